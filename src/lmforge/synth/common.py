"""What every synthetic-data pipeline shares: the run directory, the novelty filter, the data-stage checks applied
to what was generated, and the stats.

Layout of OUT/ (like the data stage's): `data/` the kept items (alpaca JSONL, and sharegpt JSONL), `rejects/` every
dropped item with its reason (`rejects.jsonl`: ROUGE-L to which instruction, which heuristic, which dedup cluster,
which eval item), `state.json` (what a resumed run continues from), `stats.json` (counts per round, rejection reasons,
lengths, tokens) and `rouge_l.png` (the histogram of each new instruction's highest ROUGE-L to the pool). Every
generated item is either kept or rejected: generated = kept + rejected.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np

from lmforge.files import atomic_write, write_json

BUILTIN_SEEDS = {"builtin:seeds-en": "seeds_en.jsonl", "builtin:seeds-zh": "seeds_zh.jsonl"}


def seed_path(spec: str) -> str:
    """The seed file a run starts from: a path, or builtin:seeds-en / builtin:seeds-zh (shipped in synth/data)."""
    if spec in BUILTIN_SEEDS:
        return str(Path(__file__).parent / "data" / BUILTIN_SEEDS[spec])
    if not Path(spec).exists():
        from lmforge.data.sources import CorpusError
        from lmforge.hub import missing_path_error

        raise CorpusError(missing_path_error(Path(spec), "seed file"))
    return spec


class NoveltyFilter:
    """The pool of instructions so far; `check(text)` -> (highest ROUGE-L to the pool, the instruction it is
    closest to). Tokenised once per instruction (the pool grows to thousands)."""

    def __init__(self, pool: list[str] | None = None):
        from lmforge.metrics import rouge_tokens

        self._tokens = rouge_tokens
        self.pool: list[str] = []
        self.toks: list[list[str]] = []
        for t in pool or []:
            self.add(t)

    def add(self, text: str) -> None:
        self.pool.append(text)
        self.toks.append(self._tokens(text))

    def check(self, text: str) -> tuple[float, str | None]:
        from lmforge.metrics import lcs_length

        cand = self._tokens(text)
        best, which = 0.0, None
        for ref, toks in zip(self.pool, self.toks):
            if not cand or not toks:
                continue
            lcs = lcs_length(toks, cand)
            if lcs == 0:
                continue
            p, r = lcs / len(cand), lcs / len(toks)
            f = 2 * p * r / (p + r)
            if f > best:
                best, which = f, ref
        return best, which


class SynthRun:
    """The run directory: resumable state, kept items, rejects, stats."""

    def __init__(self, out: str | os.PathLike, resume: bool = False, overwrite: bool = False):
        from lmforge.train.config import RunDirectoryError

        self.out = Path(out)
        state = self.out / "state.json"
        if state.exists() and not (resume or overwrite):
            raise RunDirectoryError(f"{self.out} already holds a synthetic-data run; pass --resume to continue it or "
                                    "--overwrite to start over")
        if resume and not state.exists():
            raise RunDirectoryError(f"resume: {self.out} has no state.json to continue from")
        self.state = json.loads(state.read_text(encoding="utf-8")) if resume else {}
        (self.out / "data").mkdir(parents=True, exist_ok=True)
        (self.out / "rejects").mkdir(parents=True, exist_ok=True)

    def save_state(self, state: dict) -> None:
        self.state = state
        write_json(self.out / "state.json", state)

    def write(self, kept: list[dict], rejects: list[dict], stats: dict, similarities: list[float]) -> dict:
        with atomic_write(self.out / "data" / "alpaca.jsonl") as f:
            for item in kept:
                f.write(json.dumps({k: item[k] for k in ("instruction", "input", "output")}, ensure_ascii=False) + "\n")
        with atomic_write(self.out / "data" / "sharegpt.jsonl") as f:
            for item in kept:
                prompt = item["instruction"] + (f"\n{item['input']}" if item.get("input") else "")
                f.write(json.dumps({"conversations": [{"from": "human", "value": prompt},
                                                      {"from": "gpt", "value": item["output"]}]},
                                   ensure_ascii=False) + "\n")
        with atomic_write(self.out / "rejects" / "rejects.jsonl") as f:
            for item in rejects:
                f.write(json.dumps(item, ensure_ascii=False) + "\n")
        reasons = Counter(r["reason"].split(":")[0] for r in rejects)
        lengths = [len(k["instruction"]) for k in kept]
        stats = {**stats, "generated": len(kept) + len(rejects), "kept": len(kept), "rejected": len(rejects),
                 "rejection_reasons": dict(reasons.most_common()),
                 "instruction_chars": _distribution(lengths),
                 "output_chars": _distribution([len(k["output"]) for k in kept]),
                 "rouge_l_to_pool": _distribution(similarities)}
        write_json(self.out / "stats.json", stats)
        if similarities:
            plot_histogram(similarities, self.out / "rouge_l.png")
        return stats


def _distribution(values) -> dict:
    if not len(values):
        return {}
    v = np.asarray(values, dtype=float)
    return {"mean": round(float(v.mean()), 4), "p10": round(float(np.percentile(v, 10)), 4),
            "p50": round(float(np.percentile(v, 50)), 4), "p90": round(float(np.percentile(v, 90)), 4),
            "max": round(float(v.max()), 4)}


def plot_histogram(values: list[float], png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lmforge.plots import save_figure

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=110)
    ax.hist(values, bins=np.linspace(0, 1, 21), color="#3b6ea8")
    ax.axvline(0.7, color="#c4572a", ls="--", lw=1)
    ax.set(xlabel="highest ROUGE-L to the pool (0.7: the novelty cut)", ylabel="new instructions",
           title="novelty of generated instructions")
    return save_figure(fig, png)


def data_stage_checks(kept: list[dict], eval_texts: list[str] | None = None, threshold: float = 0.8,
                      ngram: int = 13) -> tuple[list[dict], list[dict]]:
    """The data stage on generated items: the Gopher repetition rules on each output (quality), exact duplicates
    (normalised text), MinHash near-duplicates (Jaccard of 5-gram shingles >= threshold, verified), and overlap with
    a held-out eval set (its n-grams: contamination). Returns (kept, rejected with reasons)."""
    from lmforge.data.dedup import exact_keys, near_duplicates

    if not kept:
        return [], []
    from lmforge.data.document import Document
    from lmforge.data.filters import GopherRepetition

    rejected, good = [], []
    repetition = GopherRepetition()  # the data stage's repetition rules catch a model stuck in a loop
    for k in kept:
        verdict = repetition.apply(Document("synth", k["output"]))
        if isinstance(verdict, str):
            rejected.append({**k, "reason": f"quality: {verdict}"})
        else:
            good.append(k)
    kept = good
    if not kept:
        return [], rejected
    texts = [f"{k['instruction']}\n{k.get('input', '')}\n{k['output']}" for k in kept]
    first: dict = {}
    keep = np.ones(len(kept), bool)
    for i, key in enumerate(exact_keys(texts).tolist()):  # the data stage's normal form (NFKC, case, spaces)
        if key in first:
            keep[i] = False
            rejected.append({**kept[i], "reason": f"exact duplicate: of item {first[key]}",
                             "duplicate_of": kept[first[key]]["instruction"]})
        else:
            first[key] = i
    idx = np.flatnonzero(keep)
    if len(idx) > 1:
        result = near_duplicates([texts[i] for i in idx], threshold=threshold, verify=True)
        for j in np.flatnonzero(~result.keep):
            i, winner = idx[j], idx[result.cluster[j]]
            keep[i] = False
            rejected.append({**kept[i], "reason": f"near duplicate: cluster of item {winner}",
                             "duplicate_of": kept[winner]["instruction"]})
    if eval_texts:
        from lmforge.eval.contamination import check_contamination

        idx = np.flatnonzero(keep)
        report = check_contamination([texts[i] for i in idx], ((f"eval:{n}", t) for n, t in enumerate(eval_texts)),
                                     ngram=ngram, threshold=0.5)
        for j in report.contaminated:
            i = idx[j]
            keep[i] = False
            rejected.append({**kept[i], "reason": f"contamination: {report.overlap[j]:.2f} of its {ngram}-grams are in "
                                                  f"the eval set", "eval_items": report.documents[j]})
    return [k for k, ok in zip(kept, keep) if ok], rejected


def read_eval_texts(path: str | None) -> list[str]:
    """Texts of a held-out eval set to check generated items against: any structured file (every string field of a
    record joined) or a .txt file (one item per line)."""
    if not path:
        return []
    from lmforge.data.sources import iter_records

    if path.endswith(".txt"):
        return [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    out = []
    for _, rec in iter_records(path):
        out.append("\n".join(str(v) for v in rec.values() if isinstance(v, str)))
    return out
