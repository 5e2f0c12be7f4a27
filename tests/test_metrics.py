"""lmforge.metrics against the libraries people cite, on real English and Chinese sentences."""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lmforge import metrics
from lmforge.text import split_sentences
from tests import corpora


def _perturb(sentence: str, rng: random.Random, chinese: bool) -> str:
    """A system output near the reference: units dropped, repeated or swapped (words, or characters for Chinese)."""
    units = list(sentence) if chinese else sentence.split()
    out = []
    for u in units:
        r = rng.random()
        if r < 0.1:
            continue
        out.append(u)
        if r > 0.95:
            out.append(u)
    if len(out) > 3 and rng.random() < 0.5:
        i = rng.randrange(len(out) - 1)
        out[i], out[i + 1] = out[i + 1], out[i]
    return ("" if chinese else " ").join(out)


@pytest.fixture(scope="module")
def english_pairs():
    rng = random.Random(0)
    refs = [s for s in split_sentences(corpora.english(60_000)) if 20 < len(s) < 300][:300]
    return [_perturb(r, rng, False) for r in refs], refs


@pytest.fixture(scope="module")
def chinese_pairs():
    rng = random.Random(1)
    refs = [s for s in split_sentences(corpora.chinese_news(40_000)) if 8 < len(s) < 200][:300]
    return [_perturb(r, rng, True) for r in refs], refs


def test_bleu_and_chrf_equal_sacrebleu_on_english(english_pairs):
    import sacrebleu

    hyps, refs = english_pairs
    ours = metrics.bleu(hyps, refs)
    theirs = sacrebleu.corpus_bleu(hyps, [refs])
    assert ours["tokenize"] == "13a"
    assert ours["score"] == pytest.approx(theirs.score, abs=1e-9)
    assert ours["precisions"] == pytest.approx(theirs.precisions, abs=1e-9)
    assert (ours["sys_len"], ours["ref_len"]) == (theirs.sys_len, theirs.ref_len)
    from sacrebleu.metrics import CHRF

    for kw in ({}, {"word_order": 2}, {"lowercase": True}):
        assert metrics.chrf(hyps, refs, **kw)["score"] == pytest.approx(
            CHRF(**kw).corpus_score(hyps, [refs]).score, abs=1e-9)
    # two reference streams, and the other smoothing methods
    refs2 = [r.upper() if i % 3 == 0 else r for i, r in enumerate(refs)]
    assert metrics.bleu(hyps, [refs, refs2])["score"] == pytest.approx(
        sacrebleu.corpus_bleu(hyps, [refs, refs2]).score, abs=1e-9)
    for smooth in ("none", "floor", "add-k"):
        assert metrics.bleu(hyps[:5], refs[:5], smooth=smooth)["score"] == pytest.approx(
            sacrebleu.corpus_bleu(hyps[:5], [refs[:5]], smooth_method=smooth).score, abs=1e-9)
    s = sacrebleu.sentence_bleu(hyps[0], [refs[0]], smooth_method="exp")
    assert metrics.bleu(hyps[:1], refs[:1], effective_order=True)["score"] == pytest.approx(s.score, abs=1e-9)


def test_bleu_picks_the_zh_tokenizer_for_chinese(chinese_pairs):
    import sacrebleu

    hyps, refs = chinese_pairs
    ours = metrics.bleu(hyps, refs)
    assert ours["tokenize"] == "zh"
    assert ours["score"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs], tokenize="zh").score, abs=1e-9)
    # the trap the issue names: sacrebleu's default on Chinese scores a close pair near zero
    assert sacrebleu.corpus_bleu(hyps, [refs]).score < ours["score"] / 3
    assert metrics.bleu(hyps, refs, tokenize="13a")["score"] == pytest.approx(
        sacrebleu.corpus_bleu(hyps, [refs]).score, abs=1e-9)
    assert metrics.chrf(hyps, refs)["score"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score, abs=1e-9)
    # sacrebleu's zh ranges include general punctuation (its '\u20000' is two characters): equal on those too
    odd = ["他说—“好”…再见", "２０２６年 GDP 增长"]
    assert metrics.bleu(odd, ["他说—“好的”…再见", "２０２６年 GDP 增长了"])["score"] == pytest.approx(
        sacrebleu.corpus_bleu(odd, [["他说—“好的”…再见", "２０２６年 GDP 增长了"]], tokenize="zh").score, abs=1e-9)


