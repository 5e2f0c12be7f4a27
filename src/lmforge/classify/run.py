"""`lmforge classify train | predict | eval`: sequence classifiers (binary, multi-class, multi-label) and BIO token
taggers on the one Trainer, from an lmforge decoder or a BERT-family encoder.

A run directory holds what every training run's does (config.yaml, metrics.jsonl, loss.png, best/, last/) plus
`labels.json`, `data.json` (examples, truncation, class counts), `rejects.jsonl`, and after training `metrics.json`
(the best checkpoint on the validation split: overall, per class, confusion matrix) and `confusion.png`
(sequence task). best/ and last/ are HF `*ForSequenceClassification` / `*ForTokenClassification` directories with
the tokenizer; best/config.json also carries the softmax temperature fitted on the validation split
(`lmforge_task.temperature`), which `predict` applies so that its probabilities are calibrated.
"""

from __future__ import annotations

import json
import math
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from lmforge.config import ConfigError
from lmforge.data.sources import encoding_field, on_error_field
from lmforge.train.config import TrainConfig

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
                "1.5x slower and was not more accurate on the built-in set, see docs/benchmarks.md)",
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
    encoding: str = encoding_field()
    errors: str = field(default="strict", metadata={"choices": ["strict", "replace"]})
    on_error: str = on_error_field()
    # pretraining's data settings: not used here (no flags)
    dataset: str = field(default="sliding", metadata={"cli": False})
    allow_mid_doc: bool = field(default=False, metadata={"cli": False})
    model_overrides: dict = field(default_factory=dict, metadata={"cli": False})
    moe_aux_weight: float = field(default=0.01, metadata={"cli": False})
    # the loop's settings, with classification defaults (BERT fine-tuning's usual ones)
    max_length: int = field(default=256, metadata={"help": "tokens per example (longer ones are cut, and counted)",
                                                   "check": (lambda v: v > 0, "> 0")})
    batch_size: int = field(default=16, metadata={"help": "examples per optimizer step",
                                                  "check": (lambda v: v > 0, "> 0")})
    max_steps: int = field(default=0, metadata={"help": "optimizer steps (0: from --epochs)",
                                                "check": (lambda v: v >= 0, ">= 0")})
    lr: float = field(default=5e-5, metadata={"help": "peak learning rate (head or LoRA only: try 1e-3)",
                                              "check": (lambda v: v > 0, "> 0")})
    warmup_steps: int = field(default=0, metadata={"help": "linear warmup steps (0: 6% of the steps)"})
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
        "method", "pattern", "verbalizer")


def label_batches(ids: list[list[int]], labels: list, micro_batch_size: int, pad_id: int, seed: int = 0,
                  rank: int = 0, world: int = 1, multi_label_classes: int = 0):
    """The Trainer's train_data: shuffled epochs of right-padded (input_ids, attention_mask, labels) batches."""
    from lmforge.train.datasets import ShuffledBatches

    return ShuffledBatches(len(ids), micro_batch_size,
                           lambda members: collate(ids, labels, members, pad_id, multi_label_classes), seed, rank, world)


def collate(ids: list[list[int]], labels: list, members: list[int], pad_id: int, multi: int = 0) -> dict:
    import torch

    T = max(len(ids[i]) for i in members)
    x = torch.full((len(members), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(members), T), dtype=torch.long)
    token_task = labels and isinstance(labels[members[0]], list) and not multi
    y = torch.full((len(members), T), -100, dtype=torch.long) if token_task else None
    for r, i in enumerate(members):
        x[r, :len(ids[i])] = torch.tensor(ids[i], dtype=torch.long)
        mask[r, :len(ids[i])] = 1
        if token_task:
            y[r, :len(labels[i])] = torch.tensor(labels[i], dtype=torch.long)
    if not token_task:
        y = torch.tensor([labels[i] for i in members], dtype=torch.float if multi else torch.long)
    return {"input_ids": x, "attention_mask": mask, "labels": y}


def eval_batches(ids: list[list[int]], labels: list, batch_size: int, pad_id: int, multi: int = 0) -> list[dict]:
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths together: less padding
    return [collate(ids, labels, order[s:s + batch_size], pad_id, multi) for s in range(0, len(order), batch_size)]


