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
from lmforge.data.step import GlobalStep, Step
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
    stage_steps, global_step = split_stages(steps_for(cfg))[stage]
    last = stage == n_stages - 1
    rejects = JsonlGzWriter(paths.rejects(stage, shard), keep_empty=False)
    stats = [StepStats(s.name) for s in stage_steps]
    read_stats = StepStats("read" if stage == 0 else split_stages(steps_for(cfg))[stage - 1][1].name)
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
            writers[key] = ParquetWriter(path) if (last and cfg.output_format == "parquet") else JsonlGzWriter(path)
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
                                            on_bad if cfg.on_error == "skip" else None, cfg.encoding,
                                            tuple(byte_range) if byte_range else None)
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
            w.write(flat_record(doc) if last else {"id": doc.id, "text": doc.text, "meta": doc.meta})
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
    result = {"stage": stage, "shard": shard, "source": source, "bytes": list(byte_range) if byte_range else None,
              "steps": [read_stats.as_dict()] + [s.as_dict() for s in stats],
              "lengths_in": histogram(lengths_in), "lengths_out": histogram(lengths_out)}
    write_json(done, result)
    return result


# what a step may raise on a document it cannot take; on_error decides between a reject and a failed run
_DOCUMENT_ERRORS = (ValueError, UnicodeError, RecursionError, OverflowError)


def _where(doc: Document) -> str:
    src, line = doc.meta.get("source"), doc.meta.get("line")
    return f"{src}:{line}" if src and line else str(src or doc.id)


def _documents_after_global(cfg, paths: RunPaths, stage: int, shard: int, reject, read_stats: StepStats):
    """Documents of the previous stage's shard that the global step kept, with cluster ids."""
    with np.load(paths.decision(stage - 1)) as z:
        start = int(z["shard_start"][shard])
        keep = z["keep"]
        cluster = z["cluster"]
        kept_ids = z["kept_ids"]
    global_name = split_stages(steps_for(cfg))[stage - 1][1].name
    for i, doc in enumerate(read_work_shard(paths.stage_out(stage - 1, shard))):
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
    paths = RunPaths(Path(cfg.output))
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
            for i, doc in enumerate(read_work_shard(paths.stage_out(stage, int(shard)))):
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


def _doc_ids(paths: RunPaths, stage: int, n_shards: int, wanted: np.ndarray, starts: list[int],
             shard_of: np.ndarray) -> dict[int, str]:
    ids: dict[int, str] = {}
    for shard in np.unique(shard_of[wanted]) if len(wanted) else []:
        local = set((wanted[shard_of[wanted] == shard] - starts[shard]).tolist())
        for i, doc in enumerate(read_work_shard(paths.stage_out(stage, int(shard)))):
            if i in local:
                ids[starts[shard] + i] = doc.id
    return ids


