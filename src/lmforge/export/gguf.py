"""Export an HF-layout model directory to GGUF, the file llama.cpp and ollama load.

lmforge writes the GGUF itself (with the `gguf` package's writer) instead of going through llama.cpp's converter,
which refuses any vocabulary it does not recognise by fingerprint ("BPE pre-tokenizer was not recognized",
llama.cpp#9927): a self-trained tokenizer is declared by its split pattern, which is what llama.cpp's pre-tokenizer
types stand for:

  gpt2 pattern   -> "gpt-2"       cl100k pattern -> "llama-bpe" (Llama 3's, the same regex)
  Qwen2's        -> "qwen2"       o200k pattern  -> "gpt-4o"

Supported: byte-level BPE tokenizers (lmforge's own, GPT-2, Qwen2.5, Llama 3 style), SentencePiece vocabularies in
tokenizer.json form (Llama 2, Phi-3, Mistral v0.1: llama.cpp's "llama" tokenizer, scores derived from the merge
ranks); every family lmforge loads, each in llama.cpp's own architecture (GGUF_ARCH); tensors in f32, f16, q8_0 or
q4_0 (1-D tensors stay f32; a matrix whose rows do not split into 32-value blocks stays f16). The chat template and
the end-of-turn token travel in the file, so llama.cpp stops where the fine-tuned model learned to.

The tensors go through lmforge's own parameters: hf.py maps a family's checkpoint onto them, `_layout` maps them onto
an architecture's GGUF tensors (lmforge's fused q/k/v and gate/up split where llama.cpp keeps them apart), and the
import runs both maps backwards. HF rotates q/k in two halves (NeoX style); llama.cpp's llama and smollm3
architectures rotate interleaved pairs, so their q and k rows are permuted on the way, as llama.cpp's converter
does. Gemma's norms scale by 1 + w, llama.cpp's by the stored weight: they are written as 1 + w.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from lmforge.config import ConfigError
from lmforge.tokenizer.patterns import PATTERNS

QWEN2_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"""
                 r"""|\s+(?!\S)|\s+""")
# llama.cpp's pre-tokenizer type for each split pattern (llama-vocab.cpp); Llama 3's spelling of cl100k included
PRE_TOKENIZERS = {
    PATTERNS["gpt2"]: "gpt-2",
    PATTERNS["cl100k"]: "llama-bpe",
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)"""
    r"""|\s+""": "llama-bpe",
    QWEN2_PATTERN: "qwen2",
    PATTERNS["o200k"]: "gpt-4o",
}
TYPES = ("f32", "f16", "q8_0", "q4_0")


class ExportError(ConfigError):
    """A model or tokenizer that this export cannot write faithfully (the message says what and why)."""


def _split_patterns(pre: dict | None) -> list[str]:
    if not pre:
        return []
    if pre.get("type") == "Sequence":
        return [p for item in pre.get("pretokenizers", []) for p in _split_patterns(item)]
    if pre.get("type") == "Split":
        pattern = pre.get("pattern", {})
        return [pattern.get("Regex") or pattern.get("String") or ""]
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return [PATTERNS["gpt2"]]
    return []


def pre_tokenizer_type(tokenizer_json: dict) -> str:
    """llama.cpp's name for the tokenizer's split pattern, or an ExportError naming the pattern."""
    model = tokenizer_json.get("model", {})
    if model.get("type") != "BPE" or tokenizer_json.get("decoder", {}).get("type") not in ("ByteLevel", None):
        raise ExportError("GGUF export writes byte-level BPE tokenizers (lmforge's, GPT-2, Qwen2, Llama 3); this "
                          f"one is {model.get('type')} with a {tokenizer_json.get('decoder', {}).get('type')} decoder")
    patterns = [p for p in _split_patterns(tokenizer_json.get("pre_tokenizer")) if p]
    for p in patterns:
        normal = p.replace("(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])",
                           "(?i:'s|'t|'re|'ve|'m|'ll|'d)")
        if normal in PRE_TOKENIZERS:
            return PRE_TOKENIZERS[normal]
    raise ExportError(f"the tokenizer's split pattern {patterns[:1]} is not one llama.cpp implements (gpt2, cl100k / "
                      "Llama 3, Qwen2, o200k): llama.cpp would split text differently and the model would read other "
                      "tokens")


# --- architectures ---------------------------------------------------------------------------------------------------

# llama.cpp's architecture for each HF family (Mistral is Llama with a window llama.cpp does not apply; Mixtral is
# llama with experts, as llama.cpp's own converter writes it)
GGUF_ARCH = {"gpt2": "gpt2", "llama": "llama", "mistral": "llama", "mixtral": "llama", "qwen2": "qwen2",
             "qwen3": "qwen3", "qwen3_moe": "qwen3moe", "gemma2": "gemma2", "gemma3_text": "gemma3", "phi3": "phi3",
             "smollm3": "smollm3", "olmo2": "olmo2"}
# llama.cpp rotates interleaved pairs in these ("norm" RoPE); HF rotates two halves: q/k rows are permuted
_INTERLEAVED_ROPE = ("llama", "smollm3")
# llama.cpp's Gemma attention scale: 1/sqrt(head_dim), or 1/sqrt(d_model / heads) for the 27B shapes (by depth)
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's half-split rotary layout -> the interleaved one of llama.cpp's llama architecture (per head)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's interleaved rotary layout -> HF's half-split one (the inverse of `_permute`)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _layout(cfg, arch: str) -> dict[str, list[str]]:
    """lmforge parameter -> the GGUF tensors it is made of, in order (several: lmforge's fused q/k/v or gate/up,
    concatenated along the output rows, dim 0 of a matrix and dim 1 of stacked experts)."""
    m = {"embed.weight": ["token_embd.weight"], "norm.weight": ["output_norm.weight"]}
    if arch == "gpt2":
        m |= {"pos_embed.weight": ["position_embd.weight"], "norm.bias": ["output_norm.bias"]}
    if not cfg.tie_embeddings:
        m["lm_head.weight"] = ["output.weight"]
    fused_qkv = arch in ("gpt2", "phi3")  # their llama.cpp layouts keep q, k, v in one matrix, as lmforge does
    for i in range(cfg.n_layers):
        blk, ours = f"blk.{i}", f"layers.{i}"
        for norm, theirs in (("attn_norm", "attn_norm"), ("mlp_norm", "ffn_norm"),
                             ("post_attn_norm", "post_attention_norm"), ("post_mlp_norm", "post_ffw_norm")):
            m[f"{ours}.{norm}.weight"] = [f"{blk}.{theirs}.weight"]
            if arch == "gpt2":
                m[f"{ours}.{norm}.bias"] = [f"{blk}.{theirs}.bias"]
        for p in ("weight", "bias"):
            m[f"{ours}.attn.qkv_proj.{p}"] = [f"{blk}.attn_qkv.{p}"] if fused_qkv else \
                [f"{blk}.attn_{x}.{p}" for x in "qkv"]
            m[f"{ours}.attn.o_proj.{p}"] = [f"{blk}.attn_output.{p}"]
            m[f"{ours}.mlp.up_proj.{p}"] = [f"{blk}.ffn_up.{p}"]
            m[f"{ours}.mlp.down_proj.{p}"] = [f"{blk}.ffn_down.{p}"]
        m[f"{ours}.attn.q_norm.weight"] = [f"{blk}.attn_q_norm.weight"]
        m[f"{ours}.attn.k_norm.weight"] = [f"{blk}.attn_k_norm.weight"]
        # Phi-3 keeps gate and up in one matrix (llama.cpp's ffn_up of 2 x n_ff, gate first, as lmforge does)
        m[f"{ours}.mlp.gate_up_proj.weight"] = [f"{blk}.ffn_up.weight"] if arch == "phi3" else \
            [f"{blk}.ffn_gate.weight", f"{blk}.ffn_up.weight"]
        m[f"{ours}.mlp.router.weight"] = [f"{blk}.ffn_gate_inp.weight"]
        m[f"{ours}.mlp.experts.gate_up_proj"] = [f"{blk}.ffn_gate_exps.weight", f"{blk}.ffn_up_exps.weight"]
        m[f"{ours}.mlp.experts.down_proj"] = [f"{blk}.ffn_down_exps.weight"]
    return m


def _split_sizes(cfg, name: str, parts: int, t: np.ndarray) -> list[int]:
    if name.endswith(("qkv_proj.weight", "qkv_proj.bias")):
        return [cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim]
    axis = 1 if ".experts." in name else 0
    return [t.shape[axis] // parts] * parts


def _to_gguf(cfg, arch: str, state: dict) -> list[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array) for each of lmforge's tensors: fused ones split, q/k permuted for llama.cpp's
    interleaved RoPE, Gemma's norm weights stored as the 1 + w they scale by (llama.cpp's RMSNorm multiplies by w)."""
    layout = _layout(cfg, arch)
    out = []
    for name, t in state.items():
        data = t.float().numpy()
        if cfg.norm_offset and name.endswith("norm.weight"):
            data = data + cfg.norm_offset
        names = layout[name]
        pieces = np.split(data, np.cumsum(_split_sizes(cfg, name, len(names), data))[:-1],
                          axis=1 if ".experts." in name else 0) if len(names) > 1 else [data]
        for gguf_name, piece in zip(names, pieces):
            if arch in _INTERLEAVED_ROPE and gguf_name.endswith(("attn_q.weight", "attn_k.weight")):
                piece = _permute(piece, cfg.n_heads if "attn_q" in gguf_name else cfg.n_kv_heads)
            out.append((gguf_name, np.ascontiguousarray(piece)))
    if arch == "olmo2" and cfg.tie_embeddings:  # llama.cpp's olmo2 requires an output matrix
        out.append(("output.weight", state["embed.weight"].float().numpy()))
    return out


