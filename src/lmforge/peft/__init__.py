"""Parameter-efficient fine-tuning: one adapter protocol (adapter.py) and its methods, LoRA / DoRA / rsLoRA / LoRA+
(lora.py) with QLoRA's NF4 base (nf4.py), bottleneck adapters (bottleneck.py), prompt tuning (prompt.py) and prefix
tuning (prefix.py), in peft's directory format where peft has the method.

    from lmforge import peft
    from lmforge.peft.lora import LoraConfig, apply_lora
    apply_lora(model, LoraConfig(r=8, targets=["q_proj", "v_proj"]))
    ... train ...
    peft.save_adapter(model, "runs/adapter", base_model_name_or_path="runs/base")
    model = peft.load_adapter(load_hf_model("runs/base"), "runs/adapter"); peft.merge(model)
"""

from lmforge import lazy_exports

# names load on first use: `lmforge --help` and torch-free commands never import torch
_EXPORTS = {name: "lmforge.peft.adapter" for name in (
    "Adapter", "adapter_of", "apply_adapter", "load_adapter", "merge", "parameter_counts", "prefill",
    "read_adapter_config", "register_adapter", "save_adapter", "set_merged", "virtual_tokens")}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(globals(), _EXPORTS)
