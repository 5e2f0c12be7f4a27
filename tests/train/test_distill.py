"""Distillation losses against their references: TRL 1.16's GKDTrainer.generalized_jsd_loss (called directly) and
torchtune's ForwardKLLoss (transcribed below: torchtune is not installed here), on the same logits; chunking,
kd_ratio mixing, and the sparse (top-k + tail) form equal to the dense one when K covers the vocabulary."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmforge.train.distill import Distill, sparse_kd_losses, token_kd_losses


def _logits(n=12, vocab=50, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, vocab, generator=g, dtype=torch.float64) * scale


@pytest.fixture(scope="module")
def trl_jsd():
    gkd = pytest.importorskip("trl.experimental.gkd.gkd_trainer")
    return gkd.GKDTrainer.generalized_jsd_loss


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.7])
def test_generalized_jsd_equals_trl(trl_jsd, beta, temperature):
    s, t = _logits(seed=1), _logits(seed=2)
    labels = torch.tensor([5, -100, 7, 1, -100, 3, 3, 9, 0, -100, 2, 4])[None]
    ref = trl_jsd(s[None], t[None], labels=labels, beta=beta, temperature=temperature)  # batchmean over labels
    kind = "jsd" if 0 < beta < 1 else ("forward_kl" if beta == 0 else "reverse_kl")
    ours = token_kd_losses(s, t, kind, beta, temperature)[labels[0] != -100].mean()
    # TRL leaves the temperature's T^2 out (Hinton et al. put it in so gradients keep their size)
    assert abs(ours.item() / temperature**2 - ref.item()) <= 1e-6
    if kind != "jsd":  # the kind "jsd" at its ends is the KL it names
        assert torch.allclose(token_kd_losses(s, t, "jsd", beta), token_kd_losses(s, t, kind), atol=1e-12)
    # float32 logits (what training gives) against TRL in float32
    ref32 = trl_jsd(s[None].float(), t[None].float(), labels=labels, beta=beta, temperature=temperature)
    ours32 = token_kd_losses(s.float(), t.float(), kind, beta, temperature)[labels[0] != -100].mean()
    assert abs(ours32.item() / temperature**2 - ref32.item()) <= 1e-6


def torchtune_forward_kl(student_logits, teacher_logits, labels, ignore_index=-100):
    """torchtune's ForwardKLLoss.forward (pytorch/torchtune, torchtune/modules/loss/kd_losses.py), line by line."""
    teacher_prob = F.softmax(teacher_logits, dim=-1, dtype=torch.float32)
    inf_mask = torch.isinf(student_logits)
    student_logprob = F.log_softmax(student_logits, dim=-1, dtype=torch.float32)
    prod_probs = torch.masked_fill(teacher_prob * student_logprob, inf_mask, 0)
    x = torch.sum(prod_probs, dim=-1).view(-1)
    mask = (labels != ignore_index).int()
    sum_masks = torch.sum(mask.view(-1), dim=0)
    if sum_masks == 0:
        return torch.tensor(0.0, device=x.device)
    return -torch.sum(x * mask.view(-1), dim=0) / torch.sum(mask.view(-1), dim=0)


def test_forward_kl_equals_torchtune_up_to_the_teachers_entropy():
    """torchtune's ForwardKLLoss is the cross entropy -sum p log q: KL(p || q) plus p's entropy, a constant of the
    teacher. So the values differ by exactly that entropy and the student's gradients are the same."""
    s, t = _logits(seed=3).float(), _logits(seed=4).float()
    labels = torch.tensor([1, 2, -100, 4, 5, 6, -100, 8, 9, 10, 11, 12])
    keep = labels != -100
    s1, s2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    ref = torchtune_forward_kl(s1, t, labels)
    ours = token_kd_losses(s2[keep], t[keep], "forward_kl").mean()
    p = F.softmax(t[keep].double(), -1)
    entropy = -(p * p.log()).sum(-1).mean()
    assert abs(ref.item() - (ours.item() + entropy.item())) <= 1e-6
    ref.backward()
    ours.backward()
    assert (s1.grad - s2.grad).abs().max() <= 1e-6


