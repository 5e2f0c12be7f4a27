"""`lmforge data stats`: a pipeline's stats.json as a table, a Markdown report and a PNG."""

from __future__ import annotations

import json
import os
from pathlib import Path

from lmforge.files import write_text


def load_stats(out_dir: str | os.PathLike) -> dict:
    path = Path(out_dir) / "stats.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError:
        from lmforge.data.sources import CorpusError

        raise CorpusError(f"{path}: no stats (run `lmforge data run` or `lmforge data dedup` first)") from None


def _removed(docs_in: int, docs_out: int) -> str:
    """Documents a step removed, or "+N" for the ones an expanding step (augment) added."""
    return f"{docs_in - docs_out:,}" if docs_out <= docs_in else f"+{docs_out - docs_in:,}"


def stats_table(stats: dict, top_reasons: int = 3) -> str:
    """Plain-text table: per step documents and characters in/out and the main reasons."""
    rows = [("step", "docs in", "docs out", "removed", "chars in", "chars out", "top reasons")]
    for s in stats["steps"]:
        reasons = "; ".join(f"{k} ({v})" for k, v in list(s["reasons"].items())[:top_reasons])
        rows.append((s["step"], f"{s['docs_in']:,}", f"{s['docs_out']:,}", _removed(s['docs_in'], s['docs_out']),
                     f"{s['chars_in']:,}", f"{s['chars_out']:,}", reasons))
    widths = [max(len(r[i]) for r in rows) for i in range(6)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r[:6], widths))) + "  " + r[6]
             for r in rows]
    lines.append(f"read {stats['documents_read']:,} documents, kept {stats['documents_kept']:,}, "
                 f"rejected {stats['documents_rejected']:,} (see rejects/) in {stats['seconds']} s")
    return "\n".join(lines)


def write_report(out_dir: str | os.PathLike) -> Path:
    """report.md + stats.png in the pipeline's output directory."""
    from lmforge.plots import plot_data_stats

    out = Path(out_dir)
    stats = load_stats(out)
    plot_data_stats(stats, out / "stats.png")
    md = ["# Data pipeline report", "", f"Inputs: {', '.join(stats['inputs'])}", "",
          "```", stats_table(stats, top_reasons=5), "```", "", "![funnel and lengths](stats.png)", ""]
    if stats.get("global_steps"):
        md += ["## Deduplication", ""]
        for g in stats["global_steps"]:
            md.append("- " + ", ".join(f"{k}: {v}" for k, v in g.items()))
        md.append("")
    path = out / "report.md"
    write_text(path, "\n".join(md))
    return path
