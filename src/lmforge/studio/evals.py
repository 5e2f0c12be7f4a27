"""Evaluations side by side: the `lmforge eval run` directories of a workspace compared per task and metric (the
metrics its report.md shows, with their standard errors), and any item's outcome in each run next to each other
(the model's output or its choice, the reference, the item's scores), from `predictions_TASK.jsonl`.

Items are matched by the line of the task's data file they came from (`doc`), so runs over the same data line up
whatever their --limit.
"""

from __future__ import annotations

import json
import math
from pathlib import Path


def _headline(results: dict) -> list[tuple[str, float, float | None]]:
    from lmforge.eval.run import headline

    return [(metric, value, None if math.isnan(err) else err) for metric, value, err in headline(results)]


def compare_evals(runs: dict[str, dict]) -> list[dict]:
    """{run id: its results.json "results"} -> one row per (task, metric): {"task", "metric", "values": {run id:
    {"value", "stderr", "n"}}}; a run without that task or metric has no entry."""
    rows: dict[tuple[str, str], dict] = {}
    for run_id, results in runs.items():
        for task, res in results.items():
            for metric, value, err in _headline(res):
                row = rows.setdefault((task, metric), {"task": task, "metric": metric, "values": {}})
                row["values"][run_id] = {"value": value, "stderr": err, "n": res.get("n")}
    return list(rows.values())


def eval_items(run_dirs: dict[str, Path], task: str, start: int = 0, limit: int = 20) -> list[dict]:
    """Items `start` .. `start + limit` of `task` (in the first run's order, then the others' extra items):
    [{"doc": data line, "runs": {run id: the prediction row}}]."""
    if "/" in task or task.startswith("."):
        raise ValueError(f"task {task!r}")
    by_run: dict[str, dict] = {}
    order: list = []
    seen = set()
    for run_id, directory in run_dirs.items():
        rows = {}
        path = Path(directory) / f"predictions_{task}.jsonl"
        if path.exists():
            with open(path, encoding="utf-8") as f:
                for line in f:
                    try:
                        row = json.loads(line)
                    except ValueError:
                        continue
                    rows[row.get("doc")] = row
                    if row.get("doc") not in seen:
                        seen.add(row.get("doc"))
                        order.append(row.get("doc"))
        by_run[run_id] = rows
    return [{"doc": doc, "runs": {r: rows[doc] for r, rows in by_run.items() if doc in rows}}
            for doc in order[start:start + limit]]