def stratified_split(keys: list[str], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, held-out) indices with each label's share held out (at least one of every label seen twice)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    by_key: dict[str, list[int]] = {}
    for i, k in enumerate(keys):
        by_key.setdefault(k, []).append(i)
    held = []
    for k in sorted(by_key):
        members = by_key[k]
        rng.shuffle(members)
        n = round(len(members) * fraction)
        if n == 0 and len(members) >= 2 and fraction > 0:
            n = 1
        held += members[:n]
    held_set = set(held)
    return [i for i in range(len(keys)) if i not in held_set], sorted(held)


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


def _read(cfg: ClassifyConfig, path: str, rejects, need_labels: bool = True):
    from lmforge.classify.builtin import BUILTIN, python_docs_topics
    from lmforge.classify.data import Labelled, read_labelled, read_tagged

    if path == BUILTIN:
        if cfg.task != "sequence":
            raise ConfigError(f"data: {BUILTIN} is a sequence-classification set")
        return [Labelled(r["text"], [r["label"]], f"{BUILTIN}:{i + 1}") for i, r in enumerate(python_docs_topics())]
    files = _files(path)
    if cfg.task == "token":
        return read_tagged(files, cfg.tokens_field, cfg.tags_field, rejects, cfg.encoding, need_labels)
    return read_labelled(files, cfg.text_field, cfg.label_field, cfg.multi_label, cfg.label_sep, rejects,
                         cfg.encoding, cfg.errors, need_labels)


def _files(path: str) -> list[str]:
    from lmforge.data.hf_datasets import is_dataset_source
    from lmforge.data.sources import CorpusError

    if is_dataset_source(path):  # a datasets directory (or DIR#SPLIT, hf:REPO) is one input
        return [path]
    p = Path(path)
    if p.is_dir():
        files = sorted(str(f) for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
        if not files:
            raise CorpusError(f"{p}: no files in it")
        return files
    if not p.exists():
        from lmforge.hub import missing_path_error

        raise CorpusError(missing_path_error(p, "data file"))
    return [str(p)]


def fit_temperature(logits, labels) -> float:
    """The softmax temperature T minimising the held-out negative log-likelihood of logits / T (Guo et al. 2017,
    temperature scaling): a single scalar, so the predicted class never changes. 1.0 where nothing can be fitted."""
    import torch
    import torch.nn.functional as F

    if len(logits) < 2:
        return 1.0
    log_t = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=100)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.exp())
    return t if math.isfinite(t) and 0.01 < t < 100 else 1.0


