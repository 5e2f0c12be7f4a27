"""Models: one configurable decoder (GPT-2 / Llama / Qwen2 / Mistral families) and HF checkpoint interop.

    from lmforge.model import preset, Transformer, load_hf_model, save_hf_model
    model = Transformer(preset("tiny-llama"))
    save_hf_model(model, "runs/m"); model = load_hf_model("runs/m")
"""

from lmforge.model.config import PRESETS, ModelConfig, preset
from lmforge.model.hf import CheckpointError, config_from_hf, config_to_hf, load_hf_model, save_hf_model
from lmforge.model.packed import PackedLinear, pack_for_cpu
from lmforge.model.quantize import Int8Linear, quantize_int8
from lmforge.model.transformer import KVCache, Transformer

__all__ = ["PRESETS", "CheckpointError", "Int8Linear", "KVCache", "ModelConfig", "PackedLinear", "Transformer", "config_from_hf",
           "config_to_hf", "load_hf_model", "pack_for_cpu", "preset", "quantize_int8", "save_hf_model"]
