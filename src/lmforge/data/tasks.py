"""The work of a pipeline: one map task (a stage's steps over one shard, plus the signatures a global step needs)
and one global step (deciding from the signatures of every shard). Both are functions of the config and the files
they read, so any executor runs them."""

from __future__ import annotations

import io
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lmforge.config import from_dict
from lmforge.data.document import Document
from lmforge.data.sources import iter_file_documents
from lmforge.data.stats import StepStats, histogram, reason_key
from lmforge.data.step import Decision, GlobalStep, Signatures, Step
from lmforge.data.writers import JsonlGzWriter, ParquetWriter, RunPaths, flat_record, read_work_shard, split_folder
from lmforge.files import atomic_write, write_json

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from lmforge.data.pipeline import PipelineConfig


def split_stages(steps: list[Step]) -> list[tuple[list[Step], GlobalStep | None]]:
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


_STEP_CACHE: dict[str, list[Step]] = {}


def steps_for(cfg: PipelineConfig) -> list[Step]:
    key = json.dumps(cfg.steps, sort_keys=True, default=str)
    if key not in _STEP_CACHE:
        from lmforge.data.pipeline import build_steps

        steps = build_steps(cfg)
        for s in steps:
            s.setup()
        _STEP_CACHE[key] = steps
    return _STEP_CACHE[key]


def writes_work_shard(stages: list[tuple[list[Step], GlobalStep | None]], stage: int) -> bool:
    """Whether a stage keeps its output documents on disk for the next stage. Only a stage whose map steps change
    or drop documents does; after a stage without map steps the next stage reads that stage's own input again
    and applies the decision itself, so no text is compressed, written and read back in between (datatrove's
    dedup does the same: signatures and decisions between stages, one final write)."""
    return stage < len(stages) - 1 and bool(stages[stage][0])


class _ShardWriters:
    """A map task's output files, opened on first use: the work shard the next stage reads, or on the last stage the
    shard's data file (one per `split_by` value)."""

    def __init__(self, cfg, paths: RunPaths, stage: int, shard: int, last: bool):
        self.cfg, self.paths, self.stage, self.shard, self.last = cfg, paths, stage, shard, last
        self.open: dict[str, Any] = {}

    def writer_for(self, doc: Document):
        cfg, paths, shard = self.cfg, self.paths, self.shard
        if not self.last:
            key = ""
            path = paths.stage_out(self.stage, shard)
        else:
            key = str(doc.meta.get(cfg.split_by, "unknown")) if cfg.split_by else ""
            ext = "parquet" if cfg.output_format == "parquet" else "jsonl.gz"
            path = paths.root / "data" / split_folder(key) / f"{shard:05d}.{ext}" if key \
                else paths.root / "data" / f"{shard:05d}.{ext}"
        if key not in self.open:
            self.open[key] = ParquetWriter(path) if (self.last and cfg.output_format == "parquet") \
                else JsonlGzWriter(path)
        return self.open[key]


def _apply_steps(doc: Document, first: int, steps: list, stats: list[StepStats], on_error: str, reject,
                 pending: list) -> Document | None:
    """`doc` through steps[first:], counted in `stats`: the document that comes out, or None when a step rejected
    it (`reject` records why). Documents an expanding step makes go to the front of `pending`, each with the step to
    continue from."""
    for k in range(first, len(steps)):
        step, st = steps[k], stats[k]
        st.docs_in += 1
        st.chars_in += len(doc.text)
        try:
            result = step.apply(doc)
        except _DOCUMENT_ERRORS as e:  # a document the step cannot take (bad encoding, pathological input)
            if on_error == "fail":
                raise RuntimeError(f"step {step.name} failed on document {doc.id} ({_where(doc)}): {e!r}") from e
            result = f"{step.name}: error {type(e).__name__}: {e}"
        # anything else (AttributeError, TypeError, NameError, ...) is a bug in the step: the run stops with its
        # traceback, whatever on_error says
        if isinstance(result, str):
            st.reasons[reason_key(result)] += 1
            reject(doc, step.name, result)
            return None
        if isinstance(result, list):  # the document first, then the ones it made
            doc, made = result[0], result[1:]
            pending[0:0] = [(d, k + 1) for d in made]
            st.docs_out += len(made)
            st.chars_out += sum(len(d.text) for d in made)
        else:
            doc = result
        st.docs_out += 1
        st.chars_out += len(doc.text)
    return doc


