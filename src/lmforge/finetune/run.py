"""`lmforge finetune`: SFT of a base model on the one Trainer, full or with LoRA / DoRA.

The run directory holds what pretraining's does (config.yaml, metrics.jsonl, loss.png, best/, last/) plus:
`tokenizer/` (the model's tokenizer with the chat template used in training written in, so every checkpoint
carries it), `template.json` (that template, its hash and where it came from), `samples.jsonl` (greedy replies to
held-out prompts at each evaluation), `data.json` (examples, truncation, tokens) and `rejects.jsonl`.
Checkpoints of a LoRA run are PEFT adapter directories (adapter_config.json + adapter_model.safetensors, with
base_model_name_or_path) plus the tokenizer; `lmforge export merge` turns one into a full HF model.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from lmforge.config import ConfigError, field_of
from lmforge.data.config import AugmentSettings
from lmforge.data.sources import encoding_field, on_error_field
from lmforge.train.config import TrainConfig

log = logging.getLogger(__name__)
_PLACEHOLDER = re.compile(r"\{\{\s*\w+\s*\}\}")

METHODS = ("full", "freeze", "lora", "dora", "qlora", "adapter", "prompt", "prefix")
RL_OBJECTIVES = ("grpo", "dr_grpo", "dapo", "rloo", "reinforce")
ADAPTER_METHODS = ("lora", "dora", "qlora", "adapter", "prompt", "prefix")
PLANNED_METHODS = {"ia3": "IA3 (learned rescaling vectors)"}


@dataclass
class FinetuneConfig(TrainConfig):
    """TrainConfig's fields (the loop's) with fine-tuning defaults, plus the data, template and method."""

    data: str = field(default="", metadata={"help": "a data file or folder, or DIR/dataset_info.json#NAME "
                                                    "(LLaMA-Factory's registry), or a Hugging Face datasets folder "
                                                    "(save_to_disk, Arrow/Parquet), DIR#SPLIT"})
    out: str = field(default="runs/finetune", metadata={"help": "run directory"})
    model: str = field(default="", metadata={"help": "the base model: an HF model directory (one lmforge trained, or "
                                                     "GPT-2 / Llama / Qwen2 / Mistral / SmolLM), or hf:ORG/NAME"})
    format: str = field(default="auto", metadata={"help": "data format", "choices": ["auto", "alpaca", "sharegpt",
                                                                                      "openai", "pairs", "text"]})
    columns: dict = field(default_factory=dict, metadata={
        "help": "the format's fields -> your columns, e.g. '{prompt: question, response: answer}'"})
    tags: dict = field(default_factory=dict, metadata={"help": "sharegpt role/content tags, e.g. '{role_tag: role}'"})
    encoding: str = encoding_field()
    errors: str = field(default="strict", metadata={"choices": ["strict", "replace"],
                                                    "help": "undecodable bytes: a bad record, or replaced by U+FFFD"})
    on_error: str = on_error_field()
    template: str = field(default="model", metadata={
        "help": "chat template: model (the tokenizer's own), or chatml, qwen, llama-3, mistral, phi-3, alpaca, plain"})
    chat_template_kwargs: dict = field(default_factory=dict, metadata={
        "help": "the chat template's own variables, as apply_chat_template's keyword arguments, e.g. "
                "'{enable_thinking: false}' (Qwen3: train replies without a reasoning block)"})
    mask: str = field(default="assistant", metadata={
        "help": "tokens trained on: assistant (every reply), last (the last reply), all (prompts too)",
        "choices": ["assistant", "last", "all"]})
    train_on_prompt: bool = field(default=False, metadata={"help": "the same as --mask all"})
    packing: bool = field(default=False, metadata={"help": "pack short examples into rows of max_length (no "
                                                           "attention across examples); off: each batch is padded "
                                                           "to its longest example"})
    group_by_length: bool = field(default=True, metadata={"help": "without packing: batch examples of similar length "
                                                                  "(faster than packing on short, even-length data; "
                                                                  "packing wins on long-tailed data, see "
                                                                  "docs/benchmarks.md)"})
    val_fraction: float = field(default=0.05, metadata={"help": "share of the examples held out for evaluation "
                                                                "(at least 1, at most 500)",
                                                        "check": (lambda v: 0 <= v < 1, "in [0, 1)")})
    val_data: str = field(default="", metadata={"help": "a separate evaluation file (then nothing is held out)"})
    samples: int = field(default=3, metadata={"help": "held-out prompts answered (greedy) at each evaluation"})
    sample_tokens: int = field(default=64, metadata={"help": "tokens per sample answer"})
    best_metric: str = field(default="val_loss", metadata={
        "help": "what picks the best checkpoint (and early stopping): val_loss, or val_rougeL / val_exact_match of "
                "the greedy replies to the --samples held-out prompts (lmforge.metrics; one process only)",
        "check": (lambda v: v in ("val_loss", "val_rougeL", "val_exact_match", "val_reward_accuracy", "val_bleu",
                                  "val_chrf"),
                  "one of val_loss, val_rougeL, val_exact_match, val_bleu, val_chrf (--task translate), "
                  "val_reward_accuracy (preference)")})
    objective: str = field(default="sft", metadata={
        "help": "sft (instruction tuning), preference tuning on chosen/rejected pairs: dpo, ipo (references "
                "computed once before training), orpo, simpo (reference-free), distill (learn a --teacher's "
                "next-token distributions on the SFT data), RL from rewards on prompts: grpo, dr_grpo, dapo, rloo, "
                "reinforce (see --reward), or reward: a reward model (Bradley–Terry) on the pairs",
        "choices": ["sft", "dpo", "ipo", "orpo", "simpo", "distill", "grpo", "dr_grpo", "dapo", "rloo", "reinforce",
                    "reward"]})
    beta: float = field(default=0.0, metadata={"help": "preference: the loss's beta (0: the method's usual value: dpo "
                                                       "0.1, ipo 0.1, orpo 0.1 (its lambda), simpo 2.0); RL: the weight "
                                                       "of the KL to the reference (0: no KL, no reference)",
                                               "check": (lambda v: v >= 0, ">= 0")})
    # --- RL from rewards (finetune/rl.py) ---
    reward: list[str] = field(default_factory=list, metadata={
        "help": "RL: rewards NAME[:ARG][:WEIGHT], summed: math[:COLUMN], format:REGEX, json_schema:FILE, "
                "length:MIN-MAX, python_tests[:COLUMN], FILE.py:FUNCTION (finetune/rewards.py)"})
    num_generations: int = field(default=4, metadata={"help": "RL: completions sampled per prompt (one group)",
                                                      "check": (lambda v: v >= 2, ">= 2")})
    max_completion_tokens: int = field(default=128, metadata={"help": "RL: tokens per completion at most",
                                                              "check": (lambda v: v > 0, "> 0")})
    temperature: float = field(default=1.0, metadata={"help": "RL: sampling temperature",
                                                      "check": (lambda v: v > 0, "> 0")})
    top_p: float = field(default=1.0, metadata={"help": "RL: nucleus sampling mass",
                                                "check": (lambda v: 0 < v <= 1, "in (0, 1]")})
    epsilon: float = field(default=0.2, metadata={"help": "RL: the ratio's clip range below 1 (and above, unless "
                                                          "--epsilon-high)", "check": (lambda v: v > 0, "> 0")})
    epsilon_high: float = field(default=0.0, metadata={"help": "RL: the clip range above 1 (0: = epsilon; DAPO "
                                                               "uses 0.28)", "check": (lambda v: v >= 0, ">= 0")})
    num_iterations: int = field(default=1, metadata={"help": "RL: optimizer steps on each sampled batch (> 1: the "
                                                             "ratio to the sampling policy's log-probabilities)",
                                                     "check": (lambda v: v >= 1, ">= 1")})
    scale_rewards: str = field(default="group", metadata={
        "help": "RL: advantages divided by the std of the group's rewards, the batch's, or none (Dr. GRPO)",
        "choices": ["group", "batch", "none"]})
    mask_truncated: bool = field(default=False, metadata={"help": "RL: completions cut at max_completion_tokens "
                                                                  "take no part in the loss"})
    sample_every: int = field(default=10, metadata={"help": "RL: rollouts between writing --samples completions "
                                                            "with their rewards to completions.jsonl (0: never)"})
    label_smoothing: float = field(default=0.0, metadata={"help": "dpo / simpo: the share of pairs assumed "
                                                                  "mislabelled (conservative DPO)",
                                                          "check": (lambda v: 0 <= v < 0.5, "in [0, 0.5)")})
    simpo_gamma: float = field(default=1.0, metadata={"help": "simpo: the target reward margin gamma"})
    # distillation (train/distill.py): --objective distill
    teacher: str = field(default="", metadata={"help": "distill: the teacher model directory (the student's tokenizer)"})
    teacher_cache: str = field(default="", metadata={"help": "distill: a teacher cache (lmforge distill cache) "
                                                             "instead of --teacher: no teacher in memory"})
    teacher_dtype: str = field(default="float32", metadata={"help": "distill: the teacher's weights (bfloat16 halves "
                                                                    "its memory, int8 quarters it)",
                                                            "choices": ["float32", "bfloat16", "float16", "int8"]})
    kd_loss: str = field(default="forward_kl", metadata={
        "help": "distill: forward_kl KL(teacher||student), reverse_kl KL(student||teacher), or jsd (generalized JSD "
                "with --kd-beta)", "choices": ["forward_kl", "reverse_kl", "jsd"]})
    kd_beta: float = field(default=0.5, metadata={"help": "distill, jsd: the teacher's weight in the mixture (0: "
                                                          "forward KL, 1: reverse KL)",
                                                  "check": (lambda v: 0 <= v <= 1, "in [0, 1]")})
    kd_temperature: float = field(default=1.0, metadata={"help": "distill: softmax temperature of both models (the "
                                                                 "loss is scaled by its square)",
                                                         "check": (lambda v: v > 0, "> 0")})
    kd_ratio: float = field(default=0.5, metadata={"help": "distill: loss = (1 - r) * cross entropy + r * KD",
                                                   "check": (lambda v: 0 <= v <= 1, "in [0, 1]")})
    kd_lmbda: float = field(default=0.0, metadata={"help": "distill: share of batches whose replies the student "
                                                           "samples itself (on-policy, GKD's lambda)",
                                                   "check": (lambda v: 0 <= v <= 1, "in [0, 1]")})
    seq_kd: bool = field(default=False, metadata={"help": "distill: the other batches' replies are the teacher's "
                                                          "generations (sequence-level KD)"})
    kd_max_new_tokens: int = field(default=128, metadata={"help": "distill, on-policy / seq_kd: tokens per generated "
                                                                  "reply", "check": (lambda v: v > 0, "> 0")})
    kd_sample_temperature: float = field(default=0.9, metadata={"help": "distill, on-policy / seq_kd: sampling "
                                                                        "temperature of generated replies",
                                                                "check": (lambda v: v >= 0, ">= 0")})
    method: str = field(default="lora", metadata={"help": "full, freeze (the last --train-layers blocks + norm and "
                                                          "head), lora, dora, qlora (LoRA on NF4 base weights), "
                                                          "adapter (bottleneck adapters), prompt (prompt tuning), "
                                                          "prefix (prefix tuning)"})
    qlora_dora: bool = field(default=False, metadata={"help": "qlora: DoRA adapters instead of LoRA"})
    num_virtual_tokens: int = field(default=20, metadata={"help": "prompt / prefix: virtual tokens learned before "
                                                                  "every sequence (prefix: keys and values in every "
                                                                  "layer)", "check": (lambda v: v > 0, "> 0")})
    adapter_size: int = field(default=64, metadata={"help": "adapter: bottleneck width (Houlsby adapters after each "
                                                            "attention and MLP)", "check": (lambda v: v > 0, "> 0")})
    train_layers: int = field(default=2, metadata={"help": "freeze: blocks that train, counted from the top"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank", "check": (lambda v: v > 0, "> 0")})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scale = alpha / r"})
    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on the adapter input"})
    lora_targets: list[str] = field(default_factory=lambda: ["all-linear"], metadata={
        "help": "module names (q_proj v_proj ..., c_attn for GPT-2) or all-linear"})
    lora_target_regex: str = field(default="", metadata={"help": "a regular expression over full HF module names "
                                                                 "instead of --lora-targets"})
    rslora: bool = field(default=False, metadata={"help": "rank-stabilised LoRA scale alpha / sqrt(r)"})
    lora_plus_ratio: float = field(default=0.0, metadata={"help": "LoRA+: B's learning rate ratio (0: off)"})
    # sequence-to-sequence tasks (lmforge.finetune.seq2seq): source/target records, validation by generation
    task: str = field(default="", metadata={
        "help": "translate or summarize: the data holds source/target records; the instruction is built, replies "
                "to held-out sources are scored (BLEU/chrF or ROUGE-L) and pick the best checkpoint",
        "check": (lambda v: v in ("", "translate", "summarize"), "translate or summarize")})
    src_lang: str = field(default="", metadata={"help": "translate: the source language code (en, zh, ja, ...)"})
    tgt_lang: str = field(default="", metadata={"help": "translate: the target language code (zh targets: BLEU on "
                                                        "sacrebleu's zh tokenization)"})
    task_template: str = field(default="", metadata={
        "help": "the user turn with a {source} slot instead of the task's instruction (implies --task summarize "
                "metrics unless --task translate)"})
    task_eval_examples: int = field(default=100, metadata={
        "help": "task: held-out examples translated / summarised at each evaluation",
        "check": (lambda v: v > 0, "> 0")})
    # data augmentation of the training split (lmforge.data.augment): new examples whose user turns are EDA / noise
    # variants, replies unchanged; the validation split is never augmented
    augment: list[str] = field(default_factory=list, metadata={
        "help": "augment the training examples' prompts with these operations: synonym insert swap delete (EDA), "
                "char (typos), punct (AEDA), backtranslate paraphrase (written by --augment-model or "
                "--augment-endpoint); off when empty"})
    augment_per_record: int = field_of(AugmentSettings, "augment_per_record")
    augment_alpha: float = field_of(AugmentSettings, "augment_alpha")
    augment_synonyms: str = field_of(AugmentSettings, "augment_synonyms")
    augment_model: str = field_of(AugmentSettings, "augment_model")
    augment_endpoint: str = field_of(AugmentSettings, "augment_endpoint")
    augment_served_model: str = field_of(AugmentSettings, "augment_served_model")
    augment_pivot: str = field_of(AugmentSettings, "augment_pivot")
    augment_cache: str = field_of(AugmentSettings, "augment_cache")
    # pretraining's data settings: not used here (no flags)
    dataset: str = field(default="sliding", metadata={"cli": False})
    allow_mid_doc: bool = field(default=False, metadata={"cli": False})
    model_overrides: dict = field(default_factory=dict, metadata={"cli": False})
    # the loop's settings, with fine-tuning defaults
    max_length: int = field(default=512, metadata={"help": "tokens per row (an example longer than this is cut)",
                                                   "check": (lambda v: v > 0, "> 0")})
    batch_size: int = field(default=8, metadata={"help": "rows per optimizer step", "check": (lambda v: v > 0, "> 0")})
    max_steps: int = field(default=200, metadata={"help": "optimizer steps", "check": (lambda v: v >= 0, ">= 0")})
    lr: float = field(default=2e-4, metadata={"help": "peak learning rate (full fine-tuning wants ~1e-5)",
                                              "check": (lambda v: v > 0, "> 0")})
    warmup_steps: int = field(default=10, metadata={"help": "linear warmup steps", "check": (lambda v: v >= 0, ">= 0")})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW decoupled weight decay (matrices only)"})
    eval_every: int = field(default=50, metadata={"help": "steps between evaluations (0: only at the end)"})
    patience: int = field(default=0, metadata={"help": "stop after this many evaluations without improvement (0: off)"})

    #: what a resumed run must share with its checkpoint, beyond the loop's own (trainer.RESUME_MUST_MATCH)
    resume_extra: ClassVar[tuple[str, ...]] = (
        "objective", "beta", "label_smoothing", "simpo_gamma", "reward", "num_generations", "max_completion_tokens",
        "temperature", "top_p", "epsilon", "epsilon_high", "num_iterations", "scale_rewards", "mask_truncated", "format",
        "columns", "tags", "template", "chat_template_kwargs", "mask",
        "train_on_prompt", "packing", "group_by_length",
        "val_fraction", "val_data", "method", "train_layers", "lora_r", "lora_alpha", "lora_dropout", "lora_targets",
        "lora_target_regex", "rslora", "lora_plus_ratio", "qlora_dora", "adapter_size", "num_virtual_tokens",
        "teacher", "teacher_cache", "teacher_dtype", "kd_loss", "kd_beta", "kd_temperature", "kd_ratio",
        "kd_lmbda", "seq_kd", "kd_max_new_tokens", "kd_sample_temperature",
        "augment", "augment_per_record", "augment_alpha", "augment_synonyms", "augment_model",
        "augment_endpoint", "augment_pivot", "task", "src_lang", "tgt_lang",
        "task_template")


def check_config(cfg: FinetuneConfig) -> None:
    if cfg.method in PLANNED_METHODS:
        raise ConfigError(f"method: {cfg.method} ({PLANNED_METHODS[cfg.method]}) is not in this version yet; "
                          f"methods: {', '.join(METHODS)}")
    if cfg.method not in METHODS:
        raise ConfigError(f"method: {cfg.method!r} is not one of {', '.join(METHODS)}")
    if not cfg.model:
        raise ConfigError("model: give the base model (--model DIR)")
    if not cfg.data:
        raise ConfigError("data: give the training data (--data FILE)")
    if cfg.distributed == "fsdp" and cfg.method not in ("full", "freeze", "lora", "dora"):
        raise ConfigError(f"distributed: fsdp with --method {cfg.method} is not supported yet (full, freeze, lora and "
                          "dora are); its weights are small, so use --distributed ddp (tested equal to one process)")
    if cfg.distributed == "fsdp" and cfg.method in ("lora", "dora") and cfg.checkpoint_format == "sharded":
        raise ConfigError("checkpoint_format: sharded checkpoints hold the whole model, not a PEFT adapter directory; "
                          "with --method lora/dora under FSDP checkpoints are full (the adapter is gathered to rank 0)")
    if cfg.method in ("prompt", "prefix") and cfg.packing:
        raise ConfigError(f"packing: {cfg.method} tuning puts its virtual tokens before each sequence, so examples "
                          "cannot share a row; use --no-packing")
    if cfg.objective not in ("sft", "distill") and cfg.method in ("prompt", "prefix"):
        raise ConfigError(f"objective: {cfg.objective} with --method {cfg.method} is not supported: the reference "
                          "model would carry the untrained virtual tokens; use lora, dora, qlora, full or freeze")
    if cfg.reward and cfg.objective not in RL_OBJECTIVES:
        raise ConfigError(f"reward: rewards are for RL (--objective {' / '.join(RL_OBJECTIVES)}), not {cfg.objective}")
    if cfg.objective == "distill" and bool(cfg.teacher) == bool(cfg.teacher_cache):
        raise ConfigError("teacher: --objective distill needs the teacher model (--teacher DIR) or its cache "
                          "(--teacher-cache DIR), one of them")
    if (cfg.kd_lmbda or cfg.seq_kd) and cfg.teacher_cache:
        raise ConfigError("teacher_cache: a cache holds the teacher's view of the data's replies only; on-policy "
                          "(--kd-lmbda) and --seq-kd generate new replies, so they need --teacher DIR")
    if (cfg.kd_lmbda or cfg.seq_kd) and cfg.packing:
        raise ConfigError("packing: generated replies replace the data's per example; use --no-packing with "
                          "--kd-lmbda / --seq-kd")
    if (cfg.kd_lmbda or cfg.seq_kd) and cfg.distributed == "fsdp":
        raise ConfigError("distributed: on-policy generation needs the whole student on each process; use ddp")
    if (cfg.kd_lmbda or cfg.seq_kd) and cfg.objective != "distill":
        raise ConfigError("kd_lmbda: on-policy and sequence-level KD belong to --objective distill")
    if (cfg.teacher or cfg.teacher_cache) and cfg.objective != "distill":
        raise ConfigError(f"teacher: a teacher is used by --objective distill, not {cfg.objective}")
    if cfg.best_metric == "val_reward_accuracy" and cfg.objective in ("sft", "distill", *RL_OBJECTIVES):
        raise ConfigError("best_metric: val_reward_accuracy is a preference-tuning metric (--objective dpo ...)")
    if (cfg.task or cfg.task_template) and cfg.objective != "sft":
        raise ConfigError("task: translation and summarisation train with --objective sft")
    if cfg.augment:
        from lmforge.data.augment import OPERATIONS

        bad = [op for op in cfg.augment if op not in OPERATIONS]
        if bad:
            raise ConfigError(f"augment: unknown operation '{bad[0]}' (known: {', '.join(OPERATIONS)})")
        if cfg.objective != "sft":
            raise ConfigError("augment: preference pairs are not augmented (a changed prompt could change which "
                              "reply is better); use it with --objective sft")
    from lmforge.synth.augment import check_augment_options

    check_augment_options(cfg)
    if cfg.ema_decay and cfg.method in ADAPTER_METHODS:
        raise ConfigError("ema_decay: an EMA of LoRA adapters is not supported; use it with full fine-tuning")


def lora_config(cfg: FinetuneConfig):
    from lmforge.peft.lora import LoraConfig

    targets = cfg.lora_target_regex or (cfg.lora_targets[0] if cfg.lora_targets == ["all-linear"] else cfg.lora_targets)
    return LoraConfig(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, targets=targets,
                      rslora=cfg.rslora, dora=cfg.method == "dora" or (cfg.method == "qlora" and cfg.qlora_dora),
                      lora_plus_ratio=cfg.lora_plus_ratio)


def prepare_model(model, cfg: FinetuneConfig) -> None:
    """Freeze / add adapters in place, as the method says."""
    if getattr(model, "portable", False) and cfg.method not in ("full", "lora", "dora", "qlora"):
        # the others name lmforge's own blocks or write into its attention (model/portable.py)
        raise ConfigError(f"method {cfg.method}: not on the portable path ({model.hf_class} runs transformers' "
                          "modules); use full, lora, dora or qlora")
    if cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    elif cfg.method == "freeze":
        n = model.cfg.n_layers
        if not 0 < cfg.train_layers <= n:
            raise ConfigError(f"train_layers: {cfg.train_layers} is not in 1..{n} (the model's blocks)")
        keep = tuple(f"layers.{i}." for i in range(n - cfg.train_layers, n)) + ("norm.", "lm_head.")
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith(keep))
    elif cfg.method == "prefix":
        from lmforge.peft.prefix import apply_prefix_tuning

        apply_prefix_tuning(model, cfg.num_virtual_tokens, cfg.seed)
    elif cfg.method == "prompt":
        from lmforge.peft.prompt import apply_prompt_tuning

        apply_prompt_tuning(model, cfg.num_virtual_tokens, cfg.seed)
    elif cfg.method == "adapter":
        from lmforge.peft.bottleneck import BottleneckConfig, apply_bottleneck

        apply_bottleneck(model, BottleneckConfig(cfg.adapter_size, dropout=cfg.lora_dropout))
    else:
        from lmforge.peft import lora

        if cfg.method == "qlora":  # every linear layer of the blocks into NF4 (embeddings, head, experts and
            # routers stay float)
            from lmforge.peft.nf4 import quantize_model

            quantize_model(model, lora.linear_modules(model.cfg, model))
        lora.apply_lora(model, lora_config(cfg))


def _stage_tokenizer(model_dir: Path, out: Path, template: str) -> Path:
    """out/tokenizer: the model's tokenizer files with the training template as its chat template."""
    from lmforge.files import StagedDirectory, write_json
    from lmforge.train.checkpoint import TOKENIZER_FILES

    with StagedDirectory(out / "tokenizer") as stage:
        for name in TOKENIZER_FILES:
            if (model_dir / name).exists() and name != "chat_template.jinja":
                shutil.copy(model_dir / name, stage.path(name))
        config_path = stage.path("tokenizer_config.json")
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.exists() else {}
        config["chat_template"] = template
        write_json(config_path, config)
        stage.path("chat_template.jinja").write_text(template, encoding="utf-8")
    return out / "tokenizer"


