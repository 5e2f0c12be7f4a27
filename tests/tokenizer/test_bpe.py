"""BPE training against a hand-worked example, a naive reference trainer, and HF's trainer."""

from __future__ import annotations

import collections
import random

import pytest
import regex

from lmforge.tokenizer import TrainingError, train_tokenizer
from lmforge.tokenizer.bpe import count_pretokens, merge_pairs, train_bpe
from lmforge.tokenizer.patterns import PATTERNS
from tests import corpora


def naive_bpe(words: list[bytes], counts: list[int], n_tokens: int, min_frequency: int = 2):
    """Textbook BPE: recount every pair over the whole corpus before each merge (Sennrich et al. 2016)."""
    vocab = [bytes([i]) for i in range(256)]
    seqs = [list(w) for w in words]
    merges = []
    while len(vocab) < n_tokens:
        pairs = collections.Counter()
        for s, c in zip(seqs, counts):
            for p in zip(s, s[1:]):
                pairs[p] += c
        if not pairs or max(pairs.values()) < min_frequency:
            break
        best = max(pairs.values())
        a, b = min(p for p, v in pairs.items() if v == best)  # ties: smallest (left, right)
        merged = vocab[a] + vocab[b]
        if merged in vocab:
            new = vocab.index(merged)
        else:
            new = len(vocab)
            vocab.append(merged)
        merges.append((a, b, new))
        for k, s in enumerate(seqs):
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and s[i] == a and s[i + 1] == b:
                    out.append(new)
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            seqs[k] = out
    return merges, vocab


def test_wikipedia_example():
    # "aaabdaaabac" -> Z=aa -> ZabdZabac -> Y=ab -> ZYdZYac -> X=ZY -> XdXac (Wikipedia, "Byte pair encoding")
    token_bytes = [bytes([i]) for i in range(256)]
    merges = merge_pairs([b"aaabdaaabac"], [1], token_bytes, 259, min_frequency=2, show_progress=False)
    assert [token_bytes[new] for _, _, new in merges] == [b"aa", b"ab", b"aaab"]


@pytest.mark.parametrize("seed", range(40))
def test_incremental_merges_equal_naive_recount(seed):
    r = random.Random(seed)
    alphabet = r.choice([b"ab", b"abc", b"aab ", "你好吗".encode()])
    words = sorted({bytes(r.choice(alphabet) for _ in range(r.randint(2, 14))) for _ in range(60)})
    counts = [r.randint(1, 6) for _ in words]
    token_bytes = [bytes([i]) for i in range(256)]
    merges = merge_pairs(list(words), counts, token_bytes, 256 + 40, 2, show_progress=False)
    expected_merges, expected_vocab = naive_bpe(words, counts, 256 + 40)
    assert merges == expected_merges
    assert token_bytes == expected_vocab


def test_real_corpus_equals_naive_recount():
    counts, _ = count_pretokens([corpora.english(20_000)], PATTERNS["gpt2"], num_workers=1, show_progress=False)
    words = [p.encode() for p in counts if len(p.encode()) > 1]
    freq = [counts[w.decode()] for w in words]
    token_bytes = [bytes([i]) for i in range(256)]
    merges = merge_pairs(list(words), freq, token_bytes, 256 + 120, 2, show_progress=False)
    assert merges == naive_bpe(words, freq, 256 + 120)[0]


def test_parallel_counting_equals_regex_over_whole_text(tmp_path):
    text = corpora.english(120_000) + "\n" + corpora.chinese_news(40_000)
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    from lmforge.data.sources import iter_text_chunks

    for name, pattern in PATTERNS.items():
        expected = collections.Counter(regex.findall(pattern, text))
        # small blocks force many cuts inside the file, and two worker processes
        chunks = iter_text_chunks([str(tmp_path / "a.txt")], block_bytes=4096)
        got, stats = count_pretokens(chunks, pattern, num_workers=2, show_progress=False)
        assert got == expected, name
        assert stats["chars"] == len(text)


def test_special_tokens_are_never_merged_or_learned():
    text = ("hello world<|endoftext|>" * 200) + ("<|im_start|>user\nhi<|im_end|>" * 100)
    tok_bytes, merges, _ = train_bpe([text], 400, PATTERNS["gpt2"], ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                     show_progress=False)
    for b in tok_bytes:
        assert b"<|" not in b and b"|>" not in b, b


def test_trained_tokenizer_layout_and_specials():
    tok = train_tokenizer("builtin:python-docs", vocab_size=600, special_tokens=["<|endoftext|>", "<|pad|>"],
                          show_progress=False)
    assert tok.vocab_size == 600
    assert tok.special_tokens == {"<|endoftext|>": 598, "<|pad|>": 599}
    assert all(tok.ranks[bytes([b])] == b for b in range(256))
    assert tok.eos_token == "<|endoftext|>"
    assert tok.chat_template is None  # no ChatML markers, no template
    # the special token's text in ordinary input does not produce the special id
    ids = tok.encode("<|endoftext|>", disallowed_special=())
    assert 598 not in ids and tok.decode(ids) == "<|endoftext|>"


def test_compression_close_to_hf_trainer():
    """Same corpus, same vocab size: bytes/token on held-out text within 2% of HF's BPE trainer."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    train_text = corpora.english(150_000)[:120_000] + corpora.chinese_news(80_000)[:60_000]
    held_out = corpora.english(150_000)[120_000:] + corpora.chinese_news(80_000)[60_000:]
    tok_bytes, merges, _ = train_bpe([train_text], 2048, PATTERNS["gpt2"], show_progress=False)
    from lmforge.tokenizer import BPETokenizer

    ours = BPETokenizer({b: i for i, b in enumerate(tok_bytes)}, [], PATTERNS["gpt2"])
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(PATTERNS["gpt2"]), "isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.train_from_iterator([train_text], trainers.BpeTrainer(vocab_size=2048, min_frequency=2, show_progress=False,
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    n_bytes = len(held_out.encode())
    ours_bpt = n_bytes / len(ours.encode(held_out))
    hf_bpt = n_bytes / len(hf.encode(held_out).ids)
    assert abs(ours_bpt - hf_bpt) / hf_bpt < 0.02, (ours_bpt, hf_bpt)


def test_bad_settings_are_clear_errors(tmp_path):
    with pytest.raises(TrainingError, match="below the minimum 259"):
        train_tokenizer("builtin:python-docs", vocab_size=258, show_progress=False)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(TrainingError, match="empty"):
        train_tokenizer([str(tmp_path / "empty.txt")], vocab_size=300, show_progress=False)
    with pytest.raises(TrainingError, match="min frequency"):
        train_tokenizer("builtin:python-docs", vocab_size=300, min_frequency=0, show_progress=False)


def test_min_frequency_stops_early(caplog):
    tok = train_tokenizer("builtin:python-docs", vocab_size=50_000, min_frequency=200, show_progress=False)
    assert tok.vocab_size < 50_000
    assert "stopped at" in caplog.text