def expected_calibration_error(probs, labels, bins: int = 10) -> float:
    """ECE: the mean |accuracy - confidence| over equal-width confidence bins, weighted by their sizes."""
    import torch

    conf, pred = probs.max(-1)
    correct = (pred == labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            ece += inside.float().mean().item() * abs(correct[inside].mean().item() - conf[inside].mean().item())
    return ece


def run_classify(cfg: ClassifyConfig) -> dict:
    """Train a classifier; returns the Trainer's summary plus data figures and the best checkpoint's metrics."""
    import os

    from lmforge.classify.data import encode_tagged, encode_texts
    from lmforge.data.sources import RejectLog
    from lmforge.files import write_json
    from lmforge.model.heads import build_classifier, is_encoder_dir
    from lmforge.model.hf import resolve_model_dir
    from lmforge.peft import parameter_counts
    from lmforge.tokenizer import load_tokenizer
    from lmforge.train.objectives import SequenceClassification, TokenClassification
    from lmforge.train.trainer import Trainer

    if not cfg.model:
        raise ConfigError("model: give the backbone (--model DIR)")
    if not cfg.data:
        raise ConfigError("data: give the labelled data (--data FILE)")
    if cfg.method == "cloze":
        from lmforge.classify.cloze import run_cloze

        return run_cloze(cfg)
    if cfg.task == "regression":
        from lmforge.classify.regression import run_regression

        return run_regression(cfg)
    if cfg.task == "token" and cfg.multi_label:
        raise ConfigError("multi_label: the token task has one tag per token")
    model_dir = resolve_model_dir(cfg.model)
    if not (model_dir / "tokenizer.json").exists():
        raise ConfigError(f"model: {model_dir} has no tokenizer.json")
    encoder = is_encoder_dir(model_dir)
    tokenizer = load_tokenizer(model_dir, backend="hf") if encoder else load_tokenizer(model_dir)
    rejects = RejectLog() if cfg.on_error == "skip" else None
    records = _read(cfg, cfg.data, rejects)
    token_task = cfg.task == "token"

    # the label set, and the split
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
    index = {label: i for i, label in enumerate(labels)}
    if cfg.val_data:
        train_recs, val_recs = records, _read(cfg, cfg.val_data, rejects)
    else:
        keys = [("|".join(sorted(set(r.tags) - {"O"})) if token_task else "|".join(r.labels)) for r in records]
        tr, va = stratified_split(keys, cfg.val_fraction, cfg.seed)
        train_recs, val_recs = [records[i] for i in tr], [records[i] for i in va]

    def encode(recs):
        if token_task:
            return encode_tagged(tokenizer, recs, index, cfg.max_length)
        from lmforge.classify.data import Encoded

        ids, cut = encode_texts(tokenizer, [r.text for r in recs], cfg.max_length)
        if cfg.multi_label:
            ys = [[1.0 if label in r.labels else 0.0 for label in labels] for r in recs]
        else:
            ys = [index[r.labels[0]] for r in recs]
        return Encoded(ids, ys, truncated=cut)

    train, val = encode(train_recs), encode(val_recs) if val_recs else None
    if not val_recs:
        raise ConfigError("val_fraction: 0 leaves nothing to validate on: give --val-data FILE or a val_fraction > 0")
    if token_task:
        counts = [sum(1 for row in train.labels for y in row if y == i) for i in range(len(labels))]
    elif cfg.multi_label:
        counts = [int(sum(row[i] for row in train.labels)) for i in range(len(labels))]
    else:
        counts = [sum(1 for y in train.labels if y == i) for i in range(len(labels))]
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    steps_per_epoch = max(1, len(train.ids) // cfg.batch_size)
    if not cfg.max_steps:
        cfg.max_steps = max(1, math.ceil(cfg.epochs * steps_per_epoch))
    if not cfg.eval_every:
        cfg.eval_every = min(steps_per_epoch, cfg.max_steps)
    if not cfg.warmup_steps:
        cfg.warmup_steps = round(0.06 * cfg.max_steps)

    import torch

    torch.manual_seed(cfg.seed)  # the head's initial weights: the same for the same seed
    pad_id = _pad_id(tokenizer, model_dir)
    model = build_classifier(model_dir, labels, cfg.task, cfg.pooling or None, cfg.multi_label, pad_id, cfg.dropout)
    _prepare(model, cfg)
    n_train = sum(len(row) for row in train.labels) if token_task else len(train.labels)
    weights = _class_weights(cfg, counts, n_train if not token_task else sum(counts))
    objective = TokenClassification(labels, weights) if token_task else SequenceClassification(cfg.multi_label, weights)
    objective.best_metric = cfg.best_metric
    objective.higher_is_better = cfg.best_metric != "val_loss"
    micro = cfg.micro_batch_size or cfg.batch_size // world
    multi = len(labels) if cfg.multi_label else 0
    batches = label_batches(train.ids, train.labels, micro, pad_id, cfg.seed, rank, world, multi)
    evals = eval_batches(val.ids, val.labels, max(micro, 16), pad_id, multi)
    trainer = Trainer(cfg, objective=objective, model=model, train_data=batches, eval_data=evals,
                      tokenizer_dir=model_dir)
    trainer.prepare_run_dir()
    out = Path(cfg.out)
    data_stats = {"train": len(train.ids), "val": len(val.ids), "labels": labels, "train_counts": dict(zip(labels, counts)),
                  "truncated": {"train": train.truncated, "val": val.truncated},
                  "rejected": len(rejects.items) if rejects else 0}
    if token_task:
        data_stats["words_past_max_length"] = {"train": train.lost_words, "val": val.lost_words}
    if trainer.is_main:
        write_json(out / "labels.json", {"task": cfg.task, "labels": labels, "multi_label": cfg.multi_label})
        write_json(out / "data.json", data_stats)
        if rejects is not None:
            rejects.write(out)
        pc = parameter_counts(model)
        print(f"classifier: {cfg.task} head on {model_dir} ({'encoder' if encoder else 'decoder'}, "
              f"{pc['total'] / 1e6:.2f} M parameters, {pc['trainable']:,} trainable); {len(labels)} labels; "
              f"{len(train.ids)} train / {len(val.ids)} validation examples; {cfg.max_steps} steps", file=sys.stderr)
        cut = train.truncated + val.truncated
        if cut:
            print(f"lmforge: {cut} example(s) are longer than max_length {cfg.max_length} and were cut"
                  + (f" ({train.lost_words + val.lost_words} words lost their tags)" if token_task else ""),
                  file=sys.stderr)
    summary = trainer.fit()
    summary["data"] = data_stats
    summary["parameters"] = parameter_counts(model)
    if trainer.is_main and (out / "best" / "config.json").exists():
        report = evaluate_dir(out / "best", cfg.val_data or None, cfg, records=val_recs, calibrate=True,
                              confusion_png=out / "confusion.png" if not token_task else None)
        write_json(out / "metrics.json", report)
        summary["best"] = report["overall"]
        write_json(out / "summary.json", {k: v for k, v in summary.items() if k != "hf_config"})
    return summary


# --- prediction and evaluation ----------------------------------------------------------------------------------

class Predictor:
    """A saved classifier and its tokenizer: `predict(records)` -> per-record labels and probabilities."""

    def __init__(self, directory: str | Path, batch_size: int = 32, max_length: int | None = None):
        from lmforge.model.heads import is_encoder_dir, load_classifier
        from lmforge.tokenizer import load_tokenizer

        self.dir = Path(directory)
        self.model = load_classifier(self.dir)
        self.tokenizer = load_tokenizer(self.dir, backend="hf") if is_encoder_dir(self.dir) else load_tokenizer(self.dir)
        raw = json.loads((self.dir / "config.json").read_text())
        self.temperature = float((raw.get("lmforge_task") or {}).get("temperature", 1.0))
        limit = self.model.backbone.cfg.max_seq_len
        self.max_length = min(max_length or limit, limit)
        self.batch_size = batch_size

    @property
    def labels(self) -> list[str]:
        return self.model.labels

    def logits(self, records) -> tuple:
        """(logits per record, kept word count per record for the token task) on the CPU."""
        import torch

        from lmforge.classify.data import encode_tagged, encode_texts

        token = self.model.task == "token"
        if token:
            enc = encode_tagged(self.tokenizer, records, {t: i for i, t in enumerate(self.labels)}, self.max_length)
            ids, first = enc.ids, enc.labels
        else:
            ids, _ = encode_texts(self.tokenizer, [r.text for r in records], self.max_length)
            first = [0] * len(ids)
        out = [None] * len(ids)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        with torch.no_grad():
            for s in range(0, len(order), self.batch_size):
                members = order[s:s + self.batch_size]
                batch = collate(ids, first, members, self.model.pad_token_id, 0 if token else 1)
                logits = self.model(batch["input_ids"], batch["attention_mask"]).float()
                for r, i in enumerate(members):
                    if token:  # the logits of each word's first piece; words past max_length: none
                        keep = torch.tensor([y != -100 for y in first[i]] + [False] * (logits.shape[1] - len(first[i])))
                        out[i] = logits[r][keep]
                    else:
                        out[i] = logits[r]
        return out

    def predict(self, records) -> list[dict]:
        import torch

        rows = []
        for rec, lg in zip(records, self.logits(records)):
            if self.model.task == "token":
                probs = torch.softmax(lg / self.temperature, -1)
                tags = [self.labels[i] for i in probs.argmax(-1).tolist()]
                tags += ["O"] * (len(rec.tokens) - len(tags))  # words past max_length
                rows.append({"tokens": rec.tokens, "tags": tags})
                continue
            scaled = lg / self.temperature
            probs = self.model.probabilities(scaled)
            row = {"text": rec.text, "probabilities": {k: round(float(p), 6) for k, p in zip(self.labels, probs)}}
            if self.model.multi_label:
                row["labels"] = [k for k, p in zip(self.labels, probs) if p > 0.5]
            else:
                row["label"] = self.labels[int(probs.argmax())]
            rows.append(row)
        return rows


def evaluate_dir(directory: str | Path, data: str | None, cfg: ClassifyConfig | None = None, records=None,
                 calibrate: bool = False, confusion_png: str | Path | None = None) -> dict:
    """Metrics of a saved classifier on labelled data: overall, per class (per entity type) and the confusion
    matrix; `calibrate=True` fits the softmax temperature on this data and writes it into the checkpoint."""
    import torch

    from lmforge.eval import metrics as M
    from lmforge.files import write_json

    p = Predictor(directory)
    token = p.model.task == "token"
    if records is None:
        cfg = cfg or ClassifyConfig(task=p.model.task, multi_label=p.model.multi_label)
        records = _read(cfg, data, None)
    logits = p.logits(records)
    labels = p.labels
    if token:
        gold = [r.tags for r in records]
        pred = [[labels[i] for i in lg.argmax(-1).tolist()] + ["O"] * (len(r.tokens) - len(lg))
                for r, lg in zip(records, logits)]
        default, strict = M.entity_scores(gold, pred), M.entity_scores(gold, pred, mode="strict")
        return {"task": "token", "examples": len(records),
                "overall": {"precision": default["micro"]["precision"], "recall": default["micro"]["recall"],
                            "f1": default["micro"]["f1"], "accuracy": default["accuracy"],
                            "strict_f1": strict["micro"]["f1"]},
                "per_type": default["per_type"], "macro": default["macro"], "weighted": default["weighted"],
                "strict": {k: strict[k] for k in ("micro", "macro", "per_type")}}
    unknown = sorted({x for r in records for x in r.labels} - set(labels))
    if unknown:
        raise ConfigError(f"{data}: labels {', '.join(unknown[:5])} are not among the model's ({', '.join(labels)})")
    stacked = torch.stack(logits)
    if p.model.multi_label:
        y = torch.tensor([[1.0 if k in r.labels else 0.0 for k in labels] for r in records])
        from lmforge.train.objectives import classification_metrics

        overall = {k.removeprefix("val_"): v for k, v in classification_metrics(stacked, y, True).items()}
        return {"task": "sequence", "multi_label": True, "examples": len(records), "overall": overall}
    y = torch.tensor([labels.index(r.labels[0]) for r in records])
    report = {"task": "sequence", "examples": len(records)}
    if calibrate:
        import torch.nn.functional as F

        t = fit_temperature(stacked, y)
        nll_before, nll_after = F.cross_entropy(stacked, y).item(), F.cross_entropy(stacked / t, y).item()
        if nll_after > nll_before:  # the fit did not converge: keep the raw softmax
            t, nll_after = 1.0, nll_before
        report["calibration"] = {
            "temperature": round(t, 4), "nll_before": round(nll_before, 4), "nll_after": round(nll_after, 4),
            "ece_before": round(expected_calibration_error(torch.softmax(stacked, -1), y), 4),
            "ece_after": round(expected_calibration_error(torch.softmax(stacked / t, -1), y), 4),
            "fitted_on": "the validation split"}
        config_path = Path(directory) / "config.json"
        raw = json.loads(config_path.read_text())
        raw.setdefault("lmforge_task", {})["temperature"] = round(t, 6)
        write_json(config_path, raw)
    from lmforge.train.objectives import classification_metrics

    overall = {k.removeprefix("val_"): v for k, v in classification_metrics(stacked, y).items()}
    pred = stacked.argmax(-1).numpy()
    gold = y.numpy()
    classes = list(range(len(labels)))
    per = M.precision_recall_f1(gold, pred, average=None, labels=classes)
    matrix, _ = M.confusion_matrix(gold, pred, labels=classes)
    report.update(overall=overall,
                  per_class={labels[i]: {"precision": per["precision"][i], "recall": per["recall"][i],
                                         "f1": per["f1"][i], "support": per["support"][i]} for i in classes},
                  confusion_matrix={"labels": labels, "matrix": matrix.tolist()})
    if confusion_png:
        from lmforge.eval.plots import plot_confusion

        report["confusion_png"] = str(plot_confusion(matrix, labels, confusion_png))
    return report
