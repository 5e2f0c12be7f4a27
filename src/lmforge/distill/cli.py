"""`lmforge distill init`: a student cut from a teacher. Training it is `lmforge finetune --objective distill`."""

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
    from lmforge.distill.student import cut_student

    info = cut_student(args.teacher, args.out, args.layers, args.keep_every)
    print(json.dumps(info), file=sys.stdout)
    print(f"student -> {args.out}: blocks {','.join(map(str, info['kept']))} of the teacher's {info['teacher_layers']}, "
          f"{info['parameters'] / 1e6:.1f} M of {info['teacher_parameters'] / 1e6:.1f} M parameters; train it with "
          f"lmforge finetune --objective distill --teacher {args.teacher} --model {args.out} --data ...",
          file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("distill", help="knowledge distillation: cut a student from a teacher",
                       description="Distillation helpers. Training is `lmforge finetune --objective distill --teacher "
                                   "DIR`; this command prepares a student.")
    commands = p.add_subparsers(dest="distill_command", metavar="COMMAND", required=True)
    init = commands.add_parser("init", help="a student with some of the teacher's blocks (loads in transformers)",
                               formatter_class=argparse.RawDescriptionHelpFormatter,
                               description="Write a student model directory: the teacher's embeddings, final norm, "
                                           "head, tokenizer and the chosen blocks (renumbered), in HF layout.",
                               epilog="examples:\n  lmforge distill init --teacher ./SmolLM2-135M-Instruct "
                                      "--keep-every 2 --out student\n  lmforge distill init --teacher DIR --layers "
                                      "0,2,4,6 --out student")
    init.add_argument("--teacher", required=True, help="the teacher's HF model directory")
    init.add_argument("--layers", type=_layer_list, default=None, help="the teacher's blocks to keep, e.g. 0,2,4")
    init.add_argument("--keep-every", type=int, default=0, help="keep blocks 0, K, 2K, ... instead of --layers")
    init.add_argument("--out", required=True, help="the student's directory (new or empty)")
    init.set_defaults(func=cmd_init, _parser=init)
