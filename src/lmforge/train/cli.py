"""`lmforge pretrain`."""

from __future__ import annotations

import argparse
import json
import sys

from lmforge.config import add_config_args, config_from_args, save_config
from lmforge.train.trainer import TrainConfig, Trainer


def cmd_pretrain(args: argparse.Namespace) -> int:
    cfg = config_from_args(TrainConfig, args)
    cfg.progress = cfg.progress and sys.stderr.isatty()
    trainer = Trainer(cfg)
    try:
        if trainer.is_main:
            save_config(cfg, cfg.out)
            n = trainer.model.cfg.num_params()
            print(f"model: {n / 1e6:.2f} M parameters; {trainer.accum} micro-batch(es) per step on each of "
                  f"{trainer.world} process(es); device {trainer.device}", file=sys.stderr)
        summary = trainer.fit()
        if trainer.is_main:
            print(json.dumps({k: v for k, v in summary.items() if k != "hf_config"}, indent=2))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
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
