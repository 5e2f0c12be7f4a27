"""Tokenization: byte-level BPE training, encoding/decoding, HF and GPT-2 formats (a tokenizer carries its chat
template; lmforge.chat renders it).

    from lmforge.tokenizer import train_tokenizer, load_tokenizer
    tok = train_tokenizer("builtin:python-docs", vocab_size=4096)
    tok.save("out/tok"); tok = load_tokenizer("out/tok")
    ids = tok.encode("def f(): 返回值")
"""

from lmforge.tokenizer.bpe import DEFAULT_SPECIALS, TrainingError, train_bpe, train_tokenizer
from lmforge.tokenizer.formats import TokenizerFormatError, load_gpt2_files, load_hf_json, load_tokenizer
from lmforge.tokenizer.patterns import PATTERNS
from lmforge.tokenizer.tokenizer import BPETokenizer, DisallowedSpecialError, HFTokenizer, Tokenizer, TokenizerError

__all__ = [
    "BPETokenizer", "DEFAULT_SPECIALS", "DisallowedSpecialError", "HFTokenizer", "PATTERNS", "Tokenizer",
    "TokenizerError", "TokenizerFormatError", "TrainingError", "load_gpt2_files", "load_hf_json", "load_tokenizer",
    "train_bpe", "train_tokenizer",
]