def test_ter_is_sacrebleus(english_pairs):
    import sacrebleu

    hyps, refs = english_pairs
    assert metrics.ter(hyps, refs)["score"] == pytest.approx(sacrebleu.corpus_ter(hyps, [refs]).score)


def test_rouge_equals_rouge_score_on_english(english_pairs):
    from rouge_score import rouge_scorer

    hyps, refs = english_pairs
    # rougeLsum reads sentences from newlines: join a few sentences per summary
    hyps_sum = ["\n".join(hyps[i:i + 3]) for i in range(0, 60, 3)]
    refs_sum = ["\n".join(refs[i:i + 3]) for i in range(0, 60, 3)]
    for stem in (False, True):
        scorer = rouge_scorer.RougeScorer(list(metrics.ROUGE_TYPES), use_stemmer=stem)
        for h, r in list(zip(hyps, refs))[:150] + list(zip(hyps_sum, refs_sum)):
            theirs = scorer.score(r, h)
            ours = metrics.rouge_pair(h, r, stem=stem)
            for t in metrics.ROUGE_TYPES:
                assert ours[t] == pytest.approx(tuple(theirs[t]), abs=1e-12), (t, h, r)
    mean = metrics.rouge(hyps, refs)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    assert mean["rougeL"] == pytest.approx(np.mean([scorer.score(r, h)["rougeL"].fmeasure
                                                    for h, r in zip(hyps, refs)]))


def test_rouge_scores_chinese_where_rouge_score_gives_zero(chinese_pairs):
    from rouge_score import rouge_scorer

    hyps, refs = chinese_pairs
    same = refs[0]
    assert rouge_scorer.RougeScorer(["rougeL"]).score(same, same)["rougeL"].fmeasure == 0.0
    assert metrics.rouge_pair(same, same)["rougeL"][2] == 1.0
    # characters as tokens: equal to rouge-score given the text with spaces between characters, as pinyin-free
    # ASCII stand-ins (rouge-score keeps only [a-z0-9])
    table = {}

    def ascii_chars(s):
        return " ".join(f"c{table.setdefault(c, len(table))}" for c in metrics.rouge_tokens(s))

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    for h, r in zip(hyps[:100], refs[:100]):
        theirs = scorer.score(ascii_chars(r), ascii_chars(h))
        ours = metrics.rouge_pair(h, r, types=("rouge1", "rouge2", "rougeL"))
        for t in ("rouge1", "rouge2", "rougeL"):
            assert ours[t][2] == pytest.approx(theirs[t].fmeasure, abs=1e-12)
    words = metrics.rouge_tokens("我们今天去北京大学", chinese="jieba")
    assert "北京大学" in words or "北京" in words


@given(st.lists(st.integers(0, 4), max_size=70), st.lists(st.integers(0, 4), max_size=70))
def test_bit_parallel_lcs_equals_the_table(a, b):
    table = metrics._lcs_indices([str(x) for x in a], [str(x) for x in b])
    assert metrics.lcs_length(a, b) == len(table)