def _from_gguf(cfg, arch: str, tensors: dict[str, np.ndarray], where: Path) -> dict:
    """lmforge's state dict from GGUF tensors (the inverse of _to_gguf); every layout tensor must be there."""
    import torch

    layout = {k: v for k, v in _layout(cfg, arch).items()}
    with torch.device("meta"):
        from lmforge.model.transformer import Transformer

        wanted = list(Transformer(cfg).state_dict())
    missing = sorted(g for name in wanted for g in layout[name] if g not in tensors)
    if missing:
        raise ExportError(f"{where}: the {arch} layout needs tensors this file lacks: {missing[:4]}")
    state = {}
    for name in wanted:
        pieces = []
        for gguf_name in layout[name]:
            data = tensors[gguf_name]
            if arch in _INTERLEAVED_ROPE and gguf_name.endswith(("attn_q.weight", "attn_k.weight")):
                data = _unpermute(data, cfg.n_heads if "attn_q" in gguf_name else cfg.n_kv_heads)
            pieces.append(data)
        data = np.concatenate(pieces, axis=1 if ".experts." in name else 0) if len(pieces) > 1 else pieces[0]
        if cfg.norm_offset and name.endswith("norm.weight"):
            data = data - cfg.norm_offset
        state[name] = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))
    return state


def _warn(message: str) -> None:
    import warnings

    warnings.warn(f"lmforge: warning: {message}", stacklevel=3)