def _split(conversations: list, fraction: float, seed: int) -> tuple[list, list]:
    import numpy as np

    if fraction <= 0 or len(conversations) < 2:
        return conversations, []
    n_val = min(500, max(1, round(len(conversations) * fraction)))
    order = np.random.default_rng(seed).permutation(len(conversations))
    held = set(order[:n_val].tolist())
    return ([c for i, c in enumerate(conversations) if i not in held],
            [c for i, c in enumerate(conversations) if i in held])


def _task(cfg: FinetuneConfig) -> str:
    """The sequence-to-sequence task of a run ("" for none): a template alone scores like summarisation."""
    return cfg.task or ("summarize" if cfg.task_template else "")


def _task_best_metric(cfg: FinetuneConfig, task: str) -> str:
    """A task run picks its checkpoint by the task's metric (BLEU, ROUGE-L), unless another generation metric is
    named."""
    from lmforge.finetune.seq2seq import TASK_METRICS

    if task and cfg.best_metric == "val_loss":
        return TASK_METRICS[task]
    if cfg.best_metric in ("val_bleu", "val_chrf") and task != "translate":
        raise ConfigError(f"best_metric: {cfg.best_metric} scores translations: use it with --task translate")
    return cfg.best_metric


def augment_conversations(conversations: list, ops: list[str], per_record: int = 1, alpha: float = 0.1,
                          seed: int = 0, synonyms: str = "auto", model=None) -> list:
    """The conversations, then new ones whose last user turn is an augmented variant (lmforge.data.augment) and
    whose replies are the source's; each new one's `where` names its source and the operation. `model` (a
    lmforge.synth.augment.ModelAugmenter) writes backtranslate / paraphrase variants."""
    from lmforge.data.augment import AugmentConfig, augment_records
    from lmforge.finetune.conversations import Conversation

    def last_user(c) -> int | None:
        if c.text is not None:
            return None
        turns = [i for i, m in enumerate(c.messages) if m["role"] == "user" and isinstance(m.get("content"), str)
                 and m["content"].strip()]
        return turns[-1] if turns else None

    records = [(c.where or f"example {i + 1}", {"text": c.messages[t]["content"], "index": i})
               for i, c in enumerate(conversations) if (t := last_user(c)) is not None]
    out = list(conversations)
    aug = AugmentConfig(ops=tuple(ops), per_record=per_record, alpha=alpha, seed=seed, synonyms=synonyms)
    for rec in augment_records(records, aug, originals=False, model=model):
        c = conversations[rec["index"]]
        messages = [dict(m) for m in c.messages]
        messages[last_user(c)]["content"] = rec["text"]
        out.append(Conversation(messages, c.tools, None, f"{rec['augmented']['source']} ({rec['augmented']['op']})"))
    return out


