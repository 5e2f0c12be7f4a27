"""`lmforge classify train | predict | eval`: sequence classifiers (binary, multi-class, multi-label) and BIO token
taggers on the one Trainer, from an lmforge decoder or a BERT-family encoder.

A run directory holds what every training run's does (config.yaml, metrics.jsonl, loss.png, best/, last/) plus
`labels.json`, `data.json` (examples, truncation, class counts), `rejects.jsonl`, and after training `metrics.json`
(the best checkpoint on the validation split: overall, per class, confusion matrix) and `confusion.png`
(sequence task). best/ and last/ are HF `*ForSequenceClassification` / `*ForTokenClassification` directories with
the tokenizer; best/config.json also carries the softmax temperature fitted on the validation split
(`lmforge_task.temperature`), which `predict` applies so that its probabilities are calibrated (classify/predict.py).
"""

from __future__ import annotations

import json
import math
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from lmforge.config import ConfigError, field_of
from lmforge.data.config import AugmentSettings
from lmforge.data.sources import encoding_field, on_error_field
from lmforge.train.config import TrainConfig

if TYPE_CHECKING:
    from lmforge.classify.data import Encoded
# classify/data.py is imported where it is used: `lmforge --help` builds this module's flags and needs none of it

TRAINS = ("all", "head", "last", "lora")


