"""The data pipeline: readers -> cleaners -> filters -> dedup -> writers, on a local process
pool or on Ray, resumable, with every removed document accounted for.

A pipeline file (YAML) or `PipelineConfig` names the inputs, the output directory and the
steps in order:

    input: [raw/, extra/*.jsonl.zst]
    output: runs/clean
    steps:
      - fix_encoding
      - whitespace
      - pii
      - language: {keep: [en, zh], min_score: 0.5}
      - gopher_quality
      - gopher_repetition
      - minhash_dedup: {threshold: 0.8, verify: true}

How it runs. Every input file is a shard. Global steps (exact_dedup, minhash_dedup) cut the
step list into stages; stage k runs its steps on every shard in parallel (a map task) and,
when a global step follows, also writes that step's per-document signatures. The global
step then decides in one process from the signatures alone (texts are reread only to verify
candidate pairs) and stage k+1 starts from the kept documents. Map tasks are independent
functions of (config, stage, shard), so the local executor (multiprocessing) and the Ray
executor run the very same code.

Output directory:
    data/00000.jsonl.gz ...       kept documents: {"id", "text", **meta} (or .parquet; with
                                  split_by: data/<value>/00000.jsonl.gz)
    rejects/00000-s0.jsonl.gz     every removed document: id, step, reason, where, text, meta
    stats.json                    per step: documents and characters in/out, reasons, lengths
    pipeline.yaml                 the resolved configuration
    work/                         intermediate shards, signatures and .done markers (resume)

Resume: a map task whose `.done` marker exists is skipped, so rerunning an interrupted
pipeline finishes only what is missing; work/run.json (the settings and the inputs' sizes and
times) decides whether an earlier run's files may be reused. Every file is written to a temporary
name and renamed when complete: an interrupted run leaves complete shards only.

This module holds the run (`run_pipeline`; the config, `PipelineConfig`, is data/config.py's); the work is in data/tasks.py (a map
task, a global step), the executors in data/executors.py, the files in data/writers.py and the
statistics in data/stats.py.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from lmforge.config import ConfigError, from_dict, read_config_file
from lmforge.data.config import PipelineConfig
from lmforge.data.executors import run_local, run_ray
from lmforge.data.sources import resolve_inputs, split_points, splittable
from lmforge.data.stats import LENGTH_BINS, merge_stats
from lmforge.data.step import Step, build_step
from lmforge.data.tasks import run_global_step, split_stages, steps_for
from lmforge.files import atomic_write, write_json

log = logging.getLogger(__name__)


def load_pipeline(path: str | os.PathLike | None = None, **overrides: Any) -> PipelineConfig:
    data = read_config_file(path) if path else {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    cfg = from_dict(PipelineConfig, data, str(path) if path else "pipeline")
    build_steps(cfg)  # validate step names and parameters before any work starts
    from lmforge.data.sources import check_encoding

    check_encoding(cfg.encoding)
    return cfg


def build_steps(cfg: PipelineConfig) -> list[Step]:
    steps = []
    for i, spec in enumerate(cfg.steps):
        where = f"steps[{i}]"
        if isinstance(spec, str):
            steps.append(build_step(spec, {}, where))
        elif isinstance(spec, dict) and len(spec) == 1:
            (name, params), = spec.items()
            if params is not None and not isinstance(params, dict):
                raise ConfigError(f"{where}.{name}: parameters must be a mapping, got {params!r}")
            steps.append(build_step(str(name), params, where))
        else:
            raise ConfigError(f"{where}: a step is a name or a one-key mapping {{name: {{params}}}}, got {spec!r}")
    return steps


# a plain JSONL file larger than this is read as several map tasks, cut at line ends, so one big file keeps every
# core busy; fixed (not derived from the worker count) so that a rerun elsewhere plans the same shards
PIECE_BYTES = 16 << 20


def plan_shards(sources: list[str]) -> list[tuple[str, tuple[int, int] | None]]:
    """The map tasks' inputs, in order: each file whole, or a large plain JSONL file in byte ranges."""
    shards = []
    for src in sources:
        if splittable(src) and os.path.getsize(src) > PIECE_BYTES:
            shards += [(src, r) for r in split_points(src, PIECE_BYTES)]
        else:
            shards.append((src, None))
    return shards


def _input_stamps(sources: list[str]) -> list[list]:
    """Each resolved input with its size and modification time: a rerun must see the same files, unchanged."""
    stamps = []
    for src in sources:
        try:
            st = os.stat(src)
            stamps.append([src, st.st_size, st.st_mtime_ns])
        except OSError:  # builtin:NAME: the Python installation's own data
            stamps.append([src, None, sys.version])
    return stamps


