"""`lmforge data tokenize`: a corpus -> memory-mapped token shards with document boundaries.

Layout of the output directory:
  manifest.json              dtype, vocab size, tokenizer hash, EOS/BOS ids, per-split shards and counts
  train_00000.bin ...        flat token ids (uint16 when the vocabulary fits, else uint32)
  train_00000.docs.npy       int64 start offset of every document inside the shard
  val_00000.bin, ...         the validation split, same format

Every document is encoded on its own and followed by the EOS token (preceded by BOS when asked), so
no token sequence runs across documents unmarked. A document goes to the validation split when a
hash of its id falls under `val_fraction`: stable across runs, workers and corpus order, and needs no
second pass. Shards are written to a temporary name and renamed when complete.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from lmforge.config import ConfigError
from lmforge.data.sources import RejectLog, check_encoding, encoding_field, iter_documents, on_error_field
from lmforge.files import write_json
from lmforge.progress import progress

if TYPE_CHECKING:
    import numpy as np

MANIFEST = "manifest.json"


@dataclass
class TokenizeConfig:
    input: list[str] = field(default_factory=lambda: ["builtin:python-docs"],
                             metadata={"help": "files, directories, globs or builtin:python-docs"})
    tokenizer: str = field(default="runs/tokenizer", metadata={"help": "tokenizer directory"})
    out: str = field(default="runs/tokens", metadata={"help": "output directory for the shards"})
    val_fraction: float = field(default=0.01, metadata={"help": "share of documents (by id hash) kept for validation",
                                                        "check": (lambda v: 0 <= v < 1, "in [0, 1)")})
    shard_tokens: int = field(default=1 << 27, metadata={"help": "tokens per shard file at most"})
    bos: bool = field(default=False, metadata={"help": "also put the BOS token before each document"})
    batch_docs: int = field(default=256, metadata={"help": "documents encoded together (threads)"})
    errors: str = field(default="strict", metadata={"help": "invalid UTF-8: strict or replace",
                                                    "choices": ["strict", "replace"]})
    text_field: str = field(default="text", metadata={"help": "JSON field holding the text in .jsonl input"})
    encoding: str = encoding_field()
    on_error: str = on_error_field()
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})


def is_validation(doc_id: str, fraction: float) -> bool:
    """Whether a document goes to the validation split: a hash of its id under `fraction` (stable across runs,
    workers and corpus order)."""
    h = int.from_bytes(hashlib.blake2b(doc_id.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
    return h / 2**64 < fraction


class _ShardWriter:
    def __init__(self, out: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.out, self.split, self.dtype, self.limit = out, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self.parts: list[np.ndarray] = []
        self.starts: list[int] = []
        self.size = 0

    def add(self, ids: list[int]) -> None:
        import numpy as np  # (here, not at the top: `lmforge --help` reads TokenizeConfig and stays numpy-free)

        if self.size and self.size + len(ids) > self.limit:
            self.flush()
        self.starts.append(self.size)
        self.parts.append(np.asarray(ids, dtype=self.dtype))
        self.size += len(ids)

    def flush(self) -> None:
        if not self.parts:
            return
        import numpy as np

        name = f"{self.split}_{len(self.shards):05d}"
        data = np.concatenate(self.parts)
        for suffix, array in ((".bin", data), (".docs.npy", np.asarray(self.starts, dtype=np.int64))):
            tmp = self.out / f".{name}{suffix}.tmp"
            with open(tmp, "wb") as f:
                if suffix == ".bin":
                    array.tofile(f)
                else:
                    np.save(f, array)
            os.replace(tmp, self.out / f"{name}{suffix}")
        self.shards.append({"file": f"{name}.bin", "docs_file": f"{name}.docs.npy", "tokens": int(data.size),
                            "documents": len(self.starts)})
        self.parts, self.starts, self.size = [], [], 0


def tokenize_corpus(cfg: TokenizeConfig) -> dict:
    """Write the shards and manifest for `cfg`; returns the manifest."""
    from lmforge.tokenizer.formats import load_tokenizer

    tok = load_tokenizer(cfg.tokenizer)
    if not 0 <= cfg.val_fraction < 1:
        raise ConfigError(f"val_fraction must be in [0, 1), got {cfg.val_fraction}")
    eos = tok.special_tokens.get(tok.eos_token) if tok.eos_token else None
    if eos is None:
        raise ConfigError(f"{cfg.tokenizer}: the tokenizer has no EOS token to mark document boundaries")
    bos = tok.special_tokens.get(tok.bos_token) if (cfg.bos and tok.bos_token) else None
    if cfg.bos and bos is None:
        raise ConfigError(f"{cfg.tokenizer}: --bos asked for, but the tokenizer has no BOS token")
    import numpy as np

    dtype = np.dtype(np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    writers = {s: _ShardWriter(out, s, dtype, cfg.shard_tokens) for s in ("train", "val")}
    t0 = time.perf_counter()
    n_chars = 0
    bar = progress(desc="tokenize", unit="doc", enabled=cfg.progress)

    check_encoding(cfg.encoding)
    rejects = RejectLog() if cfg.on_error == "skip" else None

    def batches() -> Iterator[list]:
        batch = []
        for doc in iter_documents(cfg.input, errors=cfg.errors, text_field=cfg.text_field, on_bad=rejects,
                                  encoding=cfg.encoding):
            batch.append(doc)
            if len(batch) >= cfg.batch_docs:
                yield batch
                batch = []
        if batch:
            yield batch

    for batch in batches():
        encoded = tok.encode_batch([d.text for d in batch], disallowed_special=())
        for doc, ids in zip(batch, encoded):
            ids = ([bos] if bos is not None else []) + ids + [eos]
            writers["val" if is_validation(doc.id, cfg.val_fraction) else "train"].add(ids)
            n_chars += len(doc.text)
        bar.update(len(batch))
    bar.close()
    for w in writers.values():
        w.flush()
    if rejects is not None:
        rejects.write(out)
    if not writers["train"].shards:
        raise ValueError(f"no training documents: the corpus {cfg.input} is empty or all went to validation")
    tok_json = Path(cfg.tokenizer) / "tokenizer.json"
    manifest = {
        "format": "lmforge-token-shards/1", "dtype": dtype.name, "vocab_size": tok.vocab_size,
        "eos_id": eos, "bos_id": bos,
        "tokenizer": str(cfg.tokenizer),
        "tokenizer_sha256": hashlib.sha256(tok_json.read_bytes()).hexdigest() if tok_json.exists() else None,
        "characters": n_chars, "seconds": round(time.perf_counter() - t0, 3),
        "rejected": len(rejects.items) if rejects is not None else 0,
        "splits": {s: {"shards": w.shards, "tokens": sum(x["tokens"] for x in w.shards),
                       "documents": sum(x["documents"] for x in w.shards)} for s, w in writers.items()},
    }
    write_json(out / MANIFEST, manifest)
    return manifest