def test_classification_metrics_equal_scikit_learn():
    from sklearn import metrics as sk

    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 500)
    pred = np.where(rng.random(500) < 0.6, y, rng.integers(0, 4, 500))
    assert metrics.accuracy(y, pred) == pytest.approx(sk.accuracy_score(y, pred))
    for avg in ("macro", "micro", "weighted"):
        p, r, f, _ = sk.precision_recall_fscore_support(y, pred, average=avg, zero_division=0)
        ours = metrics.precision_recall_f1(y, pred, average=avg)
        assert (ours["precision"], ours["recall"], ours["f1"]) == pytest.approx((p, r, f))
    per = metrics.precision_recall_f1(y, pred, average=None)
    assert per["f1"] == pytest.approx(sk.f1_score(y, pred, average=None, zero_division=0).tolist())
    assert metrics.matthews_corrcoef(y, pred) == pytest.approx(sk.matthews_corrcoef(y, pred))
    m, labels = metrics.confusion_matrix(y, pred)
    assert (m == sk.confusion_matrix(y, pred, labels=labels)).all()
    # a class never predicted: zero_division=0, as sklearn
    y2, p2 = [0, 1, 2, 2], [0, 1, 1, 1]
    assert metrics.precision_recall_f1(y2, p2)["f1"] == pytest.approx(sk.f1_score(y2, p2, average="macro",
                                                                                   zero_division=0))
    # binary with string labels, ROC-AUC with ties, multi-class one-vs-rest
    yb = np.array(["spam", "ham"])[rng.integers(0, 2, 300)]
    score = np.round(rng.random(300) * 0.6 + (yb == "spam") * 0.3, 2)  # rounded: many ties
    pb = np.where(score > 0.5, "spam", "ham")
    ours = metrics.precision_recall_f1(yb, pb, average="binary", pos_label="spam")
    assert ours["f1"] == pytest.approx(sk.f1_score(yb, pb, pos_label="spam"))
    assert metrics.roc_auc(yb, score) == pytest.approx(sk.roc_auc_score(yb, score))
    probs = rng.dirichlet(np.ones(4), 500) + np.eye(4)[y] * 0.3
    probs /= probs.sum(1, keepdims=True)
    for avg in ("macro", "weighted"):
        assert metrics.roc_auc(y, probs, average=avg) == pytest.approx(
            sk.roc_auc_score(y, probs, multi_class="ovr", average=avg))
    yt, yp = rng.normal(size=200), rng.normal(size=200)
    reg = metrics.regression(yt, yp)
    assert reg["mse"] == pytest.approx(sk.mean_squared_error(yt, yp))
    assert reg["mae"] == pytest.approx(sk.mean_absolute_error(yt, yp))
    assert reg["r2"] == pytest.approx(sk.r2_score(yt, yp))


def test_negative_log_likelihood_equals_scikit_learns_log_loss():
    from scipy.special import softmax
    from sklearn.metrics import log_loss

    rng = np.random.default_rng(0)
    logits, y = rng.normal(size=(300, 5)) * 3, rng.integers(0, 5, 300)
    for t in (1.0, 0.5, 2.5):
        assert metrics.negative_log_likelihood(logits, y, t) == pytest.approx(
            log_loss(y, softmax(logits / t, axis=1), labels=range(5)), rel=1e-9)


def test_expected_calibration_error_by_hand():
    # confidences 0.95 (right), 0.75 (wrong) and 0.72 (right) share the bin (0.7, 0.8], 0.65 (right), 0.85 (wrong):
    # (|1 - 0.95| + |0 - 0.85| + |1 - 0.65|) / 5 + |0.5 - 0.735| * 2 / 5 = 0.25 + 0.094
    probs = [[0.95, 0.05], [0.75, 0.25], [0.35, 0.65], [0.15, 0.85], [0.72, 0.28]]
    assert metrics.expected_calibration_error(probs, [0, 1, 1, 0, 0]) == pytest.approx(0.344)
    assert metrics.expected_calibration_error([[1.0, 0.0], [0.0, 1.0]], [0, 1]) == 0.0  # sure and right