def _check_llama_cpp_can_run(cfg, arch: str, d: Path) -> None:
    """An ExportError naming what llama.cpp's architecture would compute differently from the model; a warning
    where it differs only past a sliding window llama.cpp does not apply."""
    family = cfg.arch
    if cfg.rope_scaling and cfg.rope_scaling.get("rope_type") not in ("linear", "longrope"):
        raise ExportError(f"{d}: rope_scaling {cfg.rope_scaling.get('rope_type')!r} is not written to GGUF by this "
                          "version (linear, and Phi-3's longrope, are)")
    if (cfg.rope_scaling or {}).get("rope_type") == "longrope" and arch != "phi3":
        raise ExportError(f"{d}: LongRoPE is written for llama.cpp's phi3 architecture only")
    if cfg.sliding_window is not None and arch not in ("gemma2", "gemma3"):
        _warn(f"llama.cpp's {arch} architecture has no sliding window: past {cfg.sliding_window} tokens of "
                  f"context it attends to more than {family} does")
    if arch in ("gemma2", "gemma3"):
        want = (cfg.d_model / cfg.n_heads if cfg.n_layers == _GEMMA_27B_LAYERS[arch] else cfg.head_dim) ** -0.5
        if abs((cfg.attn_scale or cfg.head_dim ** -0.5) - want) > 1e-6 * want:
            raise ExportError(f"{d}: query_pre_attn_scalar {round((cfg.attn_scale or 1) ** -2)}: llama.cpp's {arch} "
                              f"scales attention by {want:.6g} (1/sqrt(head_dim), or 1/sqrt(d_model/heads) for the "
                              f"27B shape)")
    if arch == "gemma2" and (cfg.attn_softcap is None or cfg.final_softcap is None or not cfg.tie_embeddings):
        raise ExportError(f"{d}: llama.cpp's gemma2 always soft-caps the attention and the logits and ties the head "
                          "to the embedding; this model does not")
    if arch in ("phi3", "olmo2") and cfg.head_dim * cfg.n_heads != cfg.d_model:
        raise ExportError(f"{d}: llama.cpp's {arch} needs head_dim x heads = d_model ({cfg.head_dim} x {cfg.n_heads} "
                          f"!= {cfg.d_model})")
    if arch == "smollm3" and cfg.no_rope_layers != tuple(i for i in range(cfg.n_layers) if (i + 1) % 4 == 0):
        raise ExportError(f"{d}: no_rope_layers: llama.cpp's smollm3 leaves RoPE out of every 4th layer exactly")
    if arch == "qwen3moe" and (cfg.moe_layers is not None or not cfg.moe_norm_topk):
        raise ExportError(f"{d}: llama.cpp's qwen3moe has experts in every layer and renormalises the top-k router "
                          "weights (mlp_only_layers / decoder_sparse_step / norm_topk_prob differ)")
    if cfg.n_experts and arch not in ("llama", "qwen3moe"):
        raise ExportError(f"{d}: experts in a {family} model have no place in llama.cpp's {arch}")


def _add_hyperparameters(w, cfg, arch: str, state: dict) -> None:
    """The architecture's metadata, as llama.cpp's convert_hf_to_gguf.py writes it for the family."""
    import gguf

    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.d_model)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.d_ff)
    w.add_head_count(cfg.n_heads)
    if arch == "gpt2":
        w.add_layer_norm_eps(cfg.norm_eps)
    else:
        w.add_head_count_kv(cfg.n_kv_heads)
        w.add_layer_norm_rms_eps(cfg.norm_eps)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_rope_dimension_count(cfg.rotary_dim)
    if cfg.head_dim != cfg.d_model // cfg.n_heads or arch in ("gemma2", "gemma3"):
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    scaling = cfg.rope_scaling or {}
    if scaling.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(scaling["factor"]))
    if scaling.get("rope_type") == "longrope":  # the factor tensors go with the weights (_rope_factor_tensors)
        from lmforge.model.transformer import rope_frequencies

        w.add_rope_scaling_orig_ctx_len(int(scaling["original_max_position_embeddings"]))
        w.add_rope_scaling_attn_factors(rope_frequencies(cfg)[1])
    if arch in ("gemma2", "gemma3") and cfg.sliding_window is not None:
        w.add_sliding_window(cfg.sliding_window)
        w.add_sliding_window_pattern([cfg.window(i) is not None for i in range(cfg.n_layers)])
    if arch == "gemma3":
        w.add_rope_freq_base_swa(cfg.rope_local_theta or cfg.rope_theta)
    if arch == "gemma2":
        w.add_attn_logit_softcapping(cfg.attn_softcap)
    if arch in ("gemma2", "gemma3") and cfg.final_softcap:
        w.add_final_logit_softcapping(cfg.final_softcap)
    if cfg.n_experts:
        w.add_expert_count(cfg.n_experts)
        w.add_expert_used_count(cfg.experts_top_k)
        if arch == "qwen3moe":
            w.add_expert_feed_forward_length(cfg.moe_d_ff or cfg.d_ff)


def _rope_factor_tensors(cfg) -> list[tuple[str, np.ndarray]]:
    scaling = cfg.rope_scaling or {}
    if scaling.get("rope_type") != "longrope":
        return []
    return [("rope_factors_long.weight", np.asarray(scaling["long_factor"], dtype=np.float32)),
            ("rope_factors_short.weight", np.asarray(scaling["short_factor"], dtype=np.float32))]


