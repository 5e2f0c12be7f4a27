"""`lmforge data tokenize`."""

from __future__ import annotations

import argparse
import sys

from lmforge.config import add_config_args, config_from_args, save_config
from lmforge.data.tokenize import TokenizeConfig, tokenize_corpus


def cmd_tokenize(args: argparse.Namespace) -> int:
    cfg = config_from_args(TokenizeConfig, args)
    cfg.progress = cfg.progress and sys.stderr.isatty()
    manifest = tokenize_corpus(cfg)
    save_config(cfg, cfg.out)
    tr, va = manifest["splits"]["train"], manifest["splits"]["val"]
    print(f"{tr['tokens']:,} train tokens in {tr['documents']:,} documents ({len(tr['shards'])} shards), "
          f"{va['tokens']:,} validation tokens in {va['documents']:,} documents, {manifest['dtype']} -> {cfg.out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="corpus tools: tokenize into training shards",
                       description="Data stage tools.")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION", parser_class=type(p))
    p.set_defaults(func=lambda a: p.print_help())
    t = dsub.add_parser("tokenize", help="corpus -> memory-mapped token shards + manifest",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="Encode every document (followed by EOS) into uint16/uint32 shards with "
                                    "document offsets, a validation split and a manifest.",
                        epilog="examples:\n  lmforge data tokenize --tokenizer runs/tok --input builtin:python-docs "
                               "--out runs/tokens\n  lmforge data tokenize --tokenizer runs/tok --input corpus/ "
                               "--val-fraction 0.005 --out runs/tokens")
    add_config_args(t, TokenizeConfig)
    t.set_defaults(func=cmd_tokenize, _parser=t)