def run_finetune(cfg: FinetuneConfig) -> dict:
    """Fine-tune and return the Trainer's summary plus data and parameter figures. The model's tokenizer and
    template are resolved here; RL, reward-model and preference objectives go their own way (rl.py,
    `run_preference`), SFT and distillation through `_run_sft`."""
    from lmforge.chat.templates import resolve_template
    from lmforge.data.sources import RejectLog
    from lmforge.model.hf import resolve_model_dir
    from lmforge.tokenizer import load_tokenizer

    check_config(cfg)
    model_dir = resolve_model_dir(cfg.model)
    if not (model_dir / "tokenizer.json").exists():
        raise ConfigError(f"model: {model_dir} has no tokenizer.json; fine-tuning needs the model's tokenizer beside "
                          "its weights")
    tokenizer = load_tokenizer(model_dir)
    template, template_source = resolve_template(tokenizer, cfg.template)
    from lmforge.chat.templates import check_template_variables

    check_template_variables(cfg.chat_template_kwargs, template, template_source)
    rejects = RejectLog() if cfg.on_error == "skip" else None
    if cfg.objective in RL_OBJECTIVES:
        from lmforge.finetune.rl import run_rl

        return run_rl(cfg, model_dir, tokenizer, template, template_source, rejects)
    if cfg.objective == "reward":
        from lmforge.finetune.rl import run_reward_model

        return run_reward_model(cfg, model_dir, tokenizer, template, template_source, rejects)
    if cfg.objective not in ("sft", "distill"):
        return run_preference(cfg, model_dir, tokenizer, template, template_source, rejects)
    return _run_sft(cfg, model_dir, tokenizer, template, template_source, rejects)