def _config_from_gguf(meta: dict, tensors: dict[str, list[int]], path: Path, ids: dict):
    """The ModelConfig a GGUF file describes (llama.cpp's reading of its metadata), for the archs GGUF_ARCH names."""
    from lmforge.model.config import ModelConfig
    from lmforge.model.hf import FAMILIES, LLAMA_SWITCHES

    arch = meta.get("general.architecture")

    def key(name: str, default=None):
        return _field(meta, f"{arch}.{name}", path, default)

    n_layers, d_model, n_heads = int(key("block_count")), int(key("embedding_length")), int(key("attention.head_count"))
    context = int(key("context_length"))
    common = dict(vocab_size=int(tensors["token_embd.weight"][1]), n_layers=n_layers, d_model=d_model,
                  n_heads=n_heads, d_ff=int(key("feed_forward_length")), max_seq_len=context,
                  tie_embeddings="output.weight" not in tensors, bos_token_id=ids["bos"], eos_token_id=ids["eos"])
    if arch == "gpt2":
        return ModelConfig(arch="gpt2", norm="layernorm", norm_eps=_f32(key("attention.layer_norm_epsilon", 1e-5)),
                           mlp="gelu", pos="learned", qkv_bias=True, proj_bias=True, **common)
    n_experts = int(meta.get(f"{arch}.expert_count", 0))
    family = {"llama": "mixtral" if n_experts else "llama", "qwen3moe": "qwen3_moe", "gemma3": "gemma3_text"}.get(arch,
                                                                                                                arch)
    head_dim = int(key("attention.key_length", d_model // n_heads))
    kw = dict(LLAMA_SWITCHES, **FAMILIES[family], arch=family, n_kv_heads=int(key("attention.head_count_kv", n_heads)),
              head_dim=head_dim, norm_eps=_f32(key("attention.layer_norm_rms_epsilon", 1e-6)),
              rope_theta=_f32(key("rope.freq_base", 10000.0)), **common)
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    if kind == "linear" or (kind == "none" and meta.get(f"{arch}.rope.scaling.factor", 0) not in (0, 1)):
        kw["rope_scaling"] = {"rope_type": "linear", "factor": _f32(key("rope.scaling.factor"))}
    elif kind not in ("none", None) or "rope_freqs.weight" in tensors:
        raise ExportError(f"{path}: RoPE scaling ({arch}.rope.scaling.type {kind!r} / rope_freqs) is not imported yet")
    rotary = int(key("rope.dimension_count", head_dim))
    if rotary != head_dim:
        if arch != "phi3":
            raise ExportError(f"{path}: {arch}.rope.dimension_count {rotary} of {head_dim}: partial rotary is "
                              "imported for phi3 only")
        kw["partial_rotary"] = rotary / head_dim
    if arch == "phi3" and "rope_factors_long.weight" in tensors:
        kw["rope_scaling"] = {"rope_type": "longrope",
                              "original_max_position_embeddings": int(key("rope.scaling.original_context_length")),
                              "long_factor": None, "short_factor": None}  # the factors come from their tensors
    if arch in ("gemma2", "gemma3"):
        want = (d_model / n_heads if n_layers == _GEMMA_27B_LAYERS[arch] else head_dim) ** -0.5
        kw["attn_scale"] = want  # what llama.cpp computes (query_pre_attn_scalar is not in the file)
        window = meta.get(f"{arch}.attention.sliding_window", 4096 if arch == "gemma2" else None)
        if window:
            pattern = meta.get(f"{arch}.attention.sliding_window_pattern", 2 if arch == "gemma2" else 6)
            slides = [bool(x) for x in pattern] if isinstance(pattern, list) else \
                [i % pattern < pattern - 1 for i in range(n_layers)]  # llama.cpp's set_swa_pattern
            kw["sliding_window"] = int(window)
            if not all(slides):
                kw["layer_types"] = tuple("sliding_attention" if s else "full_attention" for s in slides)
            if not any(slides):
                kw["sliding_window"] = None
        if arch == "gemma2":
            kw["attn_softcap"] = _f32(key("attn_logit_softcapping", 50.0))
            kw["final_softcap"] = _f32(key("final_logit_softcapping", 30.0))
        elif meta.get(f"{arch}.final_logit_softcapping"):
            kw["final_softcap"] = _f32(key("final_logit_softcapping"))
        if arch == "gemma3":
            kw["rope_local_theta"] = _f32(key("rope.freq_base_swa", 10000.0))
    if arch == "smollm3":
        kw["no_rope_layers"] = tuple(i for i in range(n_layers) if (i + 1) % 4 == 0)
    if n_experts:
        kw.update(n_experts=n_experts, experts_top_k=int(key("expert_used_count")))
        if arch == "qwen3moe":
            kw["moe_d_ff"] = int(key("expert_feed_forward_length"))
    return ModelConfig(**kw)


def export_gguf(model_dir: str | os.PathLike, out: str | os.PathLike, dtype: str = "f16",
                name: str | None = None) -> Path:
    """Write `out` (a .gguf file) from an HF model directory of any family in GGUF_ARCH, with its tokenizer."""
    import gguf

    from lmforge.model.hf import config_from_hf, read_config, read_state_dict, resolve_model_dir, transformer_from_tensors

    if dtype not in TYPES:
        raise ExportError(f"--type {dtype!r}: one of {', '.join(TYPES)}")
    d = resolve_model_dir(model_dir)
    hf_cfg = read_config(d)
    if "lmforge_quantization" in hf_cfg:
        raise ExportError(f"{d} is an lmforge int8/int4 directory; export the float model it was made from")
    cfg = config_from_hf(hf_cfg, str(d / "config.json"))
    arch = GGUF_ARCH.get(cfg.arch)
    if arch is None:
        raise ExportError(f"{d}: GGUF export supports {', '.join(GGUF_ARCH)} models; this is {cfg.arch!r}")
    _check_llama_cpp_can_run(cfg, arch, d)
    if not (d / "tokenizer.json").exists():
        raise ExportError(f"{d}: no tokenizer.json (GGUF carries the tokenizer)")
    tok_json = json.loads((d / "tokenizer.json").read_text(encoding="utf-8"))
    spm = _sentencepiece_style(tok_json)
    pre = None if spm else pre_tokenizer_type(tok_json)
    tok_cfg = json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8")) \
        if (d / "tokenizer_config.json").exists() else {}
    # through lmforge's own tensors: one name map per family (hf.py) and one per GGUF architecture (_layout)
    state = transformer_from_tensors(cfg, read_state_dict(d), d).state_dict()

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    w = gguf.GGUFWriter(str(tmp), arch)
    w.add_name(name or d.name)
    _add_hyperparameters(w, cfg, arch, state)
    w.add_vocab_size(cfg.vocab_size)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[dtype]
    w.add_file_type(file_type)
    if spm:
        _add_sentencepiece_tokenizer(w, tok_json, tok_cfg, cfg, d)
    else:
        _add_tokenizer(w, tok_json, tok_cfg, cfg, pre, d)
    qtype = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}[dtype]
    for target, data in _to_gguf(cfg, arch, state) + _rope_factor_tensors(cfg):
        if data.ndim == 1 or dtype == "f32":
            w.add_tensor(target, data.astype(np.float32))
        elif dtype == "f16" or data.shape[-1] % 32:
            w.add_tensor(target, data.astype(np.float16))
        else:
            w.add_tensor(target, gguf.quants.quantize(data.astype(np.float32), qtype), raw_dtype=qtype)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()
    os.replace(tmp, out)
    return out


def _sentencepiece_style(tokenizer_json: dict) -> bool:
    """A SentencePiece vocabulary in tokenizer.json form (Llama 2, Phi-3, Mistral v0.1): BPE with byte fallback over
    "▁"-for-space text."""
    model = tokenizer_json.get("model", {})
    return model.get("type") == "BPE" and bool(model.get("byte_fallback")) and "\u2581" in json.dumps(
        tokenizer_json.get("normalizer") or {}, ensure_ascii=False) + json.dumps(tokenizer_json.get("pre_tokenizer")
                                                                              or {}, ensure_ascii=False)


def _vocab(tok_json: dict, cfg, d: Path) -> tuple[dict[str, int], dict[str, dict], int]:
    """(token -> id with the added tokens, added tokens by text, the file's vocabulary size = the embedding's)."""
    vocab: dict[str, int] = dict(tok_json["model"]["vocab"])
    added = {t["content"]: t for t in tok_json.get("added_tokens", [])}
    for content, t in added.items():
        vocab[content] = t["id"]
    size = max(cfg.vocab_size, max(vocab.values()) + 1)
    if size > cfg.vocab_size:
        raise ExportError(f"{d}: the tokenizer has ids up to {size - 1} but the model's embedding has "
                          f"{cfg.vocab_size} rows")
    return vocab, added, size


def _special_ids(tok_cfg: dict, vocab: dict) -> dict[str, int | None]:
    def token_id(key: str) -> int | None:
        value = tok_cfg.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        return vocab.get(value) if isinstance(value, str) else None

    return {k: token_id(f"{k}_token") for k in ("bos", "eos", "pad", "unk")}


def _add_special_tokens(w, tok_json: dict, tok_cfg: dict, vocab: dict, cfg, d: Path, unk: int | None = None) -> None:
    """BOS / EOS / pad (/ unk) ids, whether the tokenizer puts a BOS first when it encodes for the model (Llama 3
    and Llama 2 yes; Qwen and GPT-2 no), the chat template and its end-of-turn token."""
    from tokenizers import Tokenizer

    ids = _special_ids(tok_cfg, vocab)
    eos = ids["eos"] if ids["eos"] is not None else cfg.eos_token_id
    for value, add in ((ids["bos"], w.add_bos_token_id), (eos, w.add_eos_token_id), (ids["pad"], w.add_pad_token_id),
                       (unk, w.add_unk_token_id)):
        if value is not None:
            add(value)
    first = Tokenizer.from_str(json.dumps(tok_json)).encode("a", add_special_tokens=True).ids[:1]
    w.add_add_bos_token(ids["bos"] is not None and first == [ids["bos"]])
    _add_chat_template(w, d, eos)


def _add_sentencepiece_tokenizer(w, tok_json: dict, tok_cfg: dict, cfg, d: Path) -> None:
    """llama.cpp's "llama" tokenizer (SentencePiece): pieces with "▁" for spaces, byte tokens <0xXX>, and scores that
    order the merges. tokenizer.json keeps merges, not scores, so a piece's score is minus the rank of the first merge
    that makes it: llama.cpp's SPM merges the highest-scoring pair first, which is the lowest-ranked merge, as HF's BPE
    does."""
    import gguf

    model = tok_json["model"]
    vocab, added, size = _vocab(tok_json, cfg, d)
    scores = [0.0] * size
    for rank, m in enumerate(model.get("merges", [])):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        i = vocab.get(a + b)
        if i is not None and scores[i] == 0.0:
            scores[i] = -float(rank + 1)
    unk = vocab.get(model.get("unk_token")) if model.get("unk_token") else _special_ids(tok_cfg, vocab)["unk"]
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for token, i in vocab.items():
        tokens[i] = token
        t = added.get(token)
        if i == unk:
            types[i] = gguf.TokenType.UNKNOWN
        elif t is not None:
            types[i] = gguf.TokenType.CONTROL if t.get("special") else gguf.TokenType.USER_DEFINED
        elif len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            types[i] = gguf.TokenType.BYTE
        else:
            types[i] = gguf.TokenType.NORMAL
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    prefix = '"Prepend"' in json.dumps(tok_json.get("normalizer") or {}) or '"prepend_scheme": "always"' in json.dumps(
        tok_json.get("pre_tokenizer") or {})
    w.add_add_space_prefix(prefix)
    _add_special_tokens(w, tok_json, tok_cfg, vocab, cfg, d, unk)


def _add_chat_template(w, d: Path, eos: int | None) -> None:
    """The model's own chat template, found as everywhere else (chat/templates.py: chat_template.jinja, then
    chat_template.json, then tokenizer_config.json's), and its end-of-turn token."""
    from lmforge.chat.stops import turn_end_ids
    from lmforge.chat.templates import resolve_template
    from lmforge.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(d)
    template, _ = resolve_template(tokenizer, required=False)
    if template is not None:
        w.add_chat_template(template)
        ends = [i for i in turn_end_ids(tokenizer, template) if i != eos]
        if ends:  # the end-of-turn token (ChatML's <|im_end|>, Phi-3's <|end|>): llama.cpp stops there in chat
            w.add_eot_token_id(ends[0])


def _add_tokenizer(w, tok_json: dict, tok_cfg: dict, cfg, pre: str, d: Path) -> None:
    """llama.cpp's "gpt2" tokenizer (byte-level BPE): tokens, types, merges and the pre-tokenizer type."""
    import gguf

    vocab, added, size = _vocab(tok_json, cfg, d)
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for token, i in vocab.items():
        tokens[i] = token
        t = added.get(token)
        types[i] = (gguf.TokenType.CONTROL if t.get("special") else gguf.TokenType.USER_DEFINED) if t \
            else gguf.TokenType.NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok_json["model"].get("merges", [])]
    if not merges:
        raise ExportError(f"{d}/tokenizer.json has no BPE merges: llama.cpp cannot tokenize with it")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    _add_special_tokens(w, tok_json, tok_cfg, vocab, cfg, d)


