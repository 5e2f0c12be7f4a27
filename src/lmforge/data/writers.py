"""The files a pipeline run writes: shard writers (jsonl.gz, parquet) that rename into place when complete, the
run directory's layout, split_by folder names."""

from __future__ import annotations

import gzip
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import regex

from lmforge.data.document import Document
from lmforge.files import atomic_write


class _NothingWritten(Exception):
    """Closes an atomic write without keeping its file."""


class JsonlGzWriter:
    """Documents into one .jsonl.gz, renamed into place on close; with keep_empty=False (rejects) a file that got
    nothing is not left behind."""

    def __init__(self, path: Path, keep_empty: bool = True):
        self.path, self.count, self.keep_empty = path, 0, keep_empty
        self._ctx = atomic_write(path, "wb")
        self._raw = self._ctx.__enter__()
        self._gz = gzip.GzipFile(fileobj=self._raw, mode="wb", compresslevel=5, mtime=0)

    def write(self, record: dict) -> None:
        self._gz.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8", "surrogatepass"))
        self.count += 1

    def close(self) -> None:
        if self.count == 0 and not self.keep_empty:
            self.abort(_NothingWritten())
            return
        self._gz.close()
        self._ctx.__exit__(None, None, None)

    def abort(self, exc: BaseException) -> None:
        self._gz.close()
        self._ctx.__exit__(type(exc), exc, exc.__traceback__)


class ParquetWriter:
    """Documents into one zstd parquet file (id, text, meta as JSON), written in row groups of
    `batch` so memory stays bounded, renamed into place on close."""

    def __init__(self, path: Path, batch: int = 10_000):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.path, self.batch, self.rows, self.count = path, batch, [], 0
        self._schema = pa.schema([("id", pa.string()), ("text", pa.string()), ("meta", pa.string())])
        self._ctx = atomic_write(path, "wb")
        self._writer = pq.ParquetWriter(self._ctx.__enter__(), self._schema, compression="zstd")

    def write(self, record: dict) -> None:
        meta = {k: v for k, v in record.items() if k not in ("id", "text")}
        self.rows.append({"id": record["id"], "text": record["text"], "meta": json.dumps(meta, ensure_ascii=False)})
        self.count += 1
        if len(self.rows) >= self.batch:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if self.rows:
            self._writer.write_table(pa.Table.from_pylist(self.rows, schema=self._schema))
            self.rows = []

    def close(self) -> None:
        self._flush()
        self._writer.close()
        self._ctx.__exit__(None, None, None)

    def abort(self, exc: BaseException) -> None:
        self._writer.close()
        self._ctx.__exit__(type(exc), exc, exc.__traceback__)


def flat_record(doc: Document) -> dict:
    meta = {k: v for k, v in doc.meta.items() if k not in ("id", "text")}
    return {"id": doc.id, "text": doc.text, **meta}


def read_work_shard(path: Path):
    with gzip.open(path, "rt", encoding="utf-8", errors="surrogatepass") as f:
        for line in f:
            rec = json.loads(line)
            yield Document(rec["id"], rec["text"], rec["meta"])


@dataclass
class RunPaths:
    """Where a run keeps its files under the output directory."""

    root: Path

    @property
    def work(self) -> Path:
        return self.root / "work"

    def stage_out(self, stage: int, shard: int) -> Path:
        return self.work / f"stage{stage}" / f"{shard:05d}.jsonl.gz"

    def signatures(self, stage: int, shard: int) -> Path:
        return self.work / f"stage{stage}" / f"{shard:05d}.sig.npz"

    def done(self, stage: int, shard: int) -> Path:
        return self.work / f"stage{stage}" / f"{shard:05d}.done.json"

    def decision(self, stage: int) -> Path:
        return self.work / f"global{stage}.npz"

    def rejects(self, stage: int, shard: int) -> Path:
        return self.root / "rejects" / f"{shard:05d}-s{stage}.jsonl.gz"


def split_folder(value: str) -> str:
    """The data/ subfolder for a split_by value: the value itself where it is a safe folder name (letters of any
    script, digits, . _ -), else a cleaned name plus a hash of the value, so that values never share a folder
    ("a/b" and "a_b") and never leave data/ ("..")."""
    clean = regex.sub(r"[^\w.-]", "_", value)[:80]
    if clean == value and not value.startswith("."):
        return value
    return f"{clean.lstrip('.') or 'value'}-{hashlib.sha256(value.encode('utf-8', 'surrogatepass')).hexdigest()[:8]}"


