"""Hugging Face checkpoint interop: config.json and weight-name maps for every family in SUPPORTED.

Conversion lives beside the model, not inside it: `load_hf_model(dir)` maps a local HF directory
(model.safetensors, sharded safetensors with an index, or pytorch_model.bin read with
weights_only=True) onto lmforge's `Transformer`; `save_hf_model(model, dir)` writes the same layout
so `transformers.AutoModelForCausalLM.from_pretrained(dir)` loads it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from lmforge.files import StagedDirectory, save_tensors, write_json
from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer

SUPPORTED = ("gpt2", "llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral", "gemma2", "gemma3_text", "phi3",
             "smollm3", "olmo2")
HF_CLASS = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "mistral": "MistralForCausalLM", "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
            "mixtral": "MixtralForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
            "phi3": "Phi3ForCausalLM", "smollm3": "SmolLM3ForCausalLM", "olmo2": "Olmo2ForCausalLM"}
# buffers some checkpoints carry that are recomputed, not learned
_IGNORED = re.compile(r".*(\.attn\.bias|\.attn\.masked_bias|rotary_emb\.inv_freq)$")

# What makes each Llama-like family itself: the ModelConfig switches its modeling file fixes (anything not named
# here is Llama's: RMSNorm before each sublayer, SwiGLU, RoPE, no biases, no q/k norm).
_GEMMA = dict(mlp="geglu", norm_offset=1.0, norm_scale_float32=True, norm_placement="sandwich", scale_embeddings=True)
FAMILIES: dict[str, dict] = {
    "llama": {}, "mistral": {}, "mixtral": {}, "phi3": {}, "smollm3": {},
    "qwen2": dict(qkv_bias=True),
    "qwen3": dict(qk_norm=True), "qwen3_moe": dict(qk_norm=True),
    "gemma2": _GEMMA, "gemma3_text": dict(_GEMMA, qk_norm=True),
    "olmo2": dict(qk_norm=True, qk_norm_scope="projection", norm_placement="post", norm_scale_float32=True),
}
LLAMA_SWITCHES = dict(norm="rmsnorm", mlp="swiglu", pos="rope", qkv_bias=False, proj_bias=False, qk_norm=False,
                      qk_norm_scope="head", norm_offset=0.0, norm_scale_float32=False, norm_placement="pre",
                      scale_embeddings=False)
# what else each family's config.json can say (the rest must keep ModelConfig's defaults to be written as it):
#   window: one sliding window on every layer; layer_windows: sliding and full layers mixed (layer_types)
FEATURES: dict[str, set[str]] = {
    "llama": set(), "olmo2": set(),
    "mistral": {"window"}, "phi3": {"window", "partial_rotary"},
    "qwen2": {"window", "layer_windows"}, "qwen3": {"window", "layer_windows"},
    "qwen3_moe": {"window", "experts", "moe_layers"}, "mixtral": {"window", "experts"},
    "gemma2": {"window", "layer_windows", "attn_scale", "attn_softcap", "final_softcap"},
    "gemma3_text": {"window", "layer_windows", "attn_scale", "final_softcap", "local_rope"},
    "smollm3": {"window", "layer_windows", "no_rope"},
}
_ACTIVATION = {"gemma2": ("gelu_pytorch_tanh", "gelu_new", "gelu_fast"), "gemma3_text": ("gelu_pytorch_tanh",
                                                                                         "gelu_new", "gelu_fast")}
_DEFAULT_THETA = {"smollm3": 2000000.0, "gemma3_text": 1000000.0}


class CheckpointError(ValueError):
    """A checkpoint lmforge cannot load; the message names the file, model_type or tensor."""


class UnsupportedFeature(CheckpointError):
    """A native family's config.json uses something lmforge's decoder does not implement: `load_hf_model` runs
    such a model on the portable path (model/portable.py) instead; `reason` says what, without the file."""

    def __init__(self, where: str, reason: str):
        super().__init__(f"{where}: {reason}")
        self.reason = reason


# --- config ------------------------------------------------------------------------------

def _rope_from_hf(hf: dict, where: str, model_type: str = "llama",
                  layer_type: str = "full_attention") -> tuple[float, dict | None]:
    """(base, scaling) of the RoPE a layer type uses, from transformers 5's `rope_parameters` (one dict, or one per
    layer type) or the older `rope_theta` + `rope_scaling`; an unknown scaling type names the field."""
    from lmforge.model.config import LAYER_TYPES
    from lmforge.model.transformer import ROPE_TYPES

    params = dict(hf.get("rope_parameters") or {})
    field = "rope_parameters"
    if any(k in LAYER_TYPES for k in params):  # one dict per layer type (Gemma 3)
        params, field = dict(params.get(layer_type) or {}), f"rope_parameters.{layer_type}"
    theta = params.pop("rope_theta", hf.get("rope_theta", _DEFAULT_THETA.get(model_type, 10000.0)))
    scaling = hf.get("rope_scaling") if layer_type == "full_attention" else None
    if scaling:
        field = "rope_scaling"
    else:
        scaling = params
    scaling = {k: v for k, v in scaling.items() if k not in ("rope_theta", "partial_rotary_factor")}
    kind = scaling.pop("type", None)
    kind = scaling.setdefault("rope_type", kind or "default")
    if model_type == "phi3" and kind in ("su", "yarn"):  # Phi-3's names for LongRoPE (as Phi3Config maps them)
        kind = scaling["rope_type"] = "longrope"
    if kind not in ROPE_TYPES:
        raise UnsupportedFeature(where, f"{field}: RoPE type {kind!r} is not implemented (lmforge implements "
                                 f"{', '.join(ROPE_TYPES)})")
    if kind in ("llama3", "yarn", "longrope"):
        # the pretraining context these scalings start from (Phi-3 keeps it beside rope_scaling)
        orig = hf.get("original_max_position_embeddings") if model_type == "phi3" else None
        scaling["original_max_position_embeddings"] = orig or scaling.get("original_max_position_embeddings") or \
            hf.get("max_position_embeddings", 2048)
    if kind == "longrope":
        for key in ("short_factor", "long_factor"):
            if not isinstance(scaling.get(key), list):
                raise CheckpointError(f"{where}: {field}.{key}: LongRoPE needs a list of factors")
    return float(theta), (scaling if kind != "default" else None)


def config_from_hf(hf: dict, where: str = "config.json") -> ModelConfig:
    """ModelConfig from an HF config.json dict; a missing or malformed field, or a feature of the family that
    lmforge does not implement, is a CheckpointError naming the field."""
    try:
        return _config_from_hf(hf, where)
    except KeyError as e:
        raise CheckpointError(f"{where}: missing field {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{where}: {e}") from None


def _refuse(where: str, field: str, value, why: str):
    raise UnsupportedFeature(where, f"{field} = {json.dumps(value)}: {why}")


def _layer_types(hf: dict, model_type: str, n_layers: int, window: int | None, where: str) -> tuple | None:
    """Each layer's attention span ("full_attention" / "sliding_attention") as the family's modeling file decides
    it; None where every layer is the same."""
    from lmforge.model.config import LAYER_TYPES

    if window is None or model_type in ("mistral", "mixtral", "phi3", "qwen3_moe"):  # (these: every layer slides)
        types = None
    elif hf.get("layer_types") is not None:
        types = tuple(hf["layer_types"])
        unknown = sorted(set(types) - set(LAYER_TYPES))
        if unknown:
            _refuse(where, "layer_types", unknown[0], f"lmforge implements the layer types {', '.join(LAYER_TYPES)}")
        if len(types) != n_layers:
            _refuse(where, "layer_types", len(types), f"one entry per layer needed ({n_layers})")
    elif model_type in ("qwen2", "qwen3"):
        first = hf.get("max_window_layers", 28)
        types = tuple("sliding_attention" if i >= first else "full_attention" for i in range(n_layers))
    elif model_type in ("gemma2", "gemma3_text"):
        pattern = 2 if model_type == "gemma2" else hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6))
        types = tuple("sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layers))
    elif model_type == "smollm3":
        uses_rope = hf.get("no_rope_layers") or [int((i + 1) % hf.get("no_rope_layer_interval", 4) != 0)
                                                 for i in range(n_layers)]
        types = tuple("sliding_attention" if not uses_rope[i] else "full_attention" for i in range(n_layers))
    else:
        types = None
    return types


def _config_from_hf(hf: dict, where: str) -> ModelConfig:
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED:
        hint = (" (Gemma 3's multimodal checkpoints: lmforge reads the text-only gemma3_text ones, Gemma-3-270m/1b)"
                if model_type == "gemma3" else "")
        raise CheckpointError(f"{where}: model_type '{model_type}' is not supported (supported: "
                              f"{', '.join(SUPPORTED)}){hint}")
    if model_type == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
            raise UnsupportedFeature(where, f"activation_function = {json.dumps(act)}: lmforge's GPT-2 uses tanh GELU")
        return ModelConfig(arch="gpt2", vocab_size=hf["vocab_size"], n_layers=hf["n_layer"], d_model=hf["n_embd"],
                           n_heads=hf["n_head"], d_ff=hf.get("n_inner") or 4 * hf["n_embd"],
                           max_seq_len=hf["n_positions"], norm="layernorm", norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                           mlp="gelu", pos="learned", qkv_bias=True, proj_bias=True,
                           tie_embeddings=hf.get("tie_word_embeddings", True),
                           bos_token_id=hf.get("bos_token_id"), eos_token_id=_first(hf.get("eos_token_id")))
    switches = {**LLAMA_SWITCHES, **FAMILIES[model_type]}
    features = FEATURES[model_type]
    # features of the family that lmforge does not implement: refused by name, never silently dropped
    act_field = "hidden_activation" if model_type in _ACTIVATION and hf.get("hidden_activation") else "hidden_act"
    act = hf.get(act_field) or ("gelu_pytorch_tanh" if model_type in _ACTIVATION else "silu")
    if act not in _ACTIVATION.get(model_type, ("silu",)):
        _refuse(where, act_field, act, f"{model_type} in lmforge uses {_ACTIVATION.get(model_type, ('silu',))[0]}")
    if hf.get("attention_bias") and model_type != "qwen2":
        _refuse(where, "attention_bias", True, "biases on the attention projections are not implemented for "
                f"{model_type}")
    if hf.get("mlp_bias"):
        _refuse(where, "mlp_bias", True, "biases on the MLP projections are not implemented")
    if hf.get("use_bidirectional_attention"):
        _refuse(where, "use_bidirectional_attention", True, "lmforge's decoder is causal")
    if hf.get("router_jitter_noise"):
        _refuse(where, "router_jitter_noise", hf["router_jitter_noise"], "router jitter is not implemented")
    n_layers = hf["num_hidden_layers"]
    theta, scaling = _rope_from_hf(hf, where, model_type)
    local_theta = None
    if "local_rope" in features:
        local_theta, local_scaling = _rope_from_hf(hf, where, model_type, "sliding_attention")
        if local_scaling:
            _refuse(where, "rope_parameters.sliding_attention", local_scaling,
                    "a scaled RoPE on the sliding layers is not implemented")
        if not (hf.get("rope_parameters") or {}).get("sliding_attention"):  # the older spelling
            local_theta = float(hf.get("rope_local_base_freq", 10000.0))
    window = hf.get("sliding_window")
    if model_type in ("qwen2", "qwen3", "qwen3_moe", "smollm3") and not hf.get("use_sliding_window", False):
        window = None  # these families ignore sliding_window unless use_sliding_window is set
    types = _layer_types(hf, model_type, n_layers, window, where)
    if types is not None and "sliding_attention" not in types:
        types, window = None, None
    if types is not None and "full_attention" not in types:
        types = None
    head_dim = hf.get("head_dim")
    kw = dict(switches, arch=model_type, vocab_size=hf["vocab_size"], n_layers=n_layers, d_model=hf["hidden_size"],
              n_heads=hf["num_attention_heads"], n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
              head_dim=head_dim, d_ff=hf["intermediate_size"], max_seq_len=hf.get("max_position_embeddings", 2048),
              norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=scaling,
              rope_local_theta=local_theta, sliding_window=window, layer_types=types,
              tie_embeddings=hf.get("tie_word_embeddings", model_type in ("gemma2", "gemma3_text", "smollm3")),
              bos_token_id=hf.get("bos_token_id"), eos_token_id=_first(hf.get("eos_token_id")))
    if "attn_scale" in features:
        kw["attn_scale"] = float(hf.get("query_pre_attn_scalar", 256)) ** -0.5
    if "attn_softcap" in features:
        kw["attn_softcap"] = hf.get("attn_logit_softcapping")
    if "final_softcap" in features:
        kw["final_softcap"] = hf.get("final_logit_softcapping")
    if "partial_rotary" in features:
        kw["partial_rotary"] = float(hf.get("partial_rotary_factor")
                                     or (hf.get("rope_parameters") or {}).get("partial_rotary_factor") or 1.0)
    if "no_rope" in features and hf.get("no_rope_layers") is not None:
        kw["no_rope_layers"] = tuple(i for i, uses in enumerate(hf["no_rope_layers"]) if not uses)
    elif "no_rope" in features:
        kw["no_rope_layers"] = tuple(i for i in range(n_layers) if (i + 1) % hf.get("no_rope_layer_interval", 4) == 0)
    if model_type in ("mixtral", "qwen3_moe") and hf.get("router_aux_loss_coef") is not None:
        kw["router_aux_coef"] = float(hf["router_aux_loss_coef"])
    if model_type == "mixtral":
        kw.update(n_experts=hf["num_local_experts"], experts_top_k=hf["num_experts_per_tok"])
    elif model_type == "qwen3_moe":
        sparse = [i for i in range(n_layers) if i not in (hf.get("mlp_only_layers") or [])
                  and (i + 1) % hf.get("decoder_sparse_step", 1) == 0]
        experts = hf["num_experts"] if "num_experts" in hf else hf["num_local_experts"]  # (transformers 5 writes the latter)
        kw.update(n_experts=experts if sparse else 0, experts_top_k=hf["num_experts_per_tok"],
                  moe_d_ff=hf["moe_intermediate_size"], moe_norm_topk=bool(hf.get("norm_topk_prob", False)),
                  moe_layers=None if len(sparse) == n_layers else tuple(sparse))
    return ModelConfig(**kw)


def _first(x):
    return x[0] if isinstance(x, list) and x else x


def _check_writable(cfg: ModelConfig) -> None:
    """A config transformers' class for cfg.arch describes exactly, or a CheckpointError naming the field."""
    if cfg.arch not in FAMILIES:
        raise CheckpointError(f"arch '{cfg.arch}' cannot be written as an HF model (supported: {', '.join(SUPPORTED)})")
    need = {**LLAMA_SWITCHES, **FAMILIES[cfg.arch]}
    for name, value in need.items():
        if getattr(cfg, name) != value:
            raise CheckpointError(f"this config cannot be written as '{cfg.arch}': {name} is {getattr(cfg, name)!r}, "
                                  f"the family's is {value!r}")
    features = FEATURES[cfg.arch]
    used = {"window": cfg.sliding_window is not None, "layer_windows": cfg.layer_types is not None,
            "experts": bool(cfg.n_experts), "moe_layers": cfg.moe_layers is not None,
            "attn_scale": cfg.attn_scale is not None, "attn_softcap": cfg.attn_softcap is not None,
            "final_softcap": cfg.final_softcap is not None, "partial_rotary": cfg.partial_rotary != 1.0,
            "no_rope": bool(cfg.no_rope_layers), "local_rope": cfg.rope_local_theta is not None}
    extra = sorted(f for f, on in used.items() if on and f not in features)
    if extra:
        raise CheckpointError(f"this config cannot be written as '{cfg.arch}': its config.json has no place for "
                              f"{extra[0].replace('_', ' ')}")
    if cfg.arch in ("qwen3_moe", "mixtral") and not cfg.n_experts:
        raise CheckpointError(f"'{cfg.arch}' needs n_experts > 0")
    if cfg.arch == "mixtral" and (not cfg.moe_norm_topk or (cfg.moe_d_ff or cfg.d_ff) != cfg.d_ff):
        raise CheckpointError("Mixtral renormalises the top-k router weights and its experts are d_ff wide")
    if cfg.arch == "smollm3" and cfg.layer_types is not None and any(
            (t == "sliding_attention") != (i in cfg.no_rope_layers) for i, t in enumerate(cfg.layer_types)):
        raise CheckpointError("SmolLM3's sliding layers are its NoPE layers (no_rope_layers)")


