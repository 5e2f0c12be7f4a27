"""`lmforge tokenizer train | encode | inspect`."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.config import add_config_args, config_from_args, save_config
from lmforge.data.sources import encoding_field, on_error_field
from lmforge.files import write_json
from lmforge.tokenizer.bpe import DEFAULT_SPECIALS
from lmforge.tokenizer.patterns import PATTERNS


@dataclass
class TokenizerTrainConfig:
    """Settings of `lmforge tokenizer train` (YAML/JSON keys are the field names)."""

    input: list[str] = field(default_factory=lambda: ["builtin:python-docs"],
                             metadata={"help": "files, directories, globs or builtin:python-docs"})
    out: str = field(default="runs/tokenizer", metadata={"help": "output directory"})
    vocab_size: int = field(default=8192, metadata={"help": "tokens in the vocabulary, special tokens included"})
    pattern: str = field(default="gpt2", metadata={
        "help": f"pre-tokenizer regex: a preset ({', '.join(PATTERNS)}) or a custom regex"})
    special: list[str] = field(default_factory=lambda: list(DEFAULT_SPECIALS),
                               metadata={"help": "special tokens, never merged or produced from text"})
    min_frequency: int = field(default=2, metadata={"help": "stop when the best pair occurs fewer times"})
    errors: str = field(default="strict", metadata={"help": "invalid UTF-8: fail naming file and byte, or "
                                                            "replace with U+FFFD", "choices": ["strict", "replace"]})
    text_field: str = field(default="text", metadata={"help": "JSON field holding the text in .jsonl input"})
    encoding: str = encoding_field()
    on_error: str = on_error_field()
    workers: int = field(default=0, metadata={"help": "processes for counting (0: one per CPU core)"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})


def cmd_train(args: argparse.Namespace) -> int:
    from lmforge.tokenizer import train_tokenizer
    from lmforge.tokenizer.inspect import compression_report

    cfg = config_from_args(TokenizerTrainConfig, args)
    out = Path(cfg.out)
    from lmforge.data.sources import RejectLog, check_encoding

    check_encoding(cfg.encoding)
    rejects = RejectLog() if cfg.on_error == "skip" else None
    t0 = time.perf_counter()
    tok = train_tokenizer(cfg.input, cfg.vocab_size, cfg.pattern, cfg.special, cfg.min_frequency,
                          cfg.errors, cfg.text_field, cfg.workers or None, cfg.progress,
                          encoding=cfg.encoding, on_bad=rejects)
    seconds = time.perf_counter() - t0
    tok.save(out)
    save_config(cfg, out)
    if rejects is not None:
        rejects.write(out)
    stats = {**tok.training_stats, "seconds": round(seconds, 3), "vocab_size": tok.vocab_size,
             "compression": compression_report(tok)}
    write_json(out / "train_stats.json", stats)
    c = stats["compression"]
    print(f"trained {tok.vocab_size} tokens on {stats['chars'] / 1e6:.2f} M characters "
          f"({stats['unique_pretokens']} distinct pre-tokens) in {seconds:.1f} s -> {out}")
    print(f"compression: English {c['en']['bytes_per_token']:.2f} bytes/token, "
          f"Chinese {c['zh']['tokens_per_cjk_char']:.2f} tokens/character")
    return 0


def _read_input_text(args: argparse.Namespace) -> str:
    if args.text is not None:
        return args.text
    if sys.stdin.isatty():
        print("(reading text from standard input; end with Ctrl-D)", file=sys.stderr)
    return sys.stdin.read()


def cmd_encode(args: argparse.Namespace) -> int:
    from lmforge.cli import UserError
    from lmforge.tokenizer import DisallowedSpecialError, load_tokenizer

    tok = load_tokenizer(args.tokenizer, backend=args.backend)
    text = _read_input_text(args)
    if args.decode:
        try:
            ids = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"--decode expects a JSON list of token ids: {e}") from None
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise UserError("--decode expects a JSON list of integer token ids")
        text = tok.decode(ids)
        # the exact text when piped; on a terminal a final newline, so the shell prompt does not join the text
        sys.stdout.write(text + ("\n" if sys.stdout.isatty() and not text.endswith("\n") else ""))
        return 0
    allowed = "all" if args.allowed_special == ["all"] else set(args.allowed_special or ())
    try:
        ids = tok.encode(text, allowed_special=allowed)
    except DisallowedSpecialError as e:
        raise UserError(f"{str(e).split(';')[0]}; pass --allowed-special TOKEN (or all) to encode it "
                        "as a special token") from None
    json.dump(ids, sys.stdout)
    sys.stdout.write("\n")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from lmforge.tokenizer import load_tokenizer
    from lmforge.tokenizer.inspect import compression_report, render_spans

    tok = load_tokenizer(args.tokenizer, backend=args.backend)
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty() and not os.environ.get("NO_COLOR"))
    print(f"{tok!r}")
    if args.text is not None:
        spans = tok.token_spans(args.text, allowed_special="all")
        print(render_spans(spans, color=color, show_ids=args.ids))
        n_bytes = len(args.text.encode("utf-8", "surrogatepass"))
        n_tokens = sum(len(ids) for _, ids in spans)
        print(f"{n_tokens} tokens, {n_bytes} bytes, {n_bytes / max(n_tokens, 1):.2f} bytes/token")
    report = compression_report(tok, args.input)
    for name, r in report.items():
        line = f"{name}: {r['bytes_per_token']:.2f} bytes/token, {r['chars_per_token']:.2f} chars/token"
        if r.get("cjk_chars"):
            line += f", {r['tokens_per_cjk_char']:.2f} tokens per Chinese character"
        print(f"{line}  ({r['tokens']} tokens on {r['source']})")
    if args.json:
        print(json.dumps(report, ensure_ascii=False, indent=2))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenizer", help="train, run and inspect byte-level BPE tokenizers",
                       description="Byte-level BPE: train on a corpus, encode/decode, inspect.")
    tsub = p.add_subparsers(dest="tokenizer_command", metavar="ACTION", parser_class=type(p))
    p.set_defaults(func=lambda a: p.print_help())

    t = tsub.add_parser("train", help="train a byte-level BPE tokenizer", formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="Train a byte-level BPE tokenizer; writes tokenizer.json (HF format), "
                                    "tokenizer_config.json, config.yaml and train_stats.json.",
                        epilog="examples:\n"
                               "  lmforge tokenizer train --input builtin:python-docs --vocab-size 4096 --out runs/tok\n"
                               "  lmforge tokenizer train --input corpus/ 'extra/*.jsonl.gz' --pattern o200k "
                               "--special '<|endoftext|>' --out runs/tok\n"
                               "  lmforge tokenizer train --config tok.yaml --vocab-size 32768")
    add_config_args(t, TokenizerTrainConfig)
    t.set_defaults(func=cmd_train, _parser=t)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--tokenizer", required=True, metavar="DIR",
                        help="tokenizer directory (tokenizer.json, or encoder.json + vocab.bpe) or file")
    common.add_argument("--backend", default="auto", choices=["auto", "lmforge", "hf"],
                        help="lmforge's BPE, the tokenizers library, or auto (default)")
    common.add_argument("--text", help="text to process (default: standard input)")

    e = tsub.add_parser("encode", parents=[common], help="text -> token ids (JSON); --decode for the reverse",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        epilog="examples:\n  echo '你好 world' | lmforge tokenizer encode --tokenizer runs/tok\n"
                               "  lmforge tokenizer encode --tokenizer runs/tok --decode --text '[72, 105]'")
    e.add_argument("--decode", action="store_true", help="read a JSON list of ids and print the text")
    e.add_argument("--allowed-special", nargs="*", metavar="TOKEN",
                   help="special tokens to encode as specials ('all' for every one); others in the text are an error")
    e.set_defaults(func=cmd_encode, _parser=e)

    i = tsub.add_parser("inspect", parents=[common], help="show token boundaries and compression",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        epilog="examples:\n  lmforge tokenizer inspect --tokenizer runs/tok --text '模型 models'\n"
                               "  lmforge tokenizer inspect --tokenizer runs/tok --input my_corpus/")
    i.add_argument("--input", nargs="+", metavar="PATH", help="corpus to measure compression on "
                   "(default: the built-in English and Chinese samples)")
    i.add_argument("--color", default="auto", choices=["auto", "always", "never"], help="colour token boundaries")
    i.add_argument("--ids", action="store_true", help="print each token's id after it")
    i.add_argument("--json", action="store_true", help="also print the compression report as JSON")
    i.set_defaults(func=cmd_inspect, _parser=i)