def _run_sft(cfg: FinetuneConfig, model_dir: Path, tokenizer, template: str, template_source: str, rejects) -> dict:
    """SFT (or distillation, the same batches under another objective): conversations -> masked examples -> the
    one Trainer, in steps."""
    import torch

    from lmforge.chat.stops import eos_ids as model_eos_ids
    from lmforge.chat.stops import turn_end_ids
    from lmforge.finetune import sft
    from lmforge.model import load_hf_model
    from lmforge.peft import parameter_counts
    from lmforge.train.trainer import Trainer

    mask = "all" if cfg.train_on_prompt else cfg.mask
    task = _task(cfg)
    conversations, train_convs, val_convs = _sft_conversations(cfg, task, rejects)
    _check_sft_data(tokenizer, template, conversations)
    model = load_hf_model(model_dir)
    eos_ids = model_eos_ids(tokenizer, model.cfg)
    eos_id = eos_ids[0] if eos_ids else None
    pad_id = tokenizer.special_tokens.get(tokenizer.pad_token) if getattr(tokenizer, "pad_token", None) else None
    pad_id = pad_id if pad_id is not None else (eos_id or 0)
    variables = cfg.chat_template_kwargs
    train = sft.build_examples(tokenizer, template, train_convs, mask, cfg.max_length, eos_id, rejects, cfg.progress,
                               "tokenize train", variables)
    val = sft.build_examples(tokenizer, template, val_convs, mask, cfg.max_length, eos_id, None, False,
                             variables=variables) if val_convs else None

    torch.manual_seed(cfg.seed)  # the adapters' initial A matrices: the same for the same seed, in any process
    prepare_model(model, cfg)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    micro = cfg.micro_batch_size or cfg.batch_size // world
    batches = sft.SFTBatches(train, micro, cfg.max_length, cfg.packing, cfg.group_by_length, pad_id, cfg.seed,
                             rank, world)
    eval_data = sft.eval_batches(val, max(1, micro), pad_id) if val is not None else None
    sample_convs = [c for c in val_convs if c.text is None][:cfg.task_eval_examples if task else cfg.samples]
    out = Path(cfg.out)
    best_metric = cfg.best_metric = _task_best_metric(cfg, task)  # config.yaml names the metric that picks best/
    if best_metric != "val_loss":  # the replies are generated on rank 0: other ranks could not agree on the best
        if world > 1:
            raise ConfigError(f"best_metric: {best_metric} is measured on one process; use val_loss with torchrun")
        if not sample_convs:
            raise ConfigError(f"best_metric: {best_metric} scores replies to held-out prompts: give --samples N "
                              "(N > 0) and held-out conversations")
    objective = None
    if cfg.objective == "distill":  # the same batches; the loss adds the teacher's distributions
        objective, batches, eval_data = _distillation(cfg, model, model_dir, tokenizer, template, eos_ids, pad_id,
                                                      batches, eval_data, val, micro)
    trainer = Trainer(cfg, objective=objective, model=model, train_data=batches, eval_data=eval_data,
                      tokenizer_dir=model_dir,
                      after_eval=_sampler(tokenizer, template, sample_convs, cfg, eos_ids, out) if sample_convs else None)
    if best_metric != "val_loss":
        trainer.objective.best_metric, trainer.objective.higher_is_better = best_metric, True
        trainer.best_val = float("-inf")
    trainer.prepare_run_dir()  # refuses an occupied --out before anything is written there
    if trainer.is_main:
        trainer.tokenizer_dir = _stage_tokenizer(model_dir, out, template)
        _write_sft_start(cfg, out, model, model_dir, tokenizer, template, template_source, mask, rejects,
                         conversations, train_convs, train, val, batches, eos_ids)
    summary = trainer.fit()
    summary["parameters"] = parameter_counts(model)
    summary["data"] = {"train": train.stats, "val": val.stats if val else None}
    summary["peak_memory_mb"] = _peak_memory_mb(trainer.device)
    summary["turn_end_ids"] = turn_end_ids(tokenizer, template)
    if model.cfg.n_experts:
        summary["moe_aux_weight"] = trainer.moe_aux_weight
    if trainer.is_main:
        from lmforge.files import write_json

        write_json(out / "summary.json", {k: v for k, v in summary.items() if k != "hf_config"})
    return summary


