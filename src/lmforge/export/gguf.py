"""Export an HF-layout model directory to GGUF, the file llama.cpp and ollama load.

lmforge writes the GGUF itself (with the `gguf` package's writer) instead of going through llama.cpp's converter,
which refuses any vocabulary it does not recognise by fingerprint ("BPE pre-tokenizer was not recognized",
llama.cpp#9927): a self-trained tokenizer is declared by its split pattern, which is what llama.cpp's pre-tokenizer
types stand for:

  gpt2 pattern   -> "gpt-2"       cl100k pattern -> "llama-bpe" (Llama 3's, the same regex)
  Qwen2's        -> "qwen2"       o200k pattern  -> "gpt-4o"

Supported: byte-level BPE tokenizers (lmforge's own, GPT-2, Qwen2.5, Llama 3 style), SentencePiece vocabularies in
tokenizer.json form (Llama 2, Phi-3, Mistral v0.1: llama.cpp's "llama" tokenizer, scores derived from the merge
ranks), and the llama (Llama, Mistral, SmolLM), qwen2 and gpt2 architectures; tensors in f32, f16, q8_0 or q4_0
(1-D tensors stay f32; a matrix whose rows do not split into 32-value blocks stays f16). The chat template and the
end-of-turn token travel in the file, so llama.cpp stops where the fine-tuned model learned to.

HF's Llama checkpoints rotate q/k in two halves (NeoX style); llama.cpp's llama architecture rotates interleaved
pairs, so q and k rows are permuted on the way, as llama.cpp's convert_hf_to_gguf.py does. Qwen2 uses NeoX rotation
in llama.cpp too: no permutation.
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


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's half-split rotary layout -> the interleaved one of llama.cpp's llama architecture (per head)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensor_names(arch: str, n_layers: int) -> dict[str, str]:
    if arch == "gpt2":  # (llama.cpp reuses token_embd as the output head when output.weight is absent)
        names = {"transformer.wte.weight": "token_embd.weight", "transformer.wpe.weight": "position_embd.weight",
                 "transformer.ln_f.weight": "output_norm.weight", "transformer.ln_f.bias": "output_norm.bias",
                 "lm_head.weight": "output.weight"}
        per = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
               "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
        for i in range(n_layers):
            for hf, gg in per.items():
                for p in ("weight", "bias"):
                    names[f"transformer.h.{i}.{hf}.{p}"] = f"blk.{i}.{gg}.{p}"
        return names
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
           "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
           "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
           "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
           "mlp.down_proj.weight": "ffn_down.weight"}
    if arch == "qwen2":
        per |= {"self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
                "self_attn.v_proj.bias": "attn_v.bias"}
    for i in range(n_layers):
        for hf, gg in per.items():
            names[f"model.layers.{i}.{hf}"] = f"blk.{i}.{gg}"
    return names


def export_gguf(model_dir: str | os.PathLike, out: str | os.PathLike, dtype: str = "f16",
                name: str | None = None) -> Path:
    """Write `out` (a .gguf file) from an HF model directory with a byte-level BPE tokenizer.json."""
    import gguf

    from lmforge.model.hf import _read_config, config_from_hf, read_state_dict, resolve_model_dir

    if dtype not in TYPES:
        raise ExportError(f"--type {dtype!r}: one of {', '.join(TYPES)}")
    d = resolve_model_dir(model_dir)
    hf_cfg = _read_config(d)
    cfg = config_from_hf(hf_cfg, str(d / "config.json"))
    hf_arch = hf_cfg.get("model_type")
    arch = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "gpt2": "gpt2"}.get(hf_arch)
    if arch is None:
        raise ExportError(f"{d}: GGUF export supports gpt2, llama, mistral and qwen2 models; this is {hf_arch!r}")
    if arch != "gpt2" and (cfg.qk_norm or cfg.n_experts or cfg.pos != "rope" or cfg.norm != "rmsnorm"
                           or cfg.mlp != "swiglu"):
        raise ExportError(f"{d}: a {hf_arch} variant GGUF's {arch} architecture does not describe (qk-norm, experts, "
                          "non-RoPE positions or a non-RMSNorm/SwiGLU block)")
    if arch != "gpt2" and ((cfg.qkv_bias and arch != "qwen2") or cfg.proj_bias):
        raise ExportError(f"{d}: attention or projection biases are not part of llama.cpp's {arch} architecture")
    if not (d / "tokenizer.json").exists():
        raise ExportError(f"{d}: no tokenizer.json (GGUF carries the tokenizer)")
    tok_json = json.loads((d / "tokenizer.json").read_text(encoding="utf-8"))
    spm = _sentencepiece_style(tok_json)
    pre = None if spm else pre_tokenizer_type(tok_json)
    tok_cfg = json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8")) \
        if (d / "tokenizer_config.json").exists() else {}

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    w = gguf.GGUFWriter(str(tmp), arch)
    w.add_name(name or d.name)
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
        w.add_rope_dimension_count(cfg.head_dim)
    if cfg.head_dim != cfg.d_model // cfg.n_heads:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    if cfg.rope_scaling:
        raise ExportError(f"{d}: rope_scaling {cfg.rope_scaling} is not written to GGUF by this version")
    w.add_vocab_size(cfg.vocab_size)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[dtype]
    w.add_file_type(file_type)
    if spm:
        _add_sentencepiece_tokenizer(w, tok_json, tok_cfg, cfg, d)
    else:
        _add_tokenizer(w, tok_json, tok_cfg, cfg, pre, d)

    state = read_state_dict(d)
    if arch == "gpt2":  # the causal-mask buffers old checkpoints carry are not weights; GPT2Model has no prefix
        state = {(k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k): v
                 for k, v in state.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    names = _tensor_names(arch, cfg.n_layers)
    unknown = sorted(k for k in state if k not in names)
    if unknown:
        raise ExportError(f"{d}: tensors GGUF's {arch} layout has no place for: {unknown[:4]}")
    qtype = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}[dtype]
    for hf_name, tensor in state.items():
        data = tensor.float().numpy()
        if arch == "gpt2" and hf_name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")):
            data = np.ascontiguousarray(data.T)  # GPT-2's Conv1D keeps (in, out); GGUF wants (out, in) like Linear
        if arch == "llama" and hf_name.endswith("self_attn.q_proj.weight"):
            data = _permute(data, cfg.n_heads)
        elif arch == "llama" and hf_name.endswith("self_attn.k_proj.weight"):
            data = _permute(data, cfg.n_kv_heads)
        target = names[hf_name]
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


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's interleaved rotary layout -> HF's half-split one (the inverse of `_permute`)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_tokenizer(meta: dict, where: Path, context: int) -> tuple[dict, dict, dict]:
    """(tokenizer.json, tokenizer_config.json, special ids) from a GGUF file's byte-level BPE vocabulary."""
    import gguf

    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise ExportError(f"{where}: tokenizer.ggml.model {model!r}: this import reads byte-level BPE vocabularies "
                          "('gpt2': GPT-2, Llama 3, Qwen2, SmolLM); SentencePiece ('llama') is not supported yet")
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = list(meta.get("tokenizer.ggml.token_type") or [gguf.TokenType.NORMAL] * len(tokens))
    merges = list(_field(meta, "tokenizer.ggml.merges", where))
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)  # a repeated string (padding rows) keeps its first id; the others are never produced
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": types[i] == gguf.TokenType.CONTROL}
             for i, t in enumerate(tokens) if types[i] in (gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED)]
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
    for key, name in (("bos", "bos_token"), ("eos", "eos_token"), ("padding", "pad_token"), ("unknown", "unk_token")):
        if ids[key] is not None and 0 <= ids[key] < len(tokens):
            tok_cfg[name] = tokens[ids[key]]
    if isinstance(meta.get("tokenizer.chat_template"), str):
        tok_cfg["chat_template"] = meta["tokenizer.chat_template"]
    return tok_json, tok_cfg, ids


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def read_gguf(path: Path) -> tuple[dict, dict[str, tuple[np.ndarray, int, list[int]]]]:
    """(metadata, {tensor name: (raw bytes or values as numpy, GGML type id, shape in GGUF's ne order)}) of a GGUF
    file (version 2 or 3), memory-mapped. The `gguf` package's GGUFReader builds a numpy view for every string of
    the vocabulary, 6 s for Qwen2.5's 151k tokens; this walks the bytes once (tested equal to GGUFReader)."""
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
    chat template, generation_config.json) from a GGUF file: llama, qwen2 and gpt2 architectures, any tensor type
    the `gguf` package dequantizes (F32, F16, BF16, Q8_0, Q4_0/1, Q5_0/1, K-quants), a byte-level BPE vocabulary.

    Quantized weights are dequantized to `dtype` (fp32 by default: the values the file encodes, exactly), so the
    directory loads in lmforge and transformers alike and fine-tunes like any float model."""
    import gguf
    import torch

    from lmforge.files import StagedDirectory, save_tensors, write_json
    from lmforge.model.config import ModelConfig
    from lmforge.model.hf import config_from_hf, config_to_hf, generation_config

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: no such GGUF file")
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype)
    if torch_dtype is None:
        raise ExportError(f"--dtype {dtype!r}: one of fp32, bf16, fp16")
    meta, raw_tensors = read_gguf(path)
    arch = meta.get("general.architecture")
    if arch not in ("llama", "qwen2", "gpt2"):
        raise ExportError(f"{path}: GGUF architecture {arch!r}; this import reads llama (Llama, Mistral, SmolLM), "
                          "qwen2 and gpt2")
    tensors = {name: dims for name, (_, _, dims) in raw_tensors.items()}  # GGUF's ne order: columns first
    if "rope_freqs.weight" in tensors or meta.get(f"{arch}.rope.scaling.type", "none") not in ("none", None):
        raise ExportError(f"{path}: RoPE scaling (rope_freqs or {arch}.rope.scaling.*) is not imported yet")
    n_layers = int(_field(meta, f"{arch}.block_count", path))
    d_model = int(_field(meta, f"{arch}.embedding_length", path))
    n_heads = int(_field(meta, f"{arch}.attention.head_count", path))
    n_kv = int(meta.get(f"{arch}.attention.head_count_kv", n_heads))
    context = int(_field(meta, f"{arch}.context_length", path))
    names = {gg: hf for hf, gg in _tensor_names(arch, n_layers).items()}
    unknown = sorted(n for n in tensors if n not in names)
    if unknown:
        raise ExportError(f"{path}: tensors the {arch} layout has no place for: {unknown[:4]}")
    missing = sorted(n for n in names if n not in tensors and n != "output.weight")  # no output: a tied head
    if missing:
        raise ExportError(f"{path}: the {arch} layout needs tensors this file lacks: {missing[:4]}")
    vocab_rows = int(tensors["token_embd.weight"][1])
    tok_json, tok_cfg, ids = _gguf_tokenizer(meta, path, context)
    if len(meta["tokenizer.ggml.tokens"]) > vocab_rows:
        raise ExportError(f"{path}: {len(meta['tokenizer.ggml.tokens'])} tokens but token_embd has {vocab_rows} rows")
    eos = ids["eos"]
    common = dict(vocab_size=vocab_rows, n_layers=n_layers, d_model=d_model, n_heads=n_heads,
                  d_ff=int(_field(meta, f"{arch}.feed_forward_length", path)), max_seq_len=context,
                  tie_embeddings="output.weight" not in tensors, bos_token_id=ids["bos"], eos_token_id=eos)
    if arch == "gpt2":
        cfg = ModelConfig(arch="gpt2", norm="layernorm", norm_eps=_f32(meta.get("gpt2.attention.layer_norm_epsilon",
                          1e-5)), mlp="gelu", pos="learned", qkv_bias=True, proj_bias=True, **common)
    else:
        head_dim = int(meta.get(f"{arch}.attention.key_length", d_model // n_heads))
        cfg = ModelConfig(arch=arch, n_kv_heads=n_kv, head_dim=head_dim, norm="rmsnorm",
                          norm_eps=_f32(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)), mlp="swiglu",
                          pos="rope", rope_theta=_f32(meta.get(f"{arch}.rope.freq_base", 10000.0)),
                          qkv_bias=arch == "qwen2", proj_bias=False, **common)
    hf_config = config_to_hf(cfg)
    hf_config["torch_dtype"] = hf_config["dtype"] = str(torch_dtype).removeprefix("torch.")
    config_from_hf(hf_config, str(path))  # the config lmforge will read back is one it supports

    state: dict[str, torch.Tensor] = {}
    for name, (raw, kind, dims) in raw_tensors.items():
        qtype = gguf.GGMLQuantizationType(kind)
        try:
            data = gguf.quants.dequantize(raw, qtype)
        except NotImplementedError:
            raise ExportError(f"{path}: tensor {name} is {qtype.name}, which the gguf package cannot "
                              "dequantize") from None
        data = np.array(data, dtype=np.float32).reshape([int(x) for x in reversed(dims)])
        hf_name = names[name]
        if arch == "llama" and name.endswith("attn_q.weight"):
            data = _unpermute(data, n_heads)
        elif arch == "llama" and name.endswith("attn_k.weight"):
            data = _unpermute(data, n_kv)
        elif arch == "gpt2" and name.endswith(("attn_qkv.weight", "attn_output.weight", "ffn_up.weight",
                                               "ffn_down.weight")):
            data = data.T  # back to GPT-2's Conv1D (in, out)
        state[hf_name] = torch.from_numpy(np.ascontiguousarray(data)).to(torch_dtype)
    gen = generation_config(cfg)
    stops = [i for i in (eos, ids["eot"], ids["eom"]) if i is not None]
    if len(set(stops)) > 1:  # an instruct model ends a turn with its end-of-turn token
        gen["eos_token_id"] = list(dict.fromkeys(stops))
    if ids["padding"] is not None:
        gen["pad_token_id"] = ids["padding"]
    with StagedDirectory(out) as stage:
        save_tensors(state, stage.path("model.safetensors"), metadata={"format": "pt"})
        write_json(stage.path("tokenizer.json"), tok_json, indent=None)
        write_json(stage.path("tokenizer_config.json"), tok_cfg)
        write_json(stage.path("generation_config.json"), gen)
        write_json(stage.path("config.json"), hf_config)
    return Path(out)
