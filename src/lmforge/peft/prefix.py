"""Prefix tuning (Li & Liang 2021, without the reparametrising MLP, as peft's prefix_projection=False): every
attention layer gets `n` learned keys and values that all positions attend to; the real tokens' positions start
after them, as after a KV cache of that length (peft/virtual.py). Saved in peft's PREFIX_TUNING format: one
tensor `prompt_embeddings` (n, layers x 2 x kv_heads x head_dim), layer l's keys at 2l and values at 2l + 1;
peft on the transformers model gives lmforge's logits (tested).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from lmforge.config import ConfigError
from lmforge.peft.adapter import apply_adapter, register_adapter
from lmforge.peft.virtual import VirtualTokens, VirtualTokensConfig


@register_adapter
class PrefixTuning(VirtualTokens):
    peft_type = "PREFIX_TUNING"

    def attach(self, model: nn.Module) -> None:
        cfg, n = model.cfg, self.config.num_virtual_tokens
        g = torch.Generator().manual_seed(self.config.seed)
        ref = model.embed.weight
        self.keys, self.values = nn.ParameterList(), nn.ParameterList()
        for _ in range(cfg.n_layers):  # (kv_heads, n, head_dim) per layer, drawn keys then values
            shape = (cfg.n_kv_heads, n, cfg.head_dim)
            self.keys.append(nn.Parameter((torch.randn(shape, generator=g) * 0.02).to(ref.device, ref.dtype)))
            self.values.append(nn.Parameter((torch.randn(shape, generator=g) * 0.02).to(ref.device, ref.dtype)))
        super().attach(model)

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return [*self.keys, *self.values]

    def keys_values(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return [k[None] for k in self.keys], [v[None] for v in self.values]

    def adapter_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """peft's layout: (n, layers x 2 x kv_heads x head_dim), layer l's keys at 2l and values at 2l + 1."""
        parts = []
        for k, v in zip(self.keys, self.values):
            parts += [k.detach().transpose(0, 1), v.detach().transpose(0, 1)]
        return {"prompt_embeddings": torch.stack(parts, dim=1).reshape(self.config.num_virtual_tokens, -1).contiguous()}

    def load_adapter_state(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        cfg, n = model.cfg, self.config.num_virtual_tokens
        parts = tensors["prompt_embeddings"].view(n, cfg.n_layers * 2, cfg.n_kv_heads, cfg.head_dim)
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            k.copy_(parts[:, 2 * i].transpose(0, 1))
            v.copy_(parts[:, 2 * i + 1].transpose(0, 1))

    def adapter_config(self, model: nn.Module) -> dict:
        cfg = model.cfg
        token_dim = cfg.n_kv_heads * cfg.head_dim
        return {"task_type": "CAUSAL_LM", "num_virtual_tokens": self.config.num_virtual_tokens,
                "token_dim": token_dim, "num_transformer_submodules": 1, "num_attention_heads": cfg.n_kv_heads,
                "num_layers": cfg.n_layers, "encoder_hidden_size": token_dim, "prefix_projection": False,
                "inference_mode": True}

    @classmethod
    def from_adapter_config(cls, raw: dict, where: str) -> PrefixTuning:
        if raw.get("prefix_projection"):
            raise ConfigError(f"{where}: prefix_projection (the reparametrising MLP) is not supported; save the "
                              "adapter after training, when peft keeps only the prefixes")
        if "num_virtual_tokens" not in raw:
            raise ConfigError(f"{where}: no num_virtual_tokens")
        return cls(VirtualTokensConfig(int(raw["num_virtual_tokens"])))


def apply_prefix_tuning(model: nn.Module, num_virtual_tokens: int = 20, seed: int = 0) -> PrefixTuning:
    """Freeze the model and give every attention layer `num_virtual_tokens` learned keys and values, in place."""
    return apply_adapter(model, PrefixTuning(VirtualTokensConfig(num_virtual_tokens, seed)))