def config_to_hf(cfg: ModelConfig) -> dict:
    """HF config.json dict for a ModelConfig (the fields of transformers' config class for cfg.arch); a portable
    model's (model/portable.py) is its own config.json."""
    if hasattr(cfg, "hf_config"):
        return dict(cfg.hf_config)
    common = {"architectures": [HF_CLASS.get(cfg.arch, cfg.arch)], "model_type": cfg.arch,
              "vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": cfg.bos_token_id,
              "eos_token_id": cfg.eos_token_id, "torch_dtype": "float32", "dtype": "float32"}
    if cfg.arch == "gpt2":
        if cfg.pos != "learned" or cfg.mlp != "gelu" or cfg.norm != "layernorm" or cfg.n_kv_heads != cfg.n_heads:
            raise CheckpointError("this config is not GPT-2 shaped (needs learned positions, GELU, LayerNorm, MHA)")
        return {**common, "n_layer": cfg.n_layers, "n_embd": cfg.d_model, "n_head": cfg.n_heads, "n_inner": cfg.d_ff,
                "n_positions": cfg.max_seq_len, "n_ctx": cfg.max_seq_len, "layer_norm_epsilon": cfg.norm_eps,
                "activation_function": "gelu_new", "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    _check_writable(cfg)
    a = cfg.arch
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta, **(cfg.rope_scaling or {})}
    out = {**common, "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layers,
           "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
           "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
           "rope_parameters": rope, "attention_dropout": 0.0,
           # lmforge keeps no pad id; unset rather than a family default outside a resized vocabulary (Phi-3's 32000)
           "pad_token_id": None}
    if a in _ACTIVATION:
        out["hidden_activation"] = "gelu_pytorch_tanh"
    else:
        out["hidden_act"] = "silu"
    if a not in ("qwen2", "mistral", "mixtral", "phi3"):
        out["attention_bias"] = False
    if cfg.rope_scaling:
        out["rope_scaling"] = dict(cfg.rope_scaling)
    types = list(cfg.layer_types or [("sliding_attention" if cfg.sliding_window else "full_attention")] * cfg.n_layers)
    if a in ("mistral", "mixtral", "phi3"):
        out["sliding_window"] = cfg.sliding_window
    elif a in ("qwen2", "qwen3", "qwen3_moe"):
        out.update(use_sliding_window=cfg.sliding_window is not None, sliding_window=cfg.sliding_window)
        if a != "qwen3_moe":  # (Qwen3-MoE slides every layer when use_sliding_window is set)
            first = types.index("sliding_attention") if "sliding_attention" in types else cfg.n_layers
            out.update(max_window_layers=first, layer_types=types)
    elif a in ("gemma2", "gemma3_text"):
        scalar = (cfg.attn_scale or cfg.head_dim ** -0.5) ** -2
        if abs(scalar - round(scalar)) > 1e-6 * scalar:  # the config field is an integer
            raise CheckpointError(f"attn_scale {cfg.attn_scale} is not query_pre_attn_scalar^-0.5 for an integer "
                                  f"query_pre_attn_scalar, as {a} writes it")
        out.update(query_pre_attn_scalar=round(scalar),
                   final_logit_softcapping=cfg.final_softcap, sliding_window=cfg.sliding_window, layer_types=types)
        if a == "gemma2":
            out["attn_logit_softcapping"] = cfg.attn_softcap
        else:
            local = cfg.rope_local_theta or 10000.0
            out.update(use_bidirectional_attention=False, rope_local_base_freq=local, rope_parameters={
                "full_attention": rope, "sliding_attention": {"rope_type": "default", "rope_theta": local}})
            if cfg.sliding_window is None:  # transformers' Gemma 3 always builds sliding masks: make them full
                out["sliding_window"] = cfg.max_seq_len
    elif a == "smollm3":
        out.update(no_rope_layers=[int(i not in cfg.no_rope_layers) for i in range(cfg.n_layers)],
                   use_sliding_window=cfg.sliding_window is not None, sliding_window=cfg.sliding_window,
                   layer_types=types, mlp_bias=False)
    if a == "phi3":
        out["partial_rotary_factor"] = cfg.partial_rotary
        rope["partial_rotary_factor"] = cfg.partial_rotary
        if (cfg.rope_scaling or {}).get("original_max_position_embeddings"):
            out["original_max_position_embeddings"] = cfg.rope_scaling["original_max_position_embeddings"]
    if a in ("mixtral", "qwen3_moe") and cfg.router_aux_coef is not None:
        out["router_aux_loss_coef"] = cfg.router_aux_coef
    if a == "mixtral":
        out.update(num_local_experts=cfg.n_experts, num_experts_per_tok=cfg.experts_top_k, router_jitter_noise=0.0,
                   output_router_logits=False)
    elif a == "qwen3_moe":
        sparse = [i for i in range(cfg.n_layers) if cfg.is_moe(i)]
        out.update(num_experts=cfg.n_experts, num_experts_per_tok=cfg.experts_top_k, decoder_sparse_step=1,
                   moe_intermediate_size=cfg.moe_d_ff or cfg.d_ff, norm_topk_prob=cfg.moe_norm_topk,
                   mlp_only_layers=[i for i in range(cfg.n_layers) if i not in sparse], output_router_logits=False)
    return out


