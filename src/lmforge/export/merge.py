"""`lmforge export merge`: a base model and a PEFT adapter -> one full HF model directory.

The weights are merged exactly in float32 (peft.merge), then cast; the directory gets the tokenizer and chat template
the adapter was trained with, and a generation_config.json that stops at the template's end-of-turn token too, so
transformers, llama.cpp (after `export gguf`) and lmforge's own engine stop where the fine-tuned model learned to.
"""

from __future__ import annotations

from pathlib import Path

from lmforge.config import ConfigError


def merge_adapter(adapter_dir: str | Path, out: str | Path, base: str | None = None, dtype: str | None = None) -> Path:
    """Base model + PEFT adapter -> a full HF model directory at `out` (see the module docstring). `base`: the base
    model (default: the adapter's base_model_name_or_path); `dtype`: the saved weights' (default: the base's)."""
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
