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


def _check_rl_config(cfg) -> None:
    """The settings this version of RL cannot take: FSDP, held-out data, a KL with methods that have no
    reference policy."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and cfg.distributed == "fsdp":
        raise ConfigError(f"distributed: {cfg.objective} runs under torchrun with DDP (--distributed ddp), not fsdp "
                          "(sampling needs the whole model on every process)")
    if cfg.val_data:
        raise ConfigError("val_data: RL has no held-out evaluation (the reward of each step's samples is logged)")
    if cfg.beta and cfg.method not in ("full", "freeze", "lora", "dora", "qlora"):
        raise ConfigError(f"beta: a KL to the reference is supported with full, freeze, lora, dora and qlora, not "
                          f"--method {cfg.method}")


def _prompts_that_fit(cfg, prompts: list, tokenizer, template: str, context: int) -> tuple[list, int]:
    """(the prompts, rendered into `ids`, that leave room for --max-completion-tokens within --max-length and the
    model's `context`, how many did not): a warning names the left-out ones, none fitting is an error."""
    from lmforge.chat.render import encode_chat

    # a prompt and its completion must fit --max-length and the model's own context (a small model's is short)
    limit = min(cfg.max_length, context)
    limit_name = "--max-length" if limit == cfg.max_length else "the model's context of"
    too_long = 0
    kept = []
    for p in prompts:
        p.ids = encode_chat(tokenizer, template, p.messages, add_generation_prompt=True, tools=p.tools,
                            **cfg.chat_template_kwargs).ids
        if len(p.ids) + cfg.max_completion_tokens > limit:
            too_long += 1
        else:
            kept.append(p)
    if too_long:
        log.warning("%d of %d prompts leave no room for %d completion tokens within %s %d tokens and are left out",
                    too_long, len(prompts), cfg.max_completion_tokens, limit_name, limit)
    if not kept:
        raise ConfigError(f"max_length: no prompt fits with {cfg.max_completion_tokens} completion tokens in "
                          f"{limit_name} {limit} tokens; lower --max-completion-tokens" +
                          (" or raise --max-length" if limit == cfg.max_length else ""))
    return kept, too_long


def run_rl(cfg, model_dir: Path, tokenizer, template: str, template_source: str, rejects) -> dict:
    """RL from rewards: the prompts that fit, the model and its reference policy, Rollouts and PolicyGradient on the
    one Trainer; returns the Trainer's summary with parameter and data figures."""
    import torch

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

    _check_rl_config(cfg)
    rewards = parse_rewards(cfg.reward)
    prompts = load_prompts(cfg.data, cfg.format, cfg.columns, cfg.tags, rejects, cfg.encoding, cfg.errors)
    model = load_hf_model(model_dir)
    kept, too_long = _prompts_that_fit(cfg, prompts, tokenizer, template, model.cfg.max_seq_len)
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
    # under torchrun each process samples, scores and trains on its share of every step's prompts (whole groups)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    micro = cfg.micro_batch_size or cfg.batch_size // world
    sampling = SamplingConfig(max_new_tokens=cfg.max_completion_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                              stop_token_ids=stops)
    rollouts = Rollouts(model, tokenizer, template, kept, rewards, objective, sampling, cfg.batch_size, micro,
                        cfg.num_generations, cfg.num_iterations, cfg.scale_rewards, cfg.mask_truncated, cfg.beta,
                        reference, pad_id, stops, cfg.seed, None, cfg.sample_every, cfg.samples, rank=rank,
                        world=world)
    trainer = Trainer(cfg, objective=objective, model=model, train_data=rollouts, tokenizer_dir=model_dir)
    rollouts.autocast = trainer._autocast
    rollouts.packed_sampling = cfg.precision == "fp32"  # the packed kernels compute in float32 only
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


def run_reward_model(cfg, model_dir: Path, tokenizer, template: str, template_source: str, rejects) -> dict:
    """`--objective reward`: a scalar reward head on the decoder, Bradley–Terry on the pairs DPO reads (train/rl.py
    BradleyTerry; a `margin` column, when the pairs have one, is subtracted as in Llama 2's reward models), the
    backbone trained in full, its last blocks (freeze) or through LoRA / DoRA adapters; saved as
    `*ForSequenceClassification` with one label (adapters merged; QLoRA's into the dequantized base);
    `--reward model:DIR` scores with it."""
    import torch

    from lmforge.chat.stops import eos_ids as model_eos_ids
    from lmforge.chat.templates import template_hash
    from lmforge.files import write_json
    from lmforge.finetune.preference import build_pairs, load_pairs, pair_eval_batches, preference_batches
    from lmforge.finetune.run import _peak_memory_mb, _split, _stage_tokenizer
    from lmforge.model.heads import build_classifier
    from lmforge.peft import parameter_counts
    from lmforge.train.rl import BradleyTerry
    from lmforge.train.trainer import Trainer

    if cfg.method not in ("full", "freeze", "lora", "dora", "qlora"):
        raise ConfigError(f"method: a reward model trains with --method full, freeze (the last --train-layers blocks "
                          f"and the head), lora, dora or qlora, not {cfg.method} in this version")
    pairs = load_pairs(cfg.data, cfg.format, cfg.columns, cfg.tags, rejects, cfg.encoding, cfg.errors)
    if cfg.val_data:
        train_pairs = pairs
        val_pairs = load_pairs(cfg.val_data, cfg.format, cfg.columns, cfg.tags, rejects, cfg.encoding, cfg.errors)
    else:
        train_pairs, val_pairs = _split(pairs, cfg.val_fraction, cfg.seed)
    train = build_pairs(tokenizer, template, train_pairs, cfg.max_length, rejects, cfg.progress)
    val = build_pairs(tokenizer, template, val_pairs, cfg.max_length) if val_pairs else None
    pad_id = tokenizer.special_tokens.get(tokenizer.pad_token) if getattr(tokenizer, "pad_token", None) else None
    torch.manual_seed(cfg.seed)  # the head's initial weights
    model = build_classifier(model_dir, ["reward"], "sequence", pad_token_id=pad_id, dropout=0.0)
    if pad_id is None:
        eos = model_eos_ids(tokenizer, model.backbone.cfg)
        pad_id = eos[0] if eos else 0
    _reward_model_trains(model, cfg)
    micro = cfg.micro_batch_size or cfg.batch_size
    objective = BradleyTerry()
    if cfg.best_metric == "val_loss":  # the default; val_reward_accuracy picks by held-out accuracy instead
        objective.best_metric, objective.higher_is_better = "val_loss", False
    elif cfg.best_metric != "val_reward_accuracy":
        raise ConfigError(f"best_metric: a reward model picks by val_loss or val_reward_accuracy, not {cfg.best_metric}")
    trainer = Trainer(cfg, objective=objective, model=model, train_data=preference_batches(train, micro, pad_id,
                                                                                           cfg.seed),
                      eval_data=(lambda: pair_eval_batches(val, max(1, micro), pad_id)) if val is not None else None,
                      tokenizer_dir=model_dir)
    out = Path(cfg.out)
    trainer.prepare_run_dir()
    if trainer.is_main:
        trainer.tokenizer_dir = _stage_tokenizer(model_dir, out, template)
        write_json(out / "template.json", {"source": template_source, "name": cfg.template,
                                           "hash": template_hash(template), "template": template, "mask": "none"})
        write_json(out / "data.json", {"train": train.stats, "val": val.stats if val else None})
        if rejects is not None:
            rejects.write(out)
        counts = parameter_counts(model)
        print(f"reward model (Bradley–Terry) on {model_dir} with {cfg.method}: {counts['trainable']:,} trainable "
              f"parameters; {len(train)} train / {len(val) if val else 0} held-out pairs; template: {template_source}",
              file=sys.stderr)
    summary = trainer.fit()
    summary["parameters"] = parameter_counts(model)
    summary["data"] = {"train": train.stats, "val": val.stats if val else None}
    summary["peak_memory_mb"] = _peak_memory_mb(trainer.device)
    if trainer.is_main:
        write_json(out / "summary.json", {k: v for k, v in summary.items() if k != "hf_config"})
    return summary


def _reward_model_trains(model, cfg) -> None:
    """Which of a reward model's parameters train, as --method says: all (full), the last --train-layers blocks
    (freeze), or LoRA / DoRA adapters on the backbone (qlora: on its linear layers in NF4); the head always, the
    language-model head never."""
    from lmforge.finetune.run import lora_config

    backbone = model.backbone
    for p in model.parameters():
        p.requires_grad_(cfg.method == "full")
    if backbone.lm_head is not None:  # the language-model head takes no part in a score
        backbone.lm_head.requires_grad_(False)
    if cfg.method == "freeze":
        n = backbone.cfg.n_layers
        if not 0 < cfg.train_layers <= n:
            raise ConfigError(f"train_layers: {cfg.train_layers} is not in 1..{n} (the model's blocks)")
        for layer in backbone.layers[n - cfg.train_layers:]:
            layer.requires_grad_(True)
        backbone.norm.requires_grad_(True)
    if cfg.method in ("lora", "dora", "qlora"):  # adapters on the backbone's linear layers; the head trains in full
        from lmforge.peft.lora import apply_lora, linear_modules

        if cfg.method == "qlora":  # the blocks' linear layers in NF4, as finetune's qlora (the head stays float)
            from lmforge.peft.nf4 import quantize_model

            quantize_model(backbone, linear_modules(backbone.cfg, backbone))
        apply_lora(backbone, lora_config(cfg))
    model.head.requires_grad_(True)