# --- GGUF -> HF ----------------------------------------------------------------------------------------------------

# llama.cpp's pre-tokenizer type -> the tokenizer.json pre_tokenizer of the HF models that carry it (SmolLM's splits
# every digit first; the split-pattern types are a Split + a regex-free ByteLevel, as Llama 3 / Qwen2 ship them)
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
_SPLIT_TYPES = {"llama-bpe": PATTERNS["cl100k"], "qwen2": QWEN2_PATTERN, "gpt-4o": PATTERNS["o200k"]}


def _hf_pre_tokenizer(pre: str, where: Path) -> dict:
    if pre in ("gpt-2", "gpt2"):
        return dict(_BYTE_LEVEL)
    if pre == "smollm":
        return {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, dict(_BYTE_LEVEL)]}
    if pre in _SPLIT_TYPES:
        return {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": _SPLIT_TYPES[pre]}, "behavior": "Isolated", "invert": False},
            {**_BYTE_LEVEL, "use_regex": False}]}
    raise ExportError(f"{where}: tokenizer.ggml.pre {pre!r} is not one this import knows (gpt-2, smollm, llama-bpe, "
                      "qwen2, gpt-4o): the text would be split differently from llama.cpp")


def _field(meta: dict, key: str, where: Path, default=None):
    if key in meta:
        return meta[key]
    if default is None:
        raise ExportError(f"{where}: GGUF metadata has no {key!r}")
    return default