def _sft_conversations(cfg: FinetuneConfig, task, rejects) -> tuple[list, list, list]:
    """(all conversations read from --data, the training ones (augmented if asked), the held-out ones)."""
    from lmforge.finetune.conversations import load_conversations

    def read(data: str) -> list:
        if task:  # source/target records, the task's instruction built around each source
            from lmforge.finetune.seq2seq import load_task_conversations

            return load_task_conversations(data, task, cfg.src_lang, cfg.tgt_lang, cfg.task_template, cfg.columns,
                                           rejects, cfg.encoding, cfg.errors)
        return load_conversations(data, cfg.format, cfg.columns, cfg.tags, rejects, cfg.encoding, cfg.errors)

    conversations = read(cfg.data)
    if cfg.val_data:
        train_convs = conversations
        val_convs = read(cfg.val_data)
    else:
        train_convs, val_convs = _split(conversations, cfg.val_fraction, cfg.seed)
    if cfg.augment:
        before = len(train_convs)
        from lmforge.synth.augment import rewriter_for

        train_convs = augment_conversations(train_convs, cfg.augment, cfg.augment_per_record, cfg.augment_alpha,
                                            cfg.seed, cfg.augment_synonyms, rewriter_for(cfg))
        log.info("augment: %d training examples + %d new (%s)", before, len(train_convs) - before,
                 ", ".join(cfg.augment))
    return conversations, train_convs, val_convs


