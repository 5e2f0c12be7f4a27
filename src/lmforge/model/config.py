"""`ModelConfig`: one dataclass that describes every supported decoder, plus named presets.

A model family is a set of choices here (norm, MLP, positions, biases, heads), not a class:
GPT-2 is LayerNorm + GELU + learned positions + biases; Llama is RMSNorm + SwiGLU + RoPE;
Qwen2 adds q/k/v biases; Mistral adds a sliding window.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ModelConfig:
    arch: str = "llama"  # the HF family written on export: gpt2 | llama | qwen2 | mistral
    vocab_size: int = 32000
    n_layers: int = 12
    d_model: int = 768
    n_heads: int = 12
    n_kv_heads: int | None = None  # None: = n_heads (multi-head); 1: multi-query; else grouped-query
    head_dim: int | None = None  # None: d_model // n_heads
    d_ff: int = 3072
    max_seq_len: int = 2048
    norm: str = field(default="rmsnorm", metadata={"choices": ["rmsnorm", "layernorm"]})
    norm_eps: float = 1e-5
    mlp: str = field(default="swiglu", metadata={"choices": ["swiglu", "gelu"]})
    pos: str = field(default="rope", metadata={"choices": ["rope", "learned", "alibi"]})
    rope_theta: float = 10000.0
    # HF-style scaling: {"rope_type": "linear"|"dynamic"|"yarn"|"llama3", "factor": ..., ...}
    rope_scaling: dict[str, Any] | None = None
    qkv_bias: bool = False
    proj_bias: bool = False  # biases on the attention output and MLP projections (GPT-2)
    qk_norm: bool = False
    sliding_window: int | None = None
    n_experts: int = 0  # > 0: mixture-of-experts MLP with this many experts
    experts_top_k: int = 2  # experts each token is routed to
    tie_embeddings: bool = True
    init_std: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}; set head_dim")
            self.head_dim = self.d_model // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} must be a multiple of n_kv_heads {self.n_kv_heads}")
        if self.pos == "rope" and self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}")
        if self.n_experts and not 1 <= self.experts_top_k <= self.n_experts:
            raise ValueError(f"experts_top_k must be in 1..n_experts ({self.n_experts}), got {self.experts_top_k}")

    def num_params(self, include_embeddings: bool = True) -> int:
        """Parameter count (exact for the modules in transformer.py)."""
        d, hd = self.d_model, self.head_dim
        q, kv = self.n_heads * hd, self.n_kv_heads * hd
        attn = d * (q + 2 * kv) + q * d + (q + 2 * kv if self.qkv_bias else 0) + (d if self.proj_bias else 0)
        if self.qk_norm:
            attn += 2 * hd
        n_mats = 3 if self.mlp == "swiglu" else 2
        mlp = n_mats * d * self.d_ff + ((self.d_ff + d) if self.proj_bias else 0)
        if self.n_experts:
            mlp = self.n_experts * mlp + d * self.n_experts  # experts + router
        norm = d * (2 if self.norm == "layernorm" else 1)
        per_layer = attn + mlp + 2 * norm
        total = self.n_layers * per_layer + norm
        if include_embeddings:
            total += self.vocab_size * d + (0 if self.tie_embeddings else self.vocab_size * d)
            total += self.max_seq_len * d if self.pos == "learned" else 0
        return total

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token: 6 x (non-embedding params + output head) + attention (Kaplan et al. 2020)."""
        seq_len = seq_len or self.max_seq_len
        matmul_params = self.num_params(include_embeddings=False) + self.vocab_size * self.d_model
        attention = 12 * self.n_layers * self.n_heads * self.head_dim * seq_len  # QK^T and AV, fwd + bwd
        return 6 * matmul_params + attention


def _gpt2(n_layers: int, d_model: int, n_heads: int, **kw) -> ModelConfig:
    return ModelConfig(arch="gpt2", vocab_size=50257, n_layers=n_layers, d_model=d_model, n_heads=n_heads,
                       d_ff=4 * d_model, max_seq_len=1024, norm="layernorm", mlp="gelu", pos="learned",
                       qkv_bias=True, proj_bias=True, tie_embeddings=True, bos_token_id=50256, eos_token_id=50256, **kw)