def _f32(value) -> float:
    """A float32 metadata value as the decimal it was written from (9.999999747378752e-06 -> 1e-05)."""
    return float(np.format_float_positional(np.float32(value), unique=True, trim="-"))


def _gguf_tokenizer(meta: dict, where: Path, context: int) -> tuple[dict, dict, dict]:
    """(tokenizer.json, tokenizer_config.json, special ids) from a GGUF file's vocabulary: byte-level BPE ("gpt2") or
    SentencePiece ("llama")."""
    import gguf

    model = meta.get("tokenizer.ggml.model")
    if model == "llama":
        return _gguf_sentencepiece(meta, where, context)
    if model != "gpt2":
        raise ExportError(f"{where}: tokenizer.ggml.model {model!r}: this import reads byte-level BPE ('gpt2': GPT-2, "
                          "Llama 3, Qwen2, SmolLM) and SentencePiece ('llama': Llama 2, Mistral, Phi-3) vocabularies")
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = list(meta.get("tokenizer.ggml.token_type") or [gguf.TokenType.NORMAL] * len(tokens))
    merges = list(_field(meta, "tokenizer.ggml.merges", where))
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)  # a repeated string (padding rows) keeps its first id; the others are never produced
    added = _added_tokens(tokens, types)
    _strip_as_llama_cpp(meta, added)
    ids = {k: meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding", "unknown", "eot", "eom")}
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and ids["bos"] is not None
    if add_bos:
        bos = tokens[ids["bos"]]
        post = {"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {bos: {"id": bos, "ids": [ids["bos"]], "tokens": [bos]}}}
    else:
        post = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    pre = str(meta.get("tokenizer.ggml.pre", "gpt-2"))
    tok_json = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
                "pre_tokenizer": _hf_pre_tokenizer(pre, where), "post_processor": post,
                "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
                "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                          "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                          "ignore_merges": pre == "llama-bpe", "vocab": vocab, "merges": merges}}
    tok_cfg: dict = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": context,
                     "add_bos_token": add_bos, "clean_up_tokenization_spaces": False}
    _special_token_config(tok_cfg, ids, tokens)
    if isinstance(meta.get("tokenizer.chat_template"), str):
        tok_cfg["chat_template"] = meta["tokenizer.chat_template"]
    return tok_json, tok_cfg, ids


def _added_tokens(tokens: list[str], types: list[int], with_unknown: bool = False) -> list[dict]:
    """tokenizer.json's added_tokens: GGUF's control tokens (special) and user-defined ones (and the unknown token,
    special, for a SentencePiece vocabulary: <unk>)."""
    import gguf

    kinds = (gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED) + ((gguf.TokenType.UNKNOWN,) if with_unknown else ())
    return [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
             "special": types[i] != gguf.TokenType.USER_DEFINED} for i, t in enumerate(tokens) if types[i] in kinds]


def _strip_as_llama_cpp(meta: dict, added: list[dict]) -> None:
    """GGUF keeps no lstrip / rstrip per token; llama.cpp sets them by the model's name (llama-vocab.cpp): a Phi-3's
    special tokens eat the whitespace after them ("<|user|>\nhi" reads "hi"), as its tokenizer.json says, except
    <unk>, <s> and <|endoftext|>. The import gives transformers the same rule, so both read the file alike."""
    name = str(meta.get("general.name", "")).lower()
    if "phi-3" in name or "phi3" in name:
        for t in added:
            if t["special"] or t["content"] == "</s>":
                t["rstrip"] = t["content"] not in ("<unk>", "<s>", "<|endoftext|>")


def _special_token_config(tok_cfg: dict, ids: dict, tokens: list[str]) -> None:
    for key, name in (("bos", "bos_token"), ("eos", "eos_token"), ("padding", "pad_token"), ("unknown", "unk_token")):
        if ids[key] is not None and 0 <= ids[key] < len(tokens):
            tok_cfg[name] = tokens[ids[key]]


