"""Policy-gradient objectives for RL from rewards: GRPO, Dr. GRPO, DAPO, RLOO and REINFORCE, on the one loop.

The loop (train/trainer.py) is the same as for every objective; what differs is where batches come from (a rollout
source samples completions and scores them, finetune/rollout.py) and this loss. A batch holds rows of prompt +
completion: `input_ids` (B, T), `labels` (B, T) with the completion's token ids at the position before each (the
shifted targets of train/objectives.py; -100 on the prompt, on padding and on masked truncated completions),
`attention_mask`, `advantages` (B,), and where they are needed `old_logps` / `ref_logps`: per-token log-probabilities
of the trained tokens in `labels`' row-major order (the policy that sampled them, for num_iterations > 1; the
reference, for beta > 0).

The formulas are TRL 1.16's (trl/trainer/grpo_trainer.py `_generate_and_score_completions` and `_compute_loss`,
rloo_trainer.py), tested equal on the same inputs:

- advantages (GRPO family): A = r - mean(group r), divided by std + 1e-4 (the group's, `scale_rewards="group"`; the
  batch's, "batch"; not at all, "none", Dr. GRPO's recommendation); std is the unbiased one (torch.std);
- per-token loss: -min(ratio A, clip(ratio, 1 - epsilon, 1 + epsilon_high) A) + beta k3, ratio = exp(logp - old),
  k3 = exp(ref - logp) - (ref - logp) - 1 (Schulman's estimator of KL(policy || reference));
- aggregation: grpo, the mean over each completion's tokens then over completions (Shao et al. 2024); dr_grpo, the
  sum over tokens / (completions x max_completion_tokens) (Liu et al. 2025); dapo, the mean over every token of the
  whole batch (Yu et al. 2025);
- rloo: the leave-one-out baseline b_i = mean of the group's other rewards (Ahmadian et al. 2024), the KL to the
  reference as a penalty on the reward (beta x the summed first-order log ratio), and the clipped ratio of whole
  sequences' log-probabilities, averaged over completions;
- reinforce: nanochat's chat_rl.py: A = r - mean(group r), loss = -sum(logp A) / trained tokens, no ratio, no KL.

`BradleyTerry` trains the scalar reward model of RLHF on preference pairs (TRL's RewardTrainer loss).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist

from lmforge.train.objectives import Objective, _decoder, model_inputs

LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "rloo", "reinforce")
SCALE_REWARDS = ("group", "batch", "none")


# --- advantages -------------------------------------------------------------------------------------------------------

def _nanstd(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """The unbiased standard deviation over the non-NaN entries (TRL's trainer/utils.py nanstd)."""
    mean = torch.nanmean(x, dim=dim, keepdim=dim is not None)
    var = torch.nanmean((x - mean) ** 2, dim=dim)
    count = torch.sum(~torch.isnan(x), dim=dim)
    return torch.sqrt(var * count / (count - 1))


def combine_rewards(per_reward: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(N, K) rewards (NaN: skipped) -> (N,) weighted sums; NaN where every reward skipped the completion."""
    total = (per_reward * weights[None]).nansum(1)
    total[torch.isnan(per_reward).all(1)] = torch.nan
    return total


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group") -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, the std is zero) of rewards (N,) in consecutive groups of `group_size` (NaN: unscorable, left out
    of the baseline, advantage 0)."""
    if scale not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards {scale!r}: one of {', '.join(SCALE_REWARDS)}")
    grouped = rewards.view(-1, group_size)
    mean = torch.nanmean(grouped, 1).repeat_interleave(group_size)
    if scale == "batch":
        std = _nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    else:
        std = _nanstd(grouped, 1).repeat_interleave(group_size) if group_size > 1 else torch.zeros_like(rewards)
    advantages = rewards - mean
    if scale != "none":
        advantages = advantages / (std + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0), torch.isclose(std, torch.zeros_like(std))


def rloo_advantages(rewards: torch.Tensor, group_size: int, normalize: bool = False) -> torch.Tensor:
    """Reward minus the mean of the group's other (scorable) rewards; optionally standardised over the batch."""
    grouped = rewards.view(-1, group_size)
    scorable = (~torch.isnan(grouped)).sum(1, keepdim=True)
    baselines = (torch.nansum(grouped, 1, keepdim=True) - grouped) / (scorable - 1)
    advantages = rewards - baselines.view(-1)
    if normalize:
        advantages = (advantages - torch.nanmean(advantages)) / (_nanstd(advantages) + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


# --- the loss -------------------------------------------------------------------------------------------------------

def policy_loss(loss_type: str, logps: torch.Tensor, rows: torch.Tensor, n_rows: int, advantages: torch.Tensor,
                old_logps: torch.Tensor | None = None, ref_logps: torch.Tensor | None = None, epsilon: float = 0.2,
                epsilon_high: float | None = None, beta: float = 0.0, max_completion_tokens: int = 256
                ) -> tuple[torch.Tensor, dict]:
    """(loss, statistics) from the per-token log-probabilities `logps` (N,) of the trained tokens of `n_rows`
    completions, `rows` (N,) naming each token's completion, and the completions' `advantages` (n_rows,).
    Statistics (sums, for means over a step): clipped tokens, KL summed over tokens, and the token count."""
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    old = logps.detach() if old_logps is None else old_logps
    lengths = torch.zeros(n_rows, device=logps.device, dtype=logps.dtype).index_add(0, rows, torch.ones_like(logps))
    stats = {"tokens": float(len(logps))}
    if loss_type == "reinforce":
        loss = -(logps * advantages[rows]).sum() / max(len(logps), 1)
        return loss, stats
    if loss_type == "rloo":
        seq, seq_old = (torch.zeros(n_rows, device=logps.device, dtype=logps.dtype).index_add(0, rows, x)
                        for x in (logps, old))
        ratio = torch.exp(seq - seq_old)
        clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)
        loss = -torch.min(ratio * advantages, clipped * advantages).mean()
        stats["clipped"] = float((((ratio < 1 - epsilon) & (advantages < 0)) | ((ratio > 1 + epsilon_high)
                                                                                  & (advantages > 0))).sum())
        stats["sequences"] = float(n_rows)
        return loss, stats
    a = advantages[rows]
    ratio = torch.exp(logps - old)
    per_token = -torch.min(ratio * a, torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high) * a)
    stats["clipped"] = float((((ratio < 1 - epsilon) & (a < 0)) | ((ratio > 1 + epsilon_high) & (a > 0))).sum())
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta > 0 needs the reference log-probabilities (ref_logps)")
        d = ref_logps - logps
        kl = torch.exp(d) - d - 1
        per_token = per_token + beta * kl
        stats["kl"] = float(kl.detach().sum())
    if loss_type == "grpo":
        per_row = torch.zeros(n_rows, device=logps.device, dtype=per_token.dtype).index_add(0, rows, per_token)
        loss = (per_row / lengths.clamp(min=1)).mean()
    elif loss_type == "dr_grpo":
        loss = per_token.sum() / (n_rows * max_completion_tokens)
    elif loss_type == "dapo":
        loss = per_token.sum() / max(len(logps), 1)
    else:
        raise ValueError(f"loss {loss_type!r}: one of {', '.join(LOSS_TYPES)}")
    return loss, stats


def token_logps(forward: Callable, batch: dict, with_entropy: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(log-probabilities (N,) of the trained tokens in row-major order, their rows (N,), their entropies (N,) or
    None). The head's matmul and softmax run on the trained positions only."""
    labels = batch["labels"]
    trained = labels != -100
    out = forward(batch["input_ids"], **model_inputs(batch))[trained]
    decoder = _decoder(forward)
    logits = (decoder.logits(out) if decoder is not None else out).float()
    logp_all = torch.log_softmax(logits, -1)
    logps = logp_all.gather(-1, labels[trained][:, None]).squeeze(-1)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logps, trained.nonzero()[:, 0], entropy


class PolicyGradient(Objective):
    """GRPO / Dr. GRPO / DAPO / RLOO / REINFORCE on rollout batches (module docstring). `step_metrics()` gives the
    means over the micro-batches since the last call: clip fraction, KL (beta > 0), entropy, and resets them."""

    best_metric = "val_reward"
    higher_is_better = True

    def __init__(self, loss_type: str = "grpo", epsilon: float = 0.2, epsilon_high: float | None = None,
                 beta: float = 0.0, max_completion_tokens: int = 256):
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss {loss_type!r}: one of {', '.join(LOSS_TYPES)}")
        self.loss_type, self.epsilon, self.epsilon_high = loss_type, epsilon, epsilon_high
        self.beta, self.max_completion_tokens = beta, max_completion_tokens
        self._sums: dict[str, float] = {}

    def count(self, batch: dict) -> int:
        # what the loss averages over: tokens (dapo, reinforce) or completions (the rest), so that the Trainer's
        # weighting of micro-batches gives the mean over the whole batch
        if self.loss_type in ("dapo", "reinforce"):
            return int((batch["labels"] != -100).sum())
        return len(batch["input_ids"])

    def loss(self, forward: Callable, batch: dict) -> tuple[torch.Tensor, int]:
        logps, rows, entropy = token_logps(forward, batch, with_entropy=True)
        # RLOO's KL is in its rewards (the rollout adds it), not in the loss
        loss, stats = policy_loss(self.loss_type, logps, rows, len(batch["input_ids"]), batch["advantages"].float(),
                                  batch.get("old_logps"), batch.get("ref_logps"), self.epsilon, self.epsilon_high,
                                  self.beta if self.loss_type != "rloo" else 0.0, self.max_completion_tokens)
        stats["entropy"] = float(entropy.sum()) if entropy is not None else 0.0
        for key, value in stats.items():
            self._sums[key] = self._sums.get(key, 0.0) + value
        return loss, self.count(batch)

    def step_metrics(self) -> dict:
        s, self._sums = self._sums, {}
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:  # every process's share
            keys = sorted(s)
            totals = torch.tensor([s[k] for k in keys], dtype=torch.float64)
            dist.all_reduce(totals)
            s = dict(zip(keys, totals.tolist()))
        tokens = max(s.get("tokens", 0.0), 1.0)
        out = {"entropy": round(s.get("entropy", 0.0) / tokens, 4)}
        if "clipped" in s:
            out["clip_fraction"] = round(s["clipped"] / s.get("sequences", tokens), 4)
        if "kl" in s:
            out["kl"] = round(s["kl"] / tokens, 6)
        return out

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, batches: Iterable[dict]) -> dict:
        return {}  # RL's measure is the reward of fresh samples, logged at every step by the rollout


# --- reward models (RLHF) -------------------------------------------------------------------------------------------

class BradleyTerry(Objective):
    """A scalar reward model on preference pairs: a batch holds B chosen rows then B rejected rows (`input_ids`,
    `attention_mask`, right-padded; optionally `margin` (B,)); the model returns one score per row, and the loss is
    -log sigmoid(r_chosen - r_rejected - margin), the mean over pairs (Bradley & Terry 1952; Ouyang et al. 2022;
    TRL's RewardTrainer.compute_loss). Eval: loss, reward accuracy (r_chosen > r_rejected), margin, mean score."""

    best_metric = "val_reward_accuracy"
    higher_is_better = True

    def count(self, batch: dict) -> int:
        return len(batch["input_ids"]) // 2

    def terms(self, forward: Callable, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scores = forward(batch["input_ids"], attention_mask=batch["attention_mask"]).float().squeeze(-1)
        chosen, rejected = scores.chunk(2)
        margin = batch.get("margin")
        d = chosen - rejected - (margin if margin is not None else 0.0)
        return -torch.nn.functional.logsigmoid(d), chosen, rejected

    def loss(self, forward: Callable, batch: dict) -> tuple[torch.Tensor, int]:
        losses, _, _ = self.terms(forward, batch)
        return losses.mean(), len(losses)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, batches: Iterable[dict]) -> dict:
        losses, chosen, rejected = [], [], []
        for batch in batches:
            lo, c, r = self.terms(model, batch)
            losses.append(lo.cpu())
            chosen.append(c.cpu())
            rejected.append(r.cpu())
        if not losses:
            return {}
        lo, c, r = torch.cat(losses), torch.cat(chosen), torch.cat(rejected)
        return {"val_loss": lo.mean().item(), "val_reward_accuracy": (c > r).float().mean().item(),
                "val_margin": (c - r).mean().item(), "val_score": torch.cat([c, r]).mean().item()}
