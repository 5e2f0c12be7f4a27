"""Progress of long work, on a terminal and off it.

On a terminal: a tqdm bar. Anywhere else (a log file, CI, `nohup`, the studio's child processes) a bar is either
silent or a mess of carriage returns, so `progress()` writes one plain line every `interval` seconds instead:
what, how far, the rate and the time left, e.g.

    lmforge: train 120/250 step (48%), 0.93 step/s, 2m19s left, loss=3.21

and a last line when the work ends (only if it wrote any). Work shorter than one interval prints nothing.
LMFORGE_PROGRESS_INTERVAL sets the interval in seconds (default 30).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class LineProgress:
    """tqdm's update / set_postfix / close / iteration, reported as a plain line every `interval` seconds."""

    def __init__(self, iterable: Iterable | None = None, total: int | float | None = None, desc: str = "",
                 unit: str = "it", initial: int | float = 0, interval: float | None = None, file=None):
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.desc, self.unit = total, desc, unit
        self.n = self.start_n = initial
        self.interval = interval if interval is not None else float(os.environ.get("LMFORGE_PROGRESS_INTERVAL", 30))
        self.file = file or sys.stderr
        self.started = self.last = time.monotonic()
        self.postfix = ""
        self.lines = 0
        self.printed_n = None
        self.closed = False

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = (self.n - self.start_n) / elapsed
        done = f"{self.n:g}" + (f"/{self.total:g}" if self.total else "") + f" {self.unit}"
        if self.total:
            done += f" ({100 * self.n / self.total:.0f}%)"
        parts = [f"{self.desc} {done}".strip(), f"{rate:.3g} {self.unit}/s" if rate >= 1 or rate == 0
                 else f"{1 / rate:.3g} s/{self.unit}"]
        if self.total and rate > 0 and self.n < self.total:
            parts.append(f"{_duration((self.total - self.n) / rate)} left")
        elif self.n >= (self.total or float("inf")):
            parts.append(f"done in {_duration(elapsed)}")
        if self.postfix:
            parts.append(self.postfix)
        return "lmforge: " + ", ".join(parts)

    def _maybe_print(self) -> None:
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self._print()

    def _print(self) -> None:
        self.lines += 1
        self.printed_n = self.n
        print(self.line(), file=self.file, flush=True)

    def update(self, n: int | float = 1) -> None:
        self.n += n
        self._maybe_print()

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        values = dict(ordered_dict or {}, **kwargs)
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def set_description(self, desc: str, refresh: bool = True) -> None:
        self.desc = desc

    def close(self) -> None:
        if not self.closed and self.lines and self.printed_n != self.n:  # a last line for work that reported
            self._print()
        self.closed = True

    def __iter__(self) -> Iterator:
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Silent(LineProgress):
    def _maybe_print(self) -> None:
        pass


def progress(iterable: Iterable | None = None, *, total: int | float | None = None, desc: str = "",
             unit: str = "it", initial: int | float = 0, enabled: bool = True, leave: bool = False, **tqdm_options):
    """A progress reporter over `iterable` or for `total` units: tqdm on a terminal, plain periodic lines elsewhere
    (module docstring), nothing when `enabled` is False. The object has update(n), set_postfix(...), close(), n."""
    if not enabled:
        return _Silent(iterable, total=total, desc=desc, unit=unit, initial=initial)
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, leave=leave, **tqdm_options)
    return LineProgress(iterable, total=total, desc=desc, unit=unit, initial=initial)
