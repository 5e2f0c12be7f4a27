"""The one scoring function (infer/scoring.py): the log-probabilities of a sequence's tokens equal transformers' full
forward of that sequence alone, however the contexts are shared, padded and batched."""

from __future__ import annotations

import pytest
import torch

from lmforge.infer.scoring import score_tokens
from lmforge.model import load_hf_model
from tests.model.test_hf_interop import _hf_tiny, _save

FEWSHOT = list(range(40, 80))  # a block that several contexts begin with (the batch runs it once)
SEQUENCES = [
    ([5, 17, 42, 8], [99, 3, 4]),  # context, continuation
    ([5, 17, 42, 8], [7]),  # the same context: run once for both
    (FEWSHOT + [1, 2, 3], [9, 9]),
    (FEWSHOT + [4, 5], [6, 7, 8, 10, 11]),
    ([250], [12]),
    ([7, 7, 1, 2, 3, 4, 5, 6, 7, 8, 9], [100, 101]),
]


@pytest.mark.parametrize("kind", ["llama", "mistral"])  # mistral: an 8-token sliding window
def test_score_tokens_equals_transformers_on_each_sequence_alone(tmp_path, kind):
    hf = _save(_hf_tiny(kind), tmp_path)
    ours = load_hf_model(tmp_path)
    seqs = [c + t for c, t in SEQUENCES]
    starts = [len(c) for c, _ in SEQUENCES]
    for batch_size in (1, 16):
        got = score_tokens(ours, seqs, starts, top=3, batch_size=batch_size)
        for seq, start, scores in zip(seqs, starts, got):
            with torch.no_grad():
                logp = torch.log_softmax(hf(torch.tensor([seq])).logits[0].float(), -1)[start - 1:-1]
            target = torch.tensor(seq[start:])
            want = logp.gather(1, target[:, None])[:, 0]
            assert torch.allclose(torch.tensor(scores.logprobs), want, atol=1e-4)
            assert scores.greedy == (logp.argmax(-1) == target).tolist()
            values, ids = logp.topk(3)
            assert [[i for i, _ in row] for row in scores.top] == ids.tolist()
            assert abs(scores.total - float(want.sum())) < 1e-3


def test_score_tokens_names_a_bad_start(tmp_path):
    _save(_hf_tiny("llama"), tmp_path)
    ours = load_hf_model(tmp_path)
    with pytest.raises(ValueError, match="sequence 1: start 3"):
        score_tokens(ours, [[1, 2, 3], [1, 2, 3]], [1, 3])
