"""The data pipeline: readers -> cleaners -> filters -> dedup -> writers, on a local process
pool or on Ray, resumable, with every removed document accounted for.

A pipeline file (YAML) or `PipelineConfig` names the inputs, the output directory and the
steps in order:

    input: [raw/, extra/*.jsonl.zst]
    output: runs/clean
    steps:
      - fix_encoding
      - whitespace
      - pii
      - language: {keep: [en, zh], min_score: 0.5}
      - gopher_quality
      - gopher_repetition
      - minhash_dedup: {threshold: 0.8, verify: true}

How it runs. Every input file is a shard. Global steps (exact_dedup, minhash_dedup) cut the
step list into stages; stage k runs its steps on every shard in parallel (a map task) and,
when a global step follows, also writes that step's per-document signatures. The global
step then decides in one process from the signatures alone (texts are reread only to verify
candidate pairs) and stage k+1 starts from the kept documents. Map tasks are independent
functions of (config, stage, shard), so the local executor (multiprocessing) and the Ray
executor run the very same code.

Output directory:
    data/00000.jsonl.gz ...       kept documents: {"id", "text", **meta} (or .parquet; with
                                  split_by: data/<value>/00000.jsonl.gz)
    rejects/00000-s0.jsonl.gz     every removed document: id, step, reason, where, text, meta
    stats.json                    per step: documents and characters in/out, reasons, lengths
    pipeline.yaml                 the resolved configuration
    work/                         intermediate shards, signatures and .done markers (resume)

Resume: a map task whose `.done` marker exists is skipped, so rerunning an interrupted
pipeline finishes only what is missing. Every file is written to a temporary name and
renamed when complete: an interrupted run leaves complete shards only.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import regex
import yaml

from lmforge.config import ConfigError, from_dict, read_config_file
from lmforge.data.document import Document
from lmforge.data.sources import iter_file_documents, resolve_inputs
from lmforge.data.step import GlobalStep, Step, build_step
from lmforge.files import atomic_write, write_json

log = logging.getLogger(__name__)


@dataclass
class PipelineConfig:
    input: list[str] = field(default_factory=list, metadata={"help": "files, directories, globs, builtin:python-docs"})
    output: str = field(default="", metadata={"help": "output directory"})
    steps: list = field(default_factory=list, metadata={"help": "step names, or {name: {param: value}} mappings"})
    text_field: str = field(default="text", metadata={"help": "text field/column of jsonl, csv and parquet input"})
    errors: str = field(default="strict", metadata={"choices": ["strict", "replace"],
                                                    "help": "undecodable bytes: a bad record, or replaced by U+FFFD"})
    encoding: str = field(default="utf-8", metadata={
        "help": "text encoding of the inputs (utf-8, gb18030, gbk, big5, utf-16, latin-1, ...) or auto (a byte-order "
                "mark, else UTF-8, else GB18030, else Latin-1; documents read otherwise than as UTF-8 carry meta "
                "encoding)"})
    on_error: str = field(default="fail", metadata={"choices": ["fail", "skip"],
                                                    "help": "bad input record: stop, or write it to rejects and go on"})
    executor: str = field(default="local", metadata={"choices": ["local", "ray"]})
    workers: int = field(default=0, metadata={"help": "worker processes for the local executor (0: all cores)"})
    ray_address: str | None = field(default=None, metadata={"help": "Ray cluster address (default: a local instance)"})
    output_format: str = field(default="jsonl.gz", metadata={"choices": ["jsonl.gz", "parquet"]})
    split_by: str | None = field(default=None, metadata={"help": "meta field whose value names an output subfolder "
                                                                  "(e.g. language)"})
    keep_rejected_text: bool = field(default=True, metadata={"help": "store the text of removed documents in rejects"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})


def load_pipeline(path: str | os.PathLike | None = None, **overrides: Any) -> PipelineConfig:
    data = read_config_file(path) if path else {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    cfg = from_dict(PipelineConfig, data, str(path) if path else "pipeline")
    build_steps(cfg)  # validate step names and parameters before any work starts
    from lmforge.data.sources import check_encoding

    check_encoding(cfg.encoding)
    return cfg


def build_steps(cfg: PipelineConfig) -> list[Step]:
    steps = []
    for i, spec in enumerate(cfg.steps):
        where = f"steps[{i}]"
        if isinstance(spec, str):
            steps.append(build_step(spec, {}, where))
        elif isinstance(spec, dict) and len(spec) == 1:
            (name, params), = spec.items()
            if params is not None and not isinstance(params, dict):
                raise ConfigError(f"{where}.{name}: parameters must be a mapping, got {params!r}")
            steps.append(build_step(str(name), params, where))
        else:
            raise ConfigError(f"{where}: a step is a name or a one-key mapping {{name: {{params}}}}, got {spec!r}")
    return steps


def _stages(steps: list[Step]) -> list[tuple[list[Step], GlobalStep | None]]:
    """[(map steps, global step after them or None)], the last stage has no global step."""
    out, current = [], []
    for s in steps:
        if isinstance(s, GlobalStep):
            out.append((current, s))
            current = []
        else:
            current.append(s)
    out.append((current, None))
    return out


# ----- stats ------------------------------------------------------------------------------------

_NUMBER = regex.compile(r"\d+(?:\.\d+)?")
LENGTH_BINS = [0] + [2 ** i for i in range(4, 25)]  # characters, log-spaced up to 16M


def reason_key(reason: str) -> str:
    """A reason with its numbers masked, so equal rules count together."""
    return _NUMBER.sub("#", reason)


def _histogram(lengths: list[int]) -> list[int]:
    return np.histogram(lengths, bins=LENGTH_BINS + [2 ** 62])[0].tolist() if lengths else [0] * len(LENGTH_BINS)


class _StepStats:
    def __init__(self, name: str):
        self.name = name
        self.docs_in = self.docs_out = self.chars_in = self.chars_out = 0
        self.reasons: Counter = Counter()

    def as_dict(self) -> dict:
        return {"step": self.name, "docs_in": self.docs_in, "docs_out": self.docs_out, "chars_in": self.chars_in,
                "chars_out": self.chars_out, "reasons": dict(self.reasons.most_common())}


def merge_stats(parts: list[dict]) -> dict:
    """Sum per-shard stats (same steps in the same order)."""
    if not parts:
        return {"steps": [], "lengths_in": [0] * len(LENGTH_BINS), "lengths_out": [0] * len(LENGTH_BINS)}
    steps = []
    for i, first in enumerate(parts[0]["steps"]):
        merged = {"step": first["step"], "docs_in": 0, "docs_out": 0, "chars_in": 0, "chars_out": 0, "reasons": Counter()}
        for p in parts:
            s = p["steps"][i]
            for k in ("docs_in", "docs_out", "chars_in", "chars_out"):
                merged[k] += s[k]
            merged["reasons"].update(s["reasons"])
        merged["reasons"] = dict(merged["reasons"].most_common())
        steps.append(merged)
    return {"steps": steps,
            "lengths_in": np.sum([p["lengths_in"] for p in parts], axis=0).tolist(),
            "lengths_out": np.sum([p["lengths_out"] for p in parts], axis=0).tolist()}


# ----- shard files ------------------------------------------------------------------------------

class _NothingWritten(Exception):
    """Closes an atomic write without keeping its file."""


class _JsonlGzWriter:
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


class _ParquetWriter:
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


def _flat_record(doc: Document) -> dict:
    meta = {k: v for k, v in doc.meta.items() if k not in ("id", "text")}
    return {"id": doc.id, "text": doc.text, **meta}


def _read_work_shard(path: Path):
    with gzip.open(path, "rt", encoding="utf-8", errors="surrogatepass") as f:
        for line in f:
            rec = json.loads(line)
            yield Document(rec["id"], rec["text"], rec["meta"])


# ----- one map task -----------------------------------------------------------------------------

@dataclass
class _Paths:
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


_STEP_CACHE: dict[str, list[Step]] = {}


def _steps_for(cfg: PipelineConfig) -> list[Step]:
    key = json.dumps(cfg.steps, sort_keys=True, default=str)
    if key not in _STEP_CACHE:
        steps = build_steps(cfg)
        for s in steps:
            s.setup()
        _STEP_CACHE[key] = steps
    return _STEP_CACHE[key]


def split_folder(value: str) -> str:
    """The data/ subfolder for a split_by value: the value itself where it is a safe folder name (letters of any
    script, digits, . _ -), else a cleaned name plus a hash of the value, so that values never share a folder
    ("a/b" and "a_b") and never leave data/ ("..")."""
    clean = regex.sub(r"[^\w.-]", "_", value)[:80]
    if clean == value and not value.startswith("."):
        return value
    return f"{clean.lstrip('.') or 'value'}-{hashlib.sha256(value.encode('utf-8', 'surrogatepass')).hexdigest()[:8]}"


def run_map_task(cfg_dict: dict, stage: int, shard: int, source: str, n_stages: int) -> dict:
    """Run stage `stage` of the pipeline on one shard; returns its stats (also saved in
    the .done marker). A pure function of its arguments and the files it reads."""
    cfg = from_dict(PipelineConfig, cfg_dict, "pipeline")
    paths = _Paths(Path(cfg.output))
    done = paths.done(stage, shard)
    if done.exists():
        return json.loads(done.read_text(encoding="utf-8"))
    stage_steps, global_step = _stages(_steps_for(cfg))[stage]
    last = stage == n_stages - 1
    rejects = _JsonlGzWriter(paths.rejects(stage, shard), keep_empty=False)
    stats = [_StepStats(s.name) for s in stage_steps]
    read_stats = _StepStats("read" if stage == 0 else _stages(_steps_for(cfg))[stage - 1][1].name)
    lengths_in: list[int] = []
    lengths_out: list[int] = []

    def reject(doc_or_where, step: str, reason: str, raw: str = "", meta: dict | None = None) -> None:
        if isinstance(doc_or_where, Document):
            d = doc_or_where
            rec = {"id": d.id, "step": step, "reason": reason, "where": _where(d),
                   "text": d.text if cfg.keep_rejected_text else None, "meta": d.meta}
        else:
            rec = {"id": None, "step": step, "reason": reason, "where": doc_or_where,
                   "text": raw if cfg.keep_rejected_text else None, "meta": meta or {}}
        rejects.write(rec)

    def on_bad(where: str, reason: str, raw: str) -> None:
        read_stats.docs_in += 1
        read_stats.reasons[reason_key(reason)] += 1
        reject(where, "read", reason, raw)

    writers: dict[str, Any] = {}

    def writer_for(doc: Document):
        if not last:
            key = ""
            path = paths.stage_out(stage, shard)
        else:
            key = str(doc.meta.get(cfg.split_by, "unknown")) if cfg.split_by else ""
            ext = "parquet" if cfg.output_format == "parquet" else "jsonl.gz"
            path = paths.root / "data" / split_folder(key) / f"{shard:05d}.{ext}" if key \
                else paths.root / "data" / f"{shard:05d}.{ext}"
        if key not in writers:
            writers[key] = _ParquetWriter(path) if (last and cfg.output_format == "parquet") else _JsonlGzWriter(path)
        return writers[key]

    if not last:  # the next stage reads this shard even when every document was removed
        writer_for(Document("", "", {}))
    sig_texts: list[str] = []
    sig_lengths: list[int] = []
    sig_scores: list[float] = []
    sig_parts: list[np.ndarray] = []

    try:
        if stage == 0:
            documents = iter_file_documents(source, cfg.errors, cfg.text_field,
                                            on_bad if cfg.on_error == "skip" else None, cfg.encoding)
        else:
            documents = _documents_after_global(cfg, paths, stage, shard, reject, read_stats)
        for doc in documents:
            if stage == 0:
                read_stats.docs_in += 1
                read_stats.docs_out += 1
                read_stats.chars_in += len(doc.text)
                read_stats.chars_out += len(doc.text)
            lengths_in.append(len(doc.text))
            for step, st in zip(stage_steps, stats):
                st.docs_in += 1
                st.chars_in += len(doc.text)
                try:
                    result = step.apply(doc)
                except _DOCUMENT_ERRORS as e:  # a document the step cannot take (bad encoding, pathological input)
                    if cfg.on_error == "fail":
                        raise RuntimeError(f"step {step.name} failed on document {doc.id} ({_where(doc)}): {e!r}") from e
                    result = f"{step.name}: error {type(e).__name__}: {e}"
                # anything else (AttributeError, TypeError, NameError, ...) is a bug in the step: the run stops
                # with its traceback, whatever on_error says
                if isinstance(result, str):
                    st.reasons[reason_key(result)] += 1
                    reject(doc, step.name, result)
                    doc = None
                    break
                doc = result
                st.docs_out += 1
                st.chars_out += len(doc.text)
            if doc is None:
                continue
            lengths_out.append(len(doc.text))
            if global_step is not None:
                sig_texts.append(doc.text)
                sig_lengths.append(len(doc.text))
                score = doc.meta.get(getattr(global_step, "score_field", ""), None)
                sig_scores.append(float(score) if isinstance(score, (int, float)) else np.nan)
                if len(sig_texts) >= 1024:
                    sig_parts.append(global_step.signatures(sig_texts))
                    sig_texts = []
            w = writer_for(doc)
            w.write(_flat_record(doc) if last else {"id": doc.id, "text": doc.text, "meta": doc.meta})
        if global_step is not None:
            if sig_texts:
                sig_parts.append(global_step.signatures(sig_texts))
            sig = np.concatenate(sig_parts) if sig_parts else np.zeros((0, 1), np.uint64)
            buf = io.BytesIO()
            np.savez(buf, signatures=sig, lengths=np.array(sig_lengths, np.int64), scores=np.array(sig_scores))
            with atomic_write(paths.signatures(stage, shard), "wb") as f:
                f.write(buf.getvalue())
    except BaseException as e:
        for w in writers.values():
            w.abort(e)
        rejects.abort(e)
        raise
    for w in writers.values():
        w.close()
    rejects.close()
    result = {"stage": stage, "shard": shard, "source": source,
              "steps": [read_stats.as_dict()] + [s.as_dict() for s in stats],
              "lengths_in": _histogram(lengths_in), "lengths_out": _histogram(lengths_out)}
    write_json(done, result)
    return result


# what a step may raise on a document it cannot take; on_error decides between a reject and a failed run
_DOCUMENT_ERRORS = (ValueError, UnicodeError, RecursionError, OverflowError)


def _where(doc: Document) -> str:
    src, line = doc.meta.get("source"), doc.meta.get("line")
    return f"{src}:{line}" if src and line else str(src or doc.id)


def _documents_after_global(cfg, paths: _Paths, stage: int, shard: int, reject, read_stats: _StepStats):
    """Documents of the previous stage's shard that the global step kept, with cluster ids."""
    with np.load(paths.decision(stage - 1)) as z:
        start = int(z["shard_start"][shard])
        keep = z["keep"]
        cluster = z["cluster"]
        kept_ids = z["kept_ids"]
    global_name = _stages(_steps_for(cfg))[stage - 1][1].name
    for i, doc in enumerate(_read_work_shard(paths.stage_out(stage - 1, shard))):
        g = start + i
        read_stats.docs_in += 1
        read_stats.chars_in += len(doc.text)
        c = int(cluster[g])
        if c >= 0:
            doc.meta = {**doc.meta, f"{global_name}_cluster": str(kept_ids[g])}
        if not keep[g]:
            reason = f"{global_name}: duplicate of {kept_ids[g]}"
            read_stats.reasons[f"{global_name}: duplicate"] += 1
            reject(doc, global_name, reason)
            continue
        read_stats.docs_out += 1
        read_stats.chars_out += len(doc.text)
        yield doc


