"""Policy-gradient objectives (train/rl.py) against TRL 1.16: the loss (and its gradient, i.e. every per-token term)
equals GRPOTrainer._compute_loss called on the same tensors for grpo / dr_grpo / dapo, with and without clipping
and KL; the advantages equal TRL's transcribed lines; RLOO equals RLOOTrainer._compute_loss; REINFORCE equals
nanochat's formula; and through a real model the objective's log-probabilities equal transformers'."""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from lmforge.train.rl import PolicyGradient, combine_rewards, group_advantages, policy_loss, rloo_advantages

trl_utils = pytest.importorskip("trl.trainer.utils")


def _accelerator():
    return SimpleNamespace(num_processes=1, gather=lambda x: x, gather_for_metrics=lambda x: x,
                           reduce=lambda x, reduction="sum": x, autocast=lambda: torch.autocast("cpu", enabled=False),
                           sync_gradients=True)


def trl_grpo_loss(loss_type, logps2d, mask, advantages, old2d=None, ref2d=None, epsilon=0.2, epsilon_high=None,
                  beta=0.0, max_completion_length=8):
    """TRL's own GRPOTrainer._compute_loss, on a stand-in trainer whose model forward returns `logps2d`."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    B, T = logps2d.shape
    me = SimpleNamespace(
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token", beta=beta,
        loss_type=loss_type, epsilon_low=epsilon, epsilon_high=epsilon if epsilon_high is None else epsilon_high,
        use_vllm=False, model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
        max_completion_length=max_completion_length, accelerator=_accelerator(), _entropy_bonus_enabled=False,
        aux_loss_enabled=False, _metrics=defaultdict(lambda: defaultdict(list)),
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps2d, torch.zeros_like(logps2d), None))
    inputs = {"prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask.long(),
              "advantages": advantages, "num_items_in_batch": mask.sum().float()}
    if old2d is not None:
        inputs["old_per_token_logps"] = old2d
    if ref2d is not None:
        inputs["ref_per_token_logps"] = ref2d
    return GRPOTrainer._compute_loss(me, None, inputs), me._metrics["train"]


@pytest.fixture
def rollout():
    g = torch.Generator().manual_seed(0)
    B, T = 6, 8
    lengths = torch.tensor([8, 3, 5, 1, 8, 6])
    mask = torch.arange(T)[None] < lengths[:, None]
    mask[4] = False  # a truncated completion masked out (mask_truncated_completions)
    logps = (-torch.rand(B, T, generator=g) * 3).requires_grad_()
    old = logps.detach() + torch.randn(B, T, generator=g) * 0.3  # far enough for both clips to bind
    ref = logps.detach() + torch.randn(B, T, generator=g) * 0.5
    advantages = torch.randn(B, generator=g)
    return logps, mask, old, ref, advantages


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta,epsilon_high,with_old", [(0.0, None, False), (0.0, 0.28, True), (0.04, None, True)])
def test_grpo_family_equals_trl(rollout, loss_type, beta, epsilon_high, with_old):
    logps, mask, old, ref, advantages = rollout
    theirs, metrics = trl_grpo_loss(loss_type, logps, mask, advantages, old if with_old else None,
                                    ref if beta else None, 0.2, epsilon_high, beta, max_completion_length=8)
    (their_grad,) = torch.autograd.grad(theirs, logps)
    rows = mask.nonzero()[:, 0]
    ours, stats = policy_loss(loss_type, logps[mask], rows, len(mask), advantages, old[mask] if with_old else None,
                              ref[mask] if beta else None, 0.2, epsilon_high, beta, max_completion_tokens=8)
    (our_grad,) = torch.autograd.grad(ours, logps)
    assert abs(ours.item() - theirs.item()) <= 1e-6
    torch.testing.assert_close(our_grad, their_grad, atol=1e-6, rtol=0)  # each token's term of the loss
    assert stats["clipped"] / stats["tokens"] == pytest.approx(metrics["clip_ratio/region_mean"][0], abs=1e-6)
    if with_old:
        assert 0 < stats["clipped"] < stats["tokens"]  # the test exercises clipping on both sides of the min
    if beta:
        assert stats["kl"] / stats["tokens"] == pytest.approx(metrics["kl"][0], abs=1e-6)


def trl_group_advantages(rewards_per_func, weights, num_generations, scale_rewards):
    """TRL 1.16 grpo_trainer.py _generate_and_score_completions, multi_objective_aggregation="sum_then_normalize",
    transcribed line for line (it is inline there, not callable on tensors); nanstd is TRL's own."""
    nanstd = trl_utils.nanstd
    unscorable_mask = torch.isnan(rewards_per_func).all(dim=1)
    rewards = (rewards_per_func * weights.unsqueeze(0)).nansum(dim=1)
    rewards[unscorable_mask] = torch.nan
    mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)
    mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)
    if scale_rewards in ["group", "none"]:
        std_rewards = nanstd(rewards.view(-1, num_generations), dim=1)
        std_rewards = std_rewards.repeat_interleave(num_generations, dim=0)
    else:
        std_rewards = nanstd(rewards).expand_as(rewards)
    advantages = rewards - mean_grouped_rewards
    if scale_rewards != "none":
        advantages = advantages / (std_rewards + 1e-4)
    is_std_zero = torch.isclose(std_rewards, torch.zeros_like(std_rewards))
    advantages = torch.nan_to_num(advantages, nan=0.0)  # TRL: "their advantage is forced to 0 afterwards"
    return advantages, is_std_zero


