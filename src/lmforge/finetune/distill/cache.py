"""The offline teacher cache: the teacher's top-k log-probabilities at every trained token of an SFT data set, so
that a student trains without the teacher in memory (DistillKit's sparse logits).

`lmforge distill cache` renders and masks the data exactly as `lmforge finetune` does (same template, mask and
max_length) and runs the teacher once over every example. Per trained token it keeps the K most likely ids, their
log-probabilities at the distillation temperature, and the log of the probability left over (the tail); the loss
then compares teacher and student over K + 1 buckets (train/distill.py `sparse_kd_losses`), which is the dense
loss when K is the vocabulary.

Layout of CACHE/: `cache.json` (the settings: teacher, its vocabulary's size and hash, top_k, temperature,
template hash, mask, max_length; written first, so a rerun with other settings is refused instead of mixing
shards), `shard-NNNNN.safetensors` (examples [N*S, (N+1)*S) of the data in order: `hashes` (E, 32) uint8, the
sha256 of each example's ids and labels, `offsets` (E+1,) into the rows, and per trained token `ids` (rows, K)
int32, `logps` (rows, K) and `tail` (rows,) in the cache's precision), and `manifest.json` once every shard is
there. Shards are written whole (temp file, rename): a run stopped midway continues where it stopped. Training
finds each of its examples by hash, so a change to the data, template, mask or max_length is named, not guessed.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from lmforge.config import ConfigError
from lmforge.data.sources import encoding_field, on_error_field

if TYPE_CHECKING:  # numpy loads with the work, not with `lmforge --help` (the CLI imports CacheConfig)
    import numpy as np

CACHE_VERSION = 1


@dataclass
class CacheConfig:
    """The teacher, the data as `lmforge finetune` reads it (defaults equal), and what to keep."""

    teacher: str = field(default="", metadata={"help": "the teacher model directory"})
    data: str = field(default="", metadata={"help": "the SFT data, as for lmforge finetune --data"})
    val_data: str = field(default="", metadata={"help": "a separate evaluation file the student run uses "
                                                        "(--val-data): cached too"})
    out: str = field(default="", metadata={"help": "the cache directory"})
    format: str = field(default="auto", metadata={"help": "data format", "choices": ["auto", "alpaca", "sharegpt",
                                                                                      "openai", "pairs", "text"]})
    columns: dict = field(default_factory=dict, metadata={"help": "the format's fields -> your columns"})
    tags: dict = field(default_factory=dict, metadata={"help": "sharegpt role/content tags"})
    encoding: str = encoding_field()
    errors: str = field(default="strict", metadata={"choices": ["strict", "replace"],
                                                    "help": "undecodable bytes: a bad record, or replaced by U+FFFD"})
    on_error: str = on_error_field()
    template: str = field(default="model", metadata={"help": "chat template, as for lmforge finetune"})
    mask: str = field(default="assistant", metadata={"help": "tokens trained on, as for lmforge finetune",
                                                     "choices": ["assistant", "last", "all"]})
    train_on_prompt: bool = field(default=False, metadata={"help": "the same as --mask all"})
    max_length: int = field(default=512, metadata={"help": "tokens per example, as for lmforge finetune",
                                                   "check": (lambda v: v > 0, "> 0")})
    top_k: int = field(default=64, metadata={"help": "ids kept per trained token (the rest is one tail bucket)",
                                             "check": (lambda v: v > 0, "> 0")})
    kd_temperature: float = field(default=1.0, metadata={"help": "the temperature the log-probabilities are taken at "
                                                                 "(training must use the same)",
                                                         "check": (lambda v: v > 0, "> 0")})
    precision: str = field(default="float16", metadata={"help": "log-probabilities stored as float16 (half the "
                                                                "size) or float32", "choices": ["float16", "float32"]})
    teacher_dtype: str = field(default="float32", metadata={"help": "the teacher's weights (int8: lmforge's "
                                                                    "weight-only int8, a quarter of float32's memory)",
                                                            "choices": ["float32", "bfloat16", "float16", "int8"]})
    batch_size: int = field(default=8, metadata={"help": "examples per teacher forward",
                                                 "check": (lambda v: v > 0, "> 0")})
    shard_examples: int = field(default=256, metadata={"help": "examples per shard (the unit a stopped run resumes "
                                                               "at)", "check": (lambda v: v > 0, "> 0")})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})


def example_hash(input_ids: np.ndarray, labels: np.ndarray) -> bytes:
    """sha256 of an example's ids and labels (int64): the key it is cached under."""
    import numpy as np
    h = hashlib.sha256(np.asarray(input_ids, np.int64).tobytes())
    h.update(b"|")
    h.update(np.asarray(labels, np.int64).tobytes())
    return h.digest()


def _settings(cfg: CacheConfig, teacher_dir: Path, vocab: str, template_hash: str) -> dict:
    return {"version": CACHE_VERSION, "teacher": str(teacher_dir.resolve()), "vocabulary": vocab,
            "top_k": cfg.top_k, "temperature": cfg.kd_temperature, "precision": cfg.precision,
            "template_hash": template_hash, "mask": "all" if cfg.train_on_prompt else cfg.mask,
            "max_length": cfg.max_length}