# ----- global steps -----------------------------------------------------------------------------

def run_global_step(cfg: PipelineConfig, stage: int, n_shards: int, step: GlobalStep) -> dict:
    paths = _Paths(Path(cfg.output))
    out = paths.decision(stage)
    info_path = out.with_suffix(".json")
    if out.exists() and info_path.exists():
        return json.loads(info_path.read_text(encoding="utf-8"))
    sigs, lengths, scores, starts = [], [], [], [0]
    for shard in range(n_shards):
        with np.load(paths.signatures(stage, shard)) as z:
            sigs.append(z["signatures"])
            lengths.append(z["lengths"])
            scores.append(z["scores"])
        starts.append(starts[-1] + len(lengths[-1]))
    width = max((s.shape[1] for s in sigs if len(s)), default=1)
    sig = np.concatenate([s for s in sigs if len(s)]) if any(len(s) for s in sigs) else np.zeros((0, width))
    shard_of = np.repeat(np.arange(n_shards), np.diff(starts))

    def texts(indices: np.ndarray) -> list[str]:
        """Texts of global document indices, reread from the stage's shards (for verification)."""
        out_texts: dict[int, str] = {}
        for shard in np.unique(shard_of[indices]):
            wanted = set((indices[shard_of[indices] == shard] - starts[shard]).tolist())
            for i, doc in enumerate(_read_work_shard(paths.stage_out(stage, int(shard)))):
                if i in wanted:
                    out_texts[starts[shard] + i] = doc.text
        return [out_texts[int(i)] for i in indices]

    t0 = time.perf_counter()
    if starts[-1] == 0:  # everything was removed before this step: nothing to compare, an empty decision
        from lmforge.data.dedup_step import Decision

        decision = Decision(np.zeros(0, bool), np.zeros(0, np.int64), {"duplicates": 0})
    else:
        decision = step.decide(sig, np.concatenate(lengths), np.concatenate(scores), texts)
    # the id of each cluster's kept document, for metadata and reject reasons
    ids = _doc_ids(paths, stage, n_shards, np.unique(decision.cluster[decision.cluster >= 0]), starts, shard_of)
    kept_ids = np.array([ids.get(int(c), "") for c in decision.cluster], dtype=object).astype(str)
    buf = io.BytesIO()
    np.savez(buf, keep=decision.keep, cluster=decision.cluster, shard_start=np.array(starts), kept_ids=kept_ids)
    with atomic_write(out, "wb") as f:
        f.write(buf.getvalue())
    info = {"step": step.name, "documents": int(len(decision.keep)), "kept": int(decision.keep.sum()),
            "seconds": round(time.perf_counter() - t0, 3), **decision.stats}
    write_json(info_path, info)
    return info


