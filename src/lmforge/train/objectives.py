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
