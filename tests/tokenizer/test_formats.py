"""File formats, proven by loading them in the libraries that own them."""

from __future__ import annotations

import json
import shutil

import pytest
import tiktoken
import tiktoken.load
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import models, pre_tokenizers, trainers

from lmforge.tokenizer import (
    BPETokenizer,
    DisallowedSpecialError,
    HFTokenizer,
    TokenizerFormatError,
    load_gpt2_files,
    load_tokenizer,
    train_tokenizer,
)
from tests import corpora

REAL_TEXT = corpora.english(60_000) + "\n" + corpora.chinese_news(30_000) + "\n" + corpora.chinese_reviews(20_000)


@pytest.mark.parametrize("pattern", ["gpt2", "cl100k", "o200k"])
def test_tokenizer_json_loads_in_hf_tokenizers_with_identical_ids(mixed_corpus_dir, tmp_path, pattern):
    tok = train_tokenizer([str(mixed_corpus_dir)], vocab_size=1500, pattern=pattern, show_progress=False)
    tok.save(tmp_path)
    hf = RustTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert hf.encode(REAL_TEXT, add_special_tokens=False).ids == tok.encode(REAL_TEXT)
    assert hf.get_vocab_size() == tok.vocab_size
    # specials are specials for HF too
    assert hf.encode("<|endoftext|>", add_special_tokens=False).ids == [tok.special_tokens["<|endoftext|>"]]
    assert hf.decode(tok.encode(REAL_TEXT)) == REAL_TEXT
    # and loading it back into lmforge gives the native fast tokenizer with the same ids
    again = load_tokenizer(tmp_path)
    assert isinstance(again, BPETokenizer)
    assert again.encode(REAL_TEXT) == tok.encode(REAL_TEXT)
    assert again.special_tokens == tok.special_tokens and again.eos_token == "<|endoftext|>"


def test_transformers_autotokenizer_reads_our_directory(trained, trained_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(trained_dir))
    assert hf.encode(REAL_TEXT, add_special_tokens=False) == trained.encode(REAL_TEXT)
    assert hf.eos_token == "<|endoftext|>" and hf.eos_token_id == trained.special_tokens["<|endoftext|>"]
    assert len(hf) == trained.vocab_size


def test_forced_hf_backend_agrees_with_native(trained, trained_dir):
    hf_backed = load_tokenizer(trained_dir, backend="hf")
    assert isinstance(hf_backed, HFTokenizer)
    assert hf_backed.encode(REAL_TEXT) == trained.encode(REAL_TEXT)
    assert hf_backed.decode(trained.encode(REAL_TEXT)) == REAL_TEXT
    with pytest.raises(DisallowedSpecialError):
        hf_backed.encode("x <|endoftext|>")
    assert hf_backed.encode("x <|endoftext|>", allowed_special="all")[-1] == trained.special_tokens["<|endoftext|>"]
    assert hf_backed.encode("x <|endoftext|>", disallowed_special=()) == trained.encode("x <|endoftext|>",
                                                                                       disallowed_special=())


def test_gpt2_files_load_like_tiktoken_and_hf():
    """GPT-2's real vocabulary: lmforge == tiktoken's own GPT-2 loader == HF's byte-level BPE."""
    encoder_json, vocab_bpe = corpora.gpt2_files()
    ours = load_gpt2_files(encoder_json, vocab_bpe)
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(vocab_bpe, encoder_json)
    assert ours.ranks == ranks
    assert ours.special_tokens == {"<|endoftext|>": 50256} and ours.vocab_size == 50257
    peer = tiktoken.Encoding("gpt2-peer", pat_str=ours.pattern, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256})
    hf = RustTokenizer(models.BPE.from_file(encoder_json, vocab_bpe))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    ids = ours.encode(REAL_TEXT)
    assert ids == peer.encode_ordinary(REAL_TEXT)
    assert ids == hf.encode(REAL_TEXT).ids
    assert ids == ours.encode(REAL_TEXT, reference=True)
    assert ours.encode("Hello world") == [15496, 995]  # GPT-2's well-known ids


def test_gpt2_directory_and_tokenizer_json_export(tmp_path):
    encoder_json, vocab_bpe = corpora.gpt2_files()
    (tmp_path / "gpt2").mkdir()
    for src, name in ((encoder_json, "encoder.json"), (vocab_bpe, "vocab.bpe")):
        shutil.copy(src, tmp_path / "gpt2" / name)
    tok = load_tokenizer(tmp_path / "gpt2")
    tok.save(tmp_path / "out")
    hf = RustTokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
    assert hf.encode(REAL_TEXT, add_special_tokens=False).ids == tok.encode(REAL_TEXT)


def _train_hf(model, trainer, pre):
    tok = RustTokenizer(model)
    tok.pre_tokenizer = pre
    tok.train_from_iterator([corpora.english(80_000), corpora.chinese_news(20_000)], trainer)
    return tok


@pytest.mark.parametrize("kind", ["wordpiece", "unigram"])
def test_other_hf_models_work_through_the_same_interface(tmp_path, kind):
    if kind == "wordpiece":
        rust = _train_hf(models.WordPiece(unk_token="[UNK]"),
                         trainers.WordPieceTrainer(vocab_size=800, special_tokens=["[UNK]", "[CLS]", "[SEP]"],
                                                   show_progress=False),
                         pre_tokenizers.BertPreTokenizer())
    else:
        rust = _train_hf(models.Unigram(), trainers.UnigramTrainer(vocab_size=3000, special_tokens=["<unk>"],
                                                                   unk_token="<unk>", show_progress=False),
                         pre_tokenizers.Metaspace())
    rust.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, HFTokenizer)
    text = corpora.english(5000) + corpora.chinese_reviews(2000)
    # the reference is the library reading the same file: a freshly trained Unigram object can itself
    # encode differently from its own saved file in rare runs (seen ~1 in 12), an upstream quirk
    reference = RustTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert tok.encode(text) == reference.encode(text, add_special_tokens=False).ids
    assert tok.vocab_size == reference.get_vocab_size()
    spans = tok.token_spans("hello world")
    assert [i for _, ids in spans for i in ids] == tok.encode("hello world")
    tok.save(tmp_path / "copy")
    assert load_tokenizer(tmp_path / "copy").encode(text) == tok.encode(text)


def test_bad_files_name_the_file(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerFormatError, match="tokenizer.json: not valid JSON"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"version": "1.0"}))
    with pytest.raises(TokenizerFormatError, match="no 'model' section"):
        load_tokenizer(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerFormatError, match="no tokenizer.json"):
        load_tokenizer(tmp_path / "empty")
    with pytest.raises(TokenizerFormatError, match="no such tokenizer"):
        load_tokenizer(tmp_path / "missing" / "dir")
    encoder_json, _ = corpora.gpt2_files()
    (tmp_path / "bad.bpe").write_text("#version: 0.2\nĠt\n")
    with pytest.raises(TokenizerFormatError, match=r"bad.bpe:2: expected 'left right'"):
        load_gpt2_files(encoder_json, tmp_path / "bad.bpe")


def test_save_is_atomic(trained, tmp_path, monkeypatch):
    """A crash while saving leaves the earlier tokenizer intact and no temp files."""
    trained.save(tmp_path)
    before = (tmp_path / "tokenizer.json").read_bytes()
    import lmforge.tokenizer.formats as formats

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(formats.json, "dump", boom)
    with pytest.raises(RuntimeError):
        trained.save(tmp_path)
    assert (tmp_path / "tokenizer.json").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
