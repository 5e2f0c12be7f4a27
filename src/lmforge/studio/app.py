"""The studio's HTTP app: JSON endpoints over a workspace's runs, the launcher and the CLI's option definitions,
and the page (studio/static: vanilla JS and a canvas chart of our own, no CDN). Every request passes the
RequestGuard of serve/security.py first (Host, Origin, and the session token for anything that changes state).

  GET  /                                  the page (it reads the token from its URL's #token=... fragment)
  GET  /api/runs                          every run: kind, model, data, status, steps, best metric, wall time,
                                          config, the command that reproduces it
  GET  /api/runs/{id}/metrics?offset=N&file=F
                                          metrics.jsonl records from byte N of file F (device:inode; another
                                          file under the name restarts at 0): {records, offset, reset, file}
  GET  /api/runs/{id}/rejects?step=S      a data pipeline's rejected documents with their step and reason
  GET  /api/commands                      the launchable commands and their options (from the CLI's parsers)
  POST /api/preview   {command, values}   the exact argv a launch would run
  POST /api/launch    {command, values}   start it: the launch record
  GET  /api/data/preview?path=&tokenizer=&template=&mask=&start=&limit=
                                          a data file through finetune's reader and the chat template: the trained
                                          spans and token counts of each example, the refused records with reasons
  GET  /api/evals?ids=A&ids=B             evaluations side by side: per task and metric, each run's value
  GET  /api/evals/items?ids=..&task=T     each item's outcome in each run (matched by the data line)
  GET  /api/checkpoints                   the runs' best/ and last/ checkpoints
  POST /api/chat      {checkpoints, messages | conversations, max_tokens, temperature, seed}
                                          one reply per checkpoint (A/B) through the one engine
  POST /api/rag       {index, question, k, mode, checkpoint?}
                                          `lmforge rag ask`: sources, and the checkpoint's answer with citations
  GET  /api/launches, /api/launches/{id}/log?offset=N
  POST /api/launches/{id}/stop | resume

Bad input (an unknown flag, a value argparse would refuse, --out outside the workspace) is a 400 whose "error"
names the flag.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Annotated

from fastapi import Query, Request  # at module level: FastAPI resolves the routes' annotations in this module's namespace

from lmforge.serve.security import RequestGuard, is_loopback
from lmforge.studio.chat import Checkpoints
from lmforge.studio.commands import LAUNCHABLE, FormError, build_argv, options
from lmforge.studio.launcher import Launcher, NotFound
from lmforge.studio.runs import file_identity, read_metrics, read_run, scan_runs

STATIC = Path(__file__).parent / "static"


class Studio:
    """What the app serves: the workspace (runs folder), the commands' parsers and the launcher."""

    def __init__(self, workspace: str | os.PathLike, parsers: dict[str, argparse.ArgumentParser],
                 cwd: str | os.PathLike | None = None):
        self.workspace = Path(workspace).resolve()
        self.parsers = {c: parsers[c] for c in LAUNCHABLE if c in parsers}
        self.launcher = Launcher(self.workspace, self.parsers, cwd)
        self.checkpoints = Checkpoints()

    def run_dir(self, run_id: str) -> Path:
        """The directory of run `run_id`, which must lie inside the workspace (NotFound otherwise)."""
        path = (self.workspace / run_id).resolve()
        if path == self.workspace or not path.is_relative_to(self.workspace) or not path.is_dir():
            raise NotFound(run_id)
        return path

    def path_in_root(self, value: str, what: str) -> Path:
        """A path the page names (relative to the folder the studio started in), which must lie inside it."""
        root = self.launcher.cwd
        path = (root / value).resolve()
        if not path.is_relative_to(root):
            raise FormError(f"{what}: {value} is outside {root}; the studio reads files inside it only")
        if not path.exists():
            raise FormError(f"{what}: {value} does not exist (relative to {root})")
        return path

    def runs(self) -> list[dict]:
        """The runs, each with the studio's launch that writes into it (its process state) where there is one."""
        out = []
        newest: dict[Path, object] = {}  # run directory -> the newest launch writing into it
        for launch in reversed(self.launcher.all()):
            newest[(self.workspace / launch.out).resolve()] = launch
        for run in scan_runs(self.workspace, self.parsers):
            item = run.to_json()
            launch = newest.get(run.path.resolve())
            if launch is not None:
                item["launch"] = launch.to_json()
                if run.status == "unknown":  # no status.json: the process the studio started is the answer
                    item["status"] = ("running" if launch.state == "running" else
                                      "finished" if launch.returncode == 0 else
                                      "stopped" if launch.stop_requested else "failed")
            out.append(item)
        return out