def run_map_task(cfg_dict: dict, stage: int, shard: int, source: str, n_stages: int,
                 byte_range: tuple[int, int] | None = None) -> dict:
    """Run stage `stage` of the pipeline on one shard; returns its stats (also saved in
    the .done marker). A pure function of its arguments and the files it reads."""
    from lmforge.data.pipeline import PipelineConfig

    cfg = from_dict(PipelineConfig, cfg_dict, "pipeline")
    paths = RunPaths(Path(cfg.output))
    done = paths.done(stage, shard)
    if done.exists():
        return json.loads(done.read_text(encoding="utf-8"))
    stages = split_stages(steps_for(cfg))
    stage_steps, global_step = stages[stage]
    last = stage == n_stages - 1
    rejects = JsonlGzWriter(paths.rejects(stage, shard), keep_empty=False)
    stats = [StepStats(s.name) for s in stage_steps]
    read_stats = StepStats("read" if stage == 0 else stages[stage - 1][1].name)
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

    writers = _ShardWriters(cfg, paths, stage, shard, last)
    writer_for = writers.writer_for
    keep_work = writes_work_shard(stages, stage)
    if keep_work:  # the next stage reads this shard even when every document was removed
        writer_for(Document("", "", {}))
    signatures = _SignatureCollector(global_step) if global_step is not None else None

    try:
        documents = _stage_input(cfg, paths, stages, stage, shard, source, byte_range, on_bad, reject, read_stats)
        for doc in documents:
            if stage == 0:
                read_stats.docs_in += 1
                read_stats.docs_out += 1
                read_stats.chars_in += len(doc.text)
                read_stats.chars_out += len(doc.text)
            lengths_in.append(len(doc.text))
            pending = [(doc, 0)]  # an expanding step (augment) returns a list: the new documents go on after it
            while pending:
                doc, first = pending.pop(0)
                doc = _apply_steps(doc, first, stage_steps, stats, cfg.on_error, reject, pending)
                if doc is None:
                    continue
                lengths_out.append(len(doc.text))
                if signatures is not None:
                    signatures.add(doc)
                if last:
                    writer_for(doc).write(flat_record(doc))
                elif keep_work:
                    writer_for(doc).write({"id": doc.id, "text": doc.text, "meta": doc.meta})
        if signatures is not None:
            signatures.save(paths, stage, shard)
    except BaseException as e:
        for w in writers.open.values():
            w.abort(e)
        rejects.abort(e)
        raise
    for w in writers.open.values():
        w.close()
    rejects.close()
    result = {"stage": stage, "shard": shard, "source": source, "bytes": list(byte_range) if byte_range else None,
              "steps": [read_stats.as_dict()] + [s.as_dict() for s in stats],
              "lengths_in": histogram(lengths_in), "lengths_out": histogram(lengths_out)}
    write_json(done, result)
    return result


