"""Prompt tuning (Lester et al. 2021): learned embeddings of `n` virtual tokens put before every sequence; only
they train. Saved as peft saves it (`adapter_config.json` with `"peft_type": "PROMPT_TUNING"`, the tensor
`prompt_embeddings` in adapter_model.safetensors), and `peft.PeftModel.from_pretrained` on the transformers
model gives lmforge's logits for the real tokens (tested). The embeddings start as those of `n` vocabulary
tokens drawn at random (peft's SAMPLE_VOCAB), which trains faster than noise.

The generation engine decodes a prompt- or prefix-tuned model from a KV cache that starts with the virtual tokens
(infer/engine.py's Decoder; `Transformer.prefill_prefix` writes a prefix's keys and values), with the tokens of
decoding without a cache (tested).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn

PEFT_TYPE = "PROMPT_TUNING"


def has_prompt(model: nn.Module) -> bool:
    return getattr(model, "prompt_embeddings", None) is not None


def apply_prompt_tuning(model: nn.Module, num_virtual_tokens: int = 20, seed: int = 0) -> None:
    """Freeze the model and give it `num_virtual_tokens` trainable virtual-token embeddings, in place."""
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, model.cfg.vocab_size, (num_virtual_tokens,), generator=g)
    init = model.embed.weight.detach()[rows.to(model.embed.weight.device)].clone()
    model.prompt_embeddings = nn.Parameter(init)


def save_prompt(model: nn.Module, directory: str | os.PathLike, base_model_name_or_path: str | None = None) -> None:
    from lmforge.files import StagedDirectory, save_tensors, write_json

    p = model.prompt_embeddings
    with StagedDirectory(directory) as stage:
        save_tensors({"prompt_embeddings": p.detach().contiguous()}, stage.path("adapter_model.safetensors"),
                     metadata={"format": "pt"})
        write_json(stage.path("adapter_config.json"), {
            "peft_type": PEFT_TYPE, "task_type": "CAUSAL_LM", "num_virtual_tokens": int(p.shape[0]),
            "token_dim": int(p.shape[1]), "num_transformer_submodules": 1, "num_attention_heads": model.cfg.n_heads,
            "num_layers": model.cfg.n_layers, "prompt_tuning_init": "SAMPLE_VOCAB",
            "base_model_name_or_path": base_model_name_or_path, "inference_mode": True})


def load_prompt(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """The virtual tokens of a peft PROMPT_TUNING directory (lmforge's or peft's) on a base model, in place."""
    from safetensors.torch import load_file

    from lmforge.model.hf import CheckpointError

    raw = json.loads((Path(directory) / "adapter_config.json").read_text(encoding="utf-8"))
    if raw.get("peft_type") != PEFT_TYPE:
        raise CheckpointError(f"{directory}: not a prompt-tuning adapter (peft_type {raw.get('peft_type')!r})")
    tensors = load_file(str(Path(directory) / "adapter_model.safetensors"))
    if "prompt_embeddings" not in tensors:
        raise CheckpointError(f"{directory}: adapter_model.safetensors has no prompt_embeddings")
    t = tensors["prompt_embeddings"]
    if t.shape[1] != model.cfg.d_model or t.shape[0] != int(raw.get("num_virtual_tokens", t.shape[0])):
        raise CheckpointError(f"{directory}: prompt_embeddings {tuple(t.shape)} do not fit this model "
                              f"(d_model {model.cfg.d_model})")
    if not has_prompt(model):
        for p in model.parameters():
            p.requires_grad_(False)
        model.prompt_embeddings = nn.Parameter(t.to(model.embed.weight.dtype).clone())
    else:
        with torch.no_grad():
            model.prompt_embeddings.copy_(t)
    return model


# --- prefix tuning -------------------------------------------------------------------------------------------------

PREFIX_TYPE = "PREFIX_TUNING"


def has_prefix(model: nn.Module) -> bool:
    return getattr(model, "n_prefix", 0) > 0


def apply_prefix_tuning(model: nn.Module, num_virtual_tokens: int = 20, seed: int = 0) -> None:
    """Freeze the model and give every attention layer `num_virtual_tokens` learned keys and values that all
    positions attend to (Li & Liang 2021, without the reparametrising MLP, as peft's prefix_projection=False);
    the real tokens' positions start after them, as after a KV cache of that length. In place."""
    cfg = model.cfg
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    ref = model.embed.weight
    for block in model.layers:
        shape = (cfg.n_kv_heads, num_virtual_tokens, cfg.head_dim)
        block.attn.prefix_key = nn.Parameter((torch.randn(shape, generator=g) * 0.02).to(ref.device, ref.dtype))
        block.attn.prefix_value = nn.Parameter((torch.randn(shape, generator=g) * 0.02).to(ref.device, ref.dtype))
    model.n_prefix = num_virtual_tokens


def _prefix_matrix(model: nn.Module) -> torch.Tensor:
    """peft's layout: (n, layers x 2 x kv_heads x head_dim), layer l's keys at 2l and values at 2l + 1."""
    parts = []
    for block in model.layers:
        parts += [block.attn.prefix_key.detach().transpose(0, 1), block.attn.prefix_value.detach().transpose(0, 1)]
    n = model.n_prefix
    return torch.stack(parts, dim=1).reshape(n, -1).contiguous()


def save_prefix(model: nn.Module, directory: str | os.PathLike, base_model_name_or_path: str | None = None) -> None:
    from lmforge.files import StagedDirectory, save_tensors, write_json

    cfg = model.cfg
    token_dim = cfg.n_kv_heads * cfg.head_dim
    with StagedDirectory(directory) as stage:
        save_tensors({"prompt_embeddings": _prefix_matrix(model)}, stage.path("adapter_model.safetensors"),
                     metadata={"format": "pt"})
        write_json(stage.path("adapter_config.json"), {
            "peft_type": PREFIX_TYPE, "task_type": "CAUSAL_LM", "num_virtual_tokens": model.n_prefix,
            "token_dim": token_dim, "num_transformer_submodules": 1, "num_attention_heads": cfg.n_kv_heads,
            "num_layers": cfg.n_layers, "encoder_hidden_size": token_dim, "prefix_projection": False,
            "base_model_name_or_path": base_model_name_or_path, "inference_mode": True})


def load_prefix(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """The prefixes of a peft PREFIX_TUNING directory (without prefix_projection) on a base model, in place."""
    from safetensors.torch import load_file

    from lmforge.model.hf import CheckpointError

    raw = json.loads((Path(directory) / "adapter_config.json").read_text(encoding="utf-8"))
    if raw.get("peft_type") != PREFIX_TYPE:
        raise CheckpointError(f"{directory}: not a prefix-tuning adapter (peft_type {raw.get('peft_type')!r})")
    if raw.get("prefix_projection"):
        raise CheckpointError(f"{directory}: prefix_projection (the reparametrising MLP) is not supported; save the "
                              "adapter after training, when peft keeps only the prefixes")
    cfg = model.cfg
    n = int(raw["num_virtual_tokens"])
    w = load_file(str(Path(directory) / "adapter_model.safetensors")).get("prompt_embeddings")
    if w is None or tuple(w.shape) != (n, cfg.n_layers * 2 * cfg.n_kv_heads * cfg.head_dim):
        raise CheckpointError(f"{directory}: its prefixes do not fit this model ({cfg.n_layers} layers, "
                              f"{cfg.n_kv_heads} KV heads of {cfg.head_dim})")
    if not has_prefix(model):
        apply_prefix_tuning(model, n)
    parts = w.view(n, cfg.n_layers * 2, cfg.n_kv_heads, cfg.head_dim)
    with torch.no_grad():
        for i, block in enumerate(model.layers):
            block.attn.prefix_key.copy_(parts[:, 2 * i].transpose(0, 1))
            block.attn.prefix_value.copy_(parts[:, 2 * i + 1].transpose(0, 1))
    return model