def trl_rloo_advantages(rewards, num_generations, normalize):
    """TRL 1.16 rloo_trainer.py _generate_and_score_completions, the leave-one-out lines transcribed."""
    nanstd = trl_utils.nanstd
    grouped_rewards = rewards.view(-1, num_generations)
    scorable_counts = (~torch.isnan(grouped_rewards)).sum(dim=1, keepdim=True)
    grouped_sum = torch.nansum(grouped_rewards, dim=1, keepdim=True)
    baselines = (grouped_sum - grouped_rewards) / (scorable_counts - 1)
    advantages = rewards - baselines.view(-1)
    if normalize:
        advantages = (advantages - torch.nanmean(advantages)) / (nanstd(advantages) + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


def test_advantages_equal_trl():
    nan = float("nan")
    # 3 prompts x 4 completions, 2 rewards (weights 1 and 0.5); a group with equal rewards (std 0), a completion
    # that every reward skipped (None -> NaN) and one that one reward skipped
    per = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0],
                        [1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0],
                        [0.5, nan], [nan, nan], [2.0, 1.0], [0.0, 0.5]])
    weights = torch.tensor([1.0, 0.5])
    rewards = combine_rewards(per, weights)
    for scale in ("group", "batch", "none"):
        ours, zero = group_advantages(rewards.clone(), 4, scale)
        theirs, their_zero = trl_group_advantages(per.clone(), weights, 4, scale)
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
        assert torch.equal(zero, their_zero)
    assert ours[9] == 0 and zero[4:8].all()
    for normalize in (False, True):
        torch.testing.assert_close(rloo_advantages(rewards.clone(), 4, normalize),
                                   trl_rloo_advantages(rewards.clone(), 4, normalize), atol=1e-6, rtol=0)
    # by hand: group 1's rewards 1, .5, 1.5, 0: completion 0's baseline is (.5 + 1.5 + 0) / 3
    assert rloo_advantages(rewards.clone(), 4)[0].item() == pytest.approx(1 - 2 / 3)


def test_rloo_loss_equals_trl(rollout):
    from trl.trainer.rloo_trainer import RLOOTrainer

    logps, mask, old, _, advantages = rollout
    old_seq = (old * mask).sum(1)
    me = SimpleNamespace(epsilon_low=0.2, epsilon_high=0.28, model=SimpleNamespace(training=True),
                         aux_loss_enabled=False, accelerator=_accelerator(),
                         _metrics=defaultdict(lambda: defaultdict(list)),
                         _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None))
    B, T = mask.shape
    inputs = {"prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask.long(),
              "advantages": advantages, "old_logps": old_seq}
    theirs = RLOOTrainer._compute_loss(me, None, inputs)
    (their_grad,) = torch.autograd.grad(theirs, logps)
    ours, _ = policy_loss("rloo", logps[mask], mask.nonzero()[:, 0], B, advantages, old[mask], None, 0.2, 0.28)
    (our_grad,) = torch.autograd.grad(ours, logps)
    assert abs(ours.item() - theirs.item()) <= 1e-6
    torch.testing.assert_close(our_grad, their_grad, atol=1e-6, rtol=0)


