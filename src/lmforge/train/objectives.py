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


def _decoder(forward: Callable):
    """lmforge's decoder behind `forward`, possibly wrapped (DDP's .module, torch.compile's ._orig_mod; FSDP2 keeps
    the class), or None: its forward returns hidden states, its `logits` / `loss` apply the head."""
    from lmforge.model.portable import PortableModel
    from lmforge.model.transformer import Transformer

    for _ in range(4):
        if isinstance(forward, (Transformer, PortableModel)):  # (the portable path: transformers' modules inside)
            return forward
        forward = getattr(forward, "module", None) or getattr(forward, "_orig_mod", None)
        if forward is None:
            return None
    return None


def model_inputs(batch: dict) -> dict:
    return {"attention_mask": batch.get("attention_mask"), "segment_ids": batch.get("segment_ids"),
            "positions": batch.get("position_ids")}


class CausalLM(Objective):
    """Next-token cross entropy on `labels` (pretraining, SFT, continued pretraining); eval: loss and perplexity."""

    def loss(self, forward: Callable, batch: dict) -> tuple[torch.Tensor, int]:
        labels = batch["labels"]
        trained = labels != -100
        count = int(trained.sum())
        masked = count < labels.numel()  # masked prompts or padding: the head runs only where there is a target
        out = forward(batch["input_ids"], **model_inputs(batch))
        decoder = _decoder(forward)
        if decoder is not None:  # hidden states: the head and the loss fused, no (tokens, vocab) logits kept
            return decoder.loss(out, labels, trained if masked else None), count
        if masked:  # another model's logits
            return F.cross_entropy(out[trained].float(), labels[trained]), count
        loss = F.cross_entropy(out.float().reshape(-1, out.shape[-1]), labels.reshape(-1), ignore_index=-100)
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
    accuracy, macro precision / recall / F1, micro F1 and ROC-AUC (scikit-learn's definitions, metrics.py)."""
    import numpy as np

    from lmforge import metrics as M

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
        from lmforge.metrics import entity_scores

        gold, pred, total, n = self.sentences(model, batches)
        if not n:
            return {}
        scores = entity_scores(gold, pred)
        return {"val_loss": total / n, "val_accuracy": scores["accuracy"], "val_precision": scores["micro"]["precision"],
                "val_recall": scores["micro"]["recall"], "val_f1": scores["micro"]["f1"]}


# --- preference tuning ----------------------------------------------------------------------------------------------

PREFERENCE_LOSSES = ("dpo", "ipo", "orpo", "simpo")
REFERENCE_FREE = ("orpo", "simpo")


def sequence_logps(forward: Callable, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability of each row's trained tokens (rows,), their number (rows,)). The head's matmul and
    softmax run on the trained (completion) positions only."""
    labels = batch["labels"]
    trained = labels != -100
    out = forward(batch["input_ids"], **model_inputs(batch))[trained]
    decoder = _decoder(forward)
    logits = decoder.logits(out) if decoder is not None else out
    token_logps = torch.log_softmax(logits.float(), -1).gather(-1, labels[trained][:, None]).squeeze(-1)
    rows = trained.nonzero()[:, 0]
    sums = torch.zeros(len(labels), device=token_logps.device, dtype=token_logps.dtype).index_add(0, rows, token_logps)
    return sums, trained.sum(1)


def preference_losses(loss_type: str, chosen: torch.Tensor, rejected: torch.Tensor, chosen_n: torch.Tensor,
                      rejected_n: torch.Tensor, ref_chosen: torch.Tensor | None = None,
                      ref_rejected: torch.Tensor | None = None, beta: float = 0.1, label_smoothing: float = 0.0,
                      simpo_gamma: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair losses, chosen rewards, rejected rewards) from summed completion log-probabilities.

    dpo    -(1-e) logsigmoid(b d) - e logsigmoid(-b d), d = (chosen - ref) - (rejected - ref)   (Rafailov et al.
           2023; e = label_smoothing: conservative DPO); rewards b (policy - ref)
    ipo    (d' - 1/(2b))^2 with d' the same margin of per-token log-probabilities (Azar et al. 2023, Eq. 17, length-
           normalised as trl does)
    simpo  -(1-e) logsigmoid(b (avg_c - avg_r) - gamma) - e logsigmoid(-(...)), avg = per-token log-probability
           (Meng et al. 2024; no reference)
    orpo   -b logsigmoid(log odds(avg_c) - log odds(avg_r)), odds(p) = p / (1 - p) (Hong et al. 2024; no reference;
           the chosen reply's NLL is added by the objective)"""
    if loss_type in ("dpo", "ipo"):
        if ref_chosen is None or ref_rejected is None:
            raise ValueError(f"{loss_type} needs the reference log-probabilities")
        c, r = chosen - ref_chosen, rejected - ref_rejected
        if loss_type == "dpo":
            d = beta * (c - r)
            losses = -F.logsigmoid(d) * (1 - label_smoothing) - F.logsigmoid(-d) * label_smoothing
        else:
            d = c / chosen_n.clamp(min=1) - r / rejected_n.clamp(min=1)
            losses = (d - 1 / (2 * beta)) ** 2
        return losses, beta * c.detach(), beta * r.detach()
    avg_c, avg_r = chosen / chosen_n.clamp(min=1), rejected / rejected_n.clamp(min=1)
    if loss_type == "simpo":
        d = beta * (avg_c - avg_r) - simpo_gamma
        losses = -F.logsigmoid(d) * (1 - label_smoothing) - F.logsigmoid(-d) * label_smoothing
    elif loss_type == "orpo":
        def log1mexp(x):  # log(1 - exp(x)) for x < 0, stable at both ends
            return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))

        log_odds = (avg_c - avg_r) - (log1mexp(avg_c) - log1mexp(avg_r))
        losses = -beta * F.logsigmoid(log_odds)
    else:
        raise ValueError(f"loss {loss_type!r}: one of {', '.join(PREFERENCE_LOSSES)}")
    return losses, beta * avg_c.detach(), beta * avg_r.detach()


