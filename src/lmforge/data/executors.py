"""Executors: run map tasks on a local process pool or on a Ray cluster (the same functions either way)."""

from __future__ import annotations

import logging
import os
import signal
import threading

from lmforge.config import ConfigError
from lmforge.data.tasks import run_map_task

log = logging.getLogger(__name__)



def run_local(tasks: list[tuple], workers: int, progress: bool, desc: str) -> list[dict]:
    from lmforge.progress import progress as progress_bar

    bar = progress_bar(total=len(tasks), desc=desc, unit="shard", enabled=progress)
    results = []
    if workers <= 1 or len(tasks) <= 1:
        for t in tasks:
            results.append(run_map_task(*t))
            bar.update()
    else:
        import multiprocessing as mp

        ctx = mp.get_context("fork") if hasattr(os, "fork") else mp.get_context()
        with ctx.Pool(min(workers, len(tasks)), initializer=_default_sigterm) as pool:
            for r in pool.imap_unordered(_star_map_task, tasks):
                results.append(r)
                bar.update()
    bar.close()
    return results


def _default_sigterm() -> None:
    """Pool initializer: the default SIGTERM, not a Python handler inherited from the parent (Ray's), which would
    keep Pool.terminate from stopping an idle worker."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _star_map_task(args: tuple) -> dict:
    return run_map_task(*args)


def run_ray(tasks: list[tuple], address: str | None, progress: bool, desc: str) -> list[dict]:
    try:
        import ray
    except ImportError:
        raise ConfigError("executor 'ray' needs Ray: pip install 'lmforge[ray]'") from None
    from lmforge.progress import progress as progress_bar

    if not ray.is_initialized():
        previous = signal.getsignal(signal.SIGTERM)
        ray.init(address=address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
        if threading.current_thread() is threading.main_thread():
            # ray.init installs a SIGTERM handler in this process that outlives ray.shutdown; put ours back
            signal.signal(signal.SIGTERM, previous)
    remote = ray.remote(num_cpus=1, max_retries=2)(run_map_task)
    pending = [remote.remote(*t) for t in tasks]
    results = []
    bar = progress_bar(total=len(tasks), desc=desc, unit="shard", enabled=progress)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        results.append(ray.get(done[0]))
        bar.update()
    bar.close()
    return results