# --- weights -----------------------------------------------------------------------------

# lmforge's norm -> the HF norm it is, by where the family puts its norms (HF's "post_attention_layernorm" is the
# norm before the MLP in Llama, after the attention in Gemma and OLMo 2)
_NORM_NAMES = {
    "pre": {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"},
    "sandwich": {"attn_norm": "input_layernorm", "post_attn_norm": "post_attention_layernorm",
                 "mlp_norm": "pre_feedforward_layernorm", "post_mlp_norm": "post_feedforward_layernorm"},
    "post": {"post_attn_norm": "post_attention_layernorm", "post_mlp_norm": "post_feedforward_layernorm"},
}


def _name_map(cfg: ModelConfig) -> dict[str, list]:
    """lmforge parameter name -> the HF tensors it is made of: several names are concatenated along dim 0 (q, k, v;
    gate, up); a list of lists is stacked, one entry per expert, each concatenated (experts' gate and up)."""
    m: dict[str, list] = {}
    if cfg.arch == "gpt2":
        m["embed.weight"], m["pos_embed.weight"] = ["transformer.wte.weight"], ["transformer.wpe.weight"]
        for i in range(cfg.n_layers):
            h = f"transformer.h.{i}"
            for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2"), ("attn.qkv_proj", "attn.c_attn"),
                                 ("attn.o_proj", "attn.c_proj"), ("mlp.up_proj", "mlp.c_fc"), ("mlp.down_proj", "mlp.c_proj")):
                for p in ("weight", "bias"):
                    m[f"layers.{i}.{ours}.{p}"] = [f"{h}.{theirs}.{p}"]
        m["norm.weight"], m["norm.bias"] = ["transformer.ln_f.weight"], ["transformer.ln_f.bias"]
        return m
    m["embed.weight"], m["norm.weight"] = ["model.embed_tokens.weight"], ["model.norm.weight"]
    if not cfg.tie_embeddings:
        m["lm_head.weight"] = ["lm_head.weight"]
    fused = cfg.arch == "phi3"  # Phi-3's checkpoints keep q/k/v and gate/up fused, as lmforge does
    for i in range(cfg.n_layers):
        h, ours = f"model.layers.{i}", f"layers.{i}"
        for norm, theirs in _NORM_NAMES[cfg.norm_placement].items():
            m[f"{ours}.{norm}.weight"] = [f"{h}.{theirs}.weight"]
        m[f"{ours}.attn.qkv_proj.weight"] = [f"{h}.self_attn.qkv_proj.weight"] if fused else \
            [f"{h}.self_attn.{p}_proj.weight" for p in "qkv"]
        if cfg.qkv_bias:
            m[f"{ours}.attn.qkv_proj.bias"] = [f"{h}.self_attn.{p}_proj.bias" for p in "qkv"]
        m[f"{ours}.attn.o_proj.weight"] = [f"{h}.self_attn.o_proj.weight"]
        if cfg.qk_norm:
            m[f"{ours}.attn.q_norm.weight"] = [f"{h}.self_attn.q_norm.weight"]
            m[f"{ours}.attn.k_norm.weight"] = [f"{h}.self_attn.k_norm.weight"]
        if cfg.is_moe(i) and cfg.arch == "mixtral":
            moe = f"{h}.block_sparse_moe"
            m[f"{ours}.mlp.router.weight"] = [f"{moe}.gate.weight"]
            m[f"{ours}.mlp.experts.gate_up_proj"] = [[f"{moe}.experts.{e}.w1.weight", f"{moe}.experts.{e}.w3.weight"]
                                                     for e in range(cfg.n_experts)]
            m[f"{ours}.mlp.experts.down_proj"] = [[f"{moe}.experts.{e}.w2.weight"] for e in range(cfg.n_experts)]
        elif cfg.is_moe(i):
            moe = f"{h}.mlp"
            m[f"{ours}.mlp.router.weight"] = [f"{moe}.gate.weight"]
            m[f"{ours}.mlp.experts.gate_up_proj"] = [[f"{moe}.experts.{e}.{p}_proj.weight" for p in ("gate", "up")]
                                                     for e in range(cfg.n_experts)]
            m[f"{ours}.mlp.experts.down_proj"] = [[f"{moe}.experts.{e}.down_proj.weight"] for e in range(cfg.n_experts)]
        else:
            m[f"{ours}.mlp.gate_up_proj.weight"] = [f"{h}.mlp.gate_up_proj.weight"] if fused else \
                [f"{h}.mlp.gate_proj.weight", f"{h}.mlp.up_proj.weight"]
            m[f"{ours}.mlp.down_proj.weight"] = [f"{h}.mlp.down_proj.weight"]
    return m