def test_fitted_temperature_is_the_nll_minimum():
    from scipy.optimize import minimize_scalar

    rng = np.random.default_rng(1)
    # an over-confident classifier: labels drawn from softmax(z), logits reported as 3 z
    z = rng.normal(size=(2000, 4))
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    y = np.array([rng.choice(4, p=row) for row in p])
    t = metrics.fit_temperature(3 * z, y)
    best = minimize_scalar(lambda log_t: metrics.negative_log_likelihood(3 * z, y, np.exp(log_t)),
                           bounds=(np.log(0.01), np.log(100)), method="bounded", options={"xatol": 1e-10})
    assert t == pytest.approx(np.exp(best.x), rel=1e-4)
    assert t == pytest.approx(3.0, rel=0.1)  # the over-confidence it was given
    assert metrics.negative_log_likelihood(3 * z, y, t) < metrics.negative_log_likelihood(3 * z, y)
    # nothing to fit: one row; every row right with growing margins (the minimum is at T -> 0): 1.0
    assert metrics.fit_temperature(z[:1], y[:1]) == 1.0
    assert metrics.fit_temperature(np.eye(4)[y] * 5, y) == 1.0


def test_squad_normalisation_is_the_official_scripts():
    # hand-worked with the official v2 script's rules
    assert metrics.normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert metrics.squad(["the Eiffel tower"], [["Eiffel Tower", "Paris"]]) == {"exact_match": 1.0, "f1": 1.0}
    out = metrics.squad(["in Paris, France"], [["Paris"]])
    assert out["exact_match"] == 0.0 and out["f1"] == pytest.approx(2 * (1 / 3) * 1 / (1 / 3 + 1))
    assert metrics.squad([""], [[]]) == {"exact_match": 1.0, "f1": 1.0}  # unanswerable, answered empty
    assert metrics.squad(["北京大学"], [["北京"]])["f1"] == pytest.approx(2 * 0.5 * 1 / 1.5)


def test_pass_at_k_matches_the_combinatorial_definition():
    from math import comb

    for n, c, k in [(10, 3, 1), (10, 3, 5), (20, 0, 3), (5, 5, 2), (7, 2, 6)]:
        exact = 1 - comb(n - c, k) / comb(n, k)
        assert metrics.pass_at_k(n, c, k) == pytest.approx(exact)


def test_exact_match_with_lm_evals_gsm8k_cleanup():
    regexes = [",", "\\$", "(?s).*#### ", "\\.$"]
    assert metrics.exact_match(["$1,200."], ["He paid...\n#### 1200"], ignore_case=True,
                               regexes_to_ignore=regexes) == 1.0


def test_metrics_by_name_equal_the_reference_libraries(chinese_pairs):
    """`score_texts` (what `lmforge eval metrics --metric` runs): each name gives its reference library's figure, with
    two references per item where the metric takes several."""
    import sacrebleu
    from sklearn.metrics import accuracy_score, matthews_corrcoef

    hyps, refs = chinese_pairs
    hyps, refs = hyps[:40], refs[:40]
    refs2 = list(reversed(refs))
    got = metrics.score_texts(["bleu", "chrf", "ter", "exact_match"], hyps, [refs, refs2])
    assert got["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs, refs2], tokenize="zh").score, abs=1e-9)
    assert got["bleu_tokenize"] == "zh"
    assert got["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs, refs2]).score, abs=1e-9)
    assert got["ter"] == pytest.approx(sacrebleu.corpus_ter(hyps, [refs, refs2]).score)
    assert got["exact_match"] == sum(h == r for h, r in zip(hyps, refs)) / len(refs)
    labels_true, labels_pred = ["a", "b", "a", "c", "b", "a"], ["a", "b", "c", "c", "a", "a"]
    got = metrics.score_texts(["accuracy", "mcc"], labels_pred, [labels_true])
    assert got == pytest.approx({"accuracy": accuracy_score(labels_true, labels_pred),
                                 "mcc": matthews_corrcoef(labels_true, labels_pred)})
    with pytest.raises(ValueError, match="unknown metric 'blue'"):
        metrics.score_texts(["blue"], hyps, [refs])
