"""`ModelConfig`: one dataclass that describes every supported decoder, plus named presets.

A model family is a set of choices here, not a class (litgpt's `Config` is the model):
GPT-2 is LayerNorm + GELU + learned positions + biases; Llama is RMSNorm + SwiGLU + RoPE;
Qwen2 adds q/k/v biases; Mistral a sliding window; Qwen3 per-head q/k norms; Gemma 2/3 (1 + w)
norms around both sublayers, GeGLU, a scaled embedding, local and global layers with their own
RoPE bases and soft-capping; Phi-3 partial rotary and LongRoPE; SmolLM3 layers without RoPE;
OLMo 2 norms after each sublayer and q/k norms over the whole projection; Mixtral and Qwen3-MoE
a mixture of experts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

LAYER_TYPES = ("full_attention", "sliding_attention")  # transformers' names for a layer's attention span


@dataclass
class ModelConfig:
    arch: str = "llama"  # the HF model_type written on export (model/hf.py: SUPPORTED)
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
    # RMSNorm scales by (norm_offset + w): Gemma stores w around 0 and scales by 1 + w
    norm_offset: float = 0.0
    # the scale multiplies in float32 before the cast back (Gemma, OLMo 2); Llama casts first, then scales
    norm_scale_float32: bool = False
    # where a block's norms sit: pre (x + f(norm(x)): Llama), post (x + norm(f(x)): OLMo 2),
    # sandwich (x + norm(f(norm(x))): Gemma 2/3's four norms per layer)
    norm_placement: str = field(default="pre", metadata={"choices": ["pre", "post", "sandwich"]})
    # swiglu: silu(gate) * up; geglu: tanh-GELU(gate) * up (Gemma); gelu: one up projection (GPT-2)
    mlp: str = field(default="swiglu", metadata={"choices": ["swiglu", "geglu", "gelu"]})
    pos: str = field(default="rope", metadata={"choices": ["rope", "learned", "alibi"]})
    rope_theta: float = 10000.0
    # HF-style scaling: {"rope_type": "linear"|"dynamic"|"yarn"|"llama3"|"longrope", "factor": ..., ...}
    rope_scaling: dict[str, Any] | None = None
    rope_local_theta: float | None = None  # RoPE base of the sliding-window layers (Gemma 3); None: rope_theta
    partial_rotary: float = 1.0  # fraction of each head rotated by RoPE (Phi-4-mini 0.75); the rest passes through
    no_rope_layers: tuple[int, ...] = ()  # layers that use no positional encoding at all (SmolLM3's NoPE layers)
    qkv_bias: bool = False
    proj_bias: bool = False  # biases on the attention output and MLP projections (GPT-2)
    qk_norm: bool = False
    # head: one RMSNorm of head_dim applied to every head (Qwen3, Gemma 3); projection: over the whole q and k
    # projections before they split into heads (OLMo 2)
    qk_norm_scope: str = field(default="head", metadata={"choices": ["head", "projection"]})
    attn_scale: float | None = None  # scores are q.k * attn_scale; None: head_dim^-0.5 (Gemma: query_pre_attn_scalar^-0.5)
    attn_softcap: float | None = None  # scores -> c * tanh(scores / c) before the softmax (Gemma 2)
    final_softcap: float | None = None  # logits -> c * tanh(logits / c) (Gemma 2)
    scale_embeddings: bool = False  # token embeddings times sqrt(d_model), in the embedding's dtype (Gemma)
    sliding_window: int | None = None  # a sliding layer attends to this many positions, its own included
    # per layer: "full_attention" or "sliding_attention"; None: every layer slides when sliding_window is set
    layer_types: tuple[str, ...] | None = None
    n_experts: int = 0  # > 0: mixture-of-experts MLP with this many experts
    experts_top_k: int = 2  # experts each token is routed to
    moe_d_ff: int | None = None  # width of each expert's MLP; None: d_ff (d_ff stays the width of dense layers)
    moe_norm_topk: bool = True  # renormalise the chosen experts' probabilities to sum to 1 (Mixtral; Qwen3-MoE's norm_topk_prob)
    moe_layers: tuple[int, ...] | None = None  # layers whose MLP is the MoE; None: all (with n_experts > 0)
    # the load-balancing loss weight the checkpoint was trained with (its config.json's router_aux_loss_coef),
    # which training uses unless told otherwise; None: not given
    router_aux_coef: float | None = None
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
        if not 0 < self.partial_rotary <= 1:
            raise ValueError(f"partial_rotary must be in (0, 1], got {self.partial_rotary}")
        if self.pos == "rope" and self.rotary_dim % 2:
            raise ValueError(f"RoPE needs an even number of rotated dims, got {self.rotary_dim} "
                             f"(head_dim {self.head_dim} x partial_rotary {self.partial_rotary})")
        if self.n_experts and not 1 <= self.experts_top_k <= self.n_experts:
            raise ValueError(f"experts_top_k must be in 1..n_experts ({self.n_experts}), got {self.experts_top_k}")
        if self.n_experts and self.mlp == "gelu":
            raise ValueError("mixture-of-experts layers need a gated MLP (mlp 'swiglu' or 'geglu')")
        self.no_rope_layers = tuple(sorted(set(self.no_rope_layers)))
        if self.moe_layers is not None:
            self.moe_layers = tuple(sorted(set(self.moe_layers)))
        for name in ("no_rope_layers", "moe_layers"):
            bad = [i for i in getattr(self, name) or () if not 0 <= i < self.n_layers]
            if bad:
                raise ValueError(f"{name}: layer(s) {bad} outside 0..{self.n_layers - 1}")
        if self.layer_types is not None:
            self.layer_types = tuple(self.layer_types)
            if len(self.layer_types) != self.n_layers:
                raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.n_layers} layers")
            unknown = sorted(set(self.layer_types) - set(LAYER_TYPES))
            if unknown:
                raise ValueError(f"layer_types: {unknown[0]!r} is not one of {', '.join(LAYER_TYPES)}")
            if "sliding_attention" in self.layer_types and self.sliding_window is None:
                raise ValueError("layer_types names sliding_attention layers but sliding_window is not set")
        for name in ("attn_softcap", "final_softcap", "sliding_window"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")

    # --- per-layer choices ---------------------------------------------------------------------------------

    @property
    def rotary_dim(self) -> int:
        """Dims of each head that RoPE rotates (the first ones; the rest pass through)."""
        return int(self.head_dim * self.partial_rotary)

    def window(self, layer: int) -> int | None:
        """The sliding window of `layer` (None: it attends to every earlier position)."""
        if self.sliding_window is None:
            return None
        if self.layer_types is None or self.layer_types[layer] == "sliding_attention":
            return self.sliding_window
        return None

    def rope_kind(self, layer: int) -> str | None:
        """Which RoPE `layer` uses: "global", "local" (sliding layers with their own base), or None (no RoPE)."""
        if self.pos != "rope" or layer in self.no_rope_layers:
            return None
        return "local" if self.rope_local_theta is not None and self.window(layer) is not None else "global"

    def is_moe(self, layer: int) -> bool:
        return bool(self.n_experts) and (self.moe_layers is None or layer in self.moe_layers)

    def num_params(self, include_embeddings: bool = True) -> int:
        """Parameter count (exact for the modules in transformer.py)."""
        d, hd = self.d_model, self.head_dim
        q, kv = self.n_heads * hd, self.n_kv_heads * hd
        attn = d * (q + 2 * kv) + q * d + (q + 2 * kv if self.qkv_bias else 0) + (d if self.proj_bias else 0)
        if self.qk_norm:
            attn += 2 * hd if self.qk_norm_scope == "head" else q + kv
        n_mats = 2 if self.mlp == "gelu" else 3
        mlp = n_mats * d * self.d_ff + ((self.d_ff + d) if self.proj_bias else 0)
        moe = self.n_experts * 3 * d * (self.moe_d_ff or self.d_ff) + d * self.n_experts  # experts + router
        norm = d * (2 if self.norm == "layernorm" else 1)
        norms = (4 if self.norm_placement == "sandwich" else 2) * norm
        total = sum(attn + (moe if self.is_moe(i) else mlp) + norms for i in range(self.n_layers)) + norm
        if include_embeddings:
            total += self.vocab_size * d + (0 if self.tie_embeddings else self.vocab_size * d)
            total += self.max_seq_len * d if self.pos == "learned" else 0
        return total

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token: 6 x (active non-embedding params + output head) + attention (Kaplan et al.
        2020); an MoE layer counts the experts a token runs through (top-k), not all of them."""
        seq_len = seq_len or self.max_seq_len
        matmul_params = self.num_params(include_embeddings=False) + self.vocab_size * self.d_model
        idle = self.n_experts - self.experts_top_k
        matmul_params -= sum(idle * 3 * self.d_model * (self.moe_d_ff or self.d_ff)
                             for i in range(self.n_layers) if self.is_moe(i))
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
    # the shapes of two small 2025 models (benchmarks/generate.py runs them with random weights)
    "qwen3-0.6b": lambda: ModelConfig(
        arch="qwen3", vocab_size=151936, n_layers=28, d_model=1024, n_heads=16, n_kv_heads=8, head_dim=128,
        d_ff=3072, max_seq_len=40960, norm_eps=1e-6, rope_theta=1000000.0, qk_norm=True, tie_embeddings=True,
        bos_token_id=151643, eos_token_id=151645),
    "gemma-3-270m": lambda: ModelConfig(
        arch="gemma3_text", vocab_size=262144, n_layers=18, d_model=640, n_heads=4, n_kv_heads=1, head_dim=256,
        d_ff=2048, max_seq_len=32768, norm_eps=1e-6, norm_offset=1.0, norm_scale_float32=True,
        norm_placement="sandwich", mlp="geglu", rope_theta=1000000.0, rope_local_theta=10000.0, qk_norm=True,
        attn_scale=256 ** -0.5, scale_embeddings=True, sliding_window=512,
        layer_types=tuple("full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(18)),
        tie_embeddings=True, bos_token_id=2, eos_token_id=1),
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
