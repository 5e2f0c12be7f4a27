"""Bottleneck adapters (Houlsby et al. 2019): a small MLP after each block's attention and MLP output.

Each adapter maps the sublayer's output h to h + up(act(down(h))), down (d -> size) and up (size -> d); up starts
at zero, so training starts from the base model. Only the adapters train. They cannot be folded into the
weights (the non-linearity sits between them), and peft has no bottleneck-adapter type, so they save in lmforge's
own adapter directory: `adapter_config.json` (`"peft_type": "LMFORGE_BOTTLENECK"`, the size, the activation,
`base_model_name_or_path`) and `adapter_model.safetensors` under lmforge's parameter names; `load_adapters` puts
them back on the base model.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.config import ConfigError

PEFT_TYPE = "LMFORGE_BOTTLENECK"
ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}


@dataclass
class BottleneckConfig:
    size: int = field(default=64, metadata={"help": "bottleneck width", "check": (lambda v: v > 0, "> 0")})
    activation: str = field(default="gelu", metadata={"choices": sorted(ACTIVATIONS)})
    dropout: float = 0.0


class Bottleneck(nn.Module):
    def __init__(self, d_model: int, cfg: BottleneckConfig, device=None, dtype=None):
        super().__init__()
        self.down = nn.Linear(d_model, cfg.size, device=device, dtype=dtype)
        self.up = nn.Linear(cfg.size, d_model, device=device, dtype=dtype)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.act = ACTIVATIONS[cfg.activation]
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(self.dropout(self.act(self.down(h))))


class WithAdapter(nn.Module):
    """A block's sublayer (attention or MLP) followed by its adapter; the sublayer keeps its name (`.inner`)."""

    def __init__(self, inner: nn.Module, adapter: Bottleneck):
        super().__init__()
        self.inner, self.adapter = inner, adapter

    def forward(self, *args, **kwargs):
        h = self.inner(*args, **kwargs)
        return h + self.adapter(h)


def has_bottleneck(model: nn.Module) -> bool:
    return any(isinstance(m, WithAdapter) for m in model.modules())


def apply_bottleneck(model: nn.Module, cfg: BottleneckConfig) -> None:
    """Freeze the model and add an adapter after every block's attention and MLP, in place."""
    if cfg.activation not in ACTIVATIONS:
        raise ConfigError(f"adapter activation: {cfg.activation!r} is not one of {', '.join(sorted(ACTIVATIONS))}")
    if model.cfg.n_experts:
        raise ConfigError("bottleneck adapters on mixture-of-experts models are not supported")
    for p in model.parameters():
        p.requires_grad_(False)
    ref = model.embed.weight
    for block in model.layers:
        for name in ("attn", "mlp"):
            inner = getattr(block, name)
            setattr(block, name, WithAdapter(inner, Bottleneck(model.cfg.d_model, cfg, ref.device, ref.dtype))
                    .train(inner.training))
    model.bottleneck = cfg


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in model.state_dict().items() if ".adapter." in k}


def save_adapters(model: nn.Module, directory: str | os.PathLike, base_model_name_or_path: str | None = None) -> None:
    from lmforge.files import StagedDirectory, save_tensors, write_json

    cfg: BottleneckConfig = model.bottleneck
    with StagedDirectory(directory) as stage:
        save_tensors(adapter_state_dict(model), stage.path("adapter_model.safetensors"), metadata={"format": "pt"})
        write_json(stage.path("adapter_config.json"), {
            "peft_type": PEFT_TYPE, "size": cfg.size, "activation": cfg.activation, "dropout": cfg.dropout,
            "base_model_name_or_path": base_model_name_or_path, "layers": model.cfg.n_layers})


def load_adapters(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Put the bottleneck adapters of an lmforge adapter directory on a base model (in place)."""
    from safetensors.torch import load_file

    from lmforge.model.hf import CheckpointError

    raw = json.loads((Path(directory) / "adapter_config.json").read_text(encoding="utf-8"))
    if raw.get("peft_type") != PEFT_TYPE:
        raise CheckpointError(f"{directory}: not a bottleneck-adapter directory (peft_type {raw.get('peft_type')!r})")
    if not has_bottleneck(model):
        apply_bottleneck(model, BottleneckConfig(int(raw["size"]), raw.get("activation", "gelu"),
                                                 float(raw.get("dropout", 0.0))))
    tensors = load_file(str(Path(directory) / "adapter_model.safetensors"))
    wanted = adapter_state_dict(model)
    if set(tensors) != set(wanted) or any(tensors[k].shape != wanted[k].shape for k in wanted):
        raise CheckpointError(f"{directory}: its adapters do not fit this model ({len(tensors)} tensors, the model "
                              f"needs {len(wanted)})")
    model.load_state_dict(tensors, strict=False)
    return model
