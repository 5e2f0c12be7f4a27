"""`lmforge pretrain`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lmforge.config import add_config_args, config_from_args
from lmforge.train.config import TrainConfig


def cmd_pretrain(args: argparse.Namespace) -> int:
    from lmforge.train.trainer import Trainer

    cfg = config_from_args(TrainConfig, args)
    trainer = Trainer(cfg)
    try:
        if trainer.is_main:
            n = trainer.model.cfg.num_params()
            print(f"model: {n / 1e6:.2f} M parameters; {trainer.accum} micro-batch(es) per step on each of "
                  f"{trainer.world} process(es); device {trainer.device}", file=sys.stderr)
        summary = trainer.fit()
        if trainer.is_main:
            print(json.dumps({k: v for k, v in summary.items() if k != "hf_config"}, indent=2))
        if "interrupted" in summary:
            if trainer.is_main:
                print(f"lmforge: interrupted at step {trainer.step}; {cfg.out}/last holds it: continue with the same "
                      "command and --resume", file=sys.stderr)
            return 130
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def cmd_export_checkpoint(args: argparse.Namespace) -> int:
    from lmforge.train.checkpoint import export_checkpoint

    for directory in args.checkpoint:
        export_checkpoint(directory)
        print(f"{directory}: wrote HF weights (model.safetensors{', ema/' if (Path(directory) / 'ema').is_dir() else ''})",
              file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="train a language model on token shards",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Pretrain a decoder on shards from `lmforge data tokenize`. Writes metrics.jsonl, "
                                   "config.yaml, and checkpoints best/ and last/ (HF layout, loadable by transformers).",
                       epilog="examples:\n  lmforge pretrain --data runs/tokens --model tiny-llama --max-steps 500 "
                              "--out runs/pt\n  lmforge pretrain --config recipe:pretrain-tiny-cpu --lr 1e-3\n"
                              "  lmforge pretrain --config recipe:pretrain-tiny-cpu --resume\n"
                              "  torchrun --nproc_per_node 2 -m lmforge pretrain --config recipe:pretrain-tiny-cpu   # DDP")
    add_config_args(p, TrainConfig)
    p.set_defaults(func=cmd_pretrain, _parser=p)

    e = sub.add_parser("export-checkpoint", help="write HF weights into sharded training checkpoints",
                       description="A sharded checkpoint (FSDP's default) holds one shard per process; training writes "
                                   "HF weights into best/ and last/ when it ends. For a run that stopped earlier, this "
                                   "reads every shard in one process and writes model.safetensors (and ema/).")
    e.add_argument("checkpoint", nargs="+", help="checkpoint directories, e.g. runs/pt/last")
    e.set_defaults(func=cmd_export_checkpoint, _parser=e)