class _SignatureCollector:
    """A shard's signatures for the global step after its stage, computed in batches of 1024 documents, saved as
    work/stageK/NNNNN.sig.npz (rows, lengths, scores, set offsets) plus .sets.npy and .ids.npy, which the global
    step maps from disk and reads only where it needs them."""

    BATCH = 1024

    def __init__(self, step: GlobalStep):
        self.step = step
        self.texts: list[str] = []
        self.ids: list[str] = []
        self.lengths: list[int] = []
        self.scores: list[float] = []
        self.parts: list[Signatures] = []

    def add(self, doc: Document) -> None:
        self.texts.append(doc.text)
        self.ids.append(doc.id)
        self.lengths.append(len(doc.text))
        score = doc.meta.get(getattr(self.step, "score_field", ""), None)
        self.scores.append(float(score) if isinstance(score, (int, float)) and not isinstance(score, bool)
                           else np.nan)
        if len(self.texts) >= self.BATCH:
            self._flush()

    def _flush(self) -> None:
        if self.texts:
            self.parts.append(self.step.signatures(self.texts))
            self.texts = []

    def save(self, paths: RunPaths, stage: int, shard: int) -> None:
        self._flush()
        parts = self.parts
        rows = np.concatenate([p.rows for p in parts]) if parts else np.zeros((0, 1), np.uint64)
        has_sets = bool(parts) and parts[0].sets is not None
        if has_sets:
            sets = np.concatenate([p.sets for p in parts])
            sizes = np.concatenate([np.diff(p.set_offsets) for p in parts])
            offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        else:
            sets, offsets = np.zeros(0, np.uint32), np.zeros(0, np.int64)
        base = paths.signatures(stage, shard)
        _save_npy(base.with_name(base.name.replace(".sig.npz", ".sets.npy")), sets)
        _save_npy(base.with_name(base.name.replace(".sig.npz", ".ids.npy")),
                  np.array(self.ids, dtype=str) if self.ids else np.zeros(0, "<U1"))
        buf = io.BytesIO()
        np.savez(buf, signatures=rows, lengths=np.array(self.lengths, np.int64), scores=np.array(self.scores),
                 set_offsets=offsets, has_sets=np.array(has_sets))
        with atomic_write(base, "wb") as f:  # last: its presence means the shard's signatures are complete
            f.write(buf.getvalue())


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_write(path, "wb") as f:
        np.save(f, array)


# what a step may raise on a document it cannot take; on_error decides between a reject and a failed run
_DOCUMENT_ERRORS = (ValueError, UnicodeError, RecursionError, OverflowError)


def _where(doc: Document) -> str:
    src, line = doc.meta.get("source"), doc.meta.get("line")
    return f"{src}:{line}" if src and line else str(src or doc.id)


def _stage_input(cfg, paths: RunPaths, stages, stage: int, shard: int, source: str, byte_range, on_bad, reject,
                 read_stats: StepStats):
    """The documents that enter stage `stage`'s map steps on this shard: the shard's input read again from the
    last stage that kept its output on disk (or from the source file), with each global decision since applied in
    order. Only the decision just before this stage records its rejects and stats; the earlier ones did so in
    their own stage."""
    j = stage - 1
    while j >= 0 and not writes_work_shard(stages, j):
        j -= 1
    if j >= 0:
        documents = read_work_shard(paths.stage_out(j, shard))
    else:
        # read problems were recorded by stage 0; a later stage reads the same bytes again (the inputs' sizes and
        # times were checked at start) and skips them silently
        bad = on_bad if stage == 0 else (lambda where, reason, raw: None)
        documents = iter_file_documents(source, cfg.errors, cfg.text_field, bad if cfg.on_error == "skip" else None,
                                        cfg.encoding, tuple(byte_range) if byte_range else None)
    for g in range(max(j, 0), stage):
        documents = _apply_decision(paths, g, stages[g][1].name, shard, documents,
                                    (reject, read_stats) if g == stage - 1 else None)
    return documents


def _apply_decision(paths: RunPaths, stage: int, global_name: str, shard: int, documents, record):
    """The documents that global step `stage` kept, in order, each given the id of its cluster's kept member
    (meta `<step>_cluster`); `record` = (reject, stats) to account for the removed ones."""
    with np.load(paths.decision(stage)) as z:
        start = int(z["shard_start"][shard])
        keep = z["keep"]
        cluster = z["cluster"]
        kept_ids = z["kept_ids"]
    for i, doc in enumerate(documents):
        g = start + i
        if record is not None:
            record[1].docs_in += 1
            record[1].chars_in += len(doc.text)
        if cluster[g] >= 0:
            doc.meta = {**doc.meta, f"{global_name}_cluster": str(kept_ids[g])}
        if not keep[g]:
            if record is not None:
                record[1].reasons[f"{global_name}: duplicate"] += 1
                record[0](doc, global_name, f"{global_name}: duplicate of {kept_ids[g]}")
            continue
        if record is not None:
            record[1].docs_out += 1
            record[1].chars_out += len(doc.text)
        yield doc


