"""Regression heads (`lmforge classify train --task regression`): one or several real-valued targets per text (or
per pair of texts, STS-style), on the one Trainer.

The head is the classifier's linear head with one output per target, saved as `*ForSequenceClassification` with
`problem_type: "regression"` and the target names as its labels: transformers loads it and its logits are the
predictions, in the targets' own units. The loss is MSE (or Huber, `--regression-loss huber`); with
`--target-scaling standard` each target's residual is divided by the target's training standard deviation (so
targets on different scales weigh alike) and a head with a bias (encoders') starts at the targets' means. Metrics
per evaluation: MSE, RMSE, MAE (scikit-learn's), Pearson and Spearman (scipy's), averaged over the targets; the
best checkpoint is the one with the lowest MSE unless `--best-metric val_spearman` (or val_pearson, val_mae ...).

Pairs: `--text-pair-field sentence2` gives each record a second text. An encoder reads the pair as its tokenizer
encodes pairs (`[CLS] a [SEP] b [SEP]`), with token type 0 throughout (lmforge's encoder has no segment-B
embeddings); a decoder reads the two texts joined by a line break.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from lmforge.config import ConfigError
from lmforge.data.sources import CorpusError, OnBad, iter_records

REGRESSION_METRICS = {"val_mse": False, "val_rmse": False, "val_mae": False, "val_pearson": True,
                      "val_spearman": True, "val_loss": False}  # name -> higher is better


@dataclass
class Scored:
    text: str
    targets: list[float]
    where: str = ""
    pair: str | None = None  # the second text of a sentence pair


def encode_scored(tokenizer, records: list[Scored], max_length: int) -> tuple[list[list[int]], int]:
    """Model inputs of scored records (pairs as the tokenizer encodes pairs, or joined by a line break where it has
    no pair template) and how many were cut to max_length."""
    from lmforge.classify.data import encode_texts

    if not any(r.pair is not None for r in records):
        return encode_texts(tokenizer, [r.text for r in records], max_length)
    tok = getattr(tokenizer, "tok", None)  # an HF tokenizers.Tokenizer: its post-processor knows pairs
    if tok is None or tok.post_processor is None:
        return encode_texts(tokenizer, [f"{r.text}\n{r.pair}" for r in records], max_length)
    pairs = [(r.text, r.pair) for r in records]
    full = [e.ids for e in tok.encode_batch(pairs, add_special_tokens=True)]
    cut = sum(len(ids) > max_length for ids in full)
    if not cut:
        return full, 0
    tok.enable_truncation(max_length)  # longest first, keeping both [SEP]s
    try:
        return [e.ids for e in tok.encode_batch(pairs, add_special_tokens=True)], cut
    finally:
        tok.no_truncation()


def read_scored(files: list[str], text_field: str, target_fields: list[str], pair_field: str = "",
                on_bad: OnBad | None = None, encoding: str = "utf-8", errors: str = "strict",
                need_targets: bool = True) -> list[Scored]:
    """Every record's text (and its pair's, with `pair_field`) and its real-valued targets."""
    out = []
    for path in files:
        for where, rec in iter_records(path, on_bad, encoding, errors):
            raw = json.dumps(rec, ensure_ascii=False, default=str)[:2000]
            problem = None
            texts = []
            for key in [text_field] + ([pair_field] if pair_field else []):
                value = rec.get(key)
                if not isinstance(value, str) or not value.strip():
                    have = ", ".join(sorted(map(str, rec))[:8])
                    problem = f"field '{key}': " + (f"missing (the record has {have})" if key not in rec
                                                    else "not a non-empty string")
                    break
                texts.append(value.strip())
            targets = []
            for key in target_fields if problem is None and need_targets else []:
                value = rec.get(key)
                try:
                    number = float(value) if not isinstance(value, bool) else None
                except (TypeError, ValueError):
                    number = None
                if number is None or not math.isfinite(number):
                    problem = f"field '{key}': " + ("missing" if key not in rec else f"{value!r} is not a number")
                    break
                targets.append(number)
            if problem is not None:
                if on_bad is None:
                    raise CorpusError(f"{where}: {problem}")
                on_bad(where, problem, raw)
                continue
            out.append(Scored(texts[0], targets, where, texts[1] if pair_field else None))
    if not out:
        raise CorpusError(f"{', '.join(files)}: no scored records")
    return out


def regression_scores(predictions, targets) -> dict:
    """val_mse, val_rmse, val_mae (scikit-learn), val_pearson, val_spearman (scipy), each the mean over targets;
    with several targets, the per-target values too (val_mse_NAME ... is left to the report)."""
    import numpy as np

    from lmforge.metrics import pearson, regression, spearman

    p, y = np.asarray(predictions, dtype=float), np.asarray(targets, dtype=float)
    if p.ndim == 1:
        p, y = p[:, None], y[:, None]
    per = []
    for k in range(y.shape[1]):
        m = regression(y[:, k], p[:, k])
        per.append({"mse": m["mse"], "rmse": math.sqrt(m["mse"]), "mae": m["mae"], "r2": m["r2"],
                    "pearson": pearson(y[:, k], p[:, k]), "spearman": spearman(y[:, k], p[:, k])})
    return {f"val_{name}": float(np.mean([m[name] for m in per])) for name in per[0]}


def _objective(n_targets: int, loss: str, scale):
    """The Trainer's objective: MSE / Huber of the (scaled) residuals; evaluation in the targets' units."""
    import torch
    import torch.nn.functional as F

    from lmforge.train.objectives import Objective

    class Regression(Objective):
        best_metric = "val_mse"
        higher_is_better = False

        def _loss(self, pred, y):
            scale_t = scale.to(pred.device) if scale is not None else None
            residual = (pred.float() - y.float()) / scale_t if scale_t is not None else pred.float() - y.float()
            zero = torch.zeros_like(residual)
            return F.huber_loss(residual, zero) if loss == "huber" else F.mse_loss(residual, zero)

        def loss(self, forward, batch):
            pred = forward(batch["input_ids"], attention_mask=batch["attention_mask"])
            return self._loss(pred, batch["labels"]), len(batch["input_ids"])

        def count(self, batch):
            return len(batch["input_ids"])

        @torch.no_grad()
        def evaluate(self, model, batches):
            preds, ys = [], []
            for batch in batches:
                preds.append(model(batch["input_ids"], attention_mask=batch["attention_mask"]).float().cpu())
                ys.append(batch["labels"].float().cpu())
            if not preds:
                return {}
            p, y = torch.cat(preds), torch.cat(ys)
            return {"val_loss": self._loss(p, y).item(), **regression_scores(p.numpy(), y.numpy())}

    return Regression()


def _regression_targets(cfg) -> list[str]:
    """The target fields, after checking the settings a regression head cannot take (best_metric val_f1, the
    classification default, becomes val_mse)."""
    if cfg.multi_label:
        raise ConfigError("multi_label: a regression head has one output per target (--target-fields)")
    if cfg.best_metric == "val_f1":  # the classification default
        cfg.best_metric = "val_mse"
    if cfg.best_metric not in REGRESSION_METRICS:
        raise ConfigError(f"best_metric: {cfg.best_metric} is not a regression metric ({', '.join(REGRESSION_METRICS)})")
    return list(cfg.target_fields) or [cfg.label_field]


def _scored_split(cfg, targets: list[str], rejects) -> tuple[list[Scored], list[Scored]]:
    """(training, validation) records: --val-data, else a seeded val_fraction of --data."""
    import numpy as np

    from lmforge.classify.data import data_files

    def read(path):
        return read_scored(data_files(path), cfg.text_field, targets, cfg.text_pair_field, rejects, cfg.encoding,
                           cfg.errors)

    records = read(cfg.data)
    if cfg.val_data:
        train_recs, val_recs = records, read(cfg.val_data)
    else:
        order = np.random.default_rng(cfg.seed).permutation(len(records))
        n_val = max(1, round(len(records) * cfg.val_fraction)) if cfg.val_fraction > 0 else 0
        held = set(order[:n_val].tolist())
        train_recs = [r for i, r in enumerate(records) if i not in held]
        val_recs = [r for i, r in enumerate(records) if i in held]
    if not val_recs:
        raise ConfigError("val_fraction: 0 leaves nothing to validate on: give --val-data FILE or a val_fraction > 0")
    return train_recs, val_recs


def run_regression(cfg) -> dict:
    """`classify train --task regression`: train, then score the best checkpoint on the validation split."""
    import os

    import numpy as np
    import torch

    from lmforge.classify.data import eval_batches, label_batches
    from lmforge.classify.run import _fill_schedule, _pad_id, _prepare
    from lmforge.data.sources import RejectLog
    from lmforge.files import write_json
    from lmforge.model.heads import build_classifier, is_encoder_dir
    from lmforge.model.hf import resolve_model_dir
    from lmforge.peft import parameter_counts
    from lmforge.tokenizer import load_tokenizer
    from lmforge.train.trainer import Trainer

    targets = _regression_targets(cfg)
    model_dir = resolve_model_dir(cfg.model)
    if not (model_dir / "tokenizer.json").exists():
        raise ConfigError(f"model: {model_dir} has no tokenizer.json")
    encoder = is_encoder_dir(model_dir)
    tokenizer = load_tokenizer(model_dir, backend="hf") if encoder else load_tokenizer(model_dir)
    rejects = RejectLog() if cfg.on_error == "skip" else None
    train_recs, val_recs = _scored_split(cfg, targets, rejects)
    y_train = np.array([r.targets for r in train_recs], dtype=float)
    mean, std = y_train.mean(0), y_train.std(0)
    scale = None
    if cfg.target_scaling == "standard":
        scale = torch.tensor(np.where(std > 0, std, 1.0), dtype=torch.float)
    ids_tr, cut_tr = encode_scored(tokenizer, train_recs, cfg.max_length)
    ids_va, cut_va = encode_scored(tokenizer, val_recs, cfg.max_length)
    _fill_schedule(cfg, len(ids_tr))

    torch.manual_seed(cfg.seed)
    pad_id = _pad_id(tokenizer, model_dir)
    model = build_classifier(model_dir, targets, "sequence", cfg.pooling or None, False, pad_id, cfg.dropout)
    model.regression = True
    if scale is not None and model.head.bias is not None:
        with torch.no_grad():  # start at the targets' means
            model.head.bias.copy_(torch.tensor(mean, dtype=model.head.bias.dtype))
    _prepare(model, cfg)
    objective = _objective(len(targets), cfg.regression_loss, scale)
    objective.best_metric, objective.higher_is_better = cfg.best_metric, REGRESSION_METRICS[cfg.best_metric]
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    micro = cfg.micro_batch_size or cfg.batch_size // world
    k = len(targets)
    batches = label_batches(ids_tr, [r.targets for r in train_recs], micro, pad_id, cfg.seed, rank, world, k)
    evals = eval_batches(ids_va, [r.targets for r in val_recs], max(micro, 16), pad_id, k)
    trainer = Trainer(cfg, objective=objective, model=model, train_data=batches, eval_data=evals,
                      tokenizer_dir=model_dir)
    trainer.prepare_run_dir()
    out = Path(cfg.out)
    data_stats = {"train": len(ids_tr), "val": len(ids_va), "targets": targets,
                  "train_mean": dict(zip(targets, mean.tolist())), "train_std": dict(zip(targets, std.tolist())),
                  "truncated": {"train": cut_tr, "val": cut_va}, "rejected": len(rejects.items) if rejects else 0}
    if trainer.is_main:
        write_json(out / "labels.json", {"task": "regression", "labels": targets, "multi_label": False})
        write_json(out / "data.json", data_stats)
        if rejects is not None:
            rejects.write(out)
        pc = parameter_counts(model)
        print(f"regression: {k} target(s) ({', '.join(targets)}) on {model_dir} ({'encoder' if encoder else 'decoder'}"
              f", {pc['trainable']:,} trainable parameters); {len(ids_tr)} train / {len(ids_va)} validation examples;"
              f" {cfg.max_steps} steps", file=sys.stderr)
        if cut_tr + cut_va:  # as a classifier's run says it (classify/run.py)
            print(f"lmforge: {cut_tr + cut_va} example(s) are longer than max_length {cfg.max_length} and were cut",
                  file=sys.stderr)
    summary = trainer.fit()
    summary["data"] = data_stats
    summary["parameters"] = parameter_counts(model)
    if trainer.is_main and (out / "best" / "config.json").exists():
        report = evaluate_regression_dir(out / "best", val_recs, cfg.max_length)
        write_json(out / "metrics.json", report)
        summary["best"] = report["overall"]
        write_json(out / "summary.json", {k: v for k, v in summary.items() if k != "hf_config"})
    return summary


def predict_values(directory: str | Path, texts: list[str] | list[Scored], batch_size: int = 32,
                   max_length: int | None = None) -> tuple[list[str], list[list[float]]]:
    """A saved regression head's target names and predictions (one list of target values per text or scored
    record, in order); texts are cut to max_length tokens, at most the model's limit (its default), as
    `classify predict` cuts a classifier's."""
    import torch

    from lmforge.classify.data import eval_batches
    from lmforge.model.heads import is_encoder_dir, load_classifier
    from lmforge.tokenizer import load_tokenizer

    d = Path(directory)
    model = load_classifier(d)
    if not getattr(model, "regression", False):
        raise ConfigError(f"{d}: not a regression head (problem_type is not regression)")
    tok = load_tokenizer(d, backend="hf") if is_encoder_dir(d) else load_tokenizer(d)
    records = [t if isinstance(t, Scored) else Scored(t, []) for t in texts]
    limit = model.backbone.cfg.max_seq_len
    ids, _ = encode_scored(tok, records, min(max_length or limit, limit))
    k = len(model.labels)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # the order eval_batches puts them in
    preds: list[list[float]] = []
    with torch.no_grad():
        for batch in eval_batches(ids, [[0.0] * k] * len(ids), batch_size, model.pad_token_id, k):
            preds += model(batch["input_ids"], attention_mask=batch["attention_mask"]).float().tolist()
    out: list[list[float]] = [[] for _ in ids]
    for i, p in zip(order, preds):
        out[i] = p
    return model.labels, out


