"""Virtual tokens: what prompt tuning and prefix tuning share. Both put `n` learned tokens before every sequence
that every real token attends to; the real tokens' positions start after them, as after a KV cache of length n.

So both come into the model as a KV cache that starts with the virtual tokens' keys and values (per layer): the
model's forward takes no adapter argument and holds no adapter code.
  - generation: `prefill` writes them into the first n slots of the engine's KV cache (the decoder asks
    `virtual_tokens(model)` for n);
  - a forward without a cache (training, evaluation, decoding without a cache): the pre-forward hook `attach`
    registers hands the model a `VirtualKV`, a cache that holds them and stores nothing, and puts n ones before
    the attention mask.
The methods differ only in where the keys and values come from (`keys_values`): prefix tuning learns them,
prompt tuning learns the embeddings and runs them through the model (causal attention: they never see the real
tokens, so one row serves the batch).
"""

from __future__ import annotations

import abc
import inspect
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from lmforge.model.transformer import KVCache
from lmforge.peft.adapter import Adapter


@dataclass
class VirtualTokensConfig:
    num_virtual_tokens: int = field(default=20, metadata={"check": (lambda v: v > 0, "> 0")})
    seed: int = 0  # the initial values' generator (never the global RNG)


class VirtualKV(KVCache):
    """A KV cache of n virtual tokens that stores nothing: each layer's new keys and values come back with the
    virtual ones before them (every row shares them)."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]):  # per layer (1, kv_heads, n, head_dim)
        self.k, self.v = keys, values
        self._length = self.max_len = keys[0].shape[2]
        self.static, self.pos = False, None
        self.rings = [None] * len(keys)  # every layer keeps its virtual tokens whole (no sliding-window ring)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B = k.shape[0]
        return (torch.cat([self.k[layer].to(k.dtype).expand(B, -1, -1, -1), k], dim=2),
                torch.cat([self.v[layer].to(v.dtype).expand(B, -1, -1, -1), v], dim=2))

    def advance(self, n: int) -> None:
        pass  # nothing stored: the next forward starts from the virtual tokens again


class VirtualTokens(Adapter):
    """Base of prompt and prefix tuning: `keys_values(model)` gives the virtual tokens' keys and values."""

    not_mergeable = ("a prompt- or prefix-tuning adapter has no weights to merge (its virtual tokens go before every "
                     "input); load it with lmforge.peft.load_adapter or peft")

    def __init__(self, config: VirtualTokensConfig):
        super().__init__(config)
        self._prefilled: weakref.WeakSet = weakref.WeakSet()  # the KV caches that start with the virtual tokens

    @abc.abstractmethod
    def keys_values(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per layer, the virtual tokens' keys and values, (1, kv_heads, n, head_dim) each."""

    def virtual_tokens(self) -> int:
        return self.config.num_virtual_tokens

    def attach(self, model: nn.Module) -> None:
        self._signature = inspect.signature(model.forward)
        model.register_forward_pre_hook(self._before_forward, with_kwargs=True)

    @torch.no_grad()
    def prefill(self, model: nn.Module, cache: KVCache) -> None:
        if cache.length:
            raise ValueError("the virtual tokens go into an empty KV cache")
        keys, values = self.keys_values(model)
        B = cache.k[0].shape[0]
        for i, (k, v) in enumerate(zip(keys, values)):
            cache.update(i, k.to(cache.k[i].dtype).expand(B, -1, -1, -1), v.to(cache.v[i].dtype).expand(B, -1, -1, -1))
        cache.advance(self.virtual_tokens())
        self._prefilled.add(cache)

    def _before_forward(self, model: nn.Module, args: tuple, kwargs: dict):
        """The model's pre-forward hook: a forward without a KV cache gets the virtual tokens as one (`VirtualKV`)
        and the attention mask n ones longer; a cache must be one `prefill` started."""
        inputs = self._signature.bind(*args, **kwargs).arguments
        n, cache = self.virtual_tokens(), inputs.get("cache")
        if cache is not None:
            if cache not in self._prefilled or cache.length < n:
                raise ValueError(f"a prompt- or prefix-tuned model decodes from a KV cache that starts with its {n} "
                                 "virtual tokens (lmforge.peft.prefill)")
            return None
        if inputs.get("segment_ids") is not None or inputs.get("positions") is not None:
            raise ValueError("a prompt- or prefix-tuned model takes whole unpacked sequences (no packing or explicit "
                             "positions)")
        inputs["cache"] = VirtualKV(*self.keys_values(model))
        mask = inputs.get("attention_mask")
        if mask is not None:  # the virtual tokens are always attended
            inputs["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)
        return (), inputs