def create_studio_app(studio: Studio, host: str = "127.0.0.1", port: int | None = None, token: str | None = None):
    """The FastAPI app over `studio`, behind the Host / Origin / token guard for `host`:`port`. A non-loopback
    `host` needs the token for every request but the page itself. The routes by view, one small function each."""
    from fastapi import FastAPI

    app = FastAPI(title="lmforge studio", version="1")
    app.add_middleware(RequestGuard, host=host, port=port, token=token, token_for_reads=not is_loopback(host),
                       open_paths=("/",))
    _add_error_handlers(app)
    _add_page_routes(app)
    _add_run_routes(app, studio)
    _add_launch_routes(app, studio)
    _add_data_routes(app, studio)
    _add_chat_routes(app, studio)
    _add_eval_routes(app, studio)
    _add_rag_route(app, studio)
    return app


def _bad(message: str, status: int = 400):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": message}, status_code=status)


def _add_error_handlers(app) -> None:
    """A user's mistake (FormError) is a 400 with its one line; a missing run or file a 404."""
    @app.exception_handler(FormError)
    async def _form_error(request, exc: FormError):
        return _bad(str(exc))

    @app.exception_handler(NotFound)
    async def _missing(request, exc: NotFound):
        return _bad(f"not found: {exc.args[0] if exc.args else ''}", 404)


def _add_page_routes(app) -> None:
    """The page and its assets (every one shipped in the package)."""
    from fastapi.responses import FileResponse

    @app.get("/")
    async def page():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    @app.get("/static/{name}")
    async def asset(name: str):
        path = STATIC / name
        if "/" in name or name.startswith(".") or not path.is_file():
            raise NotFound(name)
        return FileResponse(path)


def _add_run_routes(app, studio: Studio) -> None:
    """Runs: the table, a run's metrics from a byte offset, its rejects and its detail."""
    @app.get("/api/runs")
    async def runs():
        return {"workspace": str(studio.workspace), "runs": studio.runs()}

    @app.get("/api/runs/{run_id:path}/metrics")
    async def metrics(run_id: str, offset: int = 0, request_file: Annotated[str, Query(alias="file")] = ""):
        path = studio.run_dir(run_id) / "metrics.jsonl"
        file = file_identity(path)
        if file != request_file and offset:  # the page read another file under this name (--overwrite)
            offset = 0
            reset = True
        else:
            reset = False
        records, offset, cut = read_metrics(path, offset)
        return {"records": records, "offset": offset, "reset": reset or cut, "file": file}

    @app.get("/api/runs/{run_id:path}/rejects")
    async def rejects(run_id: str, start: int = 0, limit: int = 20, step: str | None = None):
        from lmforge.studio.runs import read_rejects

        return {"rejects": read_rejects(studio.run_dir(run_id), max(start, 0), min(max(limit, 1), 200), step)}

    @app.get("/api/runs/{run_id:path}/detail")
    async def run_detail(run_id: str):
        run = read_run(studio.run_dir(run_id), studio.workspace, studio.parsers)
        if run is None:
            raise NotFound(run_id)
        return run.to_json()


