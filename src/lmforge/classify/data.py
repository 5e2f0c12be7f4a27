"""Labelled data for the task heads: texts with labels, and BIO-tagged sentences; encoded for a model.

Texts with labels: any structured file lmforge reads (.jsonl(.gz), .json, .csv, .tsv, .parquet) with a text column
and a label column; a label is a string, a number or a boolean, or for multi-label data a list of them (or, in
CSV/TSV, one string split at `label_sep`).

Tagged sentences:
  CoNLL   one token per line, the token in the first column and its tag in the last (spaces or tabs between),
          sentences separated by blank lines, `-DOCSTART-` lines skipped (CoNLL-2003, MSRA / People's Daily
          character-level Chinese NER: one character per line)
  JSONL   a list of tokens and a list of tags per record (`tokens` / `tags`, or `ner_tags`)
Tags are BIO / IOB2 (B-TYPE, I-TYPE, O; IOBES's E- and S- are read too). Every bad record names file:line and the
field, or goes to the reject log (`on_error: skip`).

Encoded examples become the Trainer's batches here too: shuffled right-padded training batches, length-sorted
evaluation batches, and the stratified validation split.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from lmforge.config import ConfigError
from lmforge.data.hf_datasets import is_dataset_source
from lmforge.data.sources import CorpusError, OnBad, iter_records
from lmforge.text import UNSPACED_CHAR

if TYPE_CHECKING:
    from lmforge.classify.run import ClassifyConfig

TAG = re.compile(r"^(O|[BIES]-\S+)$")


@dataclass
class Labelled:
    text: str
    labels: list[str]  # one label, or several for multi-label data
    where: str = ""


@dataclass
class Tagged:
    tokens: list[str]
    tags: list[str]
    where: str = ""


@dataclass
class Encoded:
    """Model inputs of a set of examples, with what was cut."""

    ids: list[list[int]]
    labels: list = field(default_factory=list)  # class index / 0-1 vector per example, or per-piece tag ids
    truncated: int = 0  # examples cut to max_length (token task: words that lost their labels, in `lost_words`)
    lost_words: int = 0


def _bad(on_bad: OnBad | None, where: str, reason: str, raw: str = "") -> None:
    if on_bad is None:
        raise CorpusError(f"{where}: {reason}")
    on_bad(where, reason, raw)


def _label_strings(value, where: str, field_name: str, multi: bool, sep: str) -> list[str] | None:
    if isinstance(value, bool):
        return [str(value).lower()]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [str(int(value)) if float(value).is_integer() else str(value)]
    if isinstance(value, str):
        if not value.strip():
            return None
        return [v.strip() for v in value.split(sep) if v.strip()] if multi and sep else [value.strip()]
    if isinstance(value, list) and multi and all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in value):
        return [str(v) for v in value]
    return None


def read_labelled(files: list[str], text_field: str = "text", label_field: str = "label", multi_label: bool = False,
                  label_sep: str = ",", on_bad: OnBad | None = None, encoding: str = "utf-8",
                  errors: str = "strict", need_labels: bool = True) -> list[Labelled]:
    """Every record's text and label(s); `need_labels=False` (prediction) allows records without a label."""
    out = []
    for path in files:
        for where, rec in iter_records(path, on_bad, encoding, errors):
            raw = json.dumps(rec, ensure_ascii=False, default=str)[:2000]
            text = rec.get(text_field)
            if not isinstance(text, str) or not text.strip():
                keys = ", ".join(sorted(map(str, rec))[:8])
                _bad(on_bad, where, f"field '{text_field}': " + ("missing (the record has " + keys + ")"
                                                                 if text_field not in rec else "not a non-empty string"),
                     raw)
                continue
            if label_field not in rec or rec[label_field] is None or rec[label_field] == "":
                if need_labels:
                    _bad(on_bad, where, f"field '{label_field}': missing", raw)
                    continue
                out.append(Labelled(text, [], where))
                continue
            labels = _label_strings(rec[label_field], where, label_field, multi_label, label_sep)
            if labels is None or (not labels and need_labels):
                _bad(on_bad, where, f"field '{label_field}': {rec[label_field]!r} is not a label"
                     + (" or a list of labels" if multi_label else " (a string, number or boolean)"), raw)
                continue
            out.append(Labelled(text, labels, where))
    if not out:
        raise CorpusError(f"{', '.join(files)}: no labelled records")
    return out


