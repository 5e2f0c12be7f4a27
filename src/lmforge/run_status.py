"""A run directory's `status.json`: whether its run is running, finished, stopped or failed, written by the process
that runs it, so that a reader (`lmforge studio`, a script) knows instead of guessing from file times.

  {"state": "running", "pid": 4711, "host": "box", "started": 1733540000.0, "step": 0, "max_steps": 60,
   "best_metric": "val_loss", "higher_is_better": false}
  {"state": "finished" | "stopped" | "failed", ..., "ended": 1733540100.0, "step": 60, "reason": "..."}

A process that dies without writing its end (SIGKILL, out of memory, power) leaves "running" behind with its pid;
`read_status` reports such a run as failed when that pid no longer runs on this host. Times are Unix seconds.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from lmforge.files import write_json

STATUS_FILE = "status.json"
STATES = ("running", "finished", "stopped", "failed")


def mark_running(run_dir: str | os.PathLike, step: int = 0, **about) -> None:
    """Record that this process now runs the run in `run_dir` (from `step`, a resumed run's checkpoint); `about`:
    what a reader cannot know from the other files (the Trainer: max_steps, best_metric, higher_is_better)."""
    write_json(Path(run_dir) / STATUS_FILE, {"state": "running", "pid": os.getpid(), "host": socket.gethostname(),
                                             "started": time.time(), "step": step, **about})


def mark_ended(run_dir: str | os.PathLike, state: str, step: int | None = None, reason: str = "") -> None:
    """Record how the run ended: "finished" (its schedule's end), "stopped" (a signal, a step or time limit, early
    stopping: resumable) or "failed" (an error; `reason` is its message)."""
    if state not in STATES[1:]:
        raise ValueError(f"state {state!r}: one of {', '.join(STATES[1:])}")
    path = Path(run_dir) / STATUS_FILE
    try:
        status = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        status = {}
    status.update({"state": state, "ended": time.time(), "reason": reason})
    if step is not None:
        status["step"] = step
    write_json(path, status)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (and is not a zombie waiting for its parent)."""
    if pid <= 0:  # kill(0) would signal our own process group
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:  # no /proc (macOS): the kill above is the answer
        return True


def read_status(run_dir: str | os.PathLike) -> dict | None:
    """The run's status.json (None when it has none), with "running" turned into "failed" when its process is gone
    from this host (it died without recording its end)."""
    path = Path(run_dir) / STATUS_FILE
    try:
        status = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if (status.get("state") == "running" and status.get("host") == socket.gethostname()
            and not pid_alive(int(status.get("pid", 0)))):
        status.update({"state": "failed", "reason": "the process ended without recording an end (killed?)"})
    return status