def _add_launch_routes(app, studio: Studio) -> None:
    """Launch: the forms (the CLI's own options), the argv preview, start, the launches' logs, stop and resume."""
    @app.get("/api/commands")
    async def commands():
        return {"commands": {c: [o.to_json() for o in options(p)] for c, p in studio.parsers.items()}}

    async def _body(request: Request) -> tuple[str, dict]:
        try:
            body = await request.json()
        except ValueError:
            raise FormError("the request body is not JSON") from None
        command, values = body.get("command"), body.get("values") or {}
        if command not in studio.parsers:
            raise FormError(f"command: {command!r} is not one of {', '.join(studio.parsers)}")
        if not isinstance(values, dict):
            raise FormError("values: an object {option: value}")
        return command, values

    @app.post("/api/preview")
    async def preview(request: Request):
        import shlex

        command, values = await _body(request)
        argv = build_argv(studio.parsers[command], values)
        studio.launcher.output_dir(command, argv)
        return {"argv": ["lmforge", *command.split(), *argv],
                "command_line": shlex.join(["lmforge", *command.split(), *argv])}

    @app.post("/api/launch")
    async def launch(request: Request):
        command, values = await _body(request)
        return studio.launcher.start(command, values).to_json()

    @app.get("/api/launches")
    async def launches():
        return {"launches": [launch.to_json() for launch in studio.launcher.all()]}

    @app.get("/api/launches/{launch_id}/log")
    async def log(launch_id: str, offset: int = 0):
        text, offset = studio.launcher.log(launch_id, offset)
        return {"text": text, "offset": offset, "launch": studio.launcher.get(launch_id).to_json()}

    @app.post("/api/launches/{launch_id}/stop")
    async def stop(launch_id: str):
        return studio.launcher.stop(launch_id).to_json()

    @app.post("/api/launches/{launch_id}/resume")
    async def resume(launch_id: str):
        return studio.launcher.resume(launch_id).to_json()


def _add_data_routes(app, studio: Studio) -> None:
    """Data: the built-in templates and a data file through a template, trained spans marked."""
    @app.get("/api/templates")
    async def templates():
        from lmforge.chat.templates import BUILTIN_TEMPLATES

        return {"templates": ["model", *BUILTIN_TEMPLATES]}

    @app.get("/api/data/preview")
    def data_preview(path: str, tokenizer: str, template: str = "model", mask: str = "assistant", start: int = 0,
                     limit: int = 10, format: str = "auto"):
        from lmforge.chat.render import TemplateError
        from lmforge.config import ConfigError
        from lmforge.data.sources import CorpusError
        from lmforge.finetune.conversations import DataFormatError
        from lmforge.hub import SourceError
        from lmforge.studio.data_preview import preview_data
        from lmforge.tokenizer import TokenizerError, TokenizerFormatError

        data_path, tok_path = studio.path_in_root(path, "data"), studio.path_in_root(tokenizer, "tokenizer")
        try:
            return preview_data(data_path, tok_path, template, format, mask, max(start, 0), min(max(limit, 1), 100))
        except (ConfigError, CorpusError, DataFormatError, SourceError, TemplateError, TokenizerError,
                TokenizerFormatError) as e:  # the user's file or choice: said in one line, as the CLI says it
            raise FormError(str(e)) from None


def _add_chat_routes(app, studio: Studio) -> None:
    """Chat A/B: the runs' checkpoints, and one or two of them answering through the one engine."""
    @app.get("/api/checkpoints")
    async def checkpoints():
        root = studio.launcher.cwd
        found = []
        for run in scan_runs(studio.workspace, studio.parsers):
            for name in run.checkpoints:
                path = run.path / name
                found.append({"run": run.id, "name": name, "kind": run.kind,
                              "path": path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)})
        return {"checkpoints": found}

    @app.post("/api/chat")
    def chat(body: dict):
        from lmforge.chat.render import TemplateError
        from lmforge.config import ConfigError
        from lmforge.hub import SourceError
        from lmforge.model import CheckpointError

        names = body.get("checkpoints")
        if not isinstance(names, list) or not 1 <= len(names) <= 2 or not all(isinstance(n, str) for n in names):
            raise FormError("checkpoints: one or two checkpoint directories")
        paths = [studio.path_in_root(n, "checkpoints") for n in names]
        conversations = body.get("conversations") or [body.get("messages")] * len(paths)
        if len(conversations) != len(paths) or not all(
                isinstance(c, list) and c and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                  and m.get("role") in ("system", "user", "assistant") for m in c)
                for c in conversations):
            raise FormError("messages: a list of {role: system | user | assistant, content} per checkpoint")
        try:
            max_tokens = int(body.get("max_tokens", 128))
            temperature = float(body.get("temperature", 0.0))
            seed = int(body.get("seed", 0))
        except (TypeError, ValueError):
            raise FormError("max_tokens, temperature, seed: numbers") from None
        if not 1 <= max_tokens <= 4096 or not 0 <= temperature <= 2:
            raise FormError("max_tokens: 1 to 4096; temperature: 0 to 2")
        try:
            return {"replies": studio.checkpoints.reply(paths, conversations, max_tokens, temperature, seed)}
        except (CheckpointError, ConfigError, SourceError, TemplateError) as e:
            raise FormError(str(e)) from None


