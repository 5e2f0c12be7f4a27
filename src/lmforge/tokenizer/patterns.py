"""Pre-tokenization patterns: the published regexes that split text before BPE.

BPE never merges across the pieces these patterns produce, so they decide what a token
can be (e.g. a word with its leading space, at most three digits). The strings are the
published ones, in the form that Python's `regex`, tiktoken (fancy-regex) and HF
tokenizers (Oniguruma) all accept.
"""

from __future__ import annotations

PATTERNS = {
    # GPT-2 (openai/gpt-2 src/encoder.py).
    "gpt2": r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
    # GPT-4 / cl100k_base: case-insensitive contractions, digits in groups of at most 3,
    # newlines kept apart from other whitespace.
    "cl100k": r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
    # GPT-4o / o200k_base: splits camelCase and keeps combining marks with their letters,
    # which suits scripts beyond Latin.
    "o200k": "|".join([
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]),
}


def resolve_pattern(name_or_regex: str) -> str:
    """A preset name (gpt2, cl100k, o200k) or a custom regex, checked to compile."""
    if name_or_regex in PATTERNS:
        return PATTERNS[name_or_regex]
    import regex

    try:
        regex.compile(name_or_regex)
    except regex.error as e:
        from lmforge.tokenizer.tokenizer import TokenizerError

        raise TokenizerError(f"pattern {name_or_regex!r} is neither a preset ({', '.join(PATTERNS)}) "
                         f"nor a valid regex: {e}") from None
    return name_or_regex
