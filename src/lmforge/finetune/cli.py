"""`lmforge finetune` and `lmforge export merge`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lmforge.config import ConfigError, add_config_args, config_from_args


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


def merge_adapter(adapter_dir: str | Path, out: str | Path, base: str | None = None, dtype: str | None = None) -> Path:
    """Base model + PEFT adapter -> a full HF model directory (weights merged exactly in float32, then cast),
    with the tokenizer and chat template the adapter was trained with and generation_config.json stopping at the
    template's end-of-turn token too."""
    from lmforge import peft
    from lmforge.chat.stops import turn_end_ids
    from lmforge.files import write_json
    from lmforge.infer.load import torch_dtype
    from lmforge.model import load_hf_model, save_hf_model
    from lmforge.model.hf import generation_config, resolve_model_dir
    from lmforge.tokenizer import load_tokenizer
    from lmforge.train.checkpoint import TOKENIZER_FILES

    adapter_dir = Path(adapter_dir)
    adapter, raw = peft.read_adapter_config(adapter_dir)
    if not adapter.mergeable:
        raise ConfigError(f"{adapter_dir}: {adapter.not_mergeable}")
    base = base or raw.get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"{adapter_dir}: adapter_config.json names no base_model_name_or_path; pass --base DIR")
    base_dir = resolve_model_dir(base)
    model = peft.merge(peft.load_adapter(load_hf_model(base_dir), adapter_dir))
    save_hf_model(model, out, dtype=torch_dtype(dtype) if dtype else None)  # float32 / bf16 / ...: infer/load.py
    out = Path(out)
    source = adapter_dir if (adapter_dir / "tokenizer.json").exists() else base_dir
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            (out / name).write_bytes((source / name).read_bytes())
    gen = generation_config(model.cfg)
    if (out / "tokenizer.json").exists():
        stops = [i for i in turn_end_ids(load_tokenizer(out)) if i != gen.get("eos_token_id")]
        if stops:  # the chat template's end of turn stops generation too (transformers takes a list)
            gen["eos_token_id"] = ([gen["eos_token_id"]] if "eos_token_id" in gen else []) + stops
    write_json(out / "generation_config.json", gen)
    return out


def cmd_export_merge(args: argparse.Namespace) -> int:
    out = merge_adapter(args.model, args.out, args.base, args.dtype)
    print(f"merged model -> {out} (loads with transformers' AutoModelForCausalLM.from_pretrained)", file=sys.stderr)
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