def _add_eval_routes(app, studio: Studio) -> None:
    """Evals: eval runs side by side, per task and metric, and their items."""
    def eval_runs(ids: list[str]) -> dict:
        found = {}
        for run_id in ids:
            run = read_run(studio.run_dir(run_id), studio.workspace, studio.parsers)
            if run is None or run.results is None:
                raise FormError(f"{run_id}: not an evaluation (no results.json)")
            found[run_id] = run
        return found

    @app.get("/api/evals")
    async def evals(ids: Annotated[list[str], Query()] = ()):
        from lmforge.studio.evals import compare_evals

        runs = eval_runs(ids)
        return {"rows": compare_evals({i: r.results for i, r in runs.items()}),
                "models": {i: r.model for i, r in runs.items()}}

    @app.get("/api/evals/items")
    async def eval_item_rows(task: str, ids: Annotated[list[str], Query()] = (), start: int = 0,
                             limit: int = 20):
        from lmforge.studio.evals import eval_items

        runs = eval_runs(ids)
        try:
            items = eval_items({i: r.path for i, r in runs.items()}, task, max(start, 0), min(max(limit, 1), 200))
        except ValueError as e:
            raise FormError(str(e)) from None
        return {"items": items}


def _add_rag_route(app, studio: Studio) -> None:
    @app.post("/api/rag")
    def rag(body: dict):
        """`lmforge rag ask` on an index: the sources, and with a checkpoint its answer with [n] citations."""
        from lmforge.chat.render import TemplateError
        from lmforge.config import ConfigError
        from lmforge.hub import SourceError
        from lmforge.model import CheckpointError
        from lmforge.rag.answer import AskConfig, ContextTooSmall, ask
        from lmforge.rag.index import RagIndex

        question, mode, checkpoint = body.get("question"), body.get("mode") or None, body.get("checkpoint") or None
        if not isinstance(question, str) or not question.strip():
            raise FormError("question: the text to answer")
        if mode not in (None, "sparse", "dense", "hybrid"):
            raise FormError(f"mode: {mode!r} is not sparse, dense or hybrid")
        try:
            k, max_new_tokens = int(body.get("k", 5)), int(body.get("max_new_tokens", 200))
        except (TypeError, ValueError):
            raise FormError("k, max_new_tokens: numbers") from None
        index_dir = studio.path_in_root(str(body.get("index", "")), "index")
        try:
            index = RagIndex.open(index_dir)
            if mode is None:  # as the CLI: hybrid where the index has vectors, else BM25
                mode = "hybrid" if index.cfg.dense else "sparse"
            elif mode != "sparse" and not index.cfg.dense:
                raise ConfigError(f"mode {mode}: this index has no vectors (built with --no-dense); use sparse")
            model = tokenizer = None
            if checkpoint:
                with studio.checkpoints.lock:
                    client = studio.checkpoints.client(studio.path_in_root(checkpoint, "checkpoint"))
                model, tokenizer = client.model, client.tokenizer
            with studio.checkpoints.lock:  # one generation at a time, as chat's
                return ask(index, question, model, tokenizer, AskConfig(k=k, mode=mode, max_new_tokens=max_new_tokens))
        except (CheckpointError, ConfigError, ContextTooSmall, SourceError, TemplateError) as e:
            raise FormError(str(e)) from None
