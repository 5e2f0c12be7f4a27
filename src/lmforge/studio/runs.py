"""The runs of a workspace, read from their directories as the CLI writes them: training runs (pretrain, finetune
incl. DPO / RL / distillation, classify: config.yaml, metrics.jsonl, status.json, best/, last/), evaluations
(results.json), data pipelines (work/run.json, stats.json, rejects/ with each document's step and reason) and
synthetic-data runs (state.json, data/alpaca.jsonl, stats.json).
Nothing here is guessed from file times: the status is the run's status.json (run_status.py), or the exit of the
process the studio launched, or a file that only a finished run writes.

metrics.jsonl is read from a byte offset, so a page polling a growing file reads only the new lines.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.run_status import read_status
from lmforge.studio.commands import command_of_config, config_command

# files that make a directory a run, and what kind of run
TRAINING_MARKS = ("status.json", "metrics.jsonl", "latest.json")
SKIP_DIRS = frozenset({"best", "last", "tensorboard", "work", "data", "rejects", ".studio", "__pycache__"})


@dataclass
class Run:
    """One run directory as the Runs view shows it. `id`: its path relative to the workspace (posix); `status`:
    running | finished | stopped | failed | unknown; `wall_s`: seconds from start to end (or to now while running);
    `best`: {"metric", "value", "step"} of the best evaluation; `command`: the argv that reproduces it."""
    id: str
    path: Path
    kind: str = "unknown"
    status: str = "unknown"
    reason: str = ""
    model: str = ""
    data: str = ""
    step: int | None = None
    max_steps: int | None = None
    best: dict | None = None
    wall_s: float | None = None
    started: float | None = None
    config: dict = field(default_factory=dict)
    command: list[str] = field(default_factory=list)
    metrics: list[str] = field(default_factory=list)
    checkpoints: list[str] = field(default_factory=list)
    results: dict | None = None

    def to_json(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "path"}
        out["command_line"] = shlex.join(self.command) if self.command else ""
        return out


def file_identity(path: str | os.PathLike) -> str:
    """'device:inode' of a file ("" when it does not exist): a file replaced under the same name (written to a
    temporary name and renamed, or deleted and created again) gets another one."""
    try:
        st = os.stat(path)
    except OSError:
        return ""
    return f"{st.st_dev}:{st.st_ino}"


def read_metrics(path: str | os.PathLike, offset: int = 0) -> tuple[list[dict], int, bool]:
    """The records of metrics.jsonl from byte `offset`: (records, the offset to ask from next, reset). Only whole
    lines are read (a line still being written waits for the next call); a line a crash cut is skipped. `reset` is
    True when the file is now shorter than `offset` (a resumed run cut it back to its checkpoint's step): the
    records are then the whole file again."""
    try:
        size = os.path.getsize(path)
    except OSError:
        return [], 0, offset > 0
    reset = size < offset
    if reset:
        offset = 0
    records = []
    with open(path, "rb") as f:
        f.seek(offset)
        chunk = f.read(size - offset)
    end = chunk.rfind(b"\n") + 1  # up to the last complete line
    for line in chunk[:end].splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records, offset + end, reset


@dataclass
class MetricsSummary:
    """What the runs table shows of a metrics.jsonl, kept up to date from a byte offset: the numeric keys in order
    of appearance, the last training step, the sum of step_s, and per key its lowest and highest value with the
    first step that reached it (the Trainer keeps the first best too)."""
    offset: int = 0
    file: str = ""  # which file (device:inode): an overwritten run's new metrics.jsonl is read from its start
    keys: dict = field(default_factory=dict)
    last_step: int | None = None
    step_seconds: float = 0.0
    lowest: dict = field(default_factory=dict)
    highest: dict = field(default_factory=dict)

    def add(self, record: dict) -> None:
        step = record.get("step")
        if "loss" in record and isinstance(step, int):
            self.last_step = step
        self.step_seconds += record.get("step_s", 0) if isinstance(record.get("step_s"), (int, float)) else 0
        for key, value in record.items():
            if key == "step" or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            self.keys.setdefault(key, None)
            if key not in self.lowest or value < self.lowest[key][0]:
                self.lowest[key] = (value, step)
            if key not in self.highest or value > self.highest[key][0]:
                self.highest[key] = (value, step)


_SUMMARIES: dict[str, MetricsSummary] = {}


def metrics_summary(path: str | os.PathLike) -> MetricsSummary:
    """The summary of metrics.jsonl at `path`, reading only what was appended since the last call (the page asks
    for the runs table every second; a long run's file is not reread each time)."""
    key = os.fspath(path)
    summary = _SUMMARIES.get(key) or MetricsSummary()
    file = file_identity(path)
    if file != summary.file:  # another file now (--overwrite, a resume's rewrite): start over
        summary = MetricsSummary(file=file)
    records, offset, reset = read_metrics(path, summary.offset)
    if reset:  # cut back in place: start over
        summary = MetricsSummary(file=file)
        records, offset, _ = read_metrics(path, 0)
    for record in records:
        summary.add(record)
    summary.offset = offset
    _SUMMARIES[key] = summary
    return summary


def _read_yaml(path: Path) -> dict:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _text(value) -> str:
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return "" if value is None else str(value)


def _training(run: Run, parsers: dict[str, argparse.ArgumentParser]) -> None:
    config = _read_yaml(run.path / "config.yaml")
    run.config = config
    command = command_of_config(config, parsers) if config else None
    if command:
        run.kind = command
        run.command = config_command(command, parsers[command], config)
        if config.get("objective") not in (None, "sft") and command == "finetune":
            run.kind = f"finetune ({config['objective']})"
    run.model, run.data = _text(config.get("model")), _text(config.get("data"))
    run.max_steps = config.get("max_steps")
    status = read_status(run.path) or {}
    summary = metrics_summary(run.path / "metrics.jsonl")
    run.metrics = list(summary.keys)
    run.step = status.get("step") if status.get("state") != "running" else None
    if run.step is None:
        run.step = summary.last_step or 0
    run.max_steps = status.get("max_steps", run.max_steps)
    metric = status.get("best_metric", "val_loss")
    best = (summary.highest if status.get("higher_is_better", False) else summary.lowest).get(metric)
    if best is not None:
        run.best = {"metric": metric, "value": best[0], "step": best[1]}
    if status:
        run.status, run.reason = status.get("state", "unknown"), status.get("reason", "")
        run.started = status.get("started")
        if run.started:
            import time

            run.wall_s = round(status.get("ended", time.time()) - run.started, 1)
    else:  # a run from before status.json: its steps' own durations
        run.wall_s = round(summary.step_seconds, 1) or None
        done = run.max_steps is not None and summary.last_step is not None and summary.last_step >= run.max_steps
        run.status = "finished" if done else "unknown"
    run.checkpoints = [n for n in ("best", "last") if (run.path / n / "config.json").exists()]


def _evaluation(run: Run) -> None:
    try:
        results = json.loads((run.path / "results.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    run.kind, run.status, run.results = "eval run", "finished", results.get("results", {})
    run.model, run.config = _text(results.get("model")), results.get("config", {})
    run.data = _text(run.config.get("tasks"))


def _pipeline(run: Run) -> None:
    run.kind = "data run"
    run.config = _read_yaml(run.path / "pipeline.yaml")  # the resolved pipeline the run wrote beside its output
    run.data = _text(run.config.get("input"))
    try:  # per step: documents and characters in and out, rejection reasons (data/stats.py)
        run.results = json.loads((run.path / "stats.json").read_text(encoding="utf-8"))
        run.status = "finished"
    except (OSError, ValueError):
        run.status = "unknown"
    if run.config:
        run.command = ["lmforge", "data", "run", str(run.path / "pipeline.yaml")]


def _synth(run: Run) -> None:
    """`lmforge synth self-instruct / evol-instruct` (synth/common.py SynthRun): its stats.json (kept, rejected, the
    reasons) once a round is written; the kept items in data/, the rejects with reasons in rejects/rejects.jsonl."""
    run.kind = "synth"
    run.data = (run.path / "data" / "alpaca.jsonl").relative_to(run.path).as_posix()
    try:
        run.results = json.loads((run.path / "stats.json").read_text(encoding="utf-8"))
        run.status = "finished"
    except (OSError, ValueError):  # state.json without stats: a run that has not written a round yet, or stopped
        run.status = "unknown"


def read_rejects(run_dir: str | os.PathLike, start: int = 0, limit: int = 20, step: str | None = None,
                 text_chars: int = 400) -> list[dict]:
    """A data pipeline's rejected documents (rejects/*.jsonl.gz, in shard order): {"id", "step", "reason",
    "where", "text"} with the text cut to `text_chars`; only those of `step` when given."""
    import gzip

    out, seen = [], 0
    for path in sorted((Path(run_dir) / "rejects").glob("*.jsonl.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if step is not None and record.get("step") != step:
                    continue
                seen += 1
                if seen <= start:
                    continue
                text = str(record.get("text", ""))
                out.append({k: record.get(k) for k in ("id", "step", "reason", "where")}
                           | {"text": text[:text_chars] + ("…" if len(text) > text_chars else "")})
                if len(out) >= limit:
                    return out
    return out


def read_run(path: Path, workspace: Path, parsers: dict[str, argparse.ArgumentParser]) -> Run | None:
    """The run in directory `path` (None when it holds none)."""
    run = Run(id=path.relative_to(workspace).as_posix(), path=path)
    if (path / "config.yaml").exists() and any((path / m).exists() for m in TRAINING_MARKS):
        _training(run, parsers)
    elif (path / "results.json").exists():
        _evaluation(run)
    elif (path / "state.json").exists() and (path / "data" / "alpaca.jsonl").exists():
        _synth(run)
    elif (path / "work" / "run.json").exists() or (path / "stats.json").exists() and (path / "rejects").is_dir():
        _pipeline(run)
    else:
        return None
    return run


def scan_runs(workspace: str | os.PathLike, parsers: dict[str, argparse.ArgumentParser],
              max_depth: int = 4) -> list[Run]:
    """Every run under `workspace` (a run's own subdirectories are not searched), newest first."""
    workspace = Path(workspace).resolve()
    found = []

    def walk(d: Path, depth: int) -> None:
        run = read_run(d, workspace, parsers) if d != workspace else None
        if run is not None:
            found.append(run)
            return
        if depth >= max_depth:
            return
        try:
            children = sorted(p for p in d.iterdir() if p.is_dir() and p.name not in SKIP_DIRS
                              and not p.name.startswith("."))
        except OSError:
            return
        for child in children:
            walk(child, depth + 1)

    if workspace.is_dir():
        walk(workspace, 0)

    def started(r: Run) -> float:
        if r.started:
            return r.started
        try:
            return r.path.stat().st_mtime
        except OSError:
            return 0.0

    return sorted(found, key=started, reverse=True)
