"""Evaluation on a new family, unchanged: multiple-choice log-likelihoods (what `eval run` scores) and `eval ppl`
on a tiny random Qwen3 (a full and a sliding-window layer) with the real Qwen3 tokenizer, against transformers'
own model."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers

from lmforge.eval.scoring import encode_pair, perplexity, score_choices
from lmforge.model import load_hf_model
from lmforge.tokenizer import load_tokenizer
from tests import corpora
from tests.model.test_families import _hf_model

ITEMS = [("Question: Which gas do plants take in from the air to make food?\nAnswer:",
          [" oxygen", " carbon dioxide", " nitrogen"]),
         ("问题：水在多少摄氏度时沸腾？\n答案：", ["50度", "100度", "0度"]),
         ("Question: What is the main source of energy for Earth's water cycle?\nAnswer: ", ["the Sun", "the Moon"])]


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    d = corpora.real_tokenizer("qwen3", tmp_path_factory.mktemp("qwen3"))
    _hf_model("qwen3", len(transformers.AutoTokenizer.from_pretrained(d))).save_pretrained(d)
    return d, transformers.AutoModelForCausalLM.from_pretrained(d).eval()


def _logprobs(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)


def test_multiple_choice_scores_equal_transformers_on_qwen3(qwen3, tmp_path):
    d, hf = qwen3
    model, tok = load_hf_model(d), load_tokenizer(d)
    scores = score_choices(model, tok, ITEMS)
    for (context, choices), got in zip(ITEMS, scores):
        for choice, s in zip(choices, got):
            ctx, cont = encode_pair(tok, context, choice)  # lm-eval's split (tests/eval/test_tasks.py checks it)
            logp = _logprobs(hf, ctx + cont)[len(ctx) - 1:-1]
            want = float(logp.gather(1, torch.tensor(cont)[:, None]).sum())
            assert s.logprob == pytest.approx(want, abs=1e-4)
            assert s.greedy == bool((logp.argmax(-1) == torch.tensor(cont)).all())
    # and a whole `eval run` task on the family
    from lmforge.eval.run import evaluate
    from lmforge.eval.tasks import load_task

    path = tmp_path / "ARC-Easy-Test.jsonl"
    path.write_text(json.dumps({"id": "q0", "question": {"stem": "Which gas do plants take in?", "choices": [
        {"text": t, "label": lab} for t, lab in zip(["oxygen", "carbon dioxide"], "AB")]}, "answerKey": "B"}) + "\n")
    results, rows = evaluate(model, tok, load_task("arc_easy", str(path)), show_progress=False)
    assert len(rows) == 1 and results["acc"] == rows[0]["acc"] == float(
        rows[0]["loglikelihoods"][1] > rows[0]["loglikelihoods"][0])


def test_perplexity_equals_a_transformers_loop_on_qwen3(qwen3):
    """Rolling windows over a model with a sliding-window layer (8 positions): every token scored once."""
    d, hf = qwen3
    tok = load_tokenizer(d)
    texts = ["The quick brown fox jumps over the lazy dog. " * 6, "北京是中华人民共和国的首都，位于华北平原北部。" * 3]
    window, stride = 32, 12
    prefix = transformers.AutoTokenizer.from_pretrained(d).eos_token_id  # Qwen has no BOS: lm-eval's prefix
    from lmforge.eval.scoring import windows

    nll, count = 0.0, 0
    for text in texts:
        ids = [prefix] + tok.encode(text)
        for start, end, first in windows(len(ids), window, stride):
            logp = _logprobs(hf, ids[start:end])[:-1]
            lp = logp.gather(1, torch.tensor(ids[start + 1:end])[:, None])[:, 0]
            nll -= float(lp[first - start - 1:].sum())
            count += end - first
    ours = perplexity(load_hf_model(d), tok, texts, window=window, stride=stride)
    assert ours.tokens == count
    assert ours.nll == pytest.approx(nll, rel=1e-5)
    assert ours.perplexity == pytest.approx(math.exp(nll / count), rel=1e-5)
