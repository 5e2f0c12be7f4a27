"""End-to-end near-duplicate removal: the command a user types against a plain datasketch script, same JSONL.

    python benchmarks/dedup_cli.py [--docs 40000]

The input is one JSONL file of real text (the Python reference and People's Daily 1998, offline): documents of
150-250 words (English) or 300-500 characters (Chinese) at random offsets, a fifth of them edited copies (a few
per cent of their words changed) of earlier ones. Both sides read the file, shingle 5 words (characters for
Chinese) of the same normalised text, compute 128-permutation MinHash signatures, find pairs at Jaccard 0.8 with
LSH, keep the first document of each group and write the kept ones as JSONL:

  lmforge     `lmforge data dedup --input FILE --out DIR` with default flags (verification on, every core)
  datasketch  one process: json.loads, the same shingles, MinHash.update_batch, MinHashLSH query + insert,
              json.dumps of the kept lines

Prints JSON: wall seconds of each (lmforge: the whole process, start-up included), the ratio, and how many
documents each kept.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/dedup.py

from lmforge.data import dedup as D  # noqa: E402


def build_corpus(path: Path, n_docs: int, seed: int = 0) -> None:
    from pydoc_data.topics import topics

    from dedup import chinese_text  # benchmarks/dedup.py: the same People's Daily text

    rng = random.Random(seed)
    words = " ".join(topics[k] for k in sorted(topics)).split()
    zh_text = chinese_text()
    docs: list[str] = []
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n_docs):
            if docs and rng.random() < 0.2:  # an edited copy of an earlier document
                base = rng.choice(docs)
                if rng.random() < 0.5 and " " in base:
                    ws = base.split()
                    for _ in range(max(1, len(ws) // 40)):
                        ws[rng.randrange(len(ws))] = rng.choice(words)
                    text = " ".join(ws)
                else:
                    cs = list(base)
                    for _ in range(max(1, len(cs) // 60)):
                        cs[rng.randrange(len(cs))] = rng.choice(zh_text)
                    text = "".join(cs)
            elif rng.random() < 0.7:
                start = rng.randrange(len(words) - 300)
                text = " ".join(words[start:start + rng.randint(150, 250)])
            else:
                start = rng.randrange(len(zh_text) - 600)
                text = zh_text[start:start + rng.randint(300, 500)]
            docs.append(text)
            f.write(json.dumps({"id": f"d{i}", "text": text}, ensure_ascii=False) + "\n")


def datasketch_script(inp: Path, out: Path, threshold: float, num_perm: int) -> int:
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    kept = 0
    with open(inp, encoding="utf-8") as f, open(out, "w", encoding="utf-8") as w:
        for line in f:
            rec = json.loads(line)
            norm = D.normalize_for_dedup(rec["text"])
            cjk = sum(1 for c in norm if D._CJK.match(c)) >= 0.3 * max(1, len(norm.replace(" ", "")))
            toks = list(norm.replace(" ", "")) if cjk else norm.split(" ")
            shingles = {" ".join(toks[i:i + 5]) for i in range(max(1, len(toks) - 4))}
            m = MinHash(num_perm=num_perm)
            m.update_batch([s.encode("utf-8") for s in shingles])
            if lsh.query(m):
                continue
            lsh.insert(rec["id"], m)
            w.write(json.dumps(rec, ensure_ascii=False) + "\n")
            kept += 1
    return kept


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=40_000)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    corpus = tmp / "corpus.jsonl"
    build_corpus(corpus, args.docs)
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "lmforge", "data", "dedup", "--input", str(corpus), "--out",
                        str(tmp / "lmforge")], capture_output=True, text=True)
    lmforge_s = time.perf_counter() - t0
    if r.returncode:
        raise SystemExit(r.stderr)
    stats = json.loads((tmp / "lmforge" / "stats.json").read_text())
    t0 = time.perf_counter()
    ds_kept = datasketch_script(corpus, tmp / "datasketch.jsonl", 0.8, 128)
    ds_s = time.perf_counter() - t0
    print(json.dumps({
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "documents": args.docs, "input_MB": round(corpus.stat().st_size / 1e6, 1),
        "lmforge_cli": {"wall_s": round(lmforge_s, 2), "kept": stats["documents_kept"],
                        "docs_per_s": round(args.docs / lmforge_s)},
        "datasketch_script": {"wall_s": round(ds_s, 2), "kept": ds_kept, "docs_per_s": round(args.docs / ds_s)},
        "speed_ratio_lmforge_over_datasketch": round(ds_s / lmforge_s, 2)}, indent=2))


if __name__ == "__main__":
    main()
