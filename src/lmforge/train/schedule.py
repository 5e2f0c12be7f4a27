"""Optimizer and learning-rate schedule.

AdamW with decoupled weight decay on matrices only (Loshchilov & Hutter 2019); linear warmup, then cosine, linear
or warmup-stable-decay (Hu et al. 2024). Only trainable parameters enter the optimizer, so a frozen base model
(LoRA, a classification head alone) costs no optimizer state.
"""

from __future__ import annotations

import math

import torch


def learning_rate(cfg, step: int) -> float:
    """The learning rate before optimizer step `step` (0-based); `cfg` has lr, min_lr_ratio, warmup_steps,
    max_steps, schedule and decay_fraction (a TrainConfig)."""
    low = cfg.lr * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "wsd":  # warmup-stable-decay: flat, then linear decay at the end
        decay_start = int(cfg.max_steps * (1 - cfg.decay_fraction))
        if step < decay_start:
            return cfg.lr
        frac = (step - decay_start) / max(1, cfg.max_steps - decay_start)
        return cfg.lr - (cfg.lr - low) * min(frac, 1.0)
    frac = min((step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps), 1.0)
    if cfg.schedule == "linear":
        return cfg.lr - (cfg.lr - low) * frac
    return low + 0.5 * (cfg.lr - low) * (1 + math.cos(math.pi * frac))


def trainable_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def build_optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; weight decay on matrices (dim >= 2) only, never on norms and biases.
    Each group's `lr_scale` multiplies the scheduled learning rate."""
    params = [p for _, p in trainable_parameters(model)]
    if not params:
        raise ValueError("the model has no trainable parameters (every parameter has requires_grad=False)")
    groups = []
    # a parameter's `lr_scale` attribute (LoRA+ gives B a larger learning rate) puts it in a group of its own
    for scale in sorted({getattr(p, "lr_scale", 1.0) for p in params}):
        same = [p for p in params if getattr(p, "lr_scale", 1.0) == scale]
        for wd, members in ((cfg.weight_decay, [p for p in same if p.dim() >= 2]), (0.0, [p for p in same if p.dim() < 2])):
            if members or scale == 1.0:
                groups.append({"params": members, "weight_decay": wd, "lr_scale": scale})
    kind = getattr(cfg, "optimizer", "adamw")
    if kind in ("adamw8bit", "paged_adamw8bit"):
        try:
            import bitsandbytes as bnb
        except ImportError:
            from lmforge.config import ConfigError

            raise ConfigError(f"optimizer: {kind} needs bitsandbytes (pip install bitsandbytes)") from None
        cls = bnb.optim.AdamW8bit if kind == "adamw8bit" else bnb.optim.PagedAdamW8bit
        return cls(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    fused = params[0].is_cuda
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused or None)
