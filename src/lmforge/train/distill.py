"""Knowledge distillation as an objective of the one training loop: the student learns the teacher's next-token
distribution at the tokens SFT trains on, mixed with the SFT cross entropy.

Per trained token, with p the teacher's and q the student's distribution at temperature T (softmax(logits / T)):

    forward_kl   KL(p || q)                     (Hinton et al. 2015; torchtune's ForwardKLLoss up to p's entropy)
    reverse_kl   KL(q || p)                     (MiniLLM, on-policy distillation)
    jsd          b KL(p || m) + (1 - b) KL(q || m),  m = b p + (1 - b) q   (GKD, Agarwal et al. 2024, Eq. 1; TRL's
                 generalized_jsd_loss: b = 0 is forward KL, b = 1 reverse KL)

times T^2 so that the gradients keep their size as T changes (Hinton et al.), and the objective's loss is
`(1 - kd_ratio) * CE + kd_ratio * KD`, both means over the trained tokens (torchtune's KD recipes).

The teacher is a second model held frozen in eval mode, or an offline cache of its top-k log-probabilities per
trained token plus the mass of the rest (DistillKit's sparse logits): then both distributions are compared over
K + 1 buckets (the K ids, and "any other id"), which equals the dense loss when K covers the vocabulary.

Memory: the (tokens, vocab) logits of both models are never whole. The loss runs over chunks of trained tokens,
each under activation checkpointing, so one chunk's logits live at a time (recomputed in the backward pass).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lmforge.train.objectives import Objective, _decoder, _model_inputs

KD_LOSSES = ("forward_kl", "reverse_kl", "jsd")
#: log-probabilities below this are treated as this: an empty bucket (the tail when K covers the vocabulary) is
#: -inf, and 0 * -inf is NaN in the value and the gradient; exp(-1e4) is 0 in float32, so nothing else changes
LOG_FLOOR = -1e4
#: float32 logits per chunk (of both models together): 64 MiB, as linear_cross_entropy's chunks
CHUNK_BYTES = 64 * 2**20


def _float(x: torch.Tensor) -> torch.Tensor:
    """float32 at least (half and bfloat16 logits are compared in float32; float64 stays)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) summed over the last dim, from log-probabilities: sum a (log a - log b)."""
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def divergence(student_logps: torch.Tensor, teacher_logps: torch.Tensor, kind: str, beta: float = 0.5) -> torch.Tensor:
    """Per-row divergence (n,) between two distributions given as log-probabilities (n, buckets) over the same
    buckets: forward_kl = KL(teacher || student), reverse_kl = KL(student || teacher), jsd = the generalized JSD
    with weight `beta` on the teacher (0: forward KL, 1: reverse KL, as TRL's generalized_jsd_loss)."""
    s, t = student_logps.clamp(min=LOG_FLOOR), teacher_logps.clamp(min=LOG_FLOOR)
    if kind == "forward_kl" or (kind == "jsd" and beta == 0):
        return _kl(t, s)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1):
        return _kl(s, t)
    if kind != "jsd":
        raise ValueError(f"kd_loss {kind!r}: one of {', '.join(KD_LOSSES)}")
    if not 0 < beta < 1:
        raise ValueError(f"kd_beta {beta}: in [0, 1]")
    mixture = torch.logaddexp(s + math.log1p(-beta), t + math.log(beta))
    return beta * _kl(t, mixture) + (1 - beta) * _kl(s, mixture)


def token_kd_losses(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str = "forward_kl",
                    beta: float = 0.5, temperature: float = 1.0) -> torch.Tensor:
    """Per-token distillation loss (n,) of dense logits (n, vocab) of both models: the divergence between their
    distributions at `temperature`, times temperature^2. Logits are compared in float32."""
    s = F.log_softmax(_float(student_logits) / temperature, -1)
    t = F.log_softmax(_float(teacher_logits) / temperature, -1)
    return divergence(s, t, kind, beta) * temperature**2


def sparse_kd_losses(student_logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_logps: torch.Tensor,
                     teacher_tail: torch.Tensor, kind: str = "forward_kl", beta: float = 0.5,
                     temperature: float = 1.0) -> torch.Tensor:
    """Per-token distillation loss (n,) against a teacher known by its top-k: ids (n, K), their log-probabilities
    (n, K) at `temperature`, and the log of the remaining mass (n,) (-inf or LOG_FLOOR where the K ids hold it
    all). The student's distribution is collapsed onto the same K + 1 buckets (its mass on those ids, the rest in
    one), so with K = vocab this is `token_kd_losses` exactly."""
    s = F.log_softmax(_float(student_logits) / temperature, -1)
    picked = s.gather(-1, teacher_ids.long())
    rest = s.scatter(-1, teacher_ids.long(), float("-inf")).logsumexp(-1, keepdim=True)
    student = torch.cat([picked, rest], -1)
    teacher = torch.cat([_float(teacher_logps), _float(teacher_tail)[:, None]], -1).to(s.dtype)
    return divergence(student, teacher, kind, beta) * temperature**2