# ----- global steps -----------------------------------------------------------------------------

def run_global_step(cfg: PipelineConfig, stage: int, n_shards: int, step: GlobalStep) -> dict:
    """Decide over the signatures of every shard; writes work/globalK.npz (keep, cluster, shard starts, the id of
    each cluster's kept document) and its .json summary."""
    paths = RunPaths(Path(cfg.output))
    out = paths.decision(stage)
    info_path = out.with_suffix(".json")
    if out.exists() and info_path.exists():
        return json.loads(info_path.read_text(encoding="utf-8"))
    rows, lengths, scores, set_offsets, starts = [], [], [], [], [0]
    has_sets = False
    for shard in range(n_shards):
        with np.load(paths.signatures(stage, shard)) as z:
            rows.append(z["signatures"])
            lengths.append(z["lengths"])
            scores.append(z["scores"])
            set_offsets.append(z["set_offsets"])
            has_sets = has_sets or bool(z["has_sets"])
        starts.append(starts[-1] + len(lengths[-1]))
    width = max((r.shape[1] for r in rows if len(r)), default=1)
    sig = np.concatenate([r for r in rows if len(r)]) if starts[-1] else np.zeros((0, width))
    shard_of = np.repeat(np.arange(n_shards), np.diff(starts))
    base = paths.signatures(stage, 0)

    def shard_file(shard: int, kind: str) -> np.ndarray:
        return np.load(base.with_name(f"{shard:05d}.{kind}.npy"), mmap_mode="r")

    def sets(indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The sets of global document indices (sorted), gathered from each shard's memory-mapped file."""
        values, sizes = [], []
        for shard in np.unique(shard_of[indices]).tolist():
            local = indices[shard_of[indices] == shard] - starts[shard]
            off, data = set_offsets[shard], shard_file(shard, "sets")
            counts = off[local + 1] - off[local]
            take = np.repeat(off[local], counts) + (np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts,
                                                                                         counts))
            values.append(np.asarray(data[take]))
            sizes.append(counts)
        sizes_all = np.concatenate(sizes) if sizes else np.zeros(0, np.int64)
        return (np.concatenate(values) if values else np.zeros(0, np.uint32),
                np.concatenate([[0], np.cumsum(sizes_all)]).astype(np.int64))

    t0 = time.perf_counter()
    if starts[-1] == 0:  # everything was removed before this step: nothing to compare, an empty decision
        decision = Decision(np.zeros(0, bool), np.zeros(0, np.int64), {"duplicates": 0})
    else:
        decision = step.decide(sig, np.concatenate(lengths), np.concatenate(scores), sets if has_sets else None)
    # the id of each cluster's kept document, for metadata and reject reasons
    kept_ids = np.full(len(decision.cluster), "", dtype=object)
    members = np.flatnonzero(decision.cluster >= 0)
    reps = decision.cluster[members]
    for shard in np.unique(shard_of[reps]).tolist() if len(reps) else []:
        in_shard = shard_of[reps] == shard
        ids = shard_file(shard, "ids")
        kept_ids[members[in_shard]] = ids[reps[in_shard] - starts[shard]].astype(object)
    buf = io.BytesIO()
    np.savez(buf, keep=decision.keep, cluster=decision.cluster, shard_start=np.array(starts),
             kept_ids=kept_ids.astype(str))
    with atomic_write(out, "wb") as f:
        f.write(buf.getvalue())
    info = {"step": step.name, "documents": int(len(decision.keep)), "kept": int(decision.keep.sum()),
            "seconds": round(time.perf_counter() - t0, 3), **decision.stats}
    write_json(info_path, info)
    return info
