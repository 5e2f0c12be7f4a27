"""Tiny random models for tests, saved with transformers in HF layout over a real lmforge tokenizer."""

from __future__ import annotations

import shutil
from pathlib import Path


def tiny_llama(out: Path, tokenizer_dir: Path, hidden: int = 64, max_positions: int = 256, tie: bool = True) -> Path:
    """A 2-block Llama (4 heads, 2 KV heads, SwiGLU 2 x hidden) sized to the tokenizer in `tokenizer_dir`, random
    weights from seed 0, with the tokenizer files copied beside it (its end-of-text token as eos)."""
    import torch
    import transformers

    from lmforge.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=max_positions, tie_word_embeddings=tie,
                                   eos_token_id=tok.special_tokens["<|endoftext|>"])
    transformers.LlamaForCausalLM(cfg).save_pretrained(out)
    if Path(tokenizer_dir).resolve() != Path(out).resolve():
        for f in Path(tokenizer_dir).iterdir():
            shutil.copy(f, Path(out) / f.name)
    return Path(out)
