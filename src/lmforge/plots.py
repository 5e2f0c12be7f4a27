"""PNG plots of runs (training curves, the data pipeline funnel, evaluation runs compared, confusion matrices), drawn
headless (matplotlib's Agg backend) and written atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path


def plot_training(metrics_jsonl: str | os.PathLike, png: str | os.PathLike, title: str = "training") -> Path:
    """Training loss per step and validation perplexity per evaluation, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(metrics_jsonl, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    key = "val_ppl" if any("val_ppl" in r for r in rows) else "val_loss"  # task heads and DPO have no perplexity
    val = [(r["step"], r[key]) for r in rows if key in r]
    if not val and any(r.get("reward") is not None for r in rows):  # RL: the mean reward of each step's samples
        key, val = "reward", [(r["step"], r["reward"]) for r in rows if r.get("reward") is not None]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6), dpi=110)
    if train:
        a.plot(*zip(*train), lw=1, color="#3b6ea8")
    a.set(xlabel="step", ylabel="training loss", title=f"{title}: loss")
    if val:
        b.plot(*zip(*val), marker="o", color="#c4572a")
        if key == "val_ppl":
            b.set_yscale("log")
    names = {"val_ppl": ("validation perplexity (log)", "perplexity"), "val_loss": ("validation loss", "validation loss"),
             "reward": ("mean reward of the sampled completions", "reward")}
    b.set(xlabel="step", ylabel=names[key][0], title=f"{title}: {names[key][1]}")
    for ax in (a, b):
        ax.grid(alpha=0.3)
    return save_figure(fig, png)


def plot_data_stats(stats: dict, png: str | os.PathLike) -> Path:
    """Data pipeline funnel (documents left after each step, removals by step) and the
    document length histograms of input and output."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = stats["steps"]
    names = [s["step"] for s in steps]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, max(3.6, 0.32 * len(steps) + 1.5)), dpi=110)
    y = range(len(steps))
    kept = [s["docs_out"] for s in steps]
    removed = [s["docs_in"] - s["docs_out"] for s in steps]
    a.barh(y, kept, color="#3b6ea8", label="kept")
    a.barh(y, removed, left=kept, color="#c4572a", label="removed")
    a.set_yticks(list(y), names)
    a.invert_yaxis()
    a.set(xlabel="documents", title="documents after each step")
    a.legend(loc="lower right")
    bins = stats["length_bins"]
    centers = range(len(bins))
    b.bar([c - 0.2 for c in centers], stats["lengths_in"], width=0.4, color="#999999", label="input")
    b.bar([c + 0.2 for c in centers], stats["lengths_out"], width=0.4, color="#3b6ea8", label="kept")
    b.set_xticks(list(centers)[::2], [_short(v) for v in bins[::2]], rotation=45)
    b.set(xlabel="characters (at least)", ylabel="documents", title="document length")
    b.legend()
    for ax in (a, b):
        ax.grid(alpha=0.3, axis="x" if ax is a else "y")
    return save_figure(fig, png)


def _short(n: int) -> str:
    for unit, size in (("M", 1 << 20), ("k", 1 << 10)):
        if n >= size:
            return f"{n // size}{unit}"
    return str(n)


def save_figure(fig, png: str | os.PathLike) -> Path:
    """Write the figure atomically (temporary name, then rename) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    png = Path(png)
    tmp = png.with_name(f".{png.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, png)
    return png


def plot_comparison(table: dict[str, dict[str, float | None]], png: str | os.PathLike) -> Path:
    """Grouped bars: one group per task/metric, one bar per run (`table[run][task/metric] = value`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = list(table)
    keys = list(dict.fromkeys(k for r in runs for k in table[r]))
    width = 0.8 / max(len(runs), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(keys) * max(len(runs), 1) * 0.6 + 2), 4), dpi=110)
    for i, run in enumerate(runs):
        values = [table[run].get(k) or 0.0 for k in keys]
        ax.bar([x + i * width - 0.4 + width / 2 for x in range(len(keys))], values, width, label=run)
    ax.set_xticks(list(range(len(keys))), keys, rotation=30, ha="right")
    ax.set(ylabel="score", title="evaluation runs")
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    return save_figure(fig, png)


def plot_confusion(matrix, labels: list[str], png: str | os.PathLike) -> Path:
    """A confusion matrix (rows: true label, columns: predicted), counts in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    m = np.asarray(matrix)
    size = max(3.5, 0.6 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size), dpi=110)
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(j, i, str(m[i, j]), ha="center", va="center", color="white" if m[i, j] > m.max() / 2 else "black")
    ax.set(xlabel="predicted", ylabel="true", title="confusion matrix")
    return save_figure(fig, png)