class Preference(Objective):
    """Preference tuning on pairs. A batch holds B chosen rows then B rejected rows (`input_ids`, `labels` on the
    reply tokens, `attention_mask`) and, for DPO / IPO, `ref_logps` (2B,): the reference model's summed reply
    log-probabilities, computed once before training (no second model in memory). Eval: loss, reward accuracy
    (chosen reward > rejected), margins and mean rewards on held-out pairs; the best checkpoint by eval loss."""

    def __init__(self, loss_type: str = "dpo", beta: float = 0.1, label_smoothing: float = 0.0,
                 simpo_gamma: float = 1.0):
        if loss_type not in PREFERENCE_LOSSES:
            raise ValueError(f"loss {loss_type!r}: one of {', '.join(PREFERENCE_LOSSES)}")
        self.loss_type, self.beta, self.label_smoothing, self.simpo_gamma = loss_type, beta, label_smoothing, simpo_gamma

    def count(self, batch: dict) -> int:
        return len(batch["input_ids"]) // 2

    def terms(self, forward: Callable, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logps, n = sequence_logps(forward, batch)
        B = len(logps) // 2
        ref = batch.get("ref_logps")
        losses, rc, rr = preference_losses(
            self.loss_type, logps[:B], logps[B:], n[:B], n[B:], None if ref is None else ref[:B],
            None if ref is None else ref[B:], self.beta, self.label_smoothing, self.simpo_gamma)
        if self.loss_type == "orpo":  # + the chosen replies' NLL, a mean over their tokens (ORPO's SFT part)
            losses = losses - logps[:B].sum() / n[:B].sum().clamp(min=1)
        return losses, rc, rr

    def loss(self, forward: Callable, batch: dict) -> tuple[torch.Tensor, int]:
        losses, _, _ = self.terms(forward, batch)
        return losses.mean(), len(losses)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, batches: Iterable[dict]) -> dict:
        losses, chosen, rejected = [], [], []
        for batch in batches:
            lo, rc, rr = self.terms(model, batch)
            losses.append(lo.float().cpu())
            chosen.append(rc.float().cpu())
            rejected.append(rr.float().cpu())
        if not losses:
            return {}
        lo, rc, rr = torch.cat(losses), torch.cat(chosen), torch.cat(rejected)
        return {"val_loss": lo.mean().item(), "val_reward_accuracy": (rc > rr).float().mean().item(),
                "val_reward_margin": (rc - rr).mean().item(), "val_reward_chosen": rc.mean().item(),
                "val_reward_rejected": rr.mean().item()}