def test_reinforce_is_nanochats_token_mean(rollout):
    logps, mask, _, _, advantages = rollout
    # nanochat scripts/chat_rl.py: pg_obj = (logp * advantages.unsqueeze(-1)).sum() / num_valid; loss = -pg_obj
    theirs = -(logps * mask * advantages[:, None]).sum() / mask.sum()
    ours, _ = policy_loss("reinforce", logps[mask], mask.nonzero()[:, 0], len(mask), advantages)
    assert abs(ours.item() - theirs.item()) <= 1e-6


def test_objective_through_a_model_equals_trl_on_transformers_logps(trained_dir, tmp_path):
    """PolicyGradient.loss on lmforge's model of an HF checkpoint = TRL's _compute_loss fed transformers' own
    per-token log-probabilities of the same rows (right-padded prompt + completion)."""
    import transformers

    from lmforge.model import load_hf_model
    from tests.models import tiny_llama

    path = tiny_llama(tmp_path / "m", trained_dir)
    g = torch.Generator().manual_seed(1)
    B, P, C = 4, 5, 6
    prompt = torch.randint(5, 200, (B, P), generator=g)
    completion = torch.randint(5, 200, (B, C), generator=g)
    cmask = torch.ones(B, C, dtype=torch.bool)
    cmask[1, 4:] = False
    cmask[3, 2:] = False
    ids = torch.cat([prompt, completion], 1)
    attention = torch.cat([torch.ones(B, P, dtype=torch.long), cmask.long()], 1)
    labels = torch.full_like(ids, -100)
    labels[:, P - 1:P + C - 1] = completion.masked_fill(~cmask, -100)
    advantages = torch.tensor([1.0, -0.5, 0.3, -1.2])

    hf = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        logits = hf(input_ids=ids, attention_mask=attention).logits[:, P - 1:P + C - 1].float()
    hf_logps = torch.log_softmax(logits, -1).gather(-1, completion[..., None]).squeeze(-1)
    old = hf_logps + 0.1 * torch.randn(B, C, generator=g)

    model = load_hf_model(path).eval()
    batch = {"input_ids": ids, "labels": labels, "attention_mask": attention, "advantages": advantages,
             "old_logps": old[cmask]}
    for loss_type in ("grpo", "dapo", "dr_grpo"):
        objective = PolicyGradient(loss_type, epsilon=0.2, max_completion_tokens=C)
        with torch.no_grad():
            ours, count = objective.loss(model, batch)
        theirs, _ = trl_grpo_loss(loss_type, hf_logps, cmask, advantages, old, max_completion_length=C)
        assert abs(ours.item() - theirs.item()) <= 1e-5  # two float32 forwards of the same weights
        assert count == (int(cmask.sum()) if loss_type == "dapo" else B)
    metrics = objective.step_metrics()
    assert set(metrics) == {"entropy", "clip_fraction"} and metrics["entropy"] > 0


def test_bradley_terry_equals_trl_reward_trainer():
    from trl.trainer.reward_trainer import RewardTrainer

    from lmforge.train.rl import BradleyTerry

    g = torch.Generator().manual_seed(2)
    scores = torch.randn(12, 1, generator=g, requires_grad=True)
    margin = torch.rand(6, generator=g)
    for with_margin in (False, True):
        me = SimpleNamespace(model=SimpleNamespace(training=False), accelerator=_accelerator(), _total_train_tokens=0,
                             _metrics=defaultdict(lambda: defaultdict(list)),
                             args=SimpleNamespace(center_rewards_coefficient=None))
        inputs = {"input_ids": torch.zeros(12, 3, dtype=torch.long), "attention_mask": torch.ones(12, 3)}
        if with_margin:
            inputs["margin"] = margin
        theirs = RewardTrainer.compute_loss(me, lambda **kw: SimpleNamespace(logits=scores), dict(inputs))
        ours, count = BradleyTerry().loss(lambda ids, attention_mask: scores, dict(inputs))
        assert abs(ours.item() - theirs.item()) <= 1e-6 and count == 6
        torch.testing.assert_close(torch.autograd.grad(ours, scores)[0], torch.autograd.grad(theirs, scores)[0])
