"""Runs the studio starts: child processes of the known commands only (`[python, -m, lmforge, COMMAND..., ARGS...]`,
never a shell string), each with its output kept in a log file beside its record, so a page reload or a studio
restart finds both again. Stop is SIGINT, what Ctrl-C sends: a training run then finishes its step and saves a
resumable checkpoint. Resume starts the same argv again with `--resume`.

Records live in WORKSPACE/.studio/launches/ID.json (the argv, the pid, the exit code once known) with ID.log.
A child runs in its own session, so stopping the studio (Ctrl-C in its terminal) does not stop the runs it started.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lmforge.files import write_json
from lmforge.run_status import pid_alive
from lmforge.studio.commands import LAUNCHABLE, FormError, build_argv, out_option


class NotFound(KeyError):
    """No launch, run or file of that name in the workspace."""


@dataclass
class Launch:
    """One process the studio started. `argv`: the words after `lmforge`; `out`: its run directory relative to the
    workspace; `state`: running | exited; `returncode`: the exit status when known (a run stopped by SIGINT exits
    0 after its checkpoint; 2 is the CLI's one-line error, such as a used run directory)."""
    id: str
    command: str
    argv: list[str]
    out: str
    pid: int
    started: float
    state: str = "running"
    returncode: int | None = None
    ended: float | None = None
    stop_requested: bool = False
    values: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


class Launcher:
    """Starts, stops and resumes the known commands for a workspace; `parsers`: {command: its argparse parser}."""

    def __init__(self, workspace: str | os.PathLike, parsers: dict[str, argparse.ArgumentParser],
                 cwd: str | os.PathLike | None = None):
        self.workspace = Path(workspace).resolve()
        self.cwd = Path(cwd or os.getcwd()).resolve()
        self.parsers = parsers
        self.dir = self.workspace / ".studio" / "launches"
        self.processes: dict[str, subprocess.Popen] = {}
        self.lock = threading.Lock()

    # --- records ------------------------------------------------------------------------------------------------
    def _save(self, launch: Launch) -> None:
        write_json(self.dir / f"{launch.id}.json", launch.to_json())

    def get(self, launch_id: str) -> Launch:
        """The launch `launch_id` with its state brought up to date; NotFound when there is none."""
        import json

        if not launch_id.replace("-", "").isalnum():
            raise NotFound(launch_id)
        path = self.dir / f"{launch_id}.json"
        if not path.exists():
            raise NotFound(launch_id)
        launch = Launch(**json.loads(path.read_text(encoding="utf-8")))
        if launch.state == "running":
            process = self.processes.get(launch_id)
            code = process.poll() if process is not None else None
            if process is not None and code is not None or process is None and not pid_alive(launch.pid):
                launch.state, launch.returncode, launch.ended = "exited", code, time.time()
                self._save(launch)
        return launch

    def all(self) -> list[Launch]:
        """Every launch of the workspace, newest first."""
        if not self.dir.is_dir():
            return []
        return [self.get(p.stem) for p in sorted(self.dir.glob("*.json"), reverse=True)]

    def log(self, launch_id: str, offset: int = 0) -> tuple[str, int]:
        """The log's text from byte `offset`, up to its last complete line or carriage return, and the next offset."""
        self.get(launch_id)
        path = self.dir / f"{launch_id}.log"
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                chunk = f.read()
        except OSError:
            return "", offset
        end = max(chunk.rfind(b"\n"), chunk.rfind(b"\r")) + 1
        return chunk[:end].decode("utf-8", errors="replace"), offset + end

    # --- actions ------------------------------------------------------------------------------------------------
    def output_dir(self, command: str, argv: list[str]) -> Path:
        """The run directory `argv` names (--out, or the command's default), which must lie inside the workspace."""
        parser = self.parsers[command]
        action = out_option(parser)
        value = None
        for i, word in enumerate(argv):
            if action is not None and word in action.option_strings and i + 1 < len(argv):
                value = argv[i + 1]
            elif action is not None and any(word.startswith(s + "=") for s in action.option_strings):
                value = word.split("=", 1)[1]
        if value is None:
            raise FormError("--out: name the run directory (inside the workspace)")
        out = (self.cwd / value).resolve()
        if out == self.workspace or not out.is_relative_to(self.workspace):
            raise FormError(f"--out: {value} is outside the workspace {self.workspace}; runs are written inside it")
        return out

    def start(self, command: str, values: dict | None = None, argv: list[str] | None = None) -> Launch:
        """Start `lmforge COMMAND` with the form's `values` (or a ready `argv`, checked the same way)."""
        if command not in LAUNCHABLE:
            raise FormError(f"{command!r} is not a command the studio launches ({', '.join(LAUNCHABLE)})")
        if argv is None:
            argv = build_argv(self.parsers[command], values or {})
        out = self.output_dir(command, argv)
        with self.lock:
            for other in self.all():
                if other.state == "running" and (self.workspace / other.out).resolve() == out:
                    raise FormError(f"--out: {other.out} is in use by a run the studio started ({other.id}); stop it "
                                    "first")
            stamp = time.strftime("%Y%m%d-%H%M%S")
            launch_id = f"{stamp}-{command.replace(' ', '-')}-{os.urandom(2).hex()}"
            self.dir.mkdir(parents=True, exist_ok=True)
            log = open(self.dir / f"{launch_id}.log", "wb")  # noqa: SIM115  (the child holds it; closed below)
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            try:
                process = subprocess.Popen([sys.executable, "-m", "lmforge", *command.split(), *argv], cwd=self.cwd,
                                           stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                           start_new_session=True)
            finally:
                log.close()
            launch = Launch(id=launch_id, command=command, argv=argv, out=out.relative_to(self.workspace).as_posix(),
                            pid=process.pid, started=time.time(), values=values or {})
            self.processes[launch_id] = process
            self._save(launch)
        threading.Thread(target=self._reap, args=(launch_id, process), daemon=True).start()
        return launch

    def _reap(self, launch_id: str, process: subprocess.Popen) -> None:
        """Wait for the child, then record its exit code (no zombie is left behind)."""
        code = process.wait()
        with self.lock:
            launch = self.get(launch_id)
            launch.state, launch.returncode = "exited", code
            launch.ended = launch.ended or time.time()
            self._save(launch)

    def stop(self, launch_id: str) -> Launch:
        """Send SIGINT (Ctrl-C): a training run stops after its step with a resumable checkpoint."""
        launch = self.get(launch_id)
        if launch.state == "running":
            try:
                os.kill(launch.pid, signal.SIGINT)
            except ProcessLookupError:
                pass
            launch.stop_requested = True
            self._save(launch)
        return launch

    def resume(self, launch_id: str) -> Launch:
        """Start the launch's argv again with --resume (a training command that has a checkpoint to continue)."""
        launch = self.get(launch_id)
        if launch.state == "running":
            raise FormError(f"{launch_id} is still running")
        if not any(a.dest == "resume" for a in self.parsers[launch.command]._actions):
            raise FormError(f"lmforge {launch.command} has no --resume")
        argv = [a for a in launch.argv if a not in ("--resume", "--no-resume", "--overwrite")] + ["--resume"]
        return self.start(launch.command, launch.values, argv=argv)