def _describe_changes(before: list[list], after: list[list]) -> str:
    old, new = {s[0]: s[1:] for s in before}, {s[0]: s[1:] for s in after}

    def names(xs: list[str]) -> str:
        return ", ".join(xs[:3]) + (f" and {len(xs) - 3} more" if len(xs) > 3 else "")

    parts = [f"{what}: {names(xs)}" for what, xs in (
        ("added", sorted(set(new) - set(old))), ("removed", sorted(set(old) - set(new))),
        ("changed", sorted(k for k in set(old) & set(new) if old[k] != new[k]))) if xs]
    return "; ".join(parts) or "the order of the inputs"


def _config_fingerprint(cfg: PipelineConfig) -> str:
    relevant = {k: v for k, v in dataclasses.asdict(cfg).items()
                if k not in ("executor", "workers", "ray_address", "progress")}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_pipeline(cfg: PipelineConfig, overwrite: bool = False) -> dict:
    """Run (or resume) the pipeline; returns the merged stats, also written to stats.json."""
    if not cfg.output:
        raise ConfigError("pipeline: 'output' (the output directory) is required")
    steps = build_steps(cfg)
    sources = resolve_inputs(cfg.input)
    root = Path(cfg.output)
    state = {"config": _config_fingerprint(cfg), "inputs": _input_stamps(sources)}
    marker = root / "work" / "run.json"
    if root.exists() and any(root.iterdir()):
        earlier = json.loads(marker.read_text()) if marker.exists() else None
        finished = (root / "stats.json").exists()
        if overwrite:
            shutil.rmtree(root)
        elif earlier is None:
            raise ConfigError(f"{root}: holds other files, not an lmforge pipeline's output; choose a new output "
                              "directory or pass --overwrite")
        elif earlier != state and not finished:
            # an unfinished run (it failed or was stopped) has no complete output to protect: start over
            log.warning("%s: an earlier run there did not finish and had other settings or inputs; starting over", root)
            shutil.rmtree(root)
        elif earlier["config"] != state["config"]:
            raise ConfigError(f"{root}: holds the output of a pipeline with other settings; choose a new output "
                              "directory or pass --overwrite to replace it")
        elif earlier["inputs"] != state["inputs"]:
            raise ConfigError(f"{root}: the inputs changed since this output was written "
                              f"({_describe_changes(earlier['inputs'], state['inputs'])}); its shards belong to the "
                              "old files, so nothing is reused: pass --overwrite to run again on the current inputs")
    write_json(marker, state)
    with atomic_write(root / "pipeline.yaml") as f:
        yaml.safe_dump(dataclasses.asdict(cfg), f, allow_unicode=True, sort_keys=False)

    stages = split_stages(steps)
    cfg_dict = dataclasses.asdict(cfg)
    workers = cfg.workers or os.cpu_count() or 1
    all_stats, globals_info = [], []
    t0 = time.perf_counter()
    remove_temporaries(root)  # left by a run that was killed mid-write
    shards = plan_shards(sources)
    if cfg.executor == "local":
        steps_for(cfg)  # set the steps up once here (models, code-point tables): forked workers share them
    for k, (_, global_step) in enumerate(stages):
        tasks = [(cfg_dict, k, i, src, len(stages), rng) for i, (src, rng) in enumerate(shards)]
        desc = f"stage {k + 1}/{len(stages)}"
        try:
            if cfg.executor == "ray":
                results = run_ray(tasks, cfg.ray_address, cfg.progress, desc)
            else:
                results = run_local(tasks, workers, cfg.progress, desc)
        except BaseException:
            remove_temporaries(root)  # workers stopped mid-shard; their finished shards stay
            raise
        results.sort(key=lambda r: r["shard"])
        all_stats.append(results)
        if global_step is not None:
            log.debug("running %s over %d shards", global_step.name, len(shards))
            globals_info.append(run_global_step(cfg, k, len(shards), global_step))
    merged = [merge_stats(r) for r in all_stats]
    # one row per step in pipeline order: "read", the map steps, each global step, ...
    step_rows = [row for m in merged for row in m["steps"]]
    stats = {"inputs": sources, "shards": len(shards), "seconds": round(time.perf_counter() - t0, 2),
             "documents_read": step_rows[0]["docs_in"], "documents_kept": step_rows[-1]["docs_out"],
             "documents_rejected": _count_rejects(root), "steps": step_rows, "global_steps": globals_info,
             "length_bins": LENGTH_BINS, "lengths_in": merged[0]["lengths_in"], "lengths_out": merged[-1]["lengths_out"]}
    write_json(root / "stats.json", stats)
    return stats


def remove_temporaries(root: Path) -> None:
    for p in root.rglob(".*.tmp"):
        p.unlink(missing_ok=True)


def _count_rejects(root: Path) -> int:
    n = 0
    for p in sorted((root / "rejects").glob("*.jsonl.gz")):
        with gzip.open(p, "rb") as f:
            n += sum(1 for _ in f)
    return n


__all__ = ["PipelineConfig", "load_pipeline", "run_pipeline", "build_steps"]