def _gguf_sentencepiece(meta: dict, where: Path, context: int) -> tuple[dict, dict, dict]:
    """A SentencePiece vocabulary (llama.cpp's "llama" tokenizer) as the tokenizer.json transformers converts such a
    model to: BPE with byte fallback whose merges are every split of a piece into two pieces, ranked by the merged
    piece's score (SentencePiece's BPE, and llama.cpp's, merge the adjacent pair whose union scores highest), the
    "▁" word marker, and tokenizer_class LlamaTokenizer so transformers (and lmforge) prepend it at the start only."""
    import gguf

    tokens = list(meta["tokenizer.ggml.tokens"])
    scores = list(_field(meta, "tokenizer.ggml.scores", where))
    types = list(meta.get("tokenizer.ggml.token_type") or [gguf.TokenType.NORMAL] * len(tokens))
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    normal = {t: i for t, i in vocab.items() if types[i] == gguf.TokenType.NORMAL}
    merges = []
    for piece, i in normal.items():
        for cut in range(1, len(piece)):
            a, b = piece[:cut], piece[cut:]
            if a in normal and b in normal:
                merges.append((-scores[i], normal[a], normal[b], a, b))
    merges.sort()
    ids = {k: meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding", "unknown", "eot", "eom")}
    unk = ids["unknown"] if ids["unknown"] is not None else next(
        (i for i, k in enumerate(types) if k == gguf.TokenType.UNKNOWN), None)
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and ids["bos"] is not None
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    bos = tokens[ids["bos"]] if add_bos else None
    single = ([{"SpecialToken": {"id": bos, "type_id": 0}}] if bos else []) + [{"Sequence": {"id": "A", "type_id": 0}}]
    post = {"type": "TemplateProcessing", "single": single,
            "pair": single + ([{"SpecialToken": {"id": bos, "type_id": 1}}] if bos else [])
            + [{"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [ids["bos"]], "tokens": [bos]}} if bos else {}}
    replace = {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}
    decoders = [{"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"},
                {"type": "Fuse"}] + ([{"type": "Strip", "content": " ", "start": 1, "stop": 0}] if prefix else [])
    added = _added_tokens(tokens, types, with_unknown=True)
    _strip_as_llama_cpp(meta, added)
    tok_json = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
                "normalizer": {"type": "Sequence", "normalizers": ([{"type": "Prepend", "prepend": "▁"}] if prefix
                                                                   else []) + [replace]},
                "pre_tokenizer": None, "post_processor": post,
                "decoder": {"type": "Sequence", "decoders": decoders},
                "model": {"type": "BPE", "dropout": None, "unk_token": tokens[unk] if unk is not None else None,
                          "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
                          "byte_fallback": True, "ignore_merges": False, "vocab": vocab,
                          "merges": [[a, b] for *_, a, b in merges]}}
    tok_cfg: dict = {"tokenizer_class": "LlamaTokenizer", "model_max_length": context, "add_bos_token": add_bos,
                     "add_eos_token": False, "add_prefix_space": prefix, "legacy": False,
                     "clean_up_tokenization_spaces": False}
    _special_token_config(tok_cfg, ids, tokens)
    if isinstance(meta.get("tokenizer.chat_template"), str):
        tok_cfg["chat_template"] = meta["tokenizer.chat_template"]
    return tok_json, tok_cfg, ids


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def read_gguf(path: Path) -> tuple[dict, dict[str, tuple[np.ndarray, int, list[int]]]]:
    """(metadata, {tensor name: (raw bytes or values as numpy, GGML type id, shape in GGUF's ne order)}) of a GGUF
    file (version 2 or 3), memory-mapped. The `gguf` package's GGUFReader builds a numpy view for every string of
    the vocabulary, slow for a large one (docs/benchmarks.md); this walks the bytes once (tested equal to GGUFReader)."""
    import struct

    import gguf

    try:
        mm = np.memmap(path, dtype=np.uint8, mode="r")
    except (ValueError, OSError) as e:  # an empty file cannot be mapped
        raise ExportError(f"{path}: not a readable GGUF file ({e})") from None
    buf = mm.data
    if len(mm) < 24 or bytes(buf[:4]) != b"GGUF":
        raise ExportError(f"{path}: not a readable GGUF file (no GGUF header)")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
    if version not in (2, 3):
        raise ExportError(f"{path}: GGUF version {version}; this reader knows 2 and 3")
    pos = 24

    def string() -> str:
        nonlocal pos
        (n,) = struct.unpack_from("<Q", buf, pos)
        pos += 8 + n
        return bytes(buf[pos - n:pos]).decode("utf-8", errors="replace")

    def value(kind: int):
        nonlocal pos
        if kind == 8:
            return string()
        if kind == 9:
            (item, n) = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            if item in _SCALARS:  # a numeric array: one unpack
                fmt = _SCALARS[item]
                size = struct.calcsize(fmt)
                out = list(struct.unpack_from(f"<{n}{fmt[1]}", buf, pos))
                pos += n * size
                return out
            return [value(item) for _ in range(n)]
        fmt = _SCALARS.get(kind)
        if fmt is None:
            raise ExportError(f"{path}: unknown GGUF value type {kind} at byte {pos}")
        (v,) = struct.unpack_from(fmt, buf, pos)
        pos += struct.calcsize(fmt)
        return v

    try:
        meta = {}
        for _ in range(n_kv):
            key = string()
            (kind,) = struct.unpack_from("<I", buf, pos)
            pos += 4
            meta[key] = value(kind)
        infos = []
        for _ in range(n_tensors):
            name = string()
            (n_dims,) = struct.unpack_from("<I", buf, pos)
            dims = list(struct.unpack_from(f"<{n_dims}Q", buf, pos + 4))
            kind, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
            pos += 4 + 8 * n_dims + 12
            infos.append((name, dims, kind, offset))
    except struct.error as e:
        raise ExportError(f"{path}: truncated GGUF header ({e})") from None
    align = int(meta.get("general.alignment", 32))
    start = -(-pos // align) * align
    tensors = {}
    for name, dims, kind, offset in infos:
        try:
            qtype = gguf.GGMLQuantizationType(kind)
        except ValueError:
            raise ExportError(f"{path}: tensor {name} has GGML type {kind}, which the gguf package does not know "
                              "(a newer file format?)") from None
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        shape = list(reversed(dims))  # numpy order: rows first
        n_bytes = int(np.prod(dims)) * type_size // block
        raw = mm[start + offset:start + offset + n_bytes]
        if len(raw) != n_bytes:
            raise ExportError(f"{path}: tensor {name} runs past the end of the file (truncated download?)")
        if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            data = raw.view(np.float32 if qtype == gguf.GGMLQuantizationType.F32 else np.float16).reshape(shape)
        else:  # blocks: the byte layout gguf.quants.dequantize takes, (rows, bytes per row)
            data = raw.reshape(shape[:-1] + [shape[-1] * type_size // block])
        tensors[name] = (data, kind, dims)
    return meta, tensors


def import_gguf(path: str | os.PathLike, out: str | os.PathLike, dtype: str = "fp32") -> Path:
    """Write an HF model directory (config.json, model.safetensors, tokenizer.json, tokenizer_config.json with the
    chat template, generation_config.json) from a GGUF file of any architecture in GGUF_ARCH (llama with experts
    becomes Mixtral), any tensor type the `gguf` package dequantizes (F32, F16, BF16, Q8_0, Q4_0/1, Q5_0/1,
    K-quants), a byte-level BPE vocabulary.

    Quantized weights are dequantized to `dtype` (fp32 by default: the values the file encodes, exactly), so the
    directory loads in lmforge and transformers alike and fine-tunes like any float model."""
    import gguf
    import torch

    from lmforge.files import StagedDirectory, save_tensors, write_json
    from lmforge.model.hf import config_from_hf, config_to_hf, generation_config, hf_tensors
    from lmforge.model.transformer import Transformer

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: no such GGUF file")
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype)
    if torch_dtype is None:
        raise ExportError(f"--dtype {dtype!r}: one of fp32, bf16, fp16")
    meta, raw_tensors = read_gguf(path)
    arch = meta.get("general.architecture")
    if arch not in set(GGUF_ARCH.values()):
        raise ExportError(f"{path}: GGUF architecture {arch!r}; this import reads {', '.join(sorted(set(GGUF_ARCH.values())))}")
    dims = {name: d for name, (_, _, d) in raw_tensors.items()}  # GGUF's ne order: columns first
    context = int(_field(meta, f"{arch}.context_length", path))
    tok_json, tok_cfg, ids = _gguf_tokenizer(meta, path, context)
    if "token_embd.weight" not in dims:
        raise ExportError(f"{path}: the {arch} layout needs tensors this file lacks: ['token_embd.weight']")
    vocab_rows = int(dims["token_embd.weight"][1])
    if len(meta["tokenizer.ggml.tokens"]) > vocab_rows:
        raise ExportError(f"{path}: {len(meta['tokenizer.ggml.tokens'])} tokens but token_embd has {vocab_rows} rows")

    def dequantized(name: str) -> np.ndarray:
        raw, kind, shape = raw_tensors[name]
        qtype = gguf.GGMLQuantizationType(kind)
        try:
            data = gguf.quants.dequantize(raw, qtype)
        except NotImplementedError:
            raise ExportError(f"{path}: tensor {name} is {qtype.name}, which the gguf package cannot "
                              "dequantize") from None
        return np.array(data, dtype=np.float32).reshape([int(x) for x in reversed(shape)])

    cfg = _config_from_gguf(meta, dims, path, ids)
    if (cfg.rope_scaling or {}).get("rope_type") == "longrope":  # Phi-3's factors are tensors in the file
        from lmforge.model.transformer import rope_frequencies

        cfg.rope_scaling.update(long_factor=dequantized("rope_factors_long.weight").tolist(),
                                short_factor=dequantized("rope_factors_short.weight").tolist())
        stated = meta.get(f"{arch}.rope.scaling.attn_factor")
        if stated is not None and abs(stated - rope_frequencies(cfg)[1]) > 1e-6:
            cfg.rope_scaling["attention_factor"] = _f32(stated)
    layout = _layout(cfg, arch)
    with torch.device("meta"):
        wanted = list(Transformer(cfg).state_dict())
    known = {g for name in wanted for g in layout[name]} | {"rope_factors_long.weight", "rope_factors_short.weight"}
    if arch == "olmo2":  # written even for a tied head (llama.cpp's olmo2 requires it); read as an untied one
        known.add("output.weight")
    unknown = sorted(n for n in dims if n not in known)
    if unknown:
        raise ExportError(f"{path}: tensors the {arch} layout has no place for: {unknown[:4]}")
    needed = {g for name in wanted for g in layout[name]}
    state = _from_gguf(cfg, arch, {n: dequantized(n) for n in dims if n in needed}, path)
    with torch.device("meta"):
        model = Transformer(cfg)
    model.load_state_dict(state, strict=True, assign=True)
    hf_config = config_to_hf(cfg)
    hf_config["torch_dtype"] = hf_config["dtype"] = str(torch_dtype).removeprefix("torch.")
    config_from_hf(hf_config, str(path))  # the config lmforge will read back is one it supports
    tensors = {k: v.to(torch_dtype).contiguous() for k, v in hf_tensors(model).items()}
    eos = ids["eos"]
    gen = generation_config(cfg)
    stops = [i for i in (eos, ids["eot"], ids["eom"]) if i is not None]
    if len(set(stops)) > 1:  # an instruct model ends a turn with its end-of-turn token
        gen["eos_token_id"] = list(dict.fromkeys(stops))
    if ids["padding"] is not None:
        gen["pad_token_id"] = ids["padding"]
    with StagedDirectory(out) as stage:
        save_tensors(tensors, stage.path("model.safetensors"), metadata={"format": "pt"})
        write_json(stage.path("tokenizer.json"), tok_json, indent=None)
        write_json(stage.path("tokenizer_config.json"), tok_cfg)
        write_json(stage.path("generation_config.json"), gen)
        write_json(stage.path("config.json"), hf_config)
    return Path(out)