PRESETS = {
    "gpt2": lambda: _gpt2(12, 768, 12),
    "gpt2-medium": lambda: _gpt2(24, 1024, 16),
    "gpt2-large": lambda: _gpt2(36, 1280, 20),
    "gpt2-xl": lambda: _gpt2(48, 1600, 25),
    "llama-3.2-1b": lambda: ModelConfig(
        arch="llama", vocab_size=128256, n_layers=16, d_model=2048, n_heads=32, n_kv_heads=8, d_ff=8192,
        max_seq_len=131072, norm_eps=1e-5, rope_theta=500000.0, tie_embeddings=True, bos_token_id=128000,
        eos_token_id=128001, rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "qwen2.5-0.5b": lambda: ModelConfig(
        arch="qwen2", vocab_size=151936, n_layers=24, d_model=896, n_heads=14, n_kv_heads=2, d_ff=4864,
        max_seq_len=32768, norm_eps=1e-6, rope_theta=1000000.0, qkv_bias=True, tie_embeddings=True,
        bos_token_id=151643, eos_token_id=151643),
    "smollm2-135m": lambda: ModelConfig(
        arch="llama", vocab_size=49152, n_layers=30, d_model=576, n_heads=9, n_kv_heads=3, d_ff=1536,
        max_seq_len=8192, norm_eps=1e-5, rope_theta=100000.0, tie_embeddings=True, bos_token_id=0, eos_token_id=0),
    # tiny configs of each family, for tests and laptop experiments
    "tiny-gpt2": lambda: dataclasses.replace(_gpt2(2, 64, 4), vocab_size=512, max_seq_len=128),
    "tiny-llama": lambda: ModelConfig(arch="llama", vocab_size=512, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2,
                                      d_ff=176, max_seq_len=256),
    "tiny-qwen2": lambda: ModelConfig(arch="qwen2", vocab_size=512, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2,
                                      d_ff=176, max_seq_len=256, qkv_bias=True, norm_eps=1e-6, rope_theta=1e6),
    "tiny-mistral": lambda: ModelConfig(arch="mistral", vocab_size=512, n_layers=2, d_model=64, n_heads=4,
                                        n_kv_heads=1, d_ff=176, max_seq_len=256, sliding_window=16,
                                        tie_embeddings=False),
}


def preset(name: str, **overrides) -> ModelConfig:
    """A named preset, optionally with fields replaced: preset("tiny-llama", n_layers=4).

    Fields the preset derives from others follow them unless given too: head_dim (= d_model / n_heads), n_kv_heads
    (the preset's grouping: multi-head stays multi-head, GQA keeps its query heads per KV head) and GPT-2's
    d_ff (= 4 d_model). preset("gpt2", n_heads=16) is a GPT-2 with 16 heads of 48, not 16 heads of 64."""
    if name not in PRESETS:
        import difflib

        close = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise KeyError(f"unknown model preset '{name}'.{hint} Available: {', '.join(PRESETS)}")
    base = PRESETS[name]()
    if not overrides:
        return base
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"preset {name}: unknown ModelConfig field(s) {', '.join(unknown)}")
    derived = dict(overrides)
    d_model, n_heads = derived.get("d_model", base.d_model), derived.get("n_heads", base.n_heads)
    if "head_dim" not in derived and base.head_dim * base.n_heads == base.d_model:
        derived["head_dim"] = None  # recomputed from d_model and n_heads
    if "n_kv_heads" not in derived and "n_heads" in derived:
        groups = base.n_heads // base.n_kv_heads
        if n_heads % groups:
            raise ValueError(f"preset {name}: n_heads {n_heads} cannot keep its {groups} query heads per KV head; "
                             f"set n_kv_heads too")
        derived["n_kv_heads"] = n_heads // groups
    if "d_ff" not in derived and base.d_ff == 4 * base.d_model and d_model != base.d_model:
        derived["d_ff"] = 4 * d_model
    return dataclasses.replace(base, **derived)
