"""`lmforge quickstart`: the whole chain, offline, on the built-in corpus.

Today it runs the stages that exist: it trains a byte-level BPE tokenizer on
`builtin:python-docs`, checks it against the HF `tokenizers` library, measures compression on
English and Chinese, and writes `runs/quickstart/` with the artifacts and a report.md. Later
stages (data cleaning, pretraining, fine-tuning, RAG, serving) join as they land.
"""

from __future__ import annotations

import argparse
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.config import add_config_args, config_from_args, save_config
from lmforge.files import write_json, write_text


@dataclass
class QuickstartConfig:
    out: str = field(default="runs/quickstart", metadata={"help": "run directory"})
    corpus: list[str] = field(default_factory=lambda: ["builtin:python-docs"], metadata={"help": "training corpus"})
    vocab_size: int = field(default=4096, metadata={"help": "tokenizer vocabulary size"})
    pattern: str = field(default="gpt2", metadata={"help": "pre-tokenizer preset or regex"})


def run_quickstart(cfg: QuickstartConfig, log=print) -> dict:
    from tokenizers import Tokenizer as RustTokenizer

    from lmforge.data.sources import iter_documents
    from lmforge.tokenizer import load_tokenizer, train_tokenizer
    from lmforge.tokenizer.inspect import chinese_sample, compression_report, english_sample, render_spans

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)
    timings = {}

    t0 = time.perf_counter()
    docs = list(iter_documents(cfg.corpus))
    corpus = {"documents": len(docs), "characters": sum(len(d.text) for d in docs),
              "bytes": sum(len(d.text.encode("utf-8")) for d in docs)}
    timings["read corpus"] = time.perf_counter() - t0
    log(f"[1/3] corpus {' '.join(cfg.corpus)}: {corpus['documents']} documents, {corpus['bytes'] / 1e6:.2f} MB")

    t0 = time.perf_counter()
    tok = train_tokenizer(cfg.corpus, vocab_size=cfg.vocab_size, pattern=cfg.pattern, show_progress=False)
    tok.save(out / "tokenizer")
    timings["train tokenizer"] = time.perf_counter() - t0
    log(f"[2/3] tokenizer: {tok.vocab_size} tokens in {timings['train tokenizer']:.1f} s -> {out / 'tokenizer'}")

    t0 = time.perf_counter()
    reloaded = load_tokenizer(out / "tokenizer")
    hf = RustTokenizer.from_file(str(out / "tokenizer" / "tokenizer.json"))
    check_text = english_sample() + chinese_sample()
    ids = reloaded.encode(check_text)
    hf_ids = hf.encode(check_text, add_special_tokens=False).ids
    checks = {"round_trip": reloaded.decode(ids) == check_text, "matches_hf_tokenizers": ids == hf_ids,
              "matches_reference_encoder": ids == reloaded.encode(check_text, reference=True)}
    compression = compression_report(reloaded)
    timings["check + measure"] = time.perf_counter() - t0
    log(f"[3/3] checks: {checks}")

    sample = "Python 的列表推导式 (list comprehension) is concise."
    spans = render_spans(reloaded.token_spans(sample), color=False)
    en, zh = compression["en"], compression["zh"]
    report = f"""# lmforge quickstart

Run on {platform.node() or 'this machine'} ({platform.machine()}, Python {platform.python_version()}),
{time.strftime('%Y-%m-%d %H:%M')}.

## Corpus
`{' '.join(cfg.corpus)}`: {corpus['documents']} documents, {corpus['characters']:,} characters, {corpus['bytes']:,} bytes.

## Tokenizer
Byte-level BPE, pattern `{cfg.pattern}`, {tok.vocab_size} tokens (specials: {', '.join(tok.special_tokens)}),
trained from {tok.training_stats['unique_pretokens']:,} distinct pre-tokens in {timings['train tokenizer']:.1f} s.

| text | bytes/token | chars/token | tokens per Chinese character |
|---|---|---|---|
| English ({en['source']}) | {en['bytes_per_token']:.2f} | {en['chars_per_token']:.2f} | |
| Chinese ({zh['source']}) | {zh['bytes_per_token']:.2f} | {zh['chars_per_token']:.2f} | {zh['tokens_per_cjk_char']:.2f} |

The corpus is English only, so Chinese falls back to byte pieces (about 3 tokens per character);
train on Chinese text to fix that (`lmforge tokenizer train --input your_zh_corpus/`).

Token boundaries of `{sample}`:

    {spans}

Checks: decode(encode(text)) == text: **{checks['round_trip']}**; ids identical to the HF `tokenizers`
library loading our tokenizer.json: **{checks['matches_hf_tokenizers']}**; tiktoken fast path identical to the
pure-Python reference encoder: **{checks['matches_reference_encoder']}**.

## Timings
""" + "\n".join(f"- {k}: {v:.2f} s" for k, v in timings.items()) + """

## Next
Pretraining, fine-tuning, evaluation, RAG and serving join this run as those stages land.
"""
    write_text(out / "report.md", report)
    summary = {"corpus": corpus, "vocab_size": tok.vocab_size, "compression": compression, "checks": checks,
               "timings_s": {k: round(v, 3) for k, v in timings.items()}}
    write_json(out / "summary.json", summary)
    log(f"report: {out / 'report.md'}")
    if not all(checks.values()):
        raise RuntimeError(f"quickstart checks failed: {checks}")
    return summary


def cmd_quickstart(args: argparse.Namespace) -> int:
    run_quickstart(config_from_args(QuickstartConfig, args))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quickstart", help="run the whole chain offline on the built-in corpus",
                       description="Train a tokenizer on the built-in corpus (later: data, pretraining, "
                                   "fine-tuning, RAG) and write a run directory with a report.",
                       epilog="example: lmforge quickstart --out runs/quickstart")
    add_config_args(p, QuickstartConfig)
    p.set_defaults(func=cmd_quickstart, _parser=p)