def evaluate_regression_dir(directory: str | Path, records: list[Scored], max_length: int | None = None) -> dict:
    """Metrics of a saved regression head on scored records: overall (mean over targets) and per target."""
    import numpy as np

    names, values = predict_values(directory, records, max_length=max_length)
    p, y = np.asarray(values), np.asarray([r.targets for r in records])
    per = {name: {k.removeprefix("val_"): v for k, v in regression_scores(p[:, i], y[:, i]).items()}
           for i, name in enumerate(names)}
    overall = {k.removeprefix("val_"): v for k, v in regression_scores(p, y).items()}
    return {"task": "regression", "examples": len(records), "targets": names, "overall": overall, "per_target": per}


def regression_cli(args, mode: str) -> int:
    """`classify predict | eval` for a regression head: the targets are the columns its labels name."""
    from lmforge.classify.data import data_files
    from lmforge.model.hf import read_config, resolve_model_dir

    names = [v for _, v in sorted((int(k), v) for k, v in read_config(resolve_model_dir(args.model))["id2label"]
                                  .items())]
    records = read_scored(data_files(args.data), args.text_field, names, args.text_pair_field, None, args.encoding,
                          need_targets=mode == "eval")
    max_length = getattr(args, "max_length", None)  # None: the model's limit
    if mode == "eval":
        report = evaluate_regression_dir(args.model, records, max_length)
        if args.json:
            print(json.dumps(report, ensure_ascii=False))
        else:
            print(f"{report['examples']} examples: " + ", ".join(f"{k} {v:.4f}" for k, v in report["overall"].items()))
            for name, row in report["per_target"].items():
                print(f"  {name}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items()))
        return 0
    _, values = predict_values(args.model, records, max_length=max_length)
    rows = [{"where": r.where, "prediction": dict(zip(names, v))} for r, v in zip(records, values)]
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    if args.out:
        from lmforge.files import atomic_write

        with atomic_write(Path(args.out)) as f:
            f.write(text)
        print(f"{len(rows)} predictions -> {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0
