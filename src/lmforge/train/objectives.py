"""Objectives: what the one training loop optimises. A new method is a new objective, never a new loop.

An objective turns a dict batch into a loss and evaluates a model on fixed batches. Batches are dicts of
tensors: `input_ids` (B, T) and the keys the objective reads; for language modelling `labels` (B, T) holds the
target id of each position, already shifted (labels[t] is the token after input_ids[t]; -100 = no loss),
`attention_mask` (B, T) marks real tokens, and `segment_ids` / `position_ids` describe packed sequences.

`loss` returns the mean over the batch's loss terms and how many terms there were; the Trainer weights each
micro-batch by its count, so gradient accumulation gives the loss of the whole batch even when micro-batches
hold different numbers of target tokens (SFT), not the mean of their means.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F


class Objective(abc.ABC):
    """The interface: `loss(forward, batch) -> (mean loss, count)`, `evaluate(model, batches) -> metrics`."""

    #: the metric that picks the best checkpoint and drives early stopping
    best_metric: str = "val_loss"
    higher_is_better: bool = False

    @abc.abstractmethod
    def loss(self, forward: Callable, batch: dict) -> tuple[torch.Tensor, int]:
        """Mean loss over the batch's loss terms, and their number; `forward` is the (wrapped) model."""

    @abc.abstractmethod
    def evaluate(self, model: torch.nn.Module, batches: Iterable[dict]) -> dict:
        """Metrics over fixed evaluation batches, `best_metric` among them."""

    def count(self, batch: dict) -> int:
        """The number of loss terms in a batch, known before the forward pass: target tokens (labels != -100)
        for language modelling, else examples."""
        labels = batch.get("labels")
        if labels is None or labels.is_floating_point():
            return len(batch["input_ids"])
        return int((labels != -100).sum())


def _model_inputs(batch: dict) -> dict:
    return {"attention_mask": batch.get("attention_mask"), "segment_ids": batch.get("segment_ids"),
            "positions": batch.get("position_ids")}


class CausalLM(Objective):
    """Next-token cross entropy on `labels` (pretraining, SFT, continued pretraining); eval: loss and perplexity."""

    def loss(self, forward: Callable, batch: dict) -> tuple[torch.Tensor, int]:
        labels = batch["labels"]
        trained = labels != -100
        count = int(trained.sum())
        if count < labels.numel():  # masked prompts or padding: logits only where there is a target
            logits = forward(batch["input_ids"], logits_mask=trained, **_model_inputs(batch))
            return F.cross_entropy(logits.float(), labels[trained]), count
        logits = forward(batch["input_ids"], **_model_inputs(batch))
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        return loss, count

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, batches: Iterable[dict]) -> dict:
        means, counts = [], []
        for batch in batches:
            loss, count = self.loss(model, batch)
            if count:
                means.append(loss.item())
                counts.append(count)
        if not counts:
            return {}
        # equal batches (pretraining windows): the plain mean; else weighted by each batch's target tokens
        equal = len(set(counts)) == 1
        loss = sum(means) / len(means) if equal else sum(m * c for m, c in zip(means, counts)) / sum(counts)
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50))}


# --- task heads (model/heads.py) -----------------------------------------------------------------------------------

def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, multi_label: bool = False) -> dict:
    """val_* metrics of classifier logits (N, C) against labels (N,) class ids, or (N, C) 0/1 for multi-label:
    accuracy, macro precision / recall / F1, micro F1 and ROC-AUC (scikit-learn's definitions, eval/metrics.py)."""
    import numpy as np

    from lmforge.eval import metrics as M

    n_classes = logits.shape[-1]
    if multi_label:
        pred = (logits > 0).numpy().astype(int)
        gold = labels.numpy().astype(int)
        per = [M.precision_recall_f1(gold[:, c], pred[:, c], average="binary", labels=[0, 1]) for c in range(n_classes)]
        tp, fp, fn = ((pred == 1) & (gold == 1)).sum(), ((pred == 1) & (gold == 0)).sum(), ((pred == 0) & (gold == 1)).sum()
        micro_p, micro_r = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
        return {"val_accuracy": float((pred == gold).all(1).mean()),  # subset accuracy, as sklearn's accuracy_score
                "val_precision": float(np.mean([p["precision"] for p in per])),
                "val_recall": float(np.mean([p["recall"] for p in per])),
                "val_f1": float(np.mean([p["f1"] for p in per])),
                "val_f1_micro": float(2 * micro_p * micro_r / (micro_p + micro_r)) if micro_p + micro_r else 0.0}
    pred, gold = logits.argmax(-1).numpy(), labels.numpy()
    classes = list(range(n_classes))
    macro = M.precision_recall_f1(gold, pred, average="macro", labels=classes)
    out = {"val_accuracy": M.accuracy(gold, pred), "val_precision": macro["precision"], "val_recall": macro["recall"],
           "val_f1": macro["f1"], "val_f1_micro": M.precision_recall_f1(gold, pred, "micro", classes)["f1"]}
    present = sorted(set(gold.tolist()))
    if len(present) > 1:  # AUC needs both classes (every class, one-vs-rest) among the gold labels
        probs = F.softmax(logits.float(), -1).numpy()
        if n_classes == 2:
            out["val_roc_auc"] = M.roc_auc(gold, probs[:, 1])
        elif len(present) == n_classes:
            out["val_roc_auc"] = M.roc_auc(gold, probs, labels=classes)
    return out