_GPT2_CONV1D = re.compile(r".*\.(c_attn|c_proj|c_fc)\.weight$")  # GPT-2 stores Linear weights transposed


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:  # truncated, corrupt, or not a safetensors file at all
        raise CheckpointError(f"{path}: cannot be read as safetensors ({e}); the file is damaged or incomplete") from None


def read_state_dict(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of an HF checkpoint directory (single or sharded safetensors, or pytorch_model.bin)."""
    d = Path(directory)
    if (d / "model.safetensors").exists():
        return _load_safetensors(d / "model.safetensors")
    if (d / "model.safetensors.index.json").exists():
        index_path = d / "model.safetensors.index.json"
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path}: not a safetensors index ({e})") from None
        tensors: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            if not (d / shard).exists():
                raise CheckpointError(f"{index_path} names shard {shard}, which is missing")
            tensors.update(_load_safetensors(d / shard))
        return tensors
    if (d / "pytorch_model.bin").exists():
        return torch.load(d / "pytorch_model.bin", map_location="cpu", weights_only=True)
    if (d / "shards" / ".metadata").exists():
        raise CheckpointError(f"{d} is a sharded training checkpoint without HF weights yet (the run stopped before "
                              f"its end); write them with: lmforge export-checkpoint {d}")
    raise CheckpointError(f"{d}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """A local directory, or a Hugging Face Hub id downloaded (lmforge/hub.py says when: never for a mistyped path)."""
    from lmforge.hub import download, hub_repo_id, missing_path_error

    repo = hub_repo_id(path)
    if repo is not None:
        return download(repo, ["*.json", "*.safetensors", "tokenizer*", "*.txt", "*.jinja"])
    d = Path(path).expanduser()
    if not d.exists():
        raise missing_path_error(d, "model directory")
    return d


def read_config(d: Path) -> dict:
    from lmforge.hub import run_directory_hint

    path = d / "config.json"
    if not path.exists():
        raise CheckpointError(f"{d}: no config.json (is this a Hugging Face model directory?){run_directory_hint(d)}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return config


def load_hf_model(directory: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str = "cpu",
                  portable: bool = True) -> Transformer:
    """Load an HF causal-LM directory (or, online, a hub id like 'HuggingFaceTB/SmolLM2-135M') into lmforge.

    A decoder outside the native families, or a native family's config using a feature the native decoder does
    not implement, runs on the portable path (model/portable.py: transformers' own modeling code behind the same
    interface), announced in one line; `portable=False` (callers that need lmforge's own decoder) refuses it with
    the native path's one-line error instead."""
    d = resolve_model_dir(directory)
    raw = read_config(d)
    where = str(d / "config.json")
    if raw.get("model_type") not in SUPPORTED and "lmforge_quantization" not in raw:
        if not portable:
            config_from_hf(raw, where)  # the one-line error naming the model_type
        return _load_portable(d, raw, f"model_type '{raw.get('model_type')}' is not one of lmforge's native "
                                      "families", dtype, device)
    try:
        cfg = config_from_hf(raw, where)
    except UnsupportedFeature as e:
        if not portable or "lmforge_quantization" in raw:
            raise
        return _load_portable(d, raw, e.reason, dtype, device)
    if "lmforge_quantization" in raw:  # `lmforge export int8 | int4`: quantized matrices for lmforge's engine
        from lmforge.model.quantize import load_quantized

        if dtype != torch.float32:
            raise CheckpointError(f"{d}: an int8 export runs with float32 activations (got dtype {dtype})")
        return load_quantized(d, cfg, device, raw["lmforge_quantization"].get("method", "int8_weight_only"))
    return transformer_from_tensors(cfg, read_state_dict(d), d).to(device=device, dtype=dtype).eval()


def _load_portable(d: Path, raw: dict, why: str, dtype: torch.dtype, device: str):
    from lmforge.model.portable import PortableError, load_portable

    try:
        return load_portable(d, raw, why, dtype, device)
    except PortableError as e:
        raise CheckpointError(f"{d / 'config.json'}: {e} (lmforge's native families: {', '.join(SUPPORTED)})") \
            from None


def transformer_from_tensors(cfg: ModelConfig, tensors: dict[str, torch.Tensor], d: Path | str,
                             head_optional: bool = False) -> Transformer:
    """A Transformer from HF-named tensors (float32 as stored). `head_optional`: an untied model may lack
    lm_head.weight (a classifier's backbone); the head then keeps its random init and is not used."""
    if cfg.arch == "gpt2":  # original GPT-2 files have no "transformer." prefix
        tensors = {(k if k.startswith(("transformer.", "lm_head.")) else f"transformer.{k}"): v for k, v in tensors.items()}
    with torch.device("meta"):
        model = Transformer(cfg)
    state = {}
    used = set()

    def take(name: str) -> torch.Tensor:
        if name not in tensors:
            raise CheckpointError(f"{d}: tensor '{name}' is missing from the checkpoint")
        used.add(name)
        t = tensors[name]
        return t.t() if cfg.arch == "gpt2" and _GPT2_CONV1D.match(name) else t

    for ours, theirs in _name_map(cfg).items():
        if head_optional and theirs == ["lm_head.weight"] and "lm_head.weight" not in tensors:
            state[ours] = torch.empty(cfg.vocab_size, cfg.d_model).normal_(std=cfg.init_std)
            continue
        if isinstance(theirs[0], list):  # experts: one (out, in) matrix each, stacked
            stacked = theirs[0][0].rsplit(".experts.", 1)[0] + ".experts." + ours.rsplit(".", 1)[1]
            if stacked in tensors:  # a checkpoint that keeps them stacked already, as transformers holds them
                state[ours] = take(stacked)
                continue
            state[ours] = torch.stack([torch.cat([take(t) for t in names], dim=0) for names in theirs])
            continue
        parts = [take(t) for t in theirs]
        state[ours] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    if cfg.arch == "gpt2":
        used.add("lm_head.weight")  # tied to wte
    if cfg.tie_embeddings:
        used.add("lm_head.weight")
    unknown = [k for k in tensors if k not in used and not _IGNORED.match(k)]
    if unknown:
        raise CheckpointError(f"{d}: tensors lmforge does not know: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
    dtype = next(iter(state.values())).dtype if state else torch.float32
    model.load_state_dict({k: v.to(dtype if v.is_floating_point() else v.dtype) for k, v in state.items()},
                          strict=True, assign=True)
    model.reset_rotary()  # rebuilt off the meta device
    return model


def hf_tensors(model: Transformer) -> dict[str, torch.Tensor]:
    """The model's weights under their HF names (fused q/k/v and gate/up split; GPT-2's Conv1D transposed)."""
    if "peft" in model._modules:  # lmforge.peft registers a model's adapter as its child module "peft": saving the
        # base alone would drop what was trained
        raise CheckpointError(f"this model has an adapter ({model.peft.peft_type}): save it with "
                              "lmforge.peft.save_adapter, or merge it first (lmforge.peft.merge) to save a full model")
    cfg = model.cfg
    ours = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    for name, theirs in _name_map(cfg).items():
        t = ours[name]
        if isinstance(theirs[0], list):  # stacked experts: each expert's matrix, gate and up split
            for expert, names in zip(t, theirs):
                for part_name, part in zip(names, expert.chunk(len(names), dim=0)):
                    out[part_name] = part.contiguous()
        elif len(theirs) > 1:  # a fused lmforge tensor: split into the HF tensors, in order
            sizes = [cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim] \
                if len(theirs) == 3 else [t.shape[0] // 2] * 2
            for part_name, part in zip(theirs, t.split(sizes, dim=0)):
                out[part_name] = part.contiguous()
        else:
            out[theirs[0]] = t.t().contiguous() if cfg.arch == "gpt2" and _GPT2_CONV1D.match(theirs[0]) else t
    return out


def save_hf_model(model: Transformer, directory: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
    """Write config.json + model.safetensors (atomically) in the HF layout of the model's family."""
    if getattr(model, "inference_only", None):
        raise CheckpointError(f"this model's weights are in an inference-only format ({model.inference_only}); "
                              "save the float model instead")
    if getattr(model, "portable", False):  # transformers' own layout, by transformers
        if "peft" in model._modules:
            raise CheckpointError(f"this model has an adapter ({model.peft.peft_type}): save it with "
                                  "lmforge.peft.save_adapter, or merge it first (lmforge.peft.merge)")
        with StagedDirectory(directory) as stage:
            model.save(stage.tmp, dtype)
            for name in sorted(os.listdir(stage.tmp), key=lambda n: n == "config.json"):  # config.json lands last
                stage.path(name)
        return
    cfg = model.cfg
    hf_config = config_to_hf(cfg)
    out = {k: v.to(dtype or v.dtype).contiguous() for k, v in hf_tensors(model).items()}
    if dtype is not None:
        hf_config["torch_dtype"] = hf_config["dtype"] = str(dtype).removeprefix("torch.")
    # weights, generation config and config land together (files.StagedDirectory): a crash leaves the old model
    with StagedDirectory(directory) as stage:
        save_tensors(out, stage.path("model.safetensors"), metadata={"format": "pt"})
        write_json(stage.path("generation_config.json"), generation_config(cfg))
        write_json(stage.path("config.json"), hf_config)


def generation_config(cfg: ModelConfig) -> dict:
    """generation_config.json: the ids transformers' `generate` starts and stops with (without eos_token_id it
    never stops)."""
    out = {"_from_model_config": True}
    if cfg.bos_token_id is not None:
        out["bos_token_id"] = cfg.bos_token_id
    if cfg.eos_token_id is not None:
        out["eos_token_id"] = cfg.eos_token_id
    return out
