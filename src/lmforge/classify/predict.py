"""A trained classifier at work: predictions with calibrated probabilities, and its metrics on labelled data.

`Predictor` reads a classifier directory (runs/NAME/best: an HF *ForSequenceClassification / *ForTokenClassification
directory with its tokenizer) and applies the softmax temperature stored in its config.json (`lmforge_task.
temperature`). `evaluate_dir` scores it on labelled data (overall, per class or entity type, confusion matrix) and,
after training, fits that temperature on the validation split (temperature scaling, lmforge/metrics.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from lmforge.classify.data import collate, encode_tagged, encode_texts, read_examples
from lmforge.classify.run import ClassifyConfig
from lmforge.config import ConfigError


def task_config(model_dir: str | Path, **fields) -> ClassifyConfig:
    """The ClassifyConfig that reads data for a saved classifier: its task and multi-label setting (from its
    config.json) with the given reading `fields` (text_field, label_field, tokens_field, tags_field, encoding)."""
    config = Path(model_dir) / "config.json"
    raw = json.loads(config.read_text()) if config.exists() else {}
    task = (raw.get("lmforge_task") or {}).get("task") or ("token" if "Token" in str(raw.get("architectures")) else
                                                           "sequence")
    task = "sequence" if task == "cloze" else task  # a cloze classifier reads text and one label as a head's does
    return ClassifyConfig(task=task, multi_label=raw.get("problem_type") == "multi_label_classification", **fields)


def _is_cloze(raw: dict) -> bool:
    return (raw.get("lmforge_task") or {}).get("task") == "cloze"


class Predictor:
    """A saved classifier and its tokenizer: `predict(records)` -> per-record labels and probabilities."""

    def __init__(self, directory: str | Path, batch_size: int = 32, max_length: int | None = None):
        from lmforge.classify.run import task_tokenizer
        from lmforge.model.heads import load_classifier

        self.dir = Path(directory)
        raw = json.loads((self.dir / "config.json").read_text()) if (self.dir / "config.json").exists() else {}
        # a cloze (PET) checkpoint: a BertForMaskedLM whose config.json holds the pattern and the label words
        self.pattern = (raw.get("lmforge_task") or {}).get("pattern") if _is_cloze(raw) else None
        if self.pattern is not None:
            from lmforge.classify.cloze import load_cloze

            self.model = load_cloze(self.dir)
        else:
            self.model = load_classifier(self.dir)
        self.tokenizer = task_tokenizer(self.dir)
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

        token = self.model.task == "token"
        if token:
            enc = encode_tagged(self.tokenizer, records, {t: i for i, t in enumerate(self.labels)}, self.max_length)
            ids, first = enc.ids, enc.labels
        elif self.pattern is not None:
            from lmforge.classify.cloze import encode_cloze

            ids, _ = encode_cloze(self.tokenizer, [r.text for r in records], self.pattern, self.max_length)
            first = [0] * len(ids)
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
    p = Predictor(directory)
    if records is None:
        cfg = cfg or ClassifyConfig(task=p.model.task, multi_label=p.model.multi_label)
        records = read_examples(cfg, data, None)
    logits = p.logits(records)
    if p.model.task == "token":
        return _tagger_report(p.labels, records, logits)
    unknown = sorted({x for r in records for x in r.labels} - set(p.labels))
    if unknown:
        raise ConfigError(f"{data}: labels {', '.join(unknown[:5])} are not among the model's ({', '.join(p.labels)})")
    return _classifier_report(p, records, logits, calibrate, confusion_png)


def _tagger_report(labels: list[str], records, logits) -> dict:
    from lmforge import metrics as M

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


def _classifier_report(p: Predictor, records, logits, calibrate: bool, confusion_png: str | Path | None) -> dict:
    import torch

    from lmforge import metrics as M
    from lmforge.train.objectives import classification_metrics

    labels = p.labels
    stacked = torch.stack(logits)
    if p.model.multi_label:
        y = torch.tensor([[1.0 if k in r.labels else 0.0 for k in labels] for r in records])
        overall = {k.removeprefix("val_"): v for k, v in classification_metrics(stacked, y, True).items()}
        return {"task": "sequence", "multi_label": True, "examples": len(records), "overall": overall}
    y = torch.tensor([labels.index(r.labels[0]) for r in records])
    report = {"task": "sequence", "examples": len(records)}
    if calibrate:
        report["calibration"] = calibrate_dir(p.dir, stacked.numpy(), y.numpy())
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
        from lmforge.plots import plot_confusion

        report["confusion_png"] = str(plot_confusion(matrix, labels, confusion_png))
    return report


def calibrate_dir(directory: Path, logits, labels) -> dict:
    """Fit the softmax temperature on (logits, labels) and store it in the classifier's config.json
    (`lmforge_task.temperature`, which `Predictor` applies); returns the fit with the NLL and ECE before and after."""
    import numpy as np

    from lmforge import metrics as M
    from lmforge.files import write_json

    t = M.fit_temperature(logits, labels)
    nll_before, nll_after = M.negative_log_likelihood(logits, labels), M.negative_log_likelihood(logits, labels, t)
    if nll_after > nll_before:  # nothing better was found: keep the raw softmax
        t, nll_after = 1.0, nll_before

    def probs(temperature: float) -> np.ndarray:
        z = logits / temperature
        e = np.exp(z - z.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    config_path = Path(directory) / "config.json"
    raw = json.loads(config_path.read_text())
    raw.setdefault("lmforge_task", {})["temperature"] = round(t, 6)
    write_json(config_path, raw)
    return {"temperature": round(t, 4), "nll_before": round(nll_before, 4), "nll_after": round(nll_after, 4),
            "ece_before": round(M.expected_calibration_error(probs(1.0), labels), 4),
            "ece_after": round(M.expected_calibration_error(probs(t), labels), 4), "fitted_on": "the validation split"}