class SequenceClassification(Objective):
    """Cross entropy of a sequence classifier's logits on `labels` (B,) class ids, with optional class weights;
    multi-label: binary cross entropy on `labels` (B, C) of 0/1. Eval: loss, accuracy, macro P/R/F1, micro F1,
    ROC-AUC; the best checkpoint by macro F1 unless told otherwise."""

    best_metric = "val_f1"
    higher_is_better = True

    def __init__(self, multi_label: bool = False, class_weights: torch.Tensor | None = None):
        self.multi_label = multi_label
        self.class_weights = class_weights

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        weight = self.class_weights.to(logits.device) if self.class_weights is not None else None
        if self.multi_label:  # a weight per label scales its positives (pos_weight)
            return F.binary_cross_entropy_with_logits(logits.float(), labels.float(), pos_weight=weight)
        return F.cross_entropy(logits.float(), labels, weight=weight)

    def loss(self, forward: Callable, batch: dict) -> tuple[torch.Tensor, int]:
        logits = forward(batch["input_ids"], attention_mask=batch["attention_mask"])
        return self._loss(logits, batch["labels"]), len(batch["input_ids"])

    def count(self, batch: dict) -> int:
        return len(batch["input_ids"])

    @torch.no_grad()
    def predict(self, model: torch.nn.Module, batches: Iterable[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, labels) of every evaluation example, on the CPU."""
        logits, labels = [], []
        for batch in batches:
            logits.append(model(batch["input_ids"], attention_mask=batch["attention_mask"]).float().cpu())
            labels.append(batch["labels"].cpu())
        return torch.cat(logits), torch.cat(labels)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, batches: Iterable[dict]) -> dict:
        logits, labels = self.predict(model, batches)
        if not len(logits):
            return {}
        weights, self.class_weights = self.class_weights, None  # the plain loss: comparable across weightings
        try:
            loss = self._loss(logits, labels).item()
        finally:
            self.class_weights = weights
        return {"val_loss": loss, **classification_metrics(logits, labels, self.multi_label)}


class TokenClassification(Objective):
    """Cross entropy per token on `labels` (B, T): a tag id at each word's first piece, -100 elsewhere. Eval: loss,
    token accuracy and entity-level precision / recall / F1 (micro, seqeval's default mode) of the words' tags."""

    best_metric = "val_f1"
    higher_is_better = True

    def __init__(self, tags: list[str], class_weights: torch.Tensor | None = None):
        self.tags = tags
        self.class_weights = class_weights

    def loss(self, forward: Callable, batch: dict) -> tuple[torch.Tensor, int]:
        logits = forward(batch["input_ids"], attention_mask=batch["attention_mask"])
        labels = batch["labels"]
        weight = self.class_weights.to(logits.device) if self.class_weights is not None else None
        return F.cross_entropy(logits.float()[labels != -100], labels[labels != -100], weight=weight), \
            int((labels != -100).sum())

    @torch.no_grad()
    def sentences(self, model: torch.nn.Module, batches: Iterable[dict]) -> tuple[list, list, float, int]:
        """(gold tag lists, predicted tag lists, summed loss, labelled words) over the batches."""
        gold, pred, total, n = [], [], 0.0, 0
        for batch in batches:
            logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).float()
            labels = batch["labels"]
            keep = labels != -100
            if keep.any():
                total += F.cross_entropy(logits[keep], labels[keep], reduction="sum").item()
                n += int(keep.sum())
            best = logits.argmax(-1)
            for row in range(len(labels)):
                k = keep[row]
                gold.append([self.tags[i] for i in labels[row][k].tolist()])
                pred.append([self.tags[i] for i in best[row][k].tolist()])
        return gold, pred, total, n

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, batches: Iterable[dict]) -> dict:
        from lmforge.eval.metrics import entity_scores

        gold, pred, total, n = self.sentences(model, batches)
        if not n:
            return {}
        scores = entity_scores(gold, pred)
        return {"val_loss": total / n, "val_accuracy": scores["accuracy"], "val_precision": scores["micro"]["precision"],
                "val_recall": scores["micro"]["recall"], "val_f1": scores["micro"]["f1"]}
