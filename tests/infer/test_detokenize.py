"""Streaming detokenization on real models' tokenizers: the streamed text equals the whole decode, for
SentencePiece-style (Phi-3, ChatGLM3) and byte-level (Qwen, lmforge) tokenizers, and never shows half a character."""

from __future__ import annotations

import pytest
import transformers

from lmforge.infer import IncrementalDetokenizer, decode_generated
from lmforge.tokenizer import load_tokenizer
from tests.corpora import chinese_news, english

TEXTS = [
    "veishru timay: the words keep  their spaces,\ttabs and\nnew lines.",
    chinese_news(400),
    "混合 mixed 文本 with emoji 😀🎉 and accents: café, naïve, Zürich. 数字 12345。",
    english(600),
]


def _stream(tokenizer, ids):
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.push(i) for i in ids]
    pieces.append(detok.flush())
    return pieces


def _reference(name, folder):
    if name == "chatglm3-6b":  # transformers needs remote code for it: the tokenizers library decodes
        from tokenizers import Tokenizer

        rust = Tokenizer.from_file(str(folder / "tokenizer.json"))
        return lambda ids: rust.decode(ids, skip_special_tokens=False)
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    return lambda ids: hf.decode(ids, skip_special_tokens=False)


@pytest.mark.parametrize("name", ["phi-3-mini-instruct", "chatglm3-6b", "qwen2.5-instruct", "qwen3", "lmforge"])
def test_streamed_text_equals_the_whole_decode(real_tokenizers, trained_dir, name):
    folder = trained_dir if name == "lmforge" else real_tokenizers[name]
    ours = load_tokenizer(folder)
    reference = _reference(name, folder)
    for text in TEXTS:
        ids = ours.encode(text)
        pieces = _stream(ours, ids)
        assert "".join(pieces) == reference(ids), (name, text[:40])
        assert all("\ufffd" not in p for p in pieces)
        # cut anywhere (max_new_tokens): the text so far, without a character left incomplete
        for k in range(1, min(len(ids), 80)):
            pieces = _stream(ours, ids[:k])
            assert all("\ufffd" not in p for p in pieces), (name, k)
            complete = max(j for j in range(k + 1) if not reference(ids[:j]).endswith("\ufffd"))
            got = "".join(pieces)
            assert got == reference(ids[:complete]), (name, k)
            assert decode_generated(ours, ids[:k]) == got


def test_a_character_cut_by_the_token_limit_is_dropped(real_tokenizers):
    """Phi-3 spells rare characters as byte-fallback tokens; stopping inside one prints no U+FFFD."""
    ours = load_tokenizer(real_tokenizers["phi-3-mini-instruct"])
    ids = ours.encode("他说𠜎好")  # a CJK Extension B character: four byte tokens
    tokens = [ours.id_to_token(i) for i in ids]
    first_byte = next(i for i, t in enumerate(tokens) if t.startswith("<0x"))
    cut = ids[:first_byte + 2]
    assert ours.decode(cut).endswith("\ufffd")
    assert "".join(_stream(ours, cut)) == ours.decode(cut).rstrip("\ufffd") == "他说"
    # a real U+FFFD in the text is kept
    ids = ours.encode("a\ufffd")
    assert "".join(_stream(ours, ids)) == ours.decode(ids)
