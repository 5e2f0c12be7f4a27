"""RAG-Sequence and RAG-Token against a direct computation of the same marginals: each document's prompt run whole
through the model on its own (no KV cache, no batch), its next-token distributions mixed by hand with the prior."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.infer import SamplingConfig
from lmforge.rag.chunking import Chunk
from lmforge.rag.index import Hit
from lmforge.rag.marginal import document_log_prior, prior_scores, rag_sequence, rag_token


@pytest.fixture(scope="module")
def model(trained):
    from lmforge.model import Transformer
    from lmforge.model.config import preset

    torch.manual_seed(0)
    return Transformer(preset("tiny-llama", vocab_size=trained.vocab_size, max_seq_len=256)).eval()


def _prompts(tokenizer, question: str, passages: list[str]) -> list[list[int]]:
    # prompts of different lengths: the batch is left-padded, the direct computation is not
    return [tokenizer.encode(f"[{n}] {p}\nQuestion: {question}\nAnswer:") for n, p in enumerate(passages, 1)]


@torch.no_grad()
def _next_logp(model, ids: list[int]) -> torch.Tensor:
    """log p(. | ids) from one whole forward of `ids` alone."""
    return torch.log_softmax(model.logits(model(torch.tensor([ids]))[0, -1]).double(), -1)


def _hand_rag_token(model, prompts, log_prior, steps, stops):
    """Greedy RAG-Token written out: at each step every document's prompt + the answer so far runs alone, the
    distributions are mixed as sum_d p(d) p(y | d, y<t), the argmax is taken."""
    prior = torch.tensor(log_prior, dtype=torch.float64)
    answer, total = [], 0.0
    for _ in range(steps):
        mixed = torch.logsumexp(torch.stack([_next_logp(model, p + answer) for p in prompts]) + prior[:, None], 0)
        token = int(mixed.argmax())
        answer.append(token)
        total += mixed[token].item()
        if token in stops:
            break
    return answer, total


PASSAGES = ["Paris is the capital of France and its largest city.",
            "The Seine flows through Paris.",
            "Lyon is a city in France known for its cuisine, far from the coast."]
QUESTIONS = ["What is the capital of France?", "法国的首都是哪座城市？"]


@pytest.mark.parametrize("question", QUESTIONS)
def test_rag_token_equals_the_hand_marginal(model, trained, question):
    prompts = _prompts(trained, question, PASSAGES)
    log_prior = [math.log(0.5), math.log(0.3), math.log(0.2)]
    out = rag_token(model, trained, prompts, log_prior, SamplingConfig(max_new_tokens=12, temperature=0.0))
    stops = set(out.tokens[-1:]) & {trained.special_tokens["<|endoftext|>"]}
    tokens, total = _hand_rag_token(model, prompts, log_prior, 12, stops)
    assert out.tokens == tokens
    assert out.logprob == pytest.approx(total, abs=1e-4)
    # the mixture is not any one document's greedy answer scored alone: with a prior putting all the mass on one
    # document, RAG-Token is that document's own greedy decode
    only = rag_token(model, trained, prompts, [0.0, -math.inf, -math.inf], SamplingConfig(max_new_tokens=12,
                                                                                          temperature=0.0))
    alone, _ = _hand_rag_token(model, prompts[:1], [0.0], 12, stops)
    assert only.tokens == alone


def test_rag_token_samples_from_the_mixture_with_a_seed(model, trained):
    prompts = _prompts(trained, QUESTIONS[0], PASSAGES)
    cfg = SamplingConfig(max_new_tokens=8, temperature=1.0, seed=3)
    a = rag_token(model, trained, prompts, [math.log(1 / 3)] * 3, cfg)
    b = rag_token(model, trained, prompts, [math.log(1 / 3)] * 3, cfg)
    assert a.tokens == b.tokens and len(a.tokens) >= 1
    # the reported log-probability is the mixture's (temperature 1 samples the mixture itself)
    prior = torch.full((3,), math.log(1 / 3), dtype=torch.float64)
    total = 0.0
    for t, token in enumerate(a.tokens):
        mixed = torch.logsumexp(torch.stack([_next_logp(model, p + a.tokens[:t]) for p in prompts]) + prior[:, None], 0)
        total += mixed[token].item()
    assert a.logprob == pytest.approx(total, abs=1e-4)


@pytest.mark.parametrize("question", QUESTIONS)
def test_rag_sequence_scores_equal_the_hand_marginal(model, trained, question):
    prompts = _prompts(trained, question, PASSAGES)
    log_prior = document_log_prior([Hit(Chunk(f"d{i}", p, 0, len(p)), 0.0, i + 1, {"dense": c})
                                    for i, (p, c) in enumerate(zip(PASSAGES, [0.62, 0.55, 0.31]))], 0.1)
    ranked = rag_sequence(model, trained, prompts, log_prior, SamplingConfig(max_new_tokens=10, temperature=0.0))
    assert ranked and [m.logprob for m in ranked] == sorted((m.logprob for m in ranked), reverse=True)
    # every document's own greedy decode is a candidate (distinct ones once)
    greedy = set()
    for p in prompts:
        answer = []
        for _ in range(10):
            token = int(_next_logp(model, p + answer).argmax())
            answer.append(token)
            if token == trained.special_tokens["<|endoftext|>"]:
                break
        greedy.add(tuple(answer))
    assert {tuple(m.tokens) for m in ranked} == greedy
    for m in ranked:
        per_doc = []
        for p in prompts:  # log p(y | d) = sum_t log p(y_t | d, y<t), each prefix run whole
            per_doc.append(sum(_next_logp(model, p + m.tokens[:t])[y].item() for t, y in enumerate(m.tokens)))
        assert m.per_document == pytest.approx(per_doc, abs=1e-4)
        hand = math.log(sum(math.exp(lp + s) for lp, s in zip(log_prior, per_doc)))
        assert m.logprob == pytest.approx(hand, abs=1e-4)


def test_document_prior_is_a_softmax_of_the_retrieval_scores():
    def hit(scores):
        return Hit(Chunk("d", "t", 0, 1), 0.0, 1, scores)

    dense = [hit({"sparse": 9.0, "dense": 0.8}), hit({"sparse": 3.0, "dense": 0.6})]
    assert prior_scores(dense) == [0.8, 0.6]
    p = [math.exp(x) for x in document_log_prior(dense, 0.1)]
    assert p == pytest.approx([1 / (1 + math.exp(-2)), math.exp(-2) / (1 + math.exp(-2))])
    sparse = [hit({"sparse": 12.0}), hit({"sparse": 6.0}), hit({"sparse": 3.0})]
    assert prior_scores(sparse) == [1.0, 0.5, 0.25]  # BM25 relative to the best hit
    p = [math.exp(x) for x in document_log_prior(sparse, 0.25)]
    z = math.exp(4) + math.exp(2) + math.exp(1)
    assert p == pytest.approx([math.exp(4) / z, math.exp(2) / z, math.exp(1) / z])