def chunk_rows(vocab: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Rows per chunk so that a chunk's float32 logits of both models take about `chunk_bytes`."""
    return max(1, chunk_bytes // (8 * vocab))


def chunked_sums(fn: Callable[..., tuple[torch.Tensor, ...]], tensors: list[torch.Tensor], rows: int) -> tuple:
    """The sums of what `fn(*chunk)` returns (scalars) over chunks of `rows` rows of `tensors`, each chunk under
    activation checkpointing when a gradient is needed: only one chunk's intermediates (its logits) live at once."""
    totals = None
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors if torch.is_tensor(t))
    for start in range(0, len(tensors[0]), rows):
        part = [t[start:start + rows] for t in tensors]
        out = checkpoint(fn, *part, use_reentrant=False) if grad else fn(*part)
        totals = out if totals is None else tuple(a + b for a, b in zip(totals, out))
    if totals is None:
        zero = torch.zeros((), device=tensors[0].device)
        return zero, zero
    return totals


class Distill(Objective):
    """Distillation on SFT batches (`input_ids`, `labels`, `attention_mask` / packed segments): the loss is
    `(1 - ratio) * CE(labels) + ratio * KD(teacher || student)` over the trained tokens (labels != -100).

    The teacher is a model (frozen and in eval mode here; moved to the batches' device at first use) or, when the
    batches carry `teacher_ids` / `teacher_logps` / `teacher_tail` rows for their trained tokens (an offline
    cache), nothing. Eval: val_loss (the mixed loss), val_kd and val_ce (the answer loss), token-weighted."""

    def __init__(self, teacher: torch.nn.Module | None, kind: str = "forward_kl", beta: float = 0.5,
                 temperature: float = 1.0, ratio: float = 0.5, chunk_bytes: int = CHUNK_BYTES):
        if kind not in KD_LOSSES:
            raise ValueError(f"kd_loss {kind!r}: one of {', '.join(KD_LOSSES)}")
        if temperature <= 0 or not 0 <= ratio <= 1 or not 0 <= beta <= 1:
            raise ValueError(f"kd_temperature {temperature} > 0, kd_ratio {ratio} and kd_beta {beta} in [0, 1]")
        self.teacher, self.kind, self.beta, self.temperature, self.ratio = teacher, kind, beta, temperature, ratio
        self.chunk_bytes = chunk_bytes
        if teacher is not None:
            teacher.eval().requires_grad_(False)

    def _teacher_hidden(self, batch: dict, trained: torch.Tensor) -> torch.Tensor:
        device = batch["input_ids"].device
        if next(self.teacher.parameters()).device != device:
            self.teacher.to(device)
        with torch.no_grad():
            return self.teacher(batch["input_ids"], **_model_inputs(batch))[trained]

    def terms(self, forward: Callable, batch: dict) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(summed CE, summed KD, trained tokens) of a batch; KD already times T^2."""
        labels = batch["labels"]
        trained = labels != -100
        count = int(trained.sum())
        hidden = forward(batch["input_ids"], **_model_inputs(batch))[trained]
        decoder = _decoder(forward)
        head = decoder.logits if decoder is not None else (lambda h: h)  # another model returns logits
        targets = labels[trained]
        kind, beta, temperature = self.kind, self.beta, self.temperature

        if "teacher_ids" in batch:  # an offline cache: rows of the trained tokens, in order
            ids, logps, tail = batch["teacher_ids"], batch["teacher_logps"], batch["teacher_tail"]

            def sums(h, y, i, lp, tl):
                logits = head(h)
                return (F.cross_entropy(_float(logits), y, reduction="sum"),
                        sparse_kd_losses(logits, i, lp, tl, kind, beta, temperature).sum())

            vocab = decoder.cfg.vocab_size if decoder is not None else hidden.shape[-1]
            return (*chunked_sums(sums, [hidden, targets, ids, logps, tail], chunk_rows(vocab, self.chunk_bytes)),
                    count)

        teacher_hidden = self._teacher_hidden(batch, trained)
        teacher_decoder = _decoder(self.teacher)
        teacher_head = teacher_decoder.logits if teacher_decoder is not None else (lambda h: h)

        def sums(h, th, y):
            logits = head(h)
            with torch.no_grad():
                teacher_logits = teacher_head(th)
            n = min(logits.shape[-1], teacher_logits.shape[-1])  # a vocabulary padded further in one of them
            return (F.cross_entropy(_float(logits), y, reduction="sum"),
                    token_kd_losses(logits[:, :n], teacher_logits[:, :n], kind, beta, temperature).sum())

        vocab = decoder.cfg.vocab_size if decoder is not None else hidden.shape[-1]
        return (*chunked_sums(sums, [hidden, teacher_hidden, targets], chunk_rows(vocab, self.chunk_bytes)), count)

    def loss(self, forward: Callable, batch: dict) -> tuple[torch.Tensor, int]:
        ce, kd, count = self.terms(forward, batch)
        n = max(count, 1)
        return ((1 - self.ratio) * ce + self.ratio * kd) / n, count

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, batches: Iterable[dict]) -> dict:
        ce = kd = 0.0
        n = 0
        for batch in batches:
            c, k, count = self.terms(model, batch)
            ce, kd, n = ce + c.item(), kd + k.item(), n + count
        if not n:
            return {}
        return {"val_loss": ((1 - self.ratio) * ce + self.ratio * kd) / n, "val_kd": kd / n, "val_ce": ce / n}
