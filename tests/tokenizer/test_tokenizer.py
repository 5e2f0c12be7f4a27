"""Encoding and decoding: round trips, fast path vs reference, special tokens vs tiktoken."""

from __future__ import annotations

import pytest
import tiktoken
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmforge.tokenizer import DisallowedSpecialError, TokenizerError
from tests import corpora

# every code point, lone surrogates included (hypothesis leaves category Cs out by default)
any_text = st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=300)
fixture_ok = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@fixture_ok
@given(text=any_text)
def test_round_trip_any_unicode(trained, text):
    ids = trained.encode(text, disallowed_special=())
    assert trained.decode(ids) == text
    assert ids == trained.encode(text, disallowed_special=(), reference=True)


@pytest.mark.parametrize("text", [
    "", "\x00", "a\x00b", "\ud800", "x\udfffy\ud83d", "😀👩‍👩‍👧", "e\u0301\u0308", "\r\n\t \u3000",
    "混合 English 和中文，还有标点！", "\U0010ffff", "'s 's 'S", "1234567",
])
def test_round_trip_edge_cases(trained, text):
    ids = trained.encode(text)
    assert trained.decode(ids) == text
    assert ids == trained.encode(text, reference=True)


@pytest.mark.parametrize("text", [corpora.english(), corpora.chinese_news(), corpora.chinese_reviews()],
                         ids=["python-docs", "people-daily", "reviews"])
def test_fast_path_equals_reference_on_real_text(trained, text):
    ids = trained.encode(text)
    assert ids == trained.encode(text, reference=True)
    assert trained.decode(ids) == text


def test_ranks_behave_like_tiktoken_on_its_own_encoding(trained):
    """Our reference encoder, given tiktoken's ranks, reproduces tiktoken (the peer) exactly."""
    enc = tiktoken.Encoding("peer", pat_str=trained.pattern, mergeable_ranks=trained.ranks,
                            special_tokens=trained.special_tokens)
    text = corpora.english(50_000) + corpora.chinese_reviews(20_000)
    assert trained._encode_reference(text) == enc.encode_ordinary(text)


@pytest.fixture()
def peer(trained):
    return tiktoken.Encoding("peer", pat_str=trained.pattern, mergeable_ranks=trained.ranks,
                             special_tokens=trained.special_tokens)


@pytest.mark.parametrize("text,allowed,disallowed", [
    ("a <|endoftext|> b", "all", "all"),
    ("a <|endoftext|> b", {"<|endoftext|>"}, "all"),
    ("<|im_start|>user\nhi<|im_end|>", "all", "all"),
    ("<|im_start|>x<|endoftext|>", {"<|im_start|>"}, ()),
    ("no specials here", set(), "all"),
    ("a <|endoftext|> b", set(), ()),
    ("<|endoftext|><|endoftext|>", "all", ()),
])
def test_special_tokens_like_tiktoken(trained, peer, text, allowed, disallowed):
    assert trained.encode(text, allowed_special=allowed, disallowed_special=disallowed) == \
        peer.encode(text, allowed_special=allowed, disallowed_special=disallowed)


@pytest.mark.parametrize("text,allowed,disallowed", [
    ("a <|endoftext|> b", set(), "all"),
    ("<|im_start|>x<|endoftext|>", {"<|im_start|>"}, "all"),
    ("x <|im_end|>", set(), {"<|im_end|>"}),
])
def test_disallowed_specials_raise_like_tiktoken(trained, peer, text, allowed, disallowed):
    with pytest.raises(ValueError):
        peer.encode(text, allowed_special=allowed, disallowed_special=disallowed)
    with pytest.raises(DisallowedSpecialError, match="special token"):
        trained.encode(text, allowed_special=allowed, disallowed_special=disallowed)


def test_batch_encoding_equals_one_by_one(trained):
    texts = [corpora.english(100_000)[i:i + 3000] for i in range(0, 90_000, 3000)] + \
            [corpora.chinese_news()[:5000], "", "\ud800 lone"]
    expected = [trained.encode(t) for t in texts]
    assert trained.encode_batch(texts, num_threads=4) == expected
    assert trained.encode_batch(texts[:10], num_threads=1) == expected[:10]
    assert trained.encode_batch(texts, num_threads=2, processes=True, reference=True) == expected


def test_decode_invalid_utf8_like_python(trained):
    # a lone continuation byte and a truncated 3-byte sequence: same U+FFFD as bytes.decode(errors="replace")
    ids = [0x80, ord("a"), 0xE4, 0xBD]
    assert trained.decode(ids) == bytes(ids).decode("utf-8", errors="replace")
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        trained.decode([10**9])


def test_token_spans_keep_characters_whole(trained):
    text = "分词 tokenizer 😀"
    spans = trained.token_spans(text)
    assert "".join(s for s, _ in spans) == text
    assert [i for _, ids in spans for i in ids] == trained.encode(text)
    assert all("\ufffd" not in s for s, _ in spans)


def test_chat_template_matches_transformers(trained_dir):
    from transformers import AutoTokenizer

    from lmforge.chat.templates import apply_chat_template
    from lmforge.tokenizer import load_tokenizer

    ours = load_tokenizer(trained_dir)
    hf = AutoTokenizer.from_pretrained(str(trained_dir))
    messages = [{"role": "system", "content": "你是一个助手。"}, {"role": "user", "content": "Hello!"}]
    for gen in (False, True):
        text = apply_chat_template(ours, messages, add_generation_prompt=gen)
        assert text == hf.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
    ids = apply_chat_template(ours, messages, add_generation_prompt=True, tokenize=True)
    assert ids == hf.encode(hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                            add_special_tokens=False)
    assert ids[0] == ours.special_tokens["<|im_start|>"]