def _doc_ids(paths: _Paths, stage: int, n_shards: int, wanted: np.ndarray, starts: list[int],
             shard_of: np.ndarray) -> dict[int, str]:
    ids: dict[int, str] = {}
    for shard in np.unique(shard_of[wanted]) if len(wanted) else []:
        local = set((wanted[shard_of[wanted] == shard] - starts[shard]).tolist())
        for i, doc in enumerate(_read_work_shard(paths.stage_out(stage, int(shard)))):
            if i in local:
                ids[starts[shard] + i] = doc.id
    return ids


# ----- executors --------------------------------------------------------------------------------

def _run_local(tasks: list[tuple], workers: int, progress: bool, desc: str) -> list[dict]:
    from tqdm.auto import tqdm

    bar = tqdm(total=len(tasks), desc=desc, unit="shard", disable=not progress)
    results = []
    if workers <= 1 or len(tasks) <= 1:
        for t in tasks:
            results.append(run_map_task(*t))
            bar.update()
    else:
        import multiprocessing as mp

        ctx = mp.get_context("fork") if hasattr(os, "fork") else mp.get_context()
        with ctx.Pool(min(workers, len(tasks)), initializer=_default_sigterm) as pool:
            for r in pool.imap_unordered(_star_map_task, tasks):
                results.append(r)
                bar.update()
    bar.close()
    return results


