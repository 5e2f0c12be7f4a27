"""Prompt tuning (Lester et al. 2021): learned embeddings of `n` virtual tokens put before every sequence; only
they train. Saved as peft saves it (`adapter_config.json` with `"peft_type": "PROMPT_TUNING"`, the tensor
`prompt_embeddings` in adapter_model.safetensors), and `peft.PeftModel.from_pretrained` on the transformers
model gives lmforge's logits for the real tokens (tested). The embeddings start as those of `n` vocabulary
tokens drawn at random (peft's SAMPLE_VOCAB), which trains faster than noise.

The model sees them as a KV cache that starts with them (peft/virtual.py): their keys and values are those of a
forward over the embeddings alone.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from lmforge.config import ConfigError
from lmforge.model.transformer import KVCache
from lmforge.peft.adapter import apply_adapter, register_adapter
from lmforge.peft.virtual import VirtualTokens, VirtualTokensConfig


@register_adapter
class PromptTuning(VirtualTokens):
    peft_type = "PROMPT_TUNING"

    def attach(self, model: nn.Module) -> None:
        g = torch.Generator().manual_seed(self.config.seed)
        rows = torch.randint(0, model.cfg.vocab_size, (self.config.num_virtual_tokens,), generator=g)
        self.embeddings = nn.Parameter(model.embed.weight.detach()[rows.to(model.embed.weight.device)].clone())
        super().attach(model)

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return [self.embeddings]

    def keys_values(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        n = self.embeddings.shape[0]
        cache = KVCache(model.cfg, 1, n, device=self.embeddings.device, dtype=self.embeddings.dtype)
        model.forward_embeddings(self.embeddings[None], cache=cache)
        return cache.k, cache.v

    def adapter_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {"prompt_embeddings": self.embeddings.detach().contiguous()}

    def load_adapter_state(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        self.embeddings.copy_(tensors["prompt_embeddings"])

    def adapter_config(self, model: nn.Module) -> dict:
        cfg = model.cfg
        return {"task_type": "CAUSAL_LM", "num_virtual_tokens": self.config.num_virtual_tokens,
                "token_dim": cfg.d_model, "num_transformer_submodules": 1, "num_attention_heads": cfg.n_heads,
                "num_layers": cfg.n_layers, "prompt_tuning_init": "SAMPLE_VOCAB", "inference_mode": True}

    @classmethod
    def from_adapter_config(cls, raw: dict, where: str) -> PromptTuning:
        if "num_virtual_tokens" not in raw:
            raise ConfigError(f"{where}: no num_virtual_tokens")
        return cls(VirtualTokensConfig(int(raw["num_virtual_tokens"])))


def apply_prompt_tuning(model: nn.Module, num_virtual_tokens: int = 20, seed: int = 0) -> PromptTuning:
    """Freeze the model and give it `num_virtual_tokens` trainable virtual-token embeddings, in place."""
    return apply_adapter(model, PromptTuning(VirtualTokensConfig(num_virtual_tokens, seed)))