def read_tagged(files: list[str], tokens_field: str = "tokens", tags_field: str = "tags", on_bad: OnBad | None = None,
                encoding: str = "utf-8", need_tags: bool = True) -> list[Tagged]:
    """Every sentence of CoNLL-style files (any suffix but .jsonl/.json) and JSONL token/tag records."""
    out: list[Tagged] = []
    for path in files:
        if path.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet", ".arrow")) or is_dataset_source(path):
            for where, rec in iter_records(path, on_bad, encoding):
                raw = json.dumps(rec, ensure_ascii=False, default=str)[:2000]
                tokens = rec.get(tokens_field)
                tags = rec.get(tags_field, rec.get("ner_tags")) if tags_field == "tags" else rec.get(tags_field)
                if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) and t for t in tokens):
                    _bad(on_bad, where, f"field '{tokens_field}': not a non-empty list of strings", raw)
                    continue
                if tags is None and not need_tags:
                    out.append(Tagged(tokens, [], where))
                    continue
                if not isinstance(tags, list) or len(tags) != len(tokens):
                    _bad(on_bad, where, f"field '{tags_field}': " + ("missing" if tags is None else
                                                                      f"{len(tags) if isinstance(tags, list) else 0} "
                                                                      f"tags for {len(tokens)} tokens"), raw)
                    continue
                bad = next((t for t in tags if not isinstance(t, str) or not TAG.match(t)), None)
                if bad is not None:
                    _bad(on_bad, where, f"field '{tags_field}': tag {bad!r} is not BIO (B-TYPE, I-TYPE or O)", raw)
                    continue
                out.append(Tagged(tokens, tags, where))
            continue
        out += _read_conll(path, on_bad, encoding, need_tags)
    if not out:
        raise CorpusError(f"{', '.join(files)}: no tagged sentences")
    return out


def _read_conll(path: str, on_bad: OnBad | None, encoding: str, need_tags: bool) -> list[Tagged]:
    try:
        lines = Path(path).read_text(encoding=encoding).splitlines()
    except UnicodeDecodeError as e:
        raise CorpusError(f"{path}: not {encoding} text at byte {e.start} (pass --encoding)") from None
    out, tokens, tags, start, broken = [], [], [], 1, None

    def flush(lineno: int):
        nonlocal tokens, tags, broken
        where = f"{path}:{start}"
        if broken is not None:
            _bad(on_bad, broken[0], broken[1], " ".join(tokens))
        elif tokens:
            out.append(Tagged(tokens, tags if need_tags or any(tags) else [], where))
        tokens, tags, broken = [], [], None

    for i, line in enumerate(lines, 1):
        if line.startswith("-DOCSTART-"):
            continue
        if not line.strip():
            flush(i)
            start = i + 1
            continue
        if not tokens:
            start = i
        cols = line.split()
        if len(cols) < 2:
            if need_tags and broken is None:
                broken = (f"{path}:{i}", f"line {line.strip()!r} has a token but no tag column")
            tokens.append(cols[0])
            tags.append("")
            continue
        if not TAG.match(cols[-1]) and broken is None:
            broken = (f"{path}:{i}", f"tag {cols[-1]!r} is not BIO (B-TYPE, I-TYPE or O)")
        tokens.append(cols[0])
        tags.append(cols[-1])
    flush(len(lines) + 1)
    return out


# --- encoding -------------------------------------------------------------------------------------------------------

def encode_texts(tokenizer, texts: list[str], max_length: int) -> tuple[list[list[int]], int]:
    """Model inputs of texts (an encoder's [CLS] ... [SEP] included; text is never read as control tokens) and how
    many were cut to max_length."""
    full = tokenizer.encode_for_model(texts)
    cut = sum(len(ids) > max_length for ids in full)
    return (tokenizer.encode_for_model(texts, max_length=max_length) if cut else full), cut


def _joined(tokens: list[str]) -> tuple[str, list[tuple[int, int]]]:
    """The sentence's text: tokens joined by spaces, except between CJK characters (Chinese BIO files hold one
    character per line), and each token's character span in it."""
    text, spans = "", []
    for i, t in enumerate(tokens):
        if i and not (UNSPACED_CHAR.match(tokens[i - 1][-1]) and UNSPACED_CHAR.match(t[0])):
            text += " "
        spans.append((len(text), len(text) + len(t)))
        text += t
    return text, spans


