"""`lmforge export int8 | int4`: model directories with weight-only int8 or int4 matrices for lmforge's own engine.

int4 is llama.cpp's Q4_0 block format (32 weights, one float16 scale; model/quantize.py), so an int4 directory holds
the same rounded numbers as a q4_0 GGUF of the model.

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


METHODS = {"int8": {"method": "int8_weight_only", "granularity": "per_output_channel"},
           "int4": {"method": "int4_weight_only", "granularity": "q4_0_blocks_of_32"}}


def export_int8(model_dir: str | os.PathLike, out: str | os.PathLike, bits: str = "int8") -> Path:
    from lmforge.files import StagedDirectory, save_tensors, write_json
    from lmforge.model import load_hf_model, quantize_int4, quantize_int8
    from lmforge.model.hf import _read_config, resolve_model_dir

    d = resolve_model_dir(model_dir)
    model = (quantize_int8 if bits == "int8" else quantize_int4)(load_hf_model(d))
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not k.endswith("scale_bf16")}
    config = _read_config(d) | {QUANT_KEY: METHODS[bits]}
    with StagedDirectory(out) as stage:
        save_tensors(state, stage.path(WEIGHTS), metadata={"format": f"lmforge-{bits}"})
        write_json(stage.path("config.json"), config)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                     "generation_config.json", "vocab.json", "merges.txt"):
            if (d / name).exists():
                shutil.copy(d / name, stage.path(name))
    return Path(out)


def load_int8(d: Path, cfg, device: str = "cpu", method: str = "int8_weight_only"):
    """The Transformer of an `export int8 / int4` directory, its quantized layers filled from the file."""
    from safetensors.torch import load_file

    from lmforge.model import quantize_int4, quantize_int8
    from lmforge.model.hf import CheckpointError
    from lmforge.model.transformer import Transformer

    tensors = load_file(str(d / WEIGHTS))
    with torch.device("meta"):
        model = Transformer(cfg)
    # the same modules, built on the meta device: the file gives them their values
    (quantize_int4 if method == "int4_weight_only" else quantize_int8)(model)
    for name, module in model.named_modules():
        if type(module).__name__ == "Int8Linear":  # its bf16 scales (for the GEMV kernel) are derived
            if f"{name}.scale" not in tensors:
                raise CheckpointError(f"{d / WEIGHTS}: no int8 weights for {name}")
            tensors[f"{name}.scale_bf16"] = tensors[f"{name}.scale"].to(torch.bfloat16)
    missing = set(model.state_dict()) - set(tensors)
    if missing:
        raise CheckpointError(f"{d / WEIGHTS}: missing {sorted(missing)[:4]}")
    model.load_state_dict(tensors, strict=True, assign=True)
    model.reset_rotary()  # rebuilt off the meta device
    return model.to(device).eval()