def _check_sft_data(tokenizer, template: str, conversations: list) -> None:
    """The template must render the data's tools; replies with unfilled {{...}} placeholders are trained as written,
    with a warning."""
    from lmforge.chat.masks import tool_rendering_check

    problem = tool_rendering_check(tokenizer, template, conversations)
    if problem:
        raise ConfigError(f"template: {problem}")
    placeholders = sum(bool(_PLACEHOLDER.search(m["content"])) for c in conversations if c.text is None
                       for m in c.messages if m["role"] == "assistant" and isinstance(m.get("content"), str))
    if placeholders:  # LLaMA-Factory's identity.json ships {{name}} and {{author}} for the user to fill in
        log.warning("%d replies hold {{...}} placeholders (e.g. LLaMA-Factory's identity.json: replace {{name}} and "
                    "{{author}} first); they are trained as written", placeholders)


def _distillation(cfg: FinetuneConfig, model, model_dir: Path, tokenizer, template: str, eos_ids: list[int],
                  pad_id: int, batches, eval_data, val, micro: int):
    """(the Distill objective, the training batches, the evaluation batches): the teacher's top-k rows from its
    cache ride along with each batch, or a live teacher (and, on-policy, replies the student generates)."""
    from lmforge.train.distill import Distill

    if cfg.teacher_cache:
        from lmforge.finetune.distill.cache import CachedTeacherBatches, TeacherCache, cached_eval_batches

        cache = TeacherCache(cfg.teacher_cache)
        cache.check(tokenizer, cfg.kd_temperature, str(model_dir))
        batches = CachedTeacherBatches(batches, cache)
        eval_data = cached_eval_batches(val, max(1, micro), pad_id, cache) if val is not None else None
        teacher = None
    else:
        from lmforge.finetune.distill.teacher import load_teacher

        teacher = load_teacher(cfg.teacher, model_dir, tokenizer, cfg.teacher_dtype)
        if cfg.kd_lmbda or cfg.seq_kd:  # replies generated by the student (or the teacher) as training goes
            from lmforge.chat.stops import stop_ids
            from lmforge.finetune.distill.on_policy import OnPolicyBatches

            batches = OnPolicyBatches(batches, model, teacher, cfg.kd_lmbda, cfg.seq_kd,
                                      stop_ids(tokenizer, eos_ids, template), pad_id, cfg.seed,
                                      cfg.kd_max_new_tokens, cfg.kd_sample_temperature)
    return Distill(teacher, cfg.kd_loss, cfg.kd_beta, cfg.kd_temperature, cfg.kd_ratio), batches, eval_data