def word_pieces(tokenizer, tokens: list[str], max_length: int) -> tuple[list[int], list[int | None]]:
    """(ids, word index of each id; None for special tokens and a word's later pieces' marker is its index too).

    An HF tokenizer (BERT's WordPiece) encodes the pre-split words itself, with its special tokens. lmforge's
    byte-level BPE encodes each word with the space before it, as it appears in running text."""
    tok = getattr(tokenizer, "tok", None)
    if tok is not None:
        tok.enable_truncation(max_length)
        try:
            enc = tok.encode(tokens, is_pretokenized=True, add_special_tokens=True)
        finally:
            tok.no_truncation()
        return enc.ids, list(enc.word_ids)
    text, spans = _joined(tokens)
    ids, words = [], []
    for w, (a, b) in enumerate(spans):
        start = a - 1 if a and text[a - 1] == " " else a  # the space belongs to the word after it
        piece = tokenizer.encode_ordinary(text[start:b])
        ids += piece
        words += [w] * len(piece)
    return ids[:max_length], words[:max_length]


def encode_tagged(tokenizer, sentences: list[Tagged], tag_ids: dict[str, int], max_length: int) -> Encoded:
    """First-piece labelling: a word's tag on its first piece, -100 on its other pieces and special tokens."""
    enc = Encoded([])
    for s in sentences:
        ids, words = word_pieces(tokenizer, s.tokens, max_length)
        labels, seen = [], set()
        for w in words:
            if w is None or w in seen:
                labels.append(-100)
            else:
                seen.add(w)
                labels.append(tag_ids[s.tags[w]] if s.tags else -100)
        if len(seen) < len(s.tokens):
            enc.truncated += 1
            enc.lost_words += len(s.tokens) - len(seen)
        enc.ids.append(ids)
        enc.labels.append(labels)
    return enc


def read_examples(cfg: ClassifyConfig, path: str, rejects: OnBad | None = None, need_labels: bool = True) -> list:
    """The labelled texts (sequence task) or tagged sentences (token task) of a file, a directory of files, or
    builtin:python-docs-topics, read with the config's fields, encoding and multi-label settings."""
    from lmforge.classify.builtin import BUILTIN, python_docs_topics

    if path == BUILTIN:
        if cfg.task != "sequence":
            raise ConfigError(f"data: {BUILTIN} is a sequence-classification set")
        return [Labelled(r["text"], [r["label"]], f"{BUILTIN}:{i + 1}") for i, r in enumerate(python_docs_topics())]
    files = data_files(path)
    if cfg.task == "token":
        return read_tagged(files, cfg.tokens_field, cfg.tags_field, rejects, cfg.encoding, need_labels)
    return read_labelled(files, cfg.text_field, cfg.label_field, cfg.multi_label, cfg.label_sep, rejects,
                         cfg.encoding, cfg.errors, need_labels)


def data_files(path: str) -> list[str]:
    """The files a --data names: a file, every file under a directory, or a datasets source as one input."""
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


# --- splits and batches --------------------------------------------------------------------------------------------

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


def augment_examples(cfg, records: list) -> list:
    """New training examples from `records` (lmforge.data.augment, as `cfg.augment*` say): EDA / noise / model-written
    variants of each text with its labels, or of each tagged sentence with its entities kept whole; each new one's
    `where` names its source and operation. Their count by operation: `augment_records.stats`."""
    from lmforge.data.augment import AugmentConfig, augment_records
    from lmforge.synth.augment import rewriter_for

    tagged = bool(records) and isinstance(records[0], Tagged)
    aug = AugmentConfig(ops=tuple(cfg.augment), per_record=cfg.augment_per_record, alpha=cfg.augment_alpha,
                        seed=cfg.seed, synonyms=cfg.augment_synonyms, tokens_field="tokens" if tagged else None)
    rows = [(r.where, {"tokens": r.tokens, "tags": r.tags} if tagged else {"text": r.text, "labels": r.labels})
            for r in records]
    out = []
    for rec in augment_records(rows, aug, originals=False, model=rewriter_for(cfg)):
        where = f"{rec['augmented']['source']} ({rec['augmented']['op']})"
        out.append(Tagged(rec["tokens"], rec["tags"], where) if tagged else Labelled(rec["text"], rec["labels"], where))
    return out


def write_augmented(path, examples: list) -> None:
    """The new training examples, one JSON object a line, each with the record and operation it came from."""
    from lmforge.files import atomic_write

    with atomic_write(path) as f:
        for e in examples:
            row = {"tokens": e.tokens, "tags": e.tags} if isinstance(e, Tagged) else {"text": e.text, "labels": e.labels}
            f.write(json.dumps({**row, "from": e.where}, ensure_ascii=False) + "\n")
