"""`lmforge finetune`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lmforge.config import add_config_args, config_from_args


def cmd_finetune(args: argparse.Namespace) -> int:
    from lmforge.finetune.run import FinetuneConfig, run_finetune

    cfg = config_from_args(FinetuneConfig, args)
    summary = run_finetune(cfg)
    shown = {k: summary[k] for k in ("steps", "initial", "final", "parameters", "data", "peak_memory_mb", "plot")
             if k in summary}
    print(json.dumps(shown, indent=2, ensure_ascii=False))
    samples = Path(cfg.out) / "samples.jsonl"
    if samples.exists():
        rows = [json.loads(line) for line in samples.read_text(encoding="utf-8").splitlines()]
        first, last = min(r["step"] for r in rows), max(r["step"] for r in rows)
        print(f"held-out answers at step {first} and {last} (all in {samples}):", file=sys.stderr)
        for r in rows:
            if r["step"] in (first, last):
                print(f"  [{r['step']}] {r['prompt'][:60]!r} -> {r['reply'][:100]!r}", file=sys.stderr)
    if "interrupted" in summary:
        print(f"lmforge: interrupted at step {summary['steps']}; {cfg.out}/last holds it: continue with the same "
              "command and --resume", file=sys.stderr)
        return 130
    adapters = cfg.method in ("lora", "dora", "qlora")
    kind = ("PEFT adapters" if adapters or cfg.method in ("prompt", "prefix")
            else "bottleneck adapters (lmforge's format)" if cfg.method == "adapter" else "HF models")
    from lmforge.finetune.run import RL_OBJECTIVES

    where = f"{cfg.out}/last" if cfg.objective in RL_OBJECTIVES else f"{cfg.out}/best and {cfg.out}/last"
    print(f"checkpoints ({kind}): {where}"
          + (f"; a full model: lmforge export merge --model {where.split()[0]} --out {cfg.out}/merged"
             if adapters else ""), file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from lmforge.finetune.run import FinetuneConfig

    p = sub.add_parser("finetune", help="instruction fine-tuning (SFT): full, freeze, LoRA, DoRA, QLoRA",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Supervised fine-tuning of a base model on instruction data (alpaca, sharegpt, "
                                   "OpenAI messages, prompt/response pairs, plain text; jsonl/json/csv/tsv/parquet, "
                                   "or a LLaMA-Factory dataset_info.json entry), rendered with the model's chat "
                                   "template or a built-in one, the loss on the replies only. LoRA checkpoints are "
                                   "PEFT adapter directories.",
                       epilog="examples:\n  lmforge finetune --model runs/quickstart/model --data qa.jsonl --out "
                              "runs/sft\n  lmforge finetune --model ./SmolLM2-135M --data data/dataset_info.json#alpaca_zh "
                              "--method dora --lora-targets q_proj v_proj\n  lmforge finetune --model DIR --data chats.jsonl "
                              "--format sharegpt --template chatml --mask last --no-packing\n"
                              "  lmforge finetune --config recipe:finetune-lora-cpu --model DIR --data FILE")
    add_config_args(p, FinetuneConfig)
    p.set_defaults(func=cmd_finetune, _parser=p)
