"""Hugging Face checkpoint interop: config.json and weight-name maps for GPT-2, Llama, Qwen2, Mistral.

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

SUPPORTED = ("gpt2", "llama", "qwen2", "mistral")
HF_CLASS = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "mistral": "MistralForCausalLM"}
# buffers some checkpoints carry that are recomputed, not learned
_IGNORED = re.compile(r".*(\.attn\.bias|\.attn\.masked_bias|rotary_emb\.inv_freq)$")


class CheckpointError(ValueError):
    """A checkpoint lmforge cannot load; the message names the file, model_type or tensor."""


# --- config ------------------------------------------------------------------------------

def _rope_from_hf(hf: dict) -> tuple[float, dict | None]:
    params = dict(hf.get("rope_parameters") or {})
    theta = params.pop("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = hf.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    if scaling:
        scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
        scaling.setdefault("rope_type", scaling.get("type", "default"))
        if scaling["rope_type"] == "default":
            scaling = None
    return float(theta), scaling


def config_from_hf(hf: dict, where: str = "config.json") -> ModelConfig:
    """ModelConfig from an HF config.json dict; a missing or malformed field is a CheckpointError naming it."""
    try:
        return _config_from_hf(hf, where)
    except KeyError as e:
        raise CheckpointError(f"{where}: missing field {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{where}: {e}") from None


def _config_from_hf(hf: dict, where: str) -> ModelConfig:
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED:
        raise CheckpointError(f"{where}: model_type '{model_type}' is not supported (supported: {', '.join(SUPPORTED)})")
    if model_type == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
            raise CheckpointError(f"{where}: GPT-2 activation '{act}' is not supported (tanh GELU only)")
        return ModelConfig(arch="gpt2", vocab_size=hf["vocab_size"], n_layers=hf["n_layer"], d_model=hf["n_embd"],
                           n_heads=hf["n_head"], d_ff=hf.get("n_inner") or 4 * hf["n_embd"],
                           max_seq_len=hf["n_positions"], norm="layernorm", norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                           mlp="gelu", pos="learned", qkv_bias=True, proj_bias=True,
                           tie_embeddings=hf.get("tie_word_embeddings", True),
                           bos_token_id=hf.get("bos_token_id"), eos_token_id=_first(hf.get("eos_token_id")))
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{where}: hidden_act '{hf.get('hidden_act')}' is not supported (silu only)")
    if hf.get("attention_bias") and model_type == "llama" or hf.get("mlp_bias"):
        raise CheckpointError(f"{where}: attention_bias/mlp_bias on Llama are not supported yet")
    theta, scaling = _rope_from_hf(hf)
    window = hf.get("sliding_window")
    if model_type == "qwen2" and not hf.get("use_sliding_window", False):
        window = None
    return ModelConfig(arch=model_type, vocab_size=hf["vocab_size"], n_layers=hf["num_hidden_layers"],
                       d_model=hf["hidden_size"], n_heads=hf["num_attention_heads"],
                       n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
                       head_dim=hf.get("head_dim"), d_ff=hf["intermediate_size"],
                       max_seq_len=hf.get("max_position_embeddings", 2048), norm="rmsnorm",
                       norm_eps=hf.get("rms_norm_eps", 1e-6), mlp="swiglu", pos="rope", rope_theta=theta,
                       rope_scaling=scaling, qkv_bias=model_type == "qwen2", proj_bias=False,
                       sliding_window=window, tie_embeddings=hf.get("tie_word_embeddings", False),
                       bos_token_id=hf.get("bos_token_id"), eos_token_id=_first(hf.get("eos_token_id")))


def _first(x):
    return x[0] if isinstance(x, list) and x else x


def config_to_hf(cfg: ModelConfig) -> dict:
    """HF config.json dict for a ModelConfig."""
    common = {"architectures": [HF_CLASS[cfg.arch]], "model_type": cfg.arch, "vocab_size": cfg.vocab_size,
              "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": cfg.bos_token_id,
              "eos_token_id": cfg.eos_token_id, "torch_dtype": "float32", "dtype": "float32"}
    if cfg.arch == "gpt2":
        if cfg.pos != "learned" or cfg.mlp != "gelu" or cfg.norm != "layernorm" or cfg.n_kv_heads != cfg.n_heads:
            raise CheckpointError("this config is not GPT-2 shaped (needs learned positions, GELU, LayerNorm, MHA)")
        return {**common, "n_layer": cfg.n_layers, "n_embd": cfg.d_model, "n_head": cfg.n_heads, "n_inner": cfg.d_ff,
                "n_positions": cfg.max_seq_len, "n_ctx": cfg.max_seq_len, "layer_norm_epsilon": cfg.norm_eps,
                "activation_function": "gelu_new", "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    if cfg.pos != "rope" or cfg.mlp != "swiglu" or cfg.norm != "rmsnorm" or cfg.proj_bias or cfg.qk_norm:
        raise CheckpointError(f"this config cannot be written as '{cfg.arch}' (needs RoPE, SwiGLU, RMSNorm, no output biases)")
    if cfg.qkv_bias != (cfg.arch == "qwen2"):
        raise CheckpointError(f"q/k/v biases are {'required' if cfg.arch == 'qwen2' else 'not supported'} for '{cfg.arch}'")
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta, **(cfg.rope_scaling or {})}
    out = {**common, "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layers,
           "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
           "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps, "hidden_act": "silu",
           "rope_theta": cfg.rope_theta, "rope_parameters": rope, "attention_dropout": 0.0}
    if cfg.rope_scaling:
        out["rope_scaling"] = dict(cfg.rope_scaling)
    if cfg.arch == "mistral":
        out["sliding_window"] = cfg.sliding_window
    elif cfg.arch == "qwen2":
        out.update(use_sliding_window=cfg.sliding_window is not None, sliding_window=cfg.sliding_window,
                   max_window_layers=cfg.n_layers)
    elif cfg.sliding_window is not None:
        raise CheckpointError("Llama has no sliding window; use arch 'mistral'")
    return out


# --- weights -----------------------------------------------------------------------------

def _name_map(cfg: ModelConfig) -> dict[str, list[str]]:
    """lmforge parameter name -> the HF tensors it is made of (several: concatenated along dim 0)."""
    m: dict[str, list[str]] = {}
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
    for i in range(cfg.n_layers):
        h = f"model.layers.{i}"
        m[f"layers.{i}.attn_norm.weight"] = [f"{h}.input_layernorm.weight"]
        m[f"layers.{i}.mlp_norm.weight"] = [f"{h}.post_attention_layernorm.weight"]
        m[f"layers.{i}.attn.qkv_proj.weight"] = [f"{h}.self_attn.{p}_proj.weight" for p in "qkv"]
        if cfg.qkv_bias:
            m[f"layers.{i}.attn.qkv_proj.bias"] = [f"{h}.self_attn.{p}_proj.bias" for p in "qkv"]
        m[f"layers.{i}.attn.o_proj.weight"] = [f"{h}.self_attn.o_proj.weight"]
        if cfg.qk_norm:
            m[f"layers.{i}.attn.q_norm.weight"] = [f"{h}.self_attn.q_norm.weight"]
            m[f"layers.{i}.attn.k_norm.weight"] = [f"{h}.self_attn.k_norm.weight"]
        m[f"layers.{i}.mlp.gate_up_proj.weight"] = [f"{h}.mlp.gate_proj.weight", f"{h}.mlp.up_proj.weight"]
        m[f"layers.{i}.mlp.down_proj.weight"] = [f"{h}.mlp.down_proj.weight"]
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


def _read_config(d: Path) -> dict:
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


def load_hf_model(directory: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Transformer:
    """Load an HF causal-LM directory (or, online, a hub id like 'HuggingFaceTB/SmolLM2-135M') into lmforge."""
    d = resolve_model_dir(directory)
    raw = _read_config(d)
    cfg = config_from_hf(raw, str(d / "config.json"))
    if "lmforge_quantization" in raw:  # `lmforge export int8`: int8 matrices for lmforge's engine
        from lmforge.export.int8 import load_int8

        if dtype != torch.float32:
            raise CheckpointError(f"{d}: an int8 export runs with float32 activations (got dtype {dtype})")
        return load_int8(d, cfg, device, raw["lmforge_quantization"].get("method", "int8_weight_only"))
    return transformer_from_tensors(cfg, read_state_dict(d), d).to(device=device, dtype=dtype).eval()


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
    if model.rotary is not None:
        model.rotary = type(model.rotary)(cfg)  # rebuilt off the meta device
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
        if len(theirs) > 1:  # a fused lmforge tensor: split into the HF tensors, in order
            sizes = [cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim] \
                if len(theirs) == 3 else [cfg.d_ff, cfg.d_ff]
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
