"""Token shards and datasets: hand-worked windows, packing at document starts, determinism, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lmforge.tokenizer.shards import TokenizeConfig, is_validation, tokenize_corpus
from lmforge.train import BatchLoader, PackedDataset, RandomOffsetBatches, SlidingWindowDataset, TokenStream


def test_sliding_windows_hand_worked():
    ds = SlidingWindowDataset(TokenStream.from_array(np.arange(20)), max_length=4, stride=2)
    assert len(ds) == 8  # starts 0, 2, ..., 14: the last needs tokens 14..18 (targets up to 18)
    x, y = ds[0]
    assert x.tolist() == [0, 1, 2, 3] and y.tolist() == [1, 2, 3, 4]
    x, y = ds[7]
    assert x.tolist() == [14, 15, 16, 17] and y.tolist() == [15, 16, 17, 18]
    with pytest.raises(IndexError):
        ds[8]
    assert len(SlidingWindowDataset(TokenStream.from_array(np.arange(20)), max_length=4)) == 4  # 0, 4, 8, 12 (16 needs token 20)


def test_packing_starts_at_documents_hand_worked():
    stream = TokenStream.from_array(np.arange(20), doc_starts=[0, 3, 10, 12])
    # windows of 5 tokens: at doc 0 (0..4); doc 1 starts at 3 < 5, skipped; doc 2 at 10 (10..14); doc 3 at 12 < 15
    assert PackedDataset(stream, max_length=4).starts.tolist() == [0, 10]
    # allowing mid-document starts, the rest of each document continues in the next window
    assert PackedDataset(stream, max_length=4, allow_mid_doc=True).starts.tolist() == [0, 5, 10, 15]


def test_stream_slices_across_shards():
    stream = TokenStream([np.arange(0, 7), np.arange(7, 10), np.arange(10, 30)], [np.array([0]), np.array([1]), np.array([0, 5])])
    assert stream.slice(5, 8).tolist() == list(range(5, 13))
    assert stream.doc_starts.tolist() == [0, 8, 10, 15]
    with pytest.raises(IndexError):
        stream.slice(25, 10)


def test_batch_loader_is_deterministic_and_resumes_mid_epoch():
    ds = SlidingWindowDataset(TokenStream.from_array(np.arange(200)), max_length=7)
    a = BatchLoader(ds, batch_size=4, seed=3)
    first = [a.next_batch()[0] for _ in range(9)]  # crosses into epoch 2 (6 batches per epoch)
    b = BatchLoader(ds, batch_size=4, seed=3)
    for _ in range(4):
        b.next_batch()
    c = BatchLoader(ds, batch_size=4, seed=3)
    c.load_state_dict(json.loads(json.dumps(b.state_dict())))
    assert all(torch.equal(c.next_batch()[0], first[k]) for k in range(4, 9))
    # two ranks together see exactly the global batch
    r0, r1 = BatchLoader(ds, 4, seed=3, rank=0, world_size=2), BatchLoader(ds, 4, seed=3, rank=1, world_size=2)
    both = torch.cat([r0.next_batch()[0], r1.next_batch()[0]])
    assert sorted(map(tuple, both.tolist())) == sorted(map(tuple, first[0].tolist()))


def test_random_offsets_depend_only_on_seed_and_step():
    stream = TokenStream.from_array(np.arange(1000))
    a = RandomOffsetBatches(stream, 16, 4, seed=1)
    batches = [a.next_batch() for _ in range(5)]
    b = RandomOffsetBatches(stream, 16, 4, seed=1)
    b.load_state_dict({"step": 3, "seed": 1})
    x, y = b.next_batch()
    assert torch.equal(x, batches[3][0]) and torch.equal(y, x + 1)  # targets are the next tokens


def test_tokenize_corpus_writes_shards_that_read_back(trained_dir, tmp_path):
    from lmforge.tokenizer import load_tokenizer

    docs = [{"id": f"d{i}", "text": f"文档 {i}: " + f"def f(x): return x * {i}\n" * (i % 7 + 1)} for i in range(300)]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(d, ensure_ascii=False) for d in docs), encoding="utf-8")
    cfg = TokenizeConfig(input=[str(tmp_path / "c.jsonl")], tokenizer=str(trained_dir), out=str(tmp_path / "tok"),
                         val_fraction=0.1, shard_tokens=2000, batch_docs=32, progress=False)
    manifest = tokenize_corpus(cfg)
    tok = load_tokenizer(trained_dir)
    eos = tok.special_tokens["<|endoftext|>"]
    assert manifest["dtype"] == "uint16" and manifest["eos_id"] == eos
    train, val = TokenStream.open(tmp_path / "tok", "train"), TokenStream.open(tmp_path / "tok", "val")
    assert len(manifest["splits"]["train"]["shards"]) > 1  # rotated at 2000 tokens
    n_val = manifest["splits"]["val"]["documents"]
    assert 10 <= n_val <= 60 and manifest["splits"]["train"]["documents"] + n_val == 300
    # reading the split back gives each document's ids followed by EOS, in corpus order
    train_docs = [d for d in docs if not is_validation(d["id"], 0.1)]
    expected = [t for d in train_docs for t in tok.encode(d["text"]) + [eos]]
    assert train.slice(0, len(train)).tolist() == expected
    assert len(val) == manifest["splits"]["val"]["tokens"]
    starts = train.doc_starts.tolist()
    assert starts[0] == 0 and all(expected[s - 1] == eos for s in starts[1:])
    # the split is a property of the document id: the same corpus in reverse order splits the same way
    (tmp_path / "r.jsonl").write_text("\n".join(json.dumps(d, ensure_ascii=False) for d in docs[::-1]), encoding="utf-8")
    reversed_cfg = {**cfg.__dict__, "input": [str(tmp_path / "r.jsonl")], "out": str(tmp_path / "tok2")}
    again = tokenize_corpus(TokenizeConfig(**reversed_cfg))
    assert again["splits"]["val"]["documents"] == n_val
    assert again["splits"]["val"]["tokens"] == manifest["splits"]["val"]["tokens"]


def test_tokenize_cli_and_errors(trained_dir, tmp_path, capsys):
    from lmforge.cli import main

    assert main(["data", "tokenize", "--tokenizer", str(trained_dir), "--out", str(tmp_path / "t"), "--no-progress"]) == 0
    assert "train tokens" in capsys.readouterr().out
    assert (tmp_path / "t" / "config.yaml").exists()
    (tmp_path / "t" / "train_00000.bin").write_bytes(b"\x00\x00")  # a truncated shard is detected
    with pytest.raises(ValueError, match="truncated"):
        TokenStream.open(tmp_path / "t")
