"""PNG plots of training runs, drawn headless (matplotlib's Agg backend)."""

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
    val = [(r["step"], r["val_ppl"]) for r in rows if "val_ppl" in r]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6), dpi=110)
    if train:
        a.plot(*zip(*train), lw=1, color="#3b6ea8")
    a.set(xlabel="step", ylabel="training loss", title=f"{title}: loss")
    if val:
        b.plot(*zip(*val), marker="o", color="#c4572a")
        b.set_yscale("log")
    b.set(xlabel="step", ylabel="validation perplexity (log)", title=f"{title}: perplexity")
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    png = Path(png)
    tmp = png.with_name(f".{png.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, png)
    return png
