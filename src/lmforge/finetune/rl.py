"""`lmforge finetune --objective grpo|dr_grpo|dapo|rloo|reinforce`: RL from rewards on the one Trainer.

Prompts (finetune/rollout.py) -> the model (full, freeze, LoRA, DoRA, QLoRA) -> Rollouts as the Trainer's data and
PolicyGradient (train/rl.py) as its objective. The run directory holds what SFT's does (config.yaml, metrics.jsonl
with the rewards, sampling and loss figures of every step, loss.png with the reward curve, last/, tokenizer/,
template.json, data.json) plus completions.jsonl: a sample of completions with their rewards every --sample-every
rollouts. There is no held-out evaluation: the reward of each step's fresh samples is the measure.
"""

from __future__ import annotations

import copy
import logging
import os
import sys
from pathlib import Path

from lmforge.config import ConfigError

log = logging.getLogger(__name__)


def run_rl(cfg, model_dir: Path, tokenizer, template: str, template_source: str, rejects) -> dict:
    import torch

    from lmforge.chat.render import encode_chat
    from lmforge.chat.stops import eos_ids as model_eos_ids
    from lmforge.chat.stops import stop_ids
    from lmforge.chat.templates import template_hash
    from lmforge.files import write_json
    from lmforge.finetune.rewards import parse_rewards
    from lmforge.finetune.rollout import Rollouts, load_prompts
    from lmforge.finetune.run import _peak_memory_mb, _stage_tokenizer, prepare_model
    from lmforge.infer.sampling import SamplingConfig
    from lmforge.model import load_hf_model
    from lmforge.peft import parameter_counts
    from lmforge.train.rl import PolicyGradient
    from lmforge.train.trainer import Trainer

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(f"objective: {cfg.objective} runs on one process in this version (the rollouts are not "
                          "split across processes yet); run it without torchrun")
    if cfg.val_data:
        raise ConfigError("val_data: RL has no held-out evaluation (the reward of each step's samples is logged)")
    if cfg.beta and cfg.method not in ("full", "freeze", "lora", "dora", "qlora"):
        raise ConfigError(f"beta: a KL to the reference is supported with full, freeze, lora, dora and qlora, not "
                          f"--method {cfg.method}")
    rewards = parse_rewards(cfg.reward)
    prompts = load_prompts(cfg.data, cfg.format, cfg.columns, cfg.tags, rejects, cfg.encoding, cfg.errors)
    too_long = 0
    kept = []
    for p in prompts:
        p.ids = encode_chat(tokenizer, template, p.messages, add_generation_prompt=True, tools=p.tools).ids
        if len(p.ids) + cfg.max_completion_tokens > cfg.max_length:
            too_long += 1
        else:
            kept.append(p)
    if too_long:
        log.warning("%d of %d prompts leave no room for %d completion tokens within --max-length %d and are left out",
                    too_long, len(prompts), cfg.max_completion_tokens, cfg.max_length)
    if not kept:
        raise ConfigError(f"max_length: no prompt fits with {cfg.max_completion_tokens} completion tokens in "
                          f"{cfg.max_length}; raise --max-length or lower --max-completion-tokens")
    model = load_hf_model(model_dir)
    eos = model_eos_ids(tokenizer, model.cfg)
    pad_id = tokenizer.special_tokens.get(tokenizer.pad_token) if getattr(tokenizer, "pad_token", None) else None
    pad_id = pad_id if pad_id is not None else (eos[0] if eos else 0)
    stops = stop_ids(tokenizer, eos, template)
    # the reference policy for the KL: LoRA runs switch their adapters off (no copy); full ones keep a frozen copy
    reference = None
    if cfg.beta and cfg.method in ("full", "freeze"):
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    torch.manual_seed(cfg.seed)
    prepare_model(model, cfg)
    objective = PolicyGradient(cfg.objective, cfg.epsilon, cfg.epsilon_high or None, cfg.beta,
                               cfg.max_completion_tokens)
    micro = cfg.micro_batch_size or cfg.batch_size
    sampling = SamplingConfig(max_new_tokens=cfg.max_completion_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                              stop_token_ids=stops)
    rollouts = Rollouts(model, tokenizer, template, kept, rewards, objective, sampling, cfg.batch_size, micro,
                        cfg.num_generations, cfg.num_iterations, cfg.scale_rewards, cfg.mask_truncated, cfg.beta,
                        reference, pad_id, stops, cfg.seed, None, cfg.sample_every, cfg.samples)
    trainer = Trainer(cfg, objective=objective, model=model, train_data=rollouts, tokenizer_dir=model_dir)
    rollouts.autocast = trainer._autocast
    if reference is not None:
        reference.to(trainer.device)
    out = Path(cfg.out)
    trainer.prepare_run_dir()
    rollouts.out = out if trainer.is_main else None
    data_stats = {"prompts": len(kept), "too_long": too_long, "rewards": [f"{r.name} x {r.weight:g}" for r in rewards]}
    if trainer.is_main:
        trainer.tokenizer_dir = _stage_tokenizer(model_dir, out, template)
        write_json(out / "template.json", {"source": template_source, "name": cfg.template,
                                           "hash": template_hash(template), "template": template, "mask": "completion"})
        write_json(out / "data.json", data_stats)
        if rejects is not None:
            rejects.write(out)
        counts = parameter_counts(model)
        print(f"RL ({cfg.objective}) of {model_dir} with {cfg.method}: {counts['trainable']:,} trainable parameters "
              f"({counts['trainable_percent']}%); {len(kept)} prompts x {cfg.num_generations} completions, "
              f"{cfg.batch_size // cfg.num_generations} prompts per step; rewards: {', '.join(data_stats['rewards'])}; "
              f"template: {template_source}", file=sys.stderr)
    summary = trainer.fit()
    summary["parameters"] = parameter_counts(model)
    summary["data"] = data_stats
    summary["peak_memory_mb"] = _peak_memory_mb(trainer.device)
    if trainer.is_main:
        write_json(out / "summary.json", {k: v for k, v in summary.items() if k != "hf_config"})
    return summary