def _write_sft_start(cfg: FinetuneConfig, out: Path, model, model_dir: Path, tokenizer, template: str,
                     template_source: str, mask: str, rejects, conversations: list, train_convs: list, train, val,
                     batches, eos_ids: list[int]) -> None:
    """What the main process writes and says before training: template.json, data.json, the rejects, one line on
    the run, the template's stop-token warning and one rendered training example."""
    from lmforge.chat.masks import render_masked, stop_token_check
    from lmforge.chat.templates import template_hash
    from lmforge.files import write_json
    from lmforge.peft import parameter_counts

    variables = cfg.chat_template_kwargs
    write_json(out / "template.json", {"source": template_source, "name": cfg.template,
                                       "hash": template_hash(template), "template": template, "mask": mask,
                                       "variables": variables})
    write_json(out / "data.json", {"train": train.stats, "val": val.stats if val else None,
                                   "packing_utilisation": round(batches.utilisation(), 4)})
    if rejects is not None:
        rejects.write(out)
    counts = parameter_counts(model)
    print(f"fine-tuning {model_dir} ({counts['total'] / 1e6:.2f} M parameters) with {cfg.method}: "
          f"{counts['trainable']:,} trainable ({counts['trainable_percent']}%); {len(train)} train / "
          f"{len(val) if val else 0} held-out examples, {train.stats['trained_tokens']:,} trained tokens; "
          f"template: {template_source}", file=sys.stderr)
    warning = stop_token_check(tokenizer, template, eos_ids)
    if warning and any(c.text is None for c in conversations):
        print(f"lmforge: WARNING: {warning}", file=sys.stderr)
    example = next((c for c in train_convs if c.text is None), None)
    if example is not None:
        print("one training example, the trained part in [[ ]]:\n" + render_masked(tokenizer, template, example,
                                                                                  mask, variables=variables),
              file=sys.stderr)


PREFERENCE_BETA = {"dpo": 0.1, "ipo": 0.1, "orpo": 0.1, "simpo": 2.0}


