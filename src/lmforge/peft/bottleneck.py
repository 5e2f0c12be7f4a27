"""Bottleneck adapters (Houlsby et al. 2019): a small MLP after each block's attention and MLP output.

Each adapter maps the sublayer's output h to h + up(act(down(h))), down (d -> size) and up (size -> d); up starts
at zero, so training starts from the base model. Only the adapters train. They cannot be folded into the
weights (the non-linearity sits between them), and peft has no bottleneck-adapter type, so they save in lmforge's
own adapter directory: `adapter_config.json` (`"peft_type": "LMFORGE_BOTTLENECK"`, the size, the activation,
`base_model_name_or_path`) and `adapter_model.safetensors` under lmforge's parameter names; `load_adapter`
(peft/adapter.py) puts them back on a base model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.config import ConfigError
from lmforge.peft.adapter import Adapter, apply_adapter, register_adapter

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


@register_adapter
class BottleneckAdapters(Adapter):
    """An adapter after every block's attention and MLP; not mergeable."""

    peft_type = "LMFORGE_BOTTLENECK"
    not_mergeable = ("bottleneck adapters cannot be merged into the weights (a non-linearity sits inside them); load "
                     "them with lmforge.peft.load_adapter on the base model")

    def attach(self, model: nn.Module) -> None:
        cfg: BottleneckConfig = self.config
        if cfg.activation not in ACTIVATIONS:
            raise ConfigError(f"adapter activation: {cfg.activation!r} is not one of {', '.join(sorted(ACTIVATIONS))}")
        if model.cfg.n_experts:
            raise ConfigError("bottleneck adapters on mixture-of-experts models are not supported")
        ref = model.embed.weight
        for block in model.layers:
            for name in ("attn", "mlp"):
                inner = getattr(block, name)
                setattr(block, name, WithAdapter(inner, Bottleneck(model.cfg.d_model, cfg, ref.device, ref.dtype))
                        .train(inner.training))

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return [p for m in model.modules() if isinstance(m, WithAdapter) for p in m.adapter.parameters()]

    def adapter_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """lmforge's parameter names (layers.0.attn.adapter.down.weight ...)."""
        return {k: v.detach().contiguous() for k, v in model.state_dict().items() if ".adapter." in k}

    def load_adapter_state(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        model.load_state_dict(tensors, strict=False)

    def adapter_config(self, model: nn.Module) -> dict:
        cfg: BottleneckConfig = self.config
        return {"size": cfg.size, "activation": cfg.activation, "dropout": cfg.dropout, "layers": model.cfg.n_layers}

    @classmethod
    def from_adapter_config(cls, raw: dict, where: str) -> BottleneckAdapters:
        try:
            return cls(BottleneckConfig(int(raw["size"]), raw.get("activation", "gelu"), float(raw.get("dropout", 0.0))))
        except KeyError as e:
            raise ConfigError(f"{where}: no {e.args[0]!r}") from None


def apply_bottleneck(model: nn.Module, cfg: BottleneckConfig) -> None:
    """Freeze the model and add an adapter after every block's attention and MLP, in place."""
    apply_adapter(model, BottleneckAdapters(cfg))