def test_divergences_are_zero_on_equal_distributions_and_positive_otherwise():
    s = _logits(seed=5)
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        assert token_kd_losses(s, s, kind).abs().max() < 1e-12
        assert (token_kd_losses(s, _logits(seed=6), kind) > 0).all()


@pytest.mark.parametrize("kind,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)])
def test_sparse_loss_with_the_whole_vocabulary_equals_the_dense_loss(kind, beta):
    s, t = _logits(seed=7), _logits(seed=8)  # float64: the sums differ only in order (float32: ~1e-7 relative)
    T = 2.0
    logps = F.log_softmax(t / T, -1)
    order = torch.randperm(50, generator=torch.Generator().manual_seed(0)).repeat(len(t), 1)  # any order of ids
    tail = torch.full((len(t),), float("-inf"))
    dense = token_kd_losses(s, t, kind, beta, T)
    sparse = sparse_kd_losses(s, order, logps.gather(-1, order), tail, kind, beta, T)
    assert (dense - sparse).abs().max() <= 1e-9
    # gradients too (the empty tail bucket gives no NaN)
    a, b = s.clone().requires_grad_(), s.clone().requires_grad_()
    token_kd_losses(a, t, kind, beta, T).sum().backward()
    sparse_kd_losses(b, order, logps.gather(-1, order), tail, kind, beta, T).sum().backward()
    assert (a.grad - b.grad).abs().max() <= 1e-9


def test_sparse_buckets_by_hand():
    """Top-1 of a 3-id vocabulary: teacher (0.7 | 0.3 rest), student (0.5 | 0.5 rest): KL = 0.7 ln(0.7/0.5) +
    0.3 ln(0.3/0.5)."""
    s = torch.log(torch.tensor([[0.5, 0.2, 0.3]]))
    loss = sparse_kd_losses(s, torch.tensor([[0]]), torch.log(torch.tensor([[0.7]])), torch.log(torch.tensor([0.3])))
    expected = 0.7 * torch.log(torch.tensor(0.7 / 0.5)) + 0.3 * torch.log(torch.tensor(0.3 / 0.5))
    assert abs(loss.item() - expected.item()) < 1e-6


class _Logits(torch.nn.Module):
    """A model returning fixed logits (B, T, V) for any input: the objective's non-lmforge path."""

    def __init__(self, logits):
        super().__init__()
        self.w = torch.nn.Parameter(logits.clone())

    def forward(self, input_ids, **kw):
        return self.w


@pytest.mark.parametrize("ratio", [0.0, 0.5, 1.0])
def test_objective_mixes_ce_and_kd_over_the_trained_tokens_in_any_chunking(ratio):
    student, teacher = _Logits(_logits(24, 40, 9).float().view(2, 12, 40)), _Logits(_logits(24, 40, 10).float().view(2, 12, 40))
    labels = torch.randint(0, 40, (2, 12), generator=torch.Generator().manual_seed(1))
    labels[0, :5] = -100
    batch = {"input_ids": torch.zeros(2, 12, dtype=torch.long), "labels": labels}
    keep = labels != -100
    ce = F.cross_entropy(student.w[keep], labels[keep])
    kd = token_kd_losses(student.w[keep], teacher.w[keep], "jsd", 0.4, 2.0).mean()
    expected = (1 - ratio) * ce + ratio * kd
    expected.backward()
    want = student.w.grad.clone()
    for chunk_bytes in (1, 8 * 40 * 5, 2**30):  # one row per chunk, 5 rows, everything at once
        student.w.grad = None
        loss, count = Distill(teacher, "jsd", 0.4, 2.0, ratio, chunk_bytes=chunk_bytes).loss(student, batch)
        assert count == int(keep.sum())
        assert abs(loss.item() - expected.item()) <= 1e-6
        loss.backward()
        assert (student.w.grad - want).abs().max() <= 1e-6
    metrics = Distill(teacher, "jsd", 0.4, 2.0, ratio).evaluate(student, [batch])
    assert abs(metrics["val_ce"] - ce.item()) < 1e-5 and abs(metrics["val_kd"] - kd.item()) < 1e-5