@dataclass
class ClassifyConfig(TrainConfig):
    """TrainConfig's fields (the loop's) with classification defaults, plus the data, labels and head."""

    data: str = field(default="", metadata={"help": "labelled data: csv/tsv/jsonl/json/parquet (sequence task), "
                                                    "CoNLL BIO files or token/tag JSONL (token task); a Hugging "
                                                    "Face datasets folder (save_to_disk, Arrow/Parquet), DIR#SPLIT"})
    out: str = field(default="runs/classify", metadata={"help": "run directory"})
    model: str = field(default="", metadata={"help": "the backbone: an lmforge / HF causal LM directory, or a "
                                                     "BERT-family encoder (a sentence-transformers dir too)"})
    task: str = field(default="sequence", metadata={"help": "sequence (a label per text), token (BIO tags) or "
                                                            "regression (real-valued targets)",
                                                    "choices": ["sequence", "token", "regression"]})
    text_field: str = field(default="text", metadata={"help": "sequence: the column holding the text"})
    label_field: str = field(default="label", metadata={"help": "sequence: the column holding the label(s)"})
    tokens_field: str = field(default="tokens", metadata={"help": "token, JSONL: the list of tokens"})
    tags_field: str = field(default="tags", metadata={"help": "token, JSONL: the list of tags (or ner_tags)"})
    multi_label: bool = field(default=False, metadata={"help": "several labels per text (a list, or split at "
                                                               "--label-sep); sigmoid outputs"})
    label_sep: str = field(default=",", metadata={"help": "multi-label CSV/TSV: the separator inside the label cell"})
    labels: list[str] = field(default_factory=list, metadata={"help": "the label set in order (default: sorted as "
                                                                      "found)"})
    class_weights: str = field(default="none", metadata={
        "help": "none, or balanced (n / (classes x count), scikit-learn's rule) against class imbalance",
        "choices": ["none", "balanced"]})
    val_data: str = field(default="", metadata={"help": "a separate validation file (then nothing is held out)"})
    val_fraction: float = field(default=0.1, metadata={"help": "share held out for validation, stratified by label",
                                                       "check": (lambda v: 0 <= v < 1, "in [0, 1)")})
    train: str = field(default="all", metadata={"help": "what trains: all, head (the head only), last (the last "
                                                        "--train-layers blocks and the head), lora (adapters and "
                                                        "the head)", "choices": list(TRAINS)})
    train_layers: int = field(default=2, metadata={"help": "train last: blocks that train, from the top"})
    pooling: str = field(default="", metadata={"help": "sequence: cls (BERT's pooler, the HF head) or mean for "
                                                       "encoders; decoders read the last real token"})
    dropout: float = field(default=0.1, metadata={"help": "dropout before the head"})
    backbone_dropout: float = field(default=0.0, metadata={
        "help": "encoders: dropout inside the layers while training (BERT's recipe is 0.1; on CPU it made training "
                "slower and was not more accurate on the built-in set, see docs/benchmarks.md)",
        "check": (lambda v: 0 <= v < 1, "in [0, 1)")})
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    epochs: float = field(default=3.0, metadata={"help": "passes over the training set (sets max_steps when that "
                                                         "is 0)", "check": (lambda v: v >= 0, ">= 0")})
    best_metric: str = field(default="val_f1", metadata={
        "help": "what picks best/ (and early stopping): val_f1 (macro; token task: entity micro F1), val_accuracy, "
                "val_f1_micro, val_roc_auc, or val_loss"})
    # cloze classification (lmforge.classify.cloze): PET on a masked LM
    method: str = field(default="head", metadata={
        "help": "head (a classification head) or cloze (PET: a --pattern with [MASK] filled by the MLM head, "
                "labels as --verbalizer words)", "choices": ["head", "cloze"]})
    pattern: str = field(default="", metadata={"help": "cloze: the text with {text} and one [MASK], e.g. "
                                                       "'{text} 总之很[MASK]。'"})
    verbalizer: str = field(default="", metadata={"help": "cloze: a word per label, e.g. pos:好,neg:差"})
    # regression (lmforge.classify.regression)
    target_fields: list[str] = field(default_factory=list, metadata={
        "help": "regression: the columns holding the targets (default: --label-field)"})
    text_pair_field: str = field(default="", metadata={"help": "regression: a second text column (STS pairs)"})
    target_scaling: str = field(default="none", metadata={
        "help": "regression: none, or standard (residuals divided by each target's std; an encoder's head starts "
                "at the means)", "choices": ["none", "standard"]})
    regression_loss: str = field(default="mse", metadata={"help": "regression: mse or huber",
                                                          "choices": ["mse", "huber"]})
    # data augmentation of the training split (lmforge.data.augment); validation is never augmented
    augment: list[str] = field(default_factory=list, metadata={
        "help": "augment the training texts (token task: sentences, entities kept whole) with these operations: "
                "synonym insert swap delete (EDA), char (typos), punct (AEDA), backtranslate paraphrase (written by "
                "--augment-model or --augment-endpoint; not for the token task); off when empty"})
    augment_per_record: int = field_of(AugmentSettings, "augment_per_record")
    augment_alpha: float = field_of(AugmentSettings, "augment_alpha")
    augment_synonyms: str = field_of(AugmentSettings, "augment_synonyms")
    augment_model: str = field_of(AugmentSettings, "augment_model")
    augment_endpoint: str = field_of(AugmentSettings, "augment_endpoint")
    augment_served_model: str = field_of(AugmentSettings, "augment_served_model")
    augment_pivot: str = field_of(AugmentSettings, "augment_pivot")
    augment_cache: str = field_of(AugmentSettings, "augment_cache")
    encoding: str = encoding_field()
    errors: str = field(default="strict", metadata={"choices": ["strict", "replace"]})
    on_error: str = on_error_field()
    # pretraining's data settings: not used here (no flags)
    dataset: str = field(default="sliding", metadata={"cli": False})
    allow_mid_doc: bool = field(default=False, metadata={"cli": False})
    model_overrides: dict = field(default_factory=dict, metadata={"cli": False})
    # MoE backbones: the checkpoint's router_aux_loss_coef, as finetune does (TrainConfig's rule)
    moe_aux_weight: float | None = field(default=None, metadata={"cli": False})
    # the loop's settings, with classification defaults (BERT fine-tuning's usual ones)
    max_length: int = field(default=256, metadata={"help": "tokens per example (longer ones are cut, and counted)",
                                                   "check": (lambda v: v > 0, "> 0")})
    batch_size: int = field(default=16, metadata={"help": "examples per optimizer step",
                                                  "check": (lambda v: v > 0, "> 0")})
    max_steps: int = field(default=0, metadata={"help": "optimizer steps (0: from --epochs)",
                                                "check": (lambda v: v >= 0, ">= 0")})
    lr: float = field(default=5e-5, metadata={"help": "peak learning rate (head or LoRA only: try 1e-3)",
                                              "check": (lambda v: v > 0, "> 0")})
    warmup_steps: int = field(default=0, metadata={"help": "linear warmup steps (0: 6 per cent of the steps)"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW decoupled weight decay (matrices only)"})
    beta2: float = 0.999
    min_lr_ratio: float = field(default=0.0, metadata={"help": "final learning rate as a fraction of lr"})
    schedule: str = field(default="linear", metadata={"choices": ["cosine", "linear", "wsd"]})
    eval_every: int = field(default=0, metadata={"help": "steps between evaluations (0: once per epoch)"})

    resume_extra: ClassVar[tuple[str, ...]] = (
        "task", "text_field", "label_field", "tokens_field", "tags_field", "multi_label", "label_sep", "labels",
        "class_weights", "val_data", "val_fraction", "train", "train_layers", "pooling", "dropout", "backbone_dropout",
        "lora_r",
        "lora_alpha", "lora_dropout", "epochs", "target_fields", "text_pair_field", "target_scaling", "regression_loss",
        "method", "pattern", "verbalizer", "augment", "augment_per_record", "augment_alpha", "augment_synonyms", "augment_model",
        "augment_endpoint", "augment_pivot")


def _pad_id(tokenizer, model_dir: Path) -> int:
    from lmforge.model.heads import is_encoder_dir

    if is_encoder_dir(model_dir):
        return json.loads((model_dir / "config.json").read_text()).get("pad_token_id") or 0
    for name in (getattr(tokenizer, "pad_token", None), getattr(tokenizer, "eos_token", None)):
        if name and name in tokenizer.special_tokens:
            return tokenizer.special_tokens[name]
    return 0


def _prepare(model, cfg: ClassifyConfig) -> None:
    """Freeze what does not train (cfg.train); set the encoder's internal dropout (cfg.backbone_dropout)."""
    backbone = model.backbone
    if model.encoder:
        backbone.dropout.p = cfg.backbone_dropout
        for layer in backbone.layers:
            layer.dropout.p = layer.attention_dropout = cfg.backbone_dropout
    if cfg.train == "all":
        for p in model.parameters():
            p.requires_grad_(True)
        if not model.encoder and backbone.lm_head is not None:
            backbone.lm_head.requires_grad_(False)
        return
    for p in backbone.parameters():
        p.requires_grad_(False)
    if cfg.train == "last":
        n = backbone.cfg.n_layers
        if not 0 < cfg.train_layers <= n:
            raise ConfigError(f"train_layers: {cfg.train_layers} is not in 1..{n} (the model's blocks)")
        for layer in backbone.layers[n - cfg.train_layers:]:
            layer.requires_grad_(True)
        if not model.encoder:
            backbone.norm.requires_grad_(True)
    elif cfg.train == "lora":
        if model.encoder:
            raise ConfigError("train: lora on an encoder is not supported yet; use --train all, last or head")
        from lmforge.peft.lora import LoraConfig, apply_lora

        apply_lora(backbone, LoraConfig(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout))


def _class_weights(cfg: ClassifyConfig, counts: list[int], n: int):
    import torch

    if cfg.class_weights == "none":
        return None
    if cfg.multi_label:  # positives against negatives per label
        return torch.tensor([(n - c) / max(c, 1) for c in counts], dtype=torch.float)
    k = sum(1 for c in counts if c)
    return torch.tensor([n / (k * c) if c else 0.0 for c in counts], dtype=torch.float)


def run_classify(cfg: ClassifyConfig) -> dict:
    """Train a classifier; returns the Trainer's summary plus data figures and the best checkpoint's metrics."""
    from lmforge.classify.data import augment_examples, read_examples, write_augmented
    from lmforge.classify.predict import evaluate_dir
    from lmforge.data.sources import RejectLog
    from lmforge.files import write_json
    from lmforge.model.hf import resolve_model_dir
    from lmforge.peft import parameter_counts

    _check(cfg)
    _fit_max_length(cfg, resolve_model_dir(cfg.model))
    if cfg.method == "cloze":  # a masked LM fills a pattern's [MASK] with a label word (PET)
        from lmforge.classify.cloze import run_cloze

        return run_cloze(cfg)
    if cfg.task == "regression":
        from lmforge.classify.regression import run_regression

        return run_regression(cfg)
    model_dir = resolve_model_dir(cfg.model)
    if not (model_dir / "tokenizer.json").exists():
        raise ConfigError(f"model: {model_dir} has no tokenizer.json")
    tokenizer = task_tokenizer(model_dir)
    rejects = RejectLog() if cfg.on_error == "skip" else None
    records = read_examples(cfg, cfg.data, rejects)
    labels = label_set(cfg, records)
    train_recs, val_recs = _split(cfg, records, rejects)
    if not val_recs:
        raise ConfigError("val_fraction: 0 leaves nothing to validate on: give --val-data FILE or a val_fraction > 0")
    augmented = augment_examples(cfg, train_recs) if cfg.augment else []
    train_recs = train_recs + augmented
    train, val = encode_examples(cfg, tokenizer, train_recs, labels), encode_examples(cfg, tokenizer, val_recs, labels)
    counts = class_counts(cfg, train.labels, len(labels))
    _fill_schedule(cfg, len(train.ids))
    trainer, model = _trainer(cfg, model_dir, tokenizer, labels, train, val, counts)
    trainer.prepare_run_dir()
    out = Path(cfg.out)
    data_stats = {"train": len(train.ids), "val": len(val.ids), "labels": labels, "train_counts": dict(zip(labels, counts)),
                  "truncated": {"train": train.truncated, "val": val.truncated},
                  "rejected": len(rejects.items) if rejects else 0}
    if cfg.augment:
        from lmforge.data.augment import augment_records

        data_stats["augmented"] = augment_records.stats  # new examples by operation, duplicates dropped
    if cfg.task == "token":
        data_stats["words_past_max_length"] = {"train": train.lost_words, "val": val.lost_words}
    if trainer.is_main:
        write_json(out / "labels.json", {"task": cfg.task, "labels": labels, "multi_label": cfg.multi_label})
        write_json(out / "data.json", data_stats)
        if rejects is not None:
            rejects.write(out)
        if augmented:
            write_augmented(out / "augmented.jsonl", augmented)
        _announce(cfg, model_dir, model, labels, train, val)
    summary = trainer.fit()
    summary["data"] = data_stats
    summary["parameters"] = parameter_counts(model)
    if getattr(model.cfg, "n_experts", 0):
        summary["moe_aux_weight"] = trainer.moe_aux_weight
    if trainer.is_main and (out / "best" / "config.json").exists():
        report = evaluate_dir(out / "best", cfg.val_data or None, cfg, records=val_recs, calibrate=True,
                              confusion_png=out / "confusion.png" if cfg.task != "token" else None)
        write_json(out / "metrics.json", report)
        summary["best"] = report["overall"]
        write_json(out / "summary.json", {k: v for k, v in summary.items() if k != "hf_config"})
    return summary


def _check(cfg: ClassifyConfig) -> None:
    if not cfg.model:
        raise ConfigError("model: give the backbone (--model DIR)")
    if not cfg.data:
        raise ConfigError("data: give the labelled data (--data FILE)")
    if cfg.task == "token" and cfg.multi_label:
        raise ConfigError("multi_label: the token task has one tag per token")
    if cfg.augment:
        from lmforge.data.augment import OPERATIONS

        bad = [op for op in cfg.augment if op not in OPERATIONS]
        if bad:
            raise ConfigError(f"augment: unknown operation '{bad[0]}' (known: {', '.join(OPERATIONS)})")
        if cfg.method == "cloze" or cfg.task == "regression":
            raise ConfigError(f"augment: not for {'cloze classification' if cfg.method == 'cloze' else 'regression'} "
                              "in this version (text classification and tagging only)")
        from lmforge.data.augment import MODEL_OPS
        from lmforge.synth.augment import check_augment_options

        model_ops = [op for op in cfg.augment if op in MODEL_OPS]
        if model_ops and cfg.task == "token":
            raise ConfigError(f"augment: {model_ops[0]} rewrites whole sentences, so entity spans cannot be kept: "
                              "the token task takes synonym insert swap delete char punct")
        check_augment_options(cfg)


def _fit_max_length(cfg: ClassifyConfig, model_dir: Path) -> None:
    """max_length cut to the backbone's positions (its config.json's max_position_embeddings or n_positions), as
    `classify predict` cuts: a longer example would index past the position table. Says so when it cuts."""
    from lmforge.model.hf import read_config

    hf = read_config(model_dir)  # a missing or broken config.json: its one-line error, naming the file
    limit = hf.get("max_position_embeddings") or hf.get("n_positions")
    if isinstance(limit, int) and 0 < limit < cfg.max_length:
        print(f"lmforge: max_length {cfg.max_length} is past {model_dir}'s {limit} positions: examples are cut to "
              f"{limit} tokens", file=sys.stderr)
        cfg.max_length = limit


def task_tokenizer(model_dir: Path):
    """The backbone's tokenizer: transformers' own for an encoder (WordPiece), lmforge's for a decoder."""
    from lmforge.model.heads import is_encoder_dir
    from lmforge.tokenizer import load_tokenizer

    return load_tokenizer(model_dir, backend="hf") if is_encoder_dir(model_dir) else load_tokenizer(model_dir)


def label_set(cfg: ClassifyConfig, records: list) -> list[str]:
    """The classes in order: --labels, else every label (token task: every B- and I- tag of each type, and O) found,
    sorted."""
    token_task = cfg.task == "token"
    found = Counter(t for r in records for t in (r.tags if token_task else r.labels))
    if token_task:  # every type's B- and I- (an I- seen only in validation data still has a class)
        found.update({f"{p}-{t[2:]}": 0 for t in list(found) if t != "O" for p in "BI"})
        found.update({"O": 0})
    labels = list(cfg.labels) or sorted(found)
    unknown = sorted(set(found) - set(labels))
    if unknown:
        raise ConfigError(f"labels: the data has {', '.join(unknown[:5])}, which --labels does not list")
    if len(labels) < 2 and not cfg.multi_label:
        raise ConfigError(f"{cfg.data}: only one label ({labels[0] if labels else 'none'}); a classifier needs two")
    return labels


def _split(cfg: ClassifyConfig, records: list, rejects) -> tuple[list, list]:
    """(training, validation) records: --val-data, or a split stratified by label (token task: by entity types)."""
    from lmforge.classify.data import read_examples, stratified_split

    if cfg.val_data:
        return records, read_examples(cfg, cfg.val_data, rejects)
    token_task = cfg.task == "token"
    keys = [("|".join(sorted(set(r.tags) - {"O"})) if token_task else "|".join(r.labels)) for r in records]
    tr, va = stratified_split(keys, cfg.val_fraction, cfg.seed)
    return [records[i] for i in tr], [records[i] for i in va]


def encode_examples(cfg: ClassifyConfig, tokenizer, records: list, labels: list[str]) -> Encoded:
    """Token ids and targets: a class index per text, a 0/1 row per text (multi-label) or a tag index per word's
    first piece (token task)."""
    from lmforge.classify.data import Encoded, encode_tagged, encode_texts

    index = {label: i for i, label in enumerate(labels)}
    if cfg.task == "token":
        return encode_tagged(tokenizer, records, index, cfg.max_length)
    ids, cut = encode_texts(tokenizer, [r.text for r in records], cfg.max_length)
    if cfg.multi_label:
        ys = [[1.0 if label in r.labels else 0.0 for label in labels] for r in records]
    else:
        ys = [index[r.labels[0]] for r in records]
    return Encoded(ids, ys, truncated=cut)


def class_counts(cfg: ClassifyConfig, targets: list, n_labels: int) -> list[int]:
    """Examples (token task: words; multi-label: positives) of each class among the encoded targets."""
    if cfg.task == "token":
        return [sum(1 for row in targets for y in row if y == i) for i in range(n_labels)]
    if cfg.multi_label:
        return [int(sum(row[i] for row in targets)) for i in range(n_labels)]
    return [sum(1 for y in targets if y == i) for i in range(n_labels)]


def _fill_schedule(cfg: ClassifyConfig, n_train: int) -> None:
    """max_steps from epochs, eval_every once per epoch, warmup 6% of the steps: where the config leaves them 0."""
    steps_per_epoch = max(1, n_train // cfg.batch_size)
    if not cfg.max_steps:
        cfg.max_steps = max(1, math.ceil(cfg.epochs * steps_per_epoch))
    if not cfg.eval_every:
        cfg.eval_every = min(steps_per_epoch, cfg.max_steps)
    if not cfg.warmup_steps:
        cfg.warmup_steps = round(0.06 * cfg.max_steps)


def _trainer(cfg: ClassifyConfig, model_dir: Path, tokenizer, labels: list[str], train: Encoded, val: Encoded,
             counts: list[int]):
    """(the Trainer, the classifier) for the task: the head on the backbone, what trains, the objective and the
    batches."""
    import os

    import torch

    from lmforge.classify.data import eval_batches, label_batches
    from lmforge.model.heads import build_classifier
    from lmforge.train.objectives import SequenceClassification, TokenClassification
    from lmforge.train.trainer import Trainer

    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    token_task = cfg.task == "token"
    torch.manual_seed(cfg.seed)  # the head's initial weights: the same for the same seed
    pad_id = _pad_id(tokenizer, model_dir)
    model = build_classifier(model_dir, labels, cfg.task, cfg.pooling or None, cfg.multi_label, pad_id, cfg.dropout)
    _prepare(model, cfg)
    n_train = sum(counts) if token_task else len(train.labels)
    weights = _class_weights(cfg, counts, n_train)
    objective = TokenClassification(labels, weights) if token_task else SequenceClassification(cfg.multi_label, weights)
    objective.best_metric = cfg.best_metric
    objective.higher_is_better = cfg.best_metric != "val_loss"
    micro = cfg.micro_batch_size or cfg.batch_size // world
    multi = len(labels) if cfg.multi_label else 0
    batches = label_batches(train.ids, train.labels, micro, pad_id, cfg.seed, rank, world, multi)
    evals = eval_batches(val.ids, val.labels, max(micro, 16), pad_id, multi)
    trainer = Trainer(cfg, objective=objective, model=model, train_data=batches, eval_data=evals,
                      tokenizer_dir=model_dir)
    return trainer, model


def _announce(cfg: ClassifyConfig, model_dir: Path, model, labels: list[str], train: Encoded, val: Encoded) -> None:
    from lmforge.peft import parameter_counts

    pc = parameter_counts(model)
    print(f"classifier: {cfg.task} head on {model_dir} ({'encoder' if model.encoder else 'decoder'}, "
          f"{pc['total'] / 1e6:.2f} M parameters, {pc['trainable']:,} trainable); {len(labels)} labels; "
          f"{len(train.ids)} train / {len(val.ids)} validation examples; {cfg.max_steps} steps", file=sys.stderr)
    cut = train.truncated + val.truncated
    if cut:
        print(f"lmforge: {cut} example(s) are longer than max_length {cfg.max_length} and were cut"
              + (f" ({train.lost_words + val.lost_words} words lost their tags)" if cfg.task == "token" else ""),
              file=sys.stderr)
