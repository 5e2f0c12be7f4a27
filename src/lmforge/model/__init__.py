"""Models: one configurable decoder (GPT-2 / Llama / Qwen2 / Mistral families) and HF checkpoint interop.

    from lmforge.model import preset, Transformer, load_hf_model, save_hf_model
    model = Transformer(preset("tiny-llama"))
    save_hf_model(model, "runs/m"); model = load_hf_model("runs/m")
"""

from lmforge import lazy_exports

# names load on first use: `lmforge --help` and torch-free commands never import torch
_EXPORTS = {
    "PRESETS": "lmforge.model.config",
    "ModelConfig": "lmforge.model.config",
    "preset": "lmforge.model.config",
    "CheckpointError": "lmforge.model.hf",
    "config_from_hf": "lmforge.model.hf",
    "config_to_hf": "lmforge.model.hf",
    "load_hf_model": "lmforge.model.hf",
    "save_hf_model": "lmforge.model.hf",
    "PackedLinear": "lmforge.model.packed",
    "PackedInt8Linear": "lmforge.model.packed",
    "pack_for_cpu": "lmforge.model.packed",
    "Int8Linear": "lmforge.model.quantize",
    "quantize_int8": "lmforge.model.quantize",
    "Int4Linear": "lmforge.model.quantize",
    "quantize_int4": "lmforge.model.quantize",
    "KVCache": "lmforge.model.transformer",
    "Transformer": "lmforge.model.transformer",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(globals(), _EXPORTS)