def run_preference(cfg: FinetuneConfig, model_dir: Path, tokenizer, template: str, template_source: str,
                   rejects) -> dict:
    """DPO / IPO / ORPO / SimPO on the one Trainer (finetune/preference.py): pairs -> both sides through the chat
    template -> reference log-probabilities once (DPO, IPO) -> the Preference objective."""
    import torch

    from lmforge.chat.stops import eos_ids as model_eos_ids
    from lmforge.chat.templates import template_hash
    from lmforge.files import write_json
    from lmforge.finetune.preference import (
        build_pairs,
        load_pairs,
        pair_eval_batches,
        preference_batches,
        reference_logps,
    )
    from lmforge.model import load_hf_model
    from lmforge.peft import parameter_counts
    from lmforge.train.objectives import REFERENCE_FREE, Preference
    from lmforge.train.trainer import Trainer

    pairs = load_pairs(cfg.data, cfg.format, cfg.columns, cfg.tags, rejects, cfg.encoding, cfg.errors)
    if cfg.val_data:
        train_pairs = pairs
        val_pairs = load_pairs(cfg.val_data, cfg.format, cfg.columns, cfg.tags, rejects, cfg.encoding, cfg.errors)
    else:
        train_pairs, val_pairs = _split(pairs, cfg.val_fraction, cfg.seed)
    model = load_hf_model(model_dir)
    eos_ids = model_eos_ids(tokenizer, model.cfg)
    pad_id = tokenizer.special_tokens.get(tokenizer.pad_token) if getattr(tokenizer, "pad_token", None) else None
    pad_id = pad_id if pad_id is not None else (eos_ids[0] if eos_ids else 0)
    progress = cfg.progress
    variables = cfg.chat_template_kwargs
    train = build_pairs(tokenizer, template, train_pairs, cfg.max_length, rejects, progress, variables)
    val = build_pairs(tokenizer, template, val_pairs, cfg.max_length, variables=variables) if val_pairs else None
    beta = cfg.beta or PREFERENCE_BETA[cfg.objective]
    objective = Preference(cfg.objective, beta, cfg.label_smoothing, cfg.simpo_gamma)
    if cfg.best_metric == "val_reward_accuracy":
        objective.best_metric, objective.higher_is_better = "val_reward_accuracy", True
    elif cfg.best_metric != "val_loss":
        raise ConfigError(f"best_metric: {cfg.best_metric} is for SFT; preference tuning picks by val_loss or "
                          "val_reward_accuracy")
    torch.manual_seed(cfg.seed)
    prepare_model(model, cfg)
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    micro = cfg.micro_batch_size or cfg.batch_size // world
    batches = preference_batches(train, micro, pad_id, cfg.seed, rank, world)
    out = Path(cfg.out)
    samples = [p.chosen for p in val_pairs][:cfg.samples]
    trainer = Trainer(cfg, objective=objective, model=model, train_data=batches, tokenizer_dir=model_dir,
                      eval_data=(lambda: pair_eval_batches(val, max(1, micro), pad_id)) if val is not None else None,
                      after_eval=_sampler(tokenizer, template, samples, cfg, eos_ids, out) if samples else None)
    if cfg.objective not in REFERENCE_FREE:  # the model as it starts is the reference: before any checkpoint loads
        for ex in (train, val):
            if ex is not None:
                ex.ref_logps = reference_logps(trainer.model, ex, pad_id, max(1, micro), trainer.device, progress,
                                               trainer.autocast_dtype)
    trainer.prepare_run_dir()
    if trainer.is_main:
        trainer.tokenizer_dir = _stage_tokenizer(model_dir, out, template)
        write_json(out / "template.json", {"source": template_source, "name": cfg.template,
                                           "hash": template_hash(template), "template": template, "mask": "last"})
        write_json(out / "data.json", {"train": train.stats, "val": val.stats if val else None})
        if rejects is not None:
            rejects.write(out)
        counts = parameter_counts(model)
        print(f"preference tuning ({cfg.objective}, beta {beta}) of {model_dir} with {cfg.method}: "
              f"{counts['trainable']:,} trainable parameters ({counts['trainable_percent']}%); {len(train)} train / "
              f"{len(val) if val else 0} held-out pairs; template: {template_source}", file=sys.stderr)
    summary = trainer.fit()
    summary["parameters"] = parameter_counts(model)
    summary["data"] = {"train": train.stats, "val": val.stats if val else None}
    summary["peak_memory_mb"] = _peak_memory_mb(trainer.device)
    if trainer.is_main:
        write_json(out / "summary.json", {k: v for k, v in summary.items() if k != "hf_config"})
    return summary


def _peak_memory_mb(device) -> float:
    import torch

    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB


def _sampler(tokenizer, template: str, convs: list, cfg: FinetuneConfig, eos_ids: list[int], out: Path):
    """After each evaluation: greedy replies to held-out prompts, appended to samples.jsonl."""
    from lmforge.chat.render import encode_chat
    from lmforge.chat.stops import stop_ids
    from lmforge.infer.engine import generate
    from lmforge.infer.sampling import SamplingConfig

    stops = stop_ids(tokenizer, eos_ids, template)  # the template being trained ends the replies
    prompts = [encode_chat(tokenizer, template, c.messages[:-1], add_generation_prompt=True, tools=c.tools,
                           **cfg.chat_template_kwargs).ids for c in convs]

    def after_eval(trainer, metrics: dict) -> None:
        import torch

        model = trainer.model
        was_training = model.training
        model.eval()
        try:  # on the adapted model as it is: merging and unmerging would drift the frozen weights
            with torch.no_grad():
                replies = generate(model, tokenizer, prompts, SamplingConfig(
                    max_new_tokens=cfg.sample_tokens, temperature=0.0, stop_token_ids=stops))
        finally:
            model.train(was_training)
        from lmforge.metrics import exact_match, rouge

        references = [c.messages[-1]["content"] for c in convs]
        # ROUGE-L (Chinese by characters) and exact match of the replies join the evaluation's metrics
        metrics["val_rougeL"] = rouge([r.strip() for r in replies], references, types=("rougeL",))["rougeL"]
        metrics["val_exact_match"] = exact_match([r.strip() for r in replies], [r.strip() for r in references])
        if _task(cfg):
            from lmforge.finetune.seq2seq import task_scores

            metrics.update(task_scores(_task(cfg), replies, references, cfg.tgt_lang))
        with open(out / "samples.jsonl", "a", encoding="utf-8") as f:
            for conv, reference, reply in zip(convs, references, replies):
                f.write(json.dumps({"step": trainer.step, "prompt": conv.messages[-2]["content"],
                                    "reference": reference, "reply": reply},
                                   ensure_ascii=False) + "\n")

    return after_eval