def build_cache(cfg: CacheConfig) -> dict:
    """Write (or continue) the cache; returns the manifest."""
    import numpy as np
    import torch

    from lmforge.chat.stops import eos_ids as model_eos_ids
    from lmforge.chat.templates import resolve_template, template_hash
    from lmforge.data.sources import RejectLog
    from lmforge.files import save_tensors, write_json
    from lmforge.finetune import sft
    from lmforge.finetune.conversations import load_conversations
    from lmforge.finetune.distill.teacher import describe_vocabulary, frozen_teacher, vocabulary
    from lmforge.model.hf import resolve_model_dir
    from lmforge.progress import progress
    from lmforge.tokenizer import load_tokenizer

    for name in ("teacher", "data", "out"):
        if not getattr(cfg, name):
            raise ConfigError(f"{name}: required (--{name.replace('_', '-')})")
    teacher_dir = resolve_model_dir(cfg.teacher)
    tokenizer = load_tokenizer(teacher_dir)
    template, _ = resolve_template(tokenizer, cfg.template)
    settings = _settings(cfg, teacher_dir, describe_vocabulary(vocabulary(tokenizer)), template_hash(template))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "cache.json").exists():
        before = json.loads((out / "cache.json").read_text(encoding="utf-8"))
        diffs = [f"{k}: {before.get(k)!r} there, {v!r} now" for k, v in settings.items() if before.get(k) != v]
        if diffs:
            raise ConfigError(f"out: {out} holds a teacher cache made with other settings ({'; '.join(diffs)}); "
                              "give another --out")
    else:
        write_json(out / "cache.json", settings)

    rejects = RejectLog() if cfg.on_error == "skip" else None
    convs = load_conversations(cfg.data, cfg.format, cfg.columns, cfg.tags, rejects, cfg.encoding, cfg.errors)
    if cfg.val_data:
        convs += load_conversations(cfg.val_data, cfg.format, cfg.columns, cfg.tags, rejects, cfg.encoding,
                                    cfg.errors)
    model = frozen_teacher(teacher_dir, cfg.teacher_dtype)
    eos = model_eos_ids(tokenizer, model.cfg)
    examples = sft.build_examples(tokenizer, template, convs, settings["mask"], cfg.max_length,
                                  eos[0] if eos else None, rejects, cfg.progress, "tokenize")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    store = torch.float16 if cfg.precision == "float16" else torch.float32
    n_shards = -(-len(examples) // cfg.shard_examples)
    bar = progress(total=len(examples), desc="teacher cache", unit="example", enabled=cfg.progress)
    rows_total = 0
    for shard in range(n_shards):
        path = out / f"shard-{shard:05d}.safetensors"
        members = list(range(shard * cfg.shard_examples, min(len(examples), (shard + 1) * cfg.shard_examples)))
        if path.exists():  # written whole by an earlier run with these settings
            rows_total += sum(int((examples.labels[i] != -100).sum()) for i in members)
            bar.update(len(members))
            continue
        ids, logps, tails = [], [], []
        for start in range(0, len(members), cfg.batch_size):
            batch = sft.collate_padded(examples, members[start:start + cfg.batch_size], 0)
            i, lp, tl = teacher_top_k(model, {k: v.to(device) for k, v in batch.items()}, cfg.top_k,
                                      cfg.kd_temperature)
            ids.append(i.int().cpu())
            logps.append(lp.to(store).cpu())
            tails.append(tl.to(store).cpu())
            bar.update(len(members[start:start + cfg.batch_size]))
        counts = [int((examples.labels[i] != -100).sum()) for i in members]
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        hashes = np.frombuffer(b"".join(example_hash(examples.input_ids[i], examples.labels[i]) for i in members),
                               np.uint8).reshape(len(members), 32)
        save_tensors({"hashes": torch.from_numpy(hashes.copy()), "offsets": torch.from_numpy(offsets),
                      "ids": torch.cat(ids), "logps": torch.cat(logps), "tail": torch.cat(tails)}, path)
        rows_total += int(offsets[-1])
    bar.close()
    size = sum(p.stat().st_size for p in out.glob("shard-*.safetensors"))
    manifest = {**settings, "examples": len(examples), "shards": n_shards, "trained_tokens": rows_total,
                "bytes": size, "bytes_per_token": round(size / max(rows_total, 1), 1)}
    write_json(out / "manifest.json", manifest)
    if rejects is not None:
        rejects.write(out)
    print(f"teacher cache -> {out}: {len(examples)} examples, {rows_total:,} trained tokens, top-{cfg.top_k}, "
          f"{manifest['bytes_per_token']} bytes per token", file=sys.stderr)
    return manifest


def teacher_top_k(model, batch: dict, k: int, temperature: float = 1.0, chunk_rows: int = 256):
    """(ids (rows, k), log-probabilities (rows, k) at `temperature`, log of the rest's mass (rows,)) of the
    teacher at the batch's trained tokens (labels != -100) in row-major order."""
    import torch
    import torch.nn.functional as F

    from lmforge.train.objectives import model_inputs

    trained = batch["labels"] != -100
    with torch.no_grad():
        hidden = model(batch["input_ids"], **model_inputs(batch))[trained]
        out_ids, out_logps, out_tail = [], [], []
        for s in range(0, len(hidden), chunk_rows):
            logps = F.log_softmax(model.logits(hidden[s:s + chunk_rows]).float() / temperature, -1)
            top, ids = logps.topk(min(k, logps.shape[-1]), -1)
            tail = logps.scatter(-1, ids, float("-inf")).logsumexp(-1)  # the rest, summed in log space
            out_ids.append(ids)
            out_logps.append(top)
            out_tail.append(tail)
    if not out_ids:
        return (torch.zeros(0, k, dtype=torch.long), torch.zeros(0, k), torch.zeros(0))
    return torch.cat(out_ids), torch.cat(out_logps), torch.cat(out_tail)


class TeacherCache:
    """A finished cache, read whole into memory: `rows(examples, members)` gives the teacher rows of those
    examples' trained tokens, in order."""

    def __init__(self, directory: str | Path):
        import torch
        from safetensors.torch import load_file

        d = Path(directory)
        if not (d / "manifest.json").exists():
            raise ConfigError(f"teacher_cache: {d} has no manifest.json: not a teacher cache, or `lmforge distill "
                              "cache` stopped before the end (run it again to finish it)")
        self.directory = d
        self.manifest = json.loads((d / "manifest.json").read_text(encoding="utf-8"))
        ids, logps, tails, self.index = [], [], [], {}
        base = 0
        for shard in range(self.manifest["shards"]):
            t = load_file(str(d / f"shard-{shard:05d}.safetensors"))
            offsets = t["offsets"].tolist()
            for e, digest in enumerate(t["hashes"].numpy()):
                self.index[digest.tobytes()] = (base + offsets[e], base + offsets[e + 1])
            ids.append(t["ids"])
            logps.append(t["logps"])
            tails.append(t["tail"])
            base += offsets[-1]
        self.ids, self.logps, self.tail = torch.cat(ids), torch.cat(logps).float(), torch.cat(tails).float()

    def check(self, tokenizer, temperature: float, where: str) -> None:
        """A ConfigError unless the student's tokenizer and temperature are the cache's."""
        from lmforge.finetune.distill.teacher import describe_vocabulary, vocabulary

        mine = describe_vocabulary(vocabulary(tokenizer))
        if mine != self.manifest["vocabulary"]:
            raise ConfigError(f"teacher_cache: {self.directory} was made with the teacher vocabulary "
                              f"{self.manifest['vocabulary']}; the student {where} has {mine}")
        if temperature != self.manifest["temperature"]:
            raise ConfigError(f"kd_temperature: {temperature}, but the cache {self.directory} holds log-probabilities "
                              f"at temperature {self.manifest['temperature']}")

    def spans(self, examples) -> list[tuple[int, int]]:
        """Each example's (start, end) rows; a ConfigError naming the first example the cache lacks."""
        spans = []
        for n, (ids, labels) in enumerate(zip(examples.input_ids, examples.labels)):
            span = self.index.get(example_hash(ids, labels))
            if span is None:
                raise ConfigError(f"teacher_cache: example {n} of the data (as rendered with this template, mask and "
                                  f"max_length) is not in {self.directory}; make the cache from the same data and "
                                  "settings (lmforge distill cache)")
            spans.append(span)
        return spans

    def rows(self, spans: list[tuple[int, int]], members: list[int]) -> dict:
        """teacher_ids / teacher_logps / teacher_tail of these examples' trained tokens, in order."""
        import torch

        idx = torch.cat([torch.arange(*spans[m]) for m in members])
        return {"teacher_ids": self.ids[idx].long(), "teacher_logps": self.logps[idx], "teacher_tail": self.tail[idx]}


class CachedTeacherBatches:
    """SFTBatches with the cached teacher rows of each batch's examples attached (the Trainer's train_data)."""

    def __init__(self, batches, cache: TeacherCache):
        self.batches, self.cache = batches, cache
        self.spans = cache.spans(batches.examples)

    def next_batch(self) -> dict:
        batch = self.batches.next_batch()
        return {**batch, **self.cache.rows(self.spans, self.batches.last_members)}

    def state_dict(self) -> dict:
        return self.batches.state_dict()

    def utilisation(self) -> float:
        return self.batches.utilisation()

    def load_state_dict(self, state: dict) -> None:
        self.batches.load_state_dict(state)


def cached_eval_batches(examples, batch_size: int, pad_id: int, cache: TeacherCache) -> list[dict]:
    """sft.eval_batches with the cached teacher rows attached."""
    from lmforge.finetune import sft

    spans = cache.spans(examples)
    return [{**sft.collate_padded(examples, members, pad_id), **cache.rows(spans, members)}
            for members in sft.eval_order(examples, batch_size)]
