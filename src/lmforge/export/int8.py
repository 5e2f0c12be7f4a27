"""`lmforge export int8`: a model directory with weight-only int8 matrices for lmforge's own engine.

The file holds what `quantize_int8` computes (model/quantize.py: one float32 scale per output channel, the integers
equal torchao's), so loading it skips the quantization and reads a quarter of the float32 weights' bytes. Layout:
config.json (the HF config plus `"lmforge_quantization": {"method": "int8_weight_only"}`), model.int8.safetensors
(lmforge's parameter names; `*.qweight` int8 and `*.scale` float32 for each quantized matrix, the embedding and norms
in float32), the tokenizer and generation_config.json. `load_hf_model` (and so `lmforge generate / chat / serve`)
recognises the directory. Other libraries cannot read it: for llama.cpp use `export gguf --type q8_0`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

QUANT_KEY = "lmforge_quantization"
WEIGHTS = "model.int8.safetensors"


def export_int8(model_dir: str | os.PathLike, out: str | os.PathLike) -> Path:
    from lmforge.files import StagedDirectory, save_tensors, write_json
    from lmforge.model import load_hf_model, quantize_int8
    from lmforge.model.hf import _read_config, resolve_model_dir

    d = resolve_model_dir(model_dir)
    model = quantize_int8(load_hf_model(d))
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not k.endswith("scale_bf16")}
    config = _read_config(d) | {QUANT_KEY: {"method": "int8_weight_only", "granularity": "per_output_channel"}}
    with StagedDirectory(out) as stage:
        save_tensors(state, stage.path(WEIGHTS), metadata={"format": "lmforge-int8"})
        write_json(stage.path("config.json"), config)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                     "generation_config.json", "vocab.json", "merges.txt"):
            if (d / name).exists():
                shutil.copy(d / name, stage.path(name))
    return Path(out)


def load_int8(d: Path, cfg, device: str = "cpu"):
    """The Transformer of an `export int8` directory, its Int8Linear layers filled from the file."""
    from safetensors.torch import load_file

    from lmforge.model import quantize_int8
    from lmforge.model.hf import CheckpointError
    from lmforge.model.transformer import Transformer

    tensors = load_file(str(d / WEIGHTS))
    with torch.device("meta"):
        model = Transformer(cfg)
    quantize_int8(model)  # the same modules, on the meta device: the file gives them their values
    for name, module in model.named_modules():
        if type(module).__name__ == "Int8Linear":
            if f"{name}.scale" not in tensors:
                raise CheckpointError(f"{d / WEIGHTS}: no int8 weights for {name}")
            tensors[f"{name}.scale_bf16"] = tensors[f"{name}.scale"].to(torch.bfloat16)
    missing = set(model.state_dict()) - set(tensors)
    if missing:
        raise CheckpointError(f"{d / WEIGHTS}: missing {sorted(missing)[:4]}")
    model.load_state_dict(tensors, strict=True, assign=True)
    if model.rotary is not None:
        model.rotary = type(model.rotary)(cfg)
    return model.to(device).eval()
