"""Cloze classification (PET, Schick & Schütze 2021): a pattern puts the text and a [MASK] into one sentence, and a
BERT-family masked language model fills the mask; each label is a word (the verbalizer), and the label's score is
the MLM head's logit for its word at the mask. No new head is learned: the pre-trained MLM head already knows which
words fit, which is why this works with few examples.

  lmforge classify train --method cloze --model BERT_MLM_DIR --data train.jsonl \
      --pattern "{text} 总之很[MASK]。" --verbalizer pos:好,neg:差

The loss is cross entropy over the verbalizer words' logits (PET's L_CE); the whole encoder and the MLM head train.
A checkpoint is a `BertForMaskedLM` directory (transformers loads it; its logits at the mask are lmforge's) with the
pattern and verbalizer in config.json (`lmforge_task`). Each verbalizer word must be one token of the vocabulary.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import ConfigError

MASK = "[MASK]"


def parse_verbalizer(spec: str) -> dict[str, str]:
    """"pos:好,neg:差" -> {"pos": "好", "neg": "差"} (label order as given)."""
    out: dict[str, str] = {}
    for item in [p for p in spec.split(",") if p.strip()]:
        label, sep, word = item.partition(":")
        if not sep or not label.strip() or not word.strip():
            raise ConfigError(f"verbalizer: {item!r} is not LABEL:WORD (e.g. pos:好,neg:差)")
        out[label.strip()] = word.strip()
    if len(out) < 2:
        raise ConfigError("verbalizer: give a word for each of at least two labels (pos:好,neg:差)")
    return out


class ClozeModel(nn.Module):
    """A BERT encoder and its MLM head, scoring the verbalizer words at the [MASK]: forward -> (B, labels)."""

    def __init__(self, encoder, head: dict[str, torch.Tensor], labels: list[str], word_ids: list[int], mask_id: int,
                 pattern: str, verbalizer: dict[str, str]):
        super().__init__()
        d = encoder.cfg.d_model
        self.backbone, self.labels, self.mask_id = encoder, list(labels), mask_id
        self.pattern, self.verbalizer = pattern, dict(verbalizer)
        self.register_buffer("word_ids", torch.tensor(word_ids, dtype=torch.long), persistent=False)
        self.dense = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d, eps=encoder.cfg.norm_eps)
        self.bias = nn.Parameter(torch.zeros(encoder.cfg.vocab_size))
        with torch.no_grad():
            self.dense.weight.copy_(head["cls.predictions.transform.dense.weight"])
            self.dense.bias.copy_(head["cls.predictions.transform.dense.bias"])
            self.norm.weight.copy_(head["cls.predictions.transform.LayerNorm.weight"])
            self.norm.bias.copy_(head["cls.predictions.transform.LayerNorm.bias"])
            self.bias.copy_(head.get("cls.predictions.bias", head.get("cls.predictions.decoder.bias")))

    # what classify predict / eval read of a classifier (classify/predict.py Predictor): one label per text
    task, multi_label = "sequence", False

    @property
    def pad_token_id(self) -> int:
        return self.backbone.cfg.pad_token_id

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits, -1)

    @property
    def cfg(self):
        return self.backbone.cfg

    @property
    def layers(self):
        return self.backbone.layers

    def aux_loss(self) -> torch.Tensor:
        return torch.zeros(())

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_) -> torch.Tensor:
        h = self.backbone(input_ids, attention_mask=attention_mask)
        at = (input_ids == self.mask_id).long().argmax(1)  # the pattern's one [MASK]
        x = self.norm(F.gelu(self.dense(h[torch.arange(len(h), device=h.device), at])))
        # the decoder is tied to the word embeddings (BERT): only the verbalizer words' rows are needed
        return x @ self.backbone.embed.weight[self.word_ids].T + self.bias[self.word_ids]

    # --- HF BertForMaskedLM directories ---------------------------------------------------------------------------
    def hf_architecture(self) -> str:
        return "BertForMaskedLM"

    def hf_config(self) -> dict:
        from lmforge.model.heads import encoder_config_to_hf

        return {**encoder_config_to_hf(self.backbone.cfg), "architectures": ["BertForMaskedLM"],
                "lmforge_task": {"task": "cloze", "pattern": self.pattern, "verbalizer": self.verbalizer,
                                 "labels": self.labels}}

    def hf_state(self) -> dict[str, torch.Tensor]:
        from lmforge.model.encoder import encoder_hf_tensors

        out = encoder_hf_tensors(self.backbone, prefix="bert.")
        out.update({"cls.predictions.transform.dense.weight": self.dense.weight,
                    "cls.predictions.transform.dense.bias": self.dense.bias,
                    "cls.predictions.transform.LayerNorm.weight": self.norm.weight,
                    "cls.predictions.transform.LayerNorm.bias": self.norm.bias, "cls.predictions.bias": self.bias})
        return {k: v.detach().float().contiguous().cpu() for k, v in out.items()}

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        from lmforge.files import StagedDirectory, save_tensors, write_json

        with StagedDirectory(directory) as stage:
            save_tensors(self.hf_state(), stage.path("model.safetensors"), metadata={"format": "pt"})
            write_json(stage.path("config.json"), self.hf_config())

    def load_state_from(self, directory: str | os.PathLike) -> None:
        other = load_cloze(directory)
        self.load_state_dict(other.state_dict())


def _special_id(tokenizer, token: str, where) -> int:
    tid = tokenizer.tok.token_to_id(token) if hasattr(tokenizer, "tok") else None
    if tid is None:
        raise ConfigError(f"{where}: the tokenizer has no {token} token (cloze needs a BERT-family MLM)")
    return tid


def build_cloze(directory: str | os.PathLike, pattern: str, verbalizer: dict[str, str]) -> tuple[ClozeModel, object]:
    """The encoder and MLM head of a BertForMaskedLM-style directory, with its tokenizer."""
    from lmforge.model.encoder import load_hf_encoder
    from lmforge.model.heads import is_encoder_dir
    from lmforge.model.hf import resolve_model_dir
    from lmforge.tokenizer import load_tokenizer

    d = resolve_model_dir(directory)
    if not is_encoder_dir(d):
        raise ConfigError(f"model: {d} is not a BERT-family encoder; cloze classification needs a masked LM")
    if pattern.count(MASK) != 1 or "{text}" not in pattern:
        raise ConfigError(f"pattern: put {{text}} and one {MASK} in it, e.g. '{{text}} 总之很{MASK}。'")
    tensors = _tensors(d)
    if "cls.predictions.transform.dense.weight" not in tensors:
        raise ConfigError(f"model: {d} has no masked-LM head (cls.predictions.*): a sentence-embedding model (such "
                          "as all-MiniLM-L6-v2) cannot fill a [MASK]; use a BertForMaskedLM checkpoint")
    tokenizer = load_tokenizer(d, backend="hf")
    word_ids = []
    for label, word in verbalizer.items():
        ids = tokenizer.tok.encode(word, add_special_tokens=False).ids
        if len(ids) != 1:
            raise ConfigError(f"verbalizer: {label}:{word} is {len(ids)} tokens of this vocabulary; each label's word "
                              "must be one token")
        if ids[0] == tokenizer.tok.token_to_id("[UNK]"):  # scoring [UNK] would give every such label one logit
            raise ConfigError(f"verbalizer: {label}:{word} is not in this vocabulary (it reads as [UNK]); choose a "
                              "word the model knows")
        if ids[0] in word_ids:
            other = list(verbalizer)[word_ids.index(ids[0])]
            raise ConfigError(f"verbalizer: {label} and {other} have the same word; give each label its own")
        word_ids.append(ids[0])
    encoder = load_hf_encoder(d).train()
    model = ClozeModel(encoder, tensors, list(verbalizer), word_ids, _special_id(tokenizer, MASK, d), pattern,
                       verbalizer)
    return model, tokenizer


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    from lmforge.model.hf import read_state_dict

    return read_state_dict(d)


def load_cloze(directory: str | os.PathLike) -> ClozeModel:
    """A directory this module saved, as a ClozeModel in eval mode."""
    raw = json.loads((Path(directory) / "config.json").read_text(encoding="utf-8"))
    meta = raw.get("lmforge_task") or {}
    if meta.get("task") != "cloze":
        raise ConfigError(f"{directory}: not a cloze classifier (train one with --method cloze)")
    model, _ = build_cloze(directory, meta["pattern"], meta["verbalizer"])
    return model.eval()


def encode_cloze(tokenizer, texts: list[str], pattern: str, max_length: int) -> tuple[list[list[int]], int]:
    """[CLS] pattern-with-text [SEP] ids with the tokenizer's [MASK] where the pattern has it (the text itself is
    never read as control tokens; a text too long is cut so that the rest of the pattern fits), and how many were
    cut."""
    cls_id, sep_id = _special_id(tokenizer, "[CLS]", "tokenizer"), _special_id(tokenizer, "[SEP]", "tokenizer")
    mask_id = _special_id(tokenizer, MASK, "tokenizer")
    before, after = pattern.split(MASK)
    head, _, tail = before.partition("{text}")
    if "{text}" not in before:  # the text after the mask
        head, tail, after = before, "", after
    out, cut = [], 0

    def enc(s: str) -> list[int]:
        return tokenizer.tok.encode(s, add_special_tokens=False).ids if s else []

    for text in texts:
        if "{text}" in before:
            a, t, b, c = enc(head), enc(text), enc(tail), enc(after)
            room = max_length - 3 - len(a) - len(b) - len(c)
            cut += len(t) > room
            ids = [cls_id] + a + t[:max(room, 0)] + b + [mask_id] + c + [sep_id]
        else:
            pre, _, post = after.partition("{text}")
            a, p, t, c = enc(head), enc(pre), enc(text), enc(post)
            room = max_length - 3 - len(a) - len(p) - len(c)
            cut += len(t) > room
            ids = [cls_id] + a + [mask_id] + p + t[:max(room, 0)] + c + [sep_id]
        out.append(ids)
    return out, cut


def run_cloze(cfg) -> dict:
    """`classify train --method cloze`: PET on the one Trainer."""
    from lmforge.classify.data import data_files, eval_batches, label_batches, read_labelled, stratified_split
    from lmforge.data.sources import RejectLog
    from lmforge.files import write_json
    from lmforge.train.objectives import SequenceClassification
    from lmforge.train.trainer import Trainer

    if cfg.task != "sequence" or cfg.multi_label:
        raise ConfigError("method cloze: one label per text (--task sequence, no --multi-label)")
    verbalizer = parse_verbalizer(cfg.verbalizer)
    torch.manual_seed(cfg.seed)
    model, tokenizer = build_cloze(cfg.model, cfg.pattern, verbalizer)
    rejects = RejectLog() if cfg.on_error == "skip" else None

    def read(path):
        return read_labelled(data_files(path), cfg.text_field, cfg.label_field, False, cfg.label_sep, rejects,
                             cfg.encoding, cfg.errors)

    records = read(cfg.data)
    labels = list(verbalizer)
    unknown = sorted({r.labels[0] for r in records} - set(labels))
    if unknown:
        raise ConfigError(f"verbalizer: the data has label {unknown[0]!r}, which --verbalizer does not name")
    if cfg.val_data:
        train_recs, val_recs = records, read(cfg.val_data)
    else:
        tr, va = stratified_split([r.labels[0] for r in records], cfg.val_fraction, cfg.seed)
        train_recs, val_recs = [records[i] for i in tr], [records[i] for i in va]
    if not val_recs:
        raise ConfigError("val_fraction: 0 leaves nothing to validate on: give --val-data FILE or a val_fraction > 0")
    index = {label: i for i, label in enumerate(labels)}
    ids_tr, cut_tr = encode_cloze(tokenizer, [r.text for r in train_recs], cfg.pattern, cfg.max_length)
    ids_va, cut_va = encode_cloze(tokenizer, [r.text for r in val_recs], cfg.pattern, cfg.max_length)
    y_tr, y_va = [index[r.labels[0]] for r in train_recs], [index[r.labels[0]] for r in val_recs]
    steps_per_epoch = max(1, len(ids_tr) // cfg.batch_size)
    if not cfg.max_steps:
        cfg.max_steps = max(1, math.ceil(cfg.epochs * steps_per_epoch))
    if not cfg.eval_every:
        cfg.eval_every = min(steps_per_epoch, cfg.max_steps)
    if not cfg.warmup_steps:
        cfg.warmup_steps = round(0.06 * cfg.max_steps)
    pad_id = model.cfg.pad_token_id
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    micro = cfg.micro_batch_size or cfg.batch_size // world
    objective = SequenceClassification()
    objective.best_metric = cfg.best_metric
    objective.higher_is_better = cfg.best_metric != "val_loss"
    trainer = Trainer(cfg, objective=objective, model=model, train_data=label_batches(ids_tr, y_tr, micro, pad_id,
                                                                                      cfg.seed, rank, world),
                      eval_data=eval_batches(ids_va, y_va, max(micro, 16), pad_id), tokenizer_dir=cfg.model)
    trainer.prepare_run_dir()
    out = Path(cfg.out)
    data_stats = {"train": len(ids_tr), "val": len(ids_va), "labels": labels, "verbalizer": verbalizer,
                  "truncated": {"train": cut_tr, "val": cut_va}}
    if trainer.is_main:
        write_json(out / "labels.json", {"task": "cloze", "labels": labels, "verbalizer": verbalizer,
                                         "pattern": cfg.pattern})
        write_json(out / "data.json", data_stats)
        print(f"cloze classification (PET): pattern {cfg.pattern!r}, verbalizer {verbalizer}; {len(ids_tr)} train / "
              f"{len(ids_va)} validation examples; {cfg.max_steps} steps", file=sys.stderr)
    summary = trainer.fit()
    summary["data"] = data_stats
    if trainer.is_main:
        if (out / "best" / "config.json").exists():  # the best checkpoint on the validation split, as a head's run
            from lmforge.classify.predict import evaluate_dir

            report = evaluate_dir(out / "best", None, records=val_recs, calibrate=True,
                                  confusion_png=out / "confusion.png")
            write_json(out / "metrics.json", report)
            summary["best"] = report["overall"]
        write_json(out / "summary.json", {k: v for k, v in summary.items() if k != "hf_config"})
    return summary
