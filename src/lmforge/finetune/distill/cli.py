"""`lmforge distill init` (a student cut from a teacher) and `lmforge distill cache` (the teacher's top-k
log-probabilities over a data set). Training is `lmforge finetune --objective distill`."""

from __future__ import annotations

import argparse
import json
import sys


def _layer_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: block numbers separated by commas, e.g. 0,2,4") from None


def cmd_init(args: argparse.Namespace) -> int:
    from lmforge.finetune.distill.student import cut_student

    info = cut_student(args.teacher, args.out, args.layers, args.keep_every, args.d_ff, args.prune_by, args.calib_data,
                       args.calib_tokens)
    print(json.dumps(info), file=sys.stdout)
    width = f", MLP width {info['d_ff']} (by {info['prune_by']})" if info["d_ff"] else ""
    print(f"student -> {args.out}: blocks {','.join(map(str, info['kept']))} of the teacher's {info['teacher_layers']}"
          f"{width}, "
          f"{info['parameters'] / 1e6:.1f} M of {info['teacher_parameters'] / 1e6:.1f} M parameters; train it with "
          f"lmforge finetune --objective distill --teacher {args.teacher} --model {args.out} --data ...",
          file=sys.stderr)
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    from lmforge.config import config_from_args
    from lmforge.finetune.distill.cache import CacheConfig, build_cache

    manifest = build_cache(config_from_args(CacheConfig, args))
    print(json.dumps(manifest, indent=2))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from lmforge.finetune.distill.student import CALIB_TOKENS, PRUNE_BY

    p = sub.add_parser("distill", help="knowledge distillation: cut a student from a teacher, cache a teacher",
                       description="Distillation helpers. Training is `lmforge finetune --objective distill --teacher "
                                   "DIR`; this command prepares a student.")
    commands = p.add_subparsers(dest="distill_command", metavar="COMMAND", required=True)
    init = commands.add_parser("init", help="a student with some of the teacher's blocks (loads in transformers)",
                               formatter_class=argparse.RawDescriptionHelpFormatter,
                               description="Write a student model directory: the teacher's embeddings, final norm, "
                                           "head, tokenizer and the chosen blocks (renumbered), in HF layout.",
                               epilog="examples:\n  lmforge distill init --teacher ./SmolLM2-135M-Instruct "
                                      "--keep-every 2 --out student\n  lmforge distill init --teacher DIR --layers "
                                      "0,2,4,6 --out student\n  lmforge distill init --teacher DIR --keep-every 2 "
                                      "--d-ff 768 --out student\n  lmforge distill init --teacher DIR --keep-every 2 "
                                      "--d-ff 768 --prune-by activation --calib-data corpus.jsonl --out student")
    init.add_argument("--teacher", required=True, help="the teacher's HF model directory")
    init.add_argument("--layers", type=_layer_list, default=None, help="the teacher's blocks to keep, e.g. 0,2,4")
    init.add_argument("--keep-every", type=int, default=0, help="keep blocks 0, K, 2K, ... instead of --layers")
    init.add_argument("--d-ff", type=int, default=None, metavar="N",
                      help="also narrow every MLP to its N most important intermediate neurons (Minitron's width "
                           "pruning, ranked by --prune-by); alone, it keeps every block")
    init.add_argument("--prune-by", choices=PRUNE_BY, default=PRUNE_BY[0],
                      help="--d-ff's ranking: the norms of each neuron's weights (no data), or its mean |activation| "
                           "over --calib-data in the student as cut (Minitron's) (default: %(default)s)")
    init.add_argument("--calib-data", nargs="+", metavar="FILE",
                      help="--prune-by activation: text to measure on (txt, md, jsonl/csv/parquet with a 'text' "
                           "field, directories, globs); one row per document")
    init.add_argument("--calib-tokens", type=int, default=CALIB_TOKENS, metavar="T",
                      help="--prune-by activation: tokens measured at most (default: %(default)s)")
    init.add_argument("--out", required=True, help="the student's directory (new or empty)")
    init.set_defaults(func=cmd_init, _parser=init)

    from lmforge.config import add_config_args
    from lmforge.finetune.distill.cache import CacheConfig

    cache = commands.add_parser("cache", help="the teacher's top-k log-probabilities at every trained token of a "
                                              "data set (train with --teacher-cache, no teacher in memory)",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Run the teacher once over SFT data rendered as lmforge finetune renders "
                                            "it; keep the top-k log-probabilities and the tail's mass per trained "
                                            "token, in shards. A stopped run continues where it stopped.",
                                epilog="example:\n  lmforge distill cache --teacher ./teacher --data "
                                       "data/dataset_info.json#alpaca_en_demo --top-k 64 --out cache\n"
                                       "  lmforge finetune --objective distill --teacher-cache cache --model ./student "
                                       "--data data/dataset_info.json#alpaca_en_demo")
    add_config_args(cache, CacheConfig)
    cache.set_defaults(func=cmd_cache, _parser=cache)