def _default_sigterm() -> None:
    """Pool initializer: the default SIGTERM, not a Python handler inherited from the parent (Ray's), which would
    keep Pool.terminate from stopping an idle worker."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _star_map_task(args: tuple) -> dict:
    return run_map_task(*args)


def _run_ray(tasks: list[tuple], address: str | None, progress: bool, desc: str) -> list[dict]:
    try:
        import ray
    except ImportError:
        raise ConfigError("executor 'ray' needs Ray: pip install 'lmforge[ray]'") from None
    from tqdm.auto import tqdm

    if not ray.is_initialized():
        previous = signal.getsignal(signal.SIGTERM)
        ray.init(address=address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
        if threading.current_thread() is threading.main_thread():
            # ray.init installs a SIGTERM handler in this process that outlives ray.shutdown; put ours back
            signal.signal(signal.SIGTERM, previous)
    remote = ray.remote(num_cpus=1, max_retries=2)(run_map_task)
    pending = [remote.remote(*t) for t in tasks]
    results = []
    bar = tqdm(total=len(tasks), desc=desc, unit="shard", disable=not progress)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        results.append(ray.get(done[0]))
        bar.update()
    bar.close()
    return results


def _input_stamps(sources: list[str]) -> list[list]:
    """Each resolved input with its size and modification time: a rerun must see the same files, unchanged."""
    stamps = []
    for src in sources:
        try:
            st = os.stat(src)
            stamps.append([src, st.st_size, st.st_mtime_ns])
        except OSError:  # builtin:NAME: the Python installation's own data
            stamps.append([src, None, sys.version])
    return stamps


def _describe_changes(before: list[list], after: list[list]) -> str:
    old, new = {s[0]: s[1:] for s in before}, {s[0]: s[1:] for s in after}

    def names(xs: list[str]) -> str:
        return ", ".join(xs[:3]) + (f" and {len(xs) - 3} more" if len(xs) > 3 else "")

    parts = [f"{what}: {names(xs)}" for what, xs in (
        ("added", sorted(set(new) - set(old))), ("removed", sorted(set(old) - set(new))),
        ("changed", sorted(k for k in set(old) & set(new) if old[k] != new[k]))) if xs]
    return "; ".join(parts) or "the order of the inputs"


def _config_fingerprint(cfg: PipelineConfig) -> str:
    relevant = {k: v for k, v in dataclasses.asdict(cfg).items()
                if k not in ("executor", "workers", "ray_address", "progress")}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_pipeline(cfg: PipelineConfig, overwrite: bool = False) -> dict:
    """Run (or resume) the pipeline; returns the merged stats, also written to stats.json."""
    if not cfg.output:
        raise ConfigError("pipeline: 'output' (the output directory) is required")
    steps = build_steps(cfg)
    sources = resolve_inputs(cfg.input)
    root = Path(cfg.output)
    state = {"config": _config_fingerprint(cfg), "inputs": _input_stamps(sources)}
    marker = root / "work" / "run.json"
    if root.exists() and any(root.iterdir()):
        earlier = json.loads(marker.read_text()) if marker.exists() else None
        finished = (root / "stats.json").exists()
        if overwrite:
            shutil.rmtree(root)
        elif earlier is None:
            raise ConfigError(f"{root}: holds other files, not an lmforge pipeline's output; choose a new output "
                              "directory or pass --overwrite")
        elif earlier != state and not finished:
            # an unfinished run (it failed or was stopped) has no complete output to protect: start over
            log.warning("%s: an earlier run there did not finish and had other settings or inputs; starting over", root)
            shutil.rmtree(root)
        elif earlier["config"] != state["config"]:
            raise ConfigError(f"{root}: holds the output of a pipeline with other settings; choose a new output "
                              "directory or pass --overwrite to replace it")
        elif earlier["inputs"] != state["inputs"]:
            raise ConfigError(f"{root}: the inputs changed since this output was written "
                              f"({_describe_changes(earlier['inputs'], state['inputs'])}); its shards belong to the "
                              "old files, so nothing is reused: pass --overwrite to run again on the current inputs")
    write_json(marker, state)
    with atomic_write(root / "pipeline.yaml") as f:
        yaml.safe_dump(dataclasses.asdict(cfg), f, allow_unicode=True, sort_keys=False)

    stages = _stages(steps)
    cfg_dict = dataclasses.asdict(cfg)
    workers = cfg.workers or os.cpu_count() or 1
    all_stats, globals_info = [], []
    t0 = time.perf_counter()
    _remove_temporaries(root)  # left by a run that was killed mid-write
    for k, (_, global_step) in enumerate(stages):
        tasks = [(cfg_dict, k, i, src, len(stages)) for i, src in enumerate(sources)]
        desc = f"stage {k + 1}/{len(stages)}"
        try:
            if cfg.executor == "ray":
                results = _run_ray(tasks, cfg.ray_address, cfg.progress, desc)
            else:
                results = _run_local(tasks, workers, cfg.progress, desc)
        except BaseException:
            _remove_temporaries(root)  # workers stopped mid-shard; their finished shards stay
            raise
        results.sort(key=lambda r: r["shard"])
        all_stats.append(results)
        if global_step is not None:
            log.debug("running %s over %d shards", global_step.name, len(sources))
            globals_info.append(run_global_step(cfg, k, len(sources), global_step))
    merged = [merge_stats(r) for r in all_stats]
    # one row per step in pipeline order: "read", the map steps, each global step, ...
    step_rows = [row for m in merged for row in m["steps"]]
    stats = {"inputs": sources, "shards": len(sources), "seconds": round(time.perf_counter() - t0, 2),
             "documents_read": step_rows[0]["docs_in"], "documents_kept": step_rows[-1]["docs_out"],
             "documents_rejected": _count_rejects(root), "steps": step_rows, "global_steps": globals_info,
             "length_bins": LENGTH_BINS, "lengths_in": merged[0]["lengths_in"], "lengths_out": merged[-1]["lengths_out"]}
    write_json(root / "stats.json", stats)
    return stats


def _remove_temporaries(root: Path) -> None:
    for p in root.rglob(".*.tmp"):
        p.unlink(missing_ok=True)


def _count_rejects(root: Path) -> int:
    n = 0
    for p in sorted((root / "rejects").glob("*.jsonl.gz")):
        with gzip.open(p, "rb") as f:
            n += sum(1 for _ in f)
    return n


__all__ = ["PipelineConfig", "load_pipeline", "run_pipeline", "build_steps"]
