"""A fast document-quality classifier: hashed n-gram features and a linear model.

Features are the word 1..n-grams of a text (character 1..n-grams for Chinese and
Japanese), hashed into 2^bits buckets with the same vectorised hashing as MinHash, counted
and L2-normalised. The model is logistic regression over them (a bag of embeddings of size
one, trained with Adam and weight decay) — the fastText-style classifier that FineWeb-Edu
and DCLM use to pick pretraining data, without a native dependency.

Saved as `classifier.safetensors` (weights) and `classifier.json` (settings and held-out
metrics); no pickle.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save

from lmforge.data.config import ClassifierSettings
from lmforge.data.dedup import shingle_hashes
from lmforge.files import atomic_write, write_json


def hashed_features(texts: Sequence[str], bits: int = ClassifierSettings.bits,
                    ngrams: Sequence[int] = ClassifierSettings.ngrams) -> tuple[
        torch.Tensor, torch.Tensor, torch.Tensor]:
    """(indices, offsets, weights) for torch.nn.functional.embedding_bag: each text's
    distinct hashed n-grams with L2-normalised counts."""
    mask = (1 << bits) - 1
    per_n = []
    for n in ngrams:
        h, off = shingle_hashes(texts, ngram=int(n), unit="auto")
        owner = np.repeat(np.arange(len(texts)), np.diff(off))
        # a different bucket layout per n so a word and a bigram rarely collide
        per_n.append((owner, (h.astype(np.uint64) * np.uint64(2 * n + 1) + np.uint64(n)) & np.uint64(mask)))
    owner = np.concatenate([p[0] for p in per_n])
    bucket = np.concatenate([p[1] for p in per_n]).astype(np.int64)
    key = owner.astype(np.int64) << bits | bucket
    uniq, counts = np.unique(key, return_counts=True)
    doc = uniq >> bits
    weights = counts.astype(np.float32)
    norms = np.sqrt(np.bincount(doc, weights=weights ** 2, minlength=len(texts)))
    weights /= np.maximum(norms[doc], 1e-12)
    offsets = np.concatenate([[0], np.cumsum(np.bincount(doc, minlength=len(texts)))[:-1]])
    return torch.from_numpy(uniq & mask), torch.from_numpy(offsets.astype(np.int64)), torch.from_numpy(weights)


class HashedLinearClassifier:
    def __init__(self, bits: int = ClassifierSettings.bits, ngrams: Sequence[int] = ClassifierSettings.ngrams):
        self.bits, self.ngrams = bits, list(ngrams)
        self.weight = torch.zeros(1 << bits, 1)
        self.bias = torch.zeros(1)
        self.metrics: dict = {}

    def logits(self, texts: Sequence[str]) -> torch.Tensor:
        idx, off, w = hashed_features(texts, self.bits, self.ngrams)
        return torch.nn.functional.embedding_bag(idx, self.weight, off, mode="sum", per_sample_weights=w)[:, 0] + self.bias

    @torch.no_grad()
    def predict_proba(self, texts: Sequence[str], batch_size: int = 512) -> np.ndarray:
        if not len(texts):
            return np.zeros(0)
        return np.concatenate([torch.sigmoid(self.logits(texts[i:i + batch_size])).numpy()
                               for i in range(0, len(texts), batch_size)])

    def fit(self, texts: Sequence[str], labels: Sequence[int], epochs: int = ClassifierSettings.epochs,
            lr: float = ClassifierSettings.lr,
            weight_decay: float = 1e-6, batch_size: int = 32, seed: int = 0) -> HashedLinearClassifier:
        y = torch.tensor(labels, dtype=torch.float32)
        feats = [hashed_features(texts[i:i + batch_size], self.bits, self.ngrams) for i in range(0, len(texts), batch_size)]
        weight = torch.nn.Parameter(self.weight.clone())
        bias = torch.nn.Parameter(self.bias.clone())
        # sparse gradients: an update touches only the buckets present in the batch
        opt_w = torch.optim.SparseAdam([weight], lr=lr)
        opt_b = torch.optim.Adam([bias], lr=lr)
        gen = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            for b in torch.randperm(len(feats), generator=gen).tolist():
                idx, off, w = feats[b]
                target = y[b * batch_size:(b + 1) * batch_size]
                emb = torch.nn.functional.embedding_bag(idx, weight, off, mode="sum", per_sample_weights=w, sparse=True)
                loss = torch.nn.functional.binary_cross_entropy_with_logits(emb[:, 0] + bias, target)
                opt_w.zero_grad()
                opt_b.zero_grad()
                loss.backward()
                opt_w.step()
                opt_b.step()
                if weight_decay:
                    with torch.no_grad():
                        weight[idx] *= 1 - lr * weight_decay
        self.weight, self.bias = weight.detach(), bias.detach()
        return self

    def save(self, out_dir: str | os.PathLike) -> None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with atomic_write(out / "classifier.safetensors", "wb") as f:
            f.write(save({"weight": self.weight.contiguous(), "bias": self.bias}))
        write_json(out / "classifier.json", {"format": "lmforge-hashed-linear", "bits": self.bits,
                                             "ngrams": self.ngrams, "metrics": self.metrics})

    @classmethod
    def load(cls, path: str | os.PathLike) -> HashedLinearClassifier:
        path = Path(path)
        try:
            info = json.loads((path / "classifier.json").read_text(encoding="utf-8"))
        except OSError:
            from lmforge.data.sources import CorpusError

            raise CorpusError(f"{path}: no classifier.json (train one with `lmforge data train-classifier`)") from None
        clf = cls(info["bits"], info["ngrams"])
        tensors = load_file(str(path / "classifier.safetensors"))
        clf.weight, clf.bias = tensors["weight"], tensors["bias"]
        clf.metrics = info.get("metrics", {})
        return clf


def train_classifier(positive: Sequence[str], negative: Sequence[str], out_dir: str | os.PathLike | None = None,
                     bits: int = ClassifierSettings.bits, ngrams: Sequence[int] = ClassifierSettings.ngrams,
                     epochs: int = ClassifierSettings.epochs, lr: float = ClassifierSettings.lr,
                     heldout_fraction: float = ClassifierSettings.heldout, seed: int = 0) -> HashedLinearClassifier:
    """Train on positive/negative texts with a random held-out split; metrics on held-out."""
    if not positive or not negative:
        raise ValueError(f"need positive and negative examples (got {len(positive)} and {len(negative)})")
    texts = list(positive) + list(negative)
    labels = np.array([1] * len(positive) + [0] * len(negative))
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(texts))
    n_held = max(1, int(round(len(texts) * heldout_fraction))) if heldout_fraction > 0 else 0
    held, train = order[:n_held], order[n_held:]
    clf = HashedLinearClassifier(bits, ngrams).fit([texts[i] for i in train], labels[train], epochs, lr, seed=seed)
    metrics = {"train_examples": int(len(train)), "heldout_examples": int(n_held),
               "positive": len(positive), "negative": len(negative)}
    if n_held:
        p = clf.predict_proba([texts[i] for i in held])
        pred, y = p >= 0.5, labels[held] == 1
        tp, fp, fn = int((pred & y).sum()), int((pred & ~y).sum()), int((~pred & y).sum())
        metrics.update(heldout_accuracy=round(float((pred == y).mean()), 4),
                       heldout_precision=round(tp / max(1, tp + fp), 4), heldout_recall=round(tp / max(1, tp + fn), 4))
    clf.metrics = metrics
    if out_dir is not None:
        clf.save(out_dir)
    return clf
