"""The hashed linear quality classifier against scikit-learn's logistic regression on the
same features, and its save/load round trip."""

from __future__ import annotations

import random

import numpy as np
import pytest

from lmforge.data.classifier import HashedLinearClassifier, hashed_features, train_classifier
from tests.corpora import chinese_news, english


def _task():
    words = english(300_000).split()
    good = [" ".join(words[i:i + 60]) for i in range(0, len(words) - 60, 60)]
    rng = random.Random(0)
    bad = []
    for g in good:  # word salad: the same words, no syntax (only bigrams tell them apart)
        w = g.split()
        rng.shuffle(w)
        bad.append(" ".join(w))
    return good, bad


def test_features_are_l2_normalised_counts():
    idx, off, w = hashed_features(["a a b", "中文中文"], bits=16, ngrams=(1,))
    first = np.sort(w[: off[1]].numpy())
    assert np.allclose(first, [1 / 5 ** 0.5, 2 / 5 ** 0.5])
    assert abs(float((w[off[1]:] ** 2).sum()) - 1) < 1e-5


def test_accuracy_matches_scikit_learn_on_the_same_features(tmp_path):
    sp = pytest.importorskip("scipy.sparse")
    from sklearn.linear_model import LogisticRegression

    good, bad = _task()
    clf = train_classifier(good, bad, tmp_path / "clf", epochs=10, seed=0)
    ours = clf.metrics["heldout_accuracy"]
    texts, y = good + bad, np.array([1] * len(good) + [0] * len(bad))
    order = np.random.default_rng(0).permutation(len(texts))
    n_held = int(round(len(texts) * 0.1))
    held, train = order[:n_held], order[n_held:]
    idx, off, w = hashed_features(texts)
    rows = np.repeat(np.arange(len(texts)), np.diff(np.append(off.numpy(), len(idx))))
    X = sp.csr_matrix((w.numpy(), (rows, idx.numpy())), shape=(len(texts), 1 << 20))
    reference = max(LogisticRegression(C=c, max_iter=3000).fit(X[train], y[train]).score(X[held], y[held])
                    for c in (10, 100))
    assert ours > 0.85
    assert ours >= reference - 0.04, (ours, reference)
    loaded = HashedLinearClassifier.load(tmp_path / "clf")
    sample = good[:5] + bad[:5] + [chinese_news()[:300]]
    assert np.allclose(loaded.predict_proba(sample), clf.predict_proba(sample))
    assert loaded.metrics == clf.metrics


def test_quality_filter_step_scores_and_filters(tmp_path):
    from lmforge.data.document import Document
    from lmforge.data.step import build_step

    good, bad = _task()
    train_classifier(good, bad, tmp_path / "clf", epochs=10)
    step = build_step("quality_classifier", {"model": str(tmp_path / "clf"), "threshold": 0.5})
    step.setup()
    kept = step.apply(Document("g", good[-1]))
    assert not isinstance(kept, str) and kept.meta["quality_score"] > 0.5
    assert step.apply(Document("b", bad[-1])).startswith("quality_classifier: score")
