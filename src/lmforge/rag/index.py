"""A persistent retrieval index: chunks + dense vectors (FAISS) + BM25, with hybrid search.

Directory layout (no pickle anywhere):

    INDEX/CURRENT              name of the live version, replaced atomically
    INDEX/v000003/manifest.json embedder, chunker, analyzer, BM25 params, counts, versions
    INDEX/v000003/chunks.jsonl  one chunk per line (doc id, text, offsets, heading path, metadata)
    INDEX/v000003/docs.json     document id -> content hash, number of chunks
    INDEX/v000003/vectors.npy   float32 [chunks, dim], L2-normalised, aligned with chunks.jsonl
    INDEX/v000003/faiss.index   FAISS index over the vectors (flat inner product, or HNSW)
    INDEX/v000003/bm25/         bm25s arrays + JSON

Every change (add, update, delete) writes a complete new version directory and then points
CURRENT at it, so a crash while indexing leaves the previous version usable; the old
version is deleted afterwards. Unchanged documents (same id and content hash) are not
re-embedded.

Search modes: `sparse` (BM25), `dense` (cosine of sentence embeddings), `hybrid` (reciprocal
rank fusion with k=60 of both lists, or weighted fusion of min-max normalised scores).
`filters={"field": value | [values]}` restricts any mode to chunks whose metadata (or
doc_id / heading) match.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.config import ConfigError, from_dict
from lmforge.data.document import Document
from lmforge.files import write_json, write_text
from lmforge.rag.chunking import Chunk, Chunker
from lmforge.rag.config import IndexConfig
from lmforge.rag.sparse import Analyzer, BM25Index

FORMAT = "lmforge-rag-index/1"
RRF_K = 60


@dataclass
class Hit:
    chunk: Chunk
    score: float
    rank: int
    scores: dict[str, float] = field(default_factory=dict)  # per retriever: sparse / dense / fused
    also_in: list[str] = field(default_factory=list)  # other documents holding the same passage (distinct search)

    def as_dict(self) -> dict:
        c = self.chunk
        return {"rank": self.rank, "score": round(self.score, 6), "chunk_id": c.chunk_id, "doc_id": c.doc_id,
                "start": c.start, "end": c.end, "heading": c.heading, "text": c.text, "meta": c.meta,
                "scores": {k: round(v, 6) for k, v in self.scores.items()}} | ({"also_in": self.also_in}
                                                                              if self.also_in else {})


def distinct_passages(hits: list[Hit], k: int) -> list[Hit]:
    """The first k hits with distinct text (whitespace aside): a passage that several documents share (a corpus
    with copied sections) is shown once, at its best rank, naming the other documents in `also_in`."""
    out: list[Hit] = []
    seen: dict[str, Hit] = {}
    for hit in hits:
        key = " ".join(hit.chunk.text.split())
        if key in seen:
            seen[key].also_in.append(hit.chunk.doc_id)
            continue
        if len(out) == k:
            continue  # past k: only the copies of what is shown still count
        hit = dataclasses.replace(hit, rank=len(out) + 1, also_in=[])
        seen[key] = hit
        out.append(hit)
    return out


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]


# ----- fusion -----------------------------------------------------------------------------------

def rrf(rankings: Sequence[Sequence[int]], k: int = RRF_K) -> dict[int, float]:
    """Reciprocal rank fusion (Cormack et al. 2009): sum over lists of 1 / (k + rank), rank from 1."""
    fused: dict[int, float] = {}
    for ranking in rankings:
        for rank, item in enumerate(ranking, start=1):
            fused[item] = fused.get(item, 0.0) + 1.0 / (k + rank)
    return fused


def weighted_fusion(score_lists: Sequence[dict[int, float]], weights: Sequence[float]) -> dict[int, float]:
    """Weighted sum of min-max normalised scores (an item missing from a list gets 0 there)."""
    fused: dict[int, float] = {}
    for scores, w in zip(score_lists, weights):
        if not scores:
            continue
        lo, hi = min(scores.values()), max(scores.values())
        for item, s in scores.items():
            fused[item] = fused.get(item, 0.0) + w * ((s - lo) / (hi - lo) if hi > lo else 1.0)
    return fused


# ----- the index --------------------------------------------------------------------------------

class RagIndex:
    def __init__(self, path: str | os.PathLike, cfg: IndexConfig | None = None):
        self.path = Path(path)
        self.cfg = cfg or IndexConfig()
        self.chunks: list[Chunk] = []
        self.docs: dict[str, dict] = {}  # id -> {"hash", "chunks"}
        self.vectors = np.zeros((0, 0), np.float32)
        self.bm25 = BM25Index(self.cfg.k1, self.cfg.b, self.cfg.bm25_method, Analyzer(self.cfg.analyzer))
        self._faiss = None
        self._embedder = None
        self.version = 0
        self.manifest: dict = {}

    # -- opening --------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike) -> RagIndex:
        path = Path(path)
        try:
            version = (path / "CURRENT").read_text().strip()
        except OSError:
            raise ConfigError(f"{path}: not an lmforge index (no CURRENT file); build one with `lmforge rag index`") \
                from None
        vdir = path / version
        manifest = json.loads((vdir / "manifest.json").read_text(encoding="utf-8"))
        if manifest.get("format") != FORMAT:
            raise ConfigError(f"{vdir}: index format {manifest.get('format')!r}, this lmforge reads {FORMAT}")
        cfg = from_dict(IndexConfig, manifest["config"], f"{vdir}/manifest.json config")
        index = cls(path, cfg)
        index.version = int(version.lstrip("v"))
        index.manifest = manifest
        with open(vdir / "chunks.jsonl", encoding="utf-8") as f:
            for line in f:
                r = json.loads(line)
                index.chunks.append(Chunk(r["doc_id"], r["text"], r["start"], r["end"], r["heading"], r["meta"]))
        index.docs = json.loads((vdir / "docs.json").read_text(encoding="utf-8"))
        if cfg.dense:
            index.vectors = np.load(vdir / "vectors.npy", allow_pickle=False)
            faiss = _faiss()

            index._faiss = faiss.read_index(str(vdir / "faiss.index"))
        index.bm25.load(vdir / "bm25", len(index.chunks))
        return index

    @classmethod
    def open_or_create(cls, path: str | os.PathLike, cfg: IndexConfig | None = None) -> RagIndex:
        return cls.open(path) if (Path(path) / "CURRENT").exists() else cls(path, cfg)

    # -- embedding ------------------------------------------------------------------------------
    @property
    def embedder(self):
        if self._embedder is None:
            from lmforge.model.encoder import SentenceEmbedder

            self._embedder = SentenceEmbedder.load(None if self.cfg.embedder == "default" else self.cfg.embedder)
        return self._embedder

    def _embed(self, texts: list[str], progress: bool = False) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.vectors.shape[1] if self.vectors.size else self.embedder.dim), np.float32)
        return self.embedder.embed(texts, batch_size=self.cfg.batch_size, show_progress=progress).numpy().astype(np.float32)

    # -- changing -------------------------------------------------------------------------------
    def upsert(self, documents: Iterable[Document], progress: bool = False, chunker: Chunker | None = None) -> dict:
        """Add new documents, re-index changed ones (same id, new content), skip unchanged ones."""
        chunker = chunker or make_chunker(self.cfg, self)
        added = updated = unchanged = 0
        new_chunks: list[Chunk] = []
        replace: set[str] = set()
        seen: set[str] = set()
        for doc in documents:
            if doc.id in seen:
                raise ConfigError(f"document id {doc.id!r} appears twice in the input; ids must be unique")
            seen.add(doc.id)
            h = content_hash(doc.text)
            old = self.docs.get(doc.id)
            if old is not None and old["hash"] == h:
                unchanged += 1
                continue
            if old is not None:
                replace.add(doc.id)
                updated += 1
            else:
                added += 1
            pieces = chunker(doc)
            new_chunks.extend(pieces)
            self.docs[doc.id] = {"hash": h, "chunks": len(pieces)}
        if added or updated:
            keep = [i for i, c in enumerate(self.chunks) if c.doc_id not in replace]
            vectors = self._embed([c.text for c in new_chunks], progress) if self.cfg.dense else None
            self.chunks = [self.chunks[i] for i in keep] + new_chunks
            if self.cfg.dense:
                old = self.vectors[keep] if self.vectors.size else np.zeros((0, vectors.shape[1]), np.float32)
                self.vectors = np.concatenate([old, vectors]).astype(np.float32)
            self._commit()
        return {"added": added, "updated": updated, "unchanged": unchanged, "chunks": len(self.chunks),
                "documents": len(self.docs)}

    def delete(self, doc_ids: Iterable[str]) -> dict:
        ids = set(doc_ids)
        missing = sorted(ids - set(self.docs))
        if missing:
            raise ConfigError(f"--delete: not in the index: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        keep = [i for i, c in enumerate(self.chunks) if c.doc_id not in ids]
        self.chunks = [self.chunks[i] for i in keep]
        if self.cfg.dense and self.vectors.size:
            self.vectors = self.vectors[keep]
        for i in ids:
            del self.docs[i]
        self._commit()
        return {"deleted": len(ids), "chunks": len(self.chunks), "documents": len(self.docs)}

    def _build_search_structures(self) -> None:
        self.bm25 = BM25Index(self.cfg.k1, self.cfg.b, self.cfg.bm25_method, Analyzer(self.cfg.analyzer))
        self.bm25.build([c.text for c in self.chunks])
        if self.cfg.dense:
            faiss = _faiss()

            dim = self.vectors.shape[1] if self.vectors.size else self.embedder.dim
            if self.cfg.vector_index == "hnsw":
                self._faiss = faiss.IndexHNSWFlat(dim, self.cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            else:
                self._faiss = faiss.IndexFlatIP(dim)
            if len(self.vectors):
                self._faiss.add(np.ascontiguousarray(self.vectors, np.float32))

    def _commit(self) -> None:
        """Write a complete new version, then switch CURRENT to it (atomic), then drop the old one."""
        self._build_search_structures()
        self.path.mkdir(parents=True, exist_ok=True)
        old = self.version
        self.version += 1
        name = f"v{self.version:06d}"
        tmp = self.path / f".{name}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        with open(tmp / "chunks.jsonl", "w", encoding="utf-8") as f:
            for c in self.chunks:
                f.write(json.dumps({"doc_id": c.doc_id, "text": c.text, "start": c.start, "end": c.end,
                                    "heading": c.heading, "meta": c.meta}, ensure_ascii=False, default=str) + "\n")
        write_json(tmp / "docs.json", self.docs, indent=None)
        (tmp / "bm25").mkdir()
        self.bm25.save(tmp / "bm25")
        if self.cfg.dense:
            faiss = _faiss()

            np.save(tmp / "vectors.npy", self.vectors, allow_pickle=False)
            faiss.write_index(self._faiss, str(tmp / "faiss.index"))
        self.manifest = {
            "format": FORMAT, "version": self.version, "updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "config": dataclasses.asdict(self.cfg), "documents": len(self.docs), "chunks": len(self.chunks),
            "dim": int(self.vectors.shape[1]) if self.cfg.dense and self.vectors.size else None,
            "versions": _versions()}
        write_json(tmp / "manifest.json", self.manifest)
        os.replace(tmp, self.path / name)
        write_text(self.path / "CURRENT", name + "\n")
        if old:
            shutil.rmtree(self.path / f"v{old:06d}", ignore_errors=True)

    # -- searching ------------------------------------------------------------------------------
    def _allowed(self, filters: dict[str, Any] | None) -> np.ndarray | None:
        if not filters:
            return None
        mask = np.ones(len(self.chunks), bool)
        for key, want in filters.items():
            wanted = set(want) if isinstance(want, (list, tuple, set)) else {want}
            for i, c in enumerate(self.chunks):
                value = c.doc_id if key == "doc_id" else c.heading if key == "heading" else c.meta.get(key)
                values = set(value) if isinstance(value, list) else {value}
                if mask[i] and not (values & wanted):
                    mask[i] = False
        return mask

    def sparse_scores(self, query: str, allowed: np.ndarray | None = None, depth: int = 100) -> dict[int, float]:
        scores = self.bm25.scores(query)
        if allowed is not None:
            scores = np.where(allowed, scores, 0.0)
        top = np.argsort(-scores, kind="stable")[:depth]
        return {int(i): float(scores[i]) for i in top if scores[i] > 0}

    def dense_scores(self, query: str, allowed: np.ndarray | None = None, depth: int = 100,
                     query_vector: np.ndarray | None = None) -> dict[int, float]:
        if not self.cfg.dense or not len(self.chunks):
            return {}
        q = self._embed([query])[0] if query_vector is None else query_vector
        if allowed is not None:  # exact scoring over the allowed chunks
            idx = np.flatnonzero(allowed)
            s = self.vectors[idx] @ q
            top = np.argsort(-s, kind="stable")[:depth]
            return {int(idx[i]): float(s[i]) for i in top}
        scores, ids = self._faiss.search(q[None, :].astype(np.float32), min(depth, len(self.chunks)))
        return {int(i): float(s) for i, s in zip(ids[0], scores[0]) if i >= 0}

    def search(self, query: str, k: int = 10, mode: str = "hybrid", filters: dict | None = None,
               fusion: str = "rrf", dense_weight: float = 0.5, depth: int | None = None,
               reranker=None, rerank_depth: int = 30, distinct: bool = True) -> list[Hit]:
        """Top `k` chunks. With a `reranker` (lmforge.model.encoder.CrossEncoder) the first
        `rerank_depth` fused results are re-scored jointly with the query and re-sorted. `distinct` shows a passage
        that several documents share once (distinct_passages); evaluation turns it off to score every document."""
        if mode not in ("sparse", "dense", "hybrid"):
            raise ValueError(f"mode must be sparse, dense or hybrid, got {mode!r}")
        if mode != "sparse" and not self.cfg.dense:
            raise ConfigError(f"{self.path}: built without dense vectors; use mode='sparse'")
        if mode == "hybrid" and not embedder_reads(self.cfg, query):
            mode = "sparse"
        allowed = self._allowed(filters)
        depth = depth or max(100, 4 * k)
        sparse = self.sparse_scores(query, allowed, depth) if mode != "dense" else {}
        dense = self.dense_scores(query, allowed, depth) if mode != "sparse" else {}
        want = 2 * k if distinct else k  # room for the copies that distinct_passages folds away
        ranked = fuse(mode, sparse, dense, fusion, dense_weight, max(want, rerank_depth) if reranker is not None else want)
        hits = [Hit(self.chunks[i], score, rank, parts) for rank, (i, score, parts) in enumerate(ranked, start=1)]
        hits = rerank(query, hits, reranker, want) if reranker is not None else hits
        return distinct_passages(hits, k) if distinct else hits[:k]


def make_chunker(cfg: IndexConfig, index) -> Chunker:
    """The index's chunker. A semantic chunker embeds with the index's embedder and measures chunks
    in its tokens, capped at its input limit ([CLS] and [SEP] aside), so every chunk fits it."""
    if cfg.chunker.kind != "semantic":
        return Chunker(cfg.chunker)
    embedder = index.embedder
    limit = max(8, min(cfg.chunker.max_size, embedder.max_length - 2))
    return Chunker(dataclasses.replace(cfg.chunker, max_size=limit), tokenizer=embedder.tokenizer, embed=index._embed)


def embedder_reads(cfg: IndexConfig, query: str) -> bool:
    """False when the query is mostly CJK and the embedder is declared not to cover Chinese/Japanese/Korean."""
    if not cfg.embedder_languages or {"zh", "ja", "ko"} & set(cfg.embedder_languages):
        return True
    from lmforge.text import is_mostly_cjk

    return not is_mostly_cjk(query)


def fuse(mode: str, sparse: dict[int, float], dense: dict[int, float], fusion: str, dense_weight: float,
         k: int) -> list[tuple[int, float, dict[str, float]]]:
    """The top k (item, score, per-retriever scores) of one mode; hybrid fuses the two lists."""
    if mode == "sparse":
        fused = sparse
    elif mode == "dense":
        fused = dense
    elif fusion == "rrf":
        fused = rrf([list(sparse), list(dense)])
    elif fusion == "weighted":
        fused = weighted_fusion([sparse, dense], [1 - dense_weight, dense_weight])
    else:
        raise ValueError(f"fusion must be rrf or weighted, got {fusion!r}")
    order = sorted(fused, key=lambda i: (-fused[i], i))[:k]
    return [(i, float(fused[i]), {"sparse": sparse.get(i, 0.0), "dense": dense.get(i, 0.0)} if mode == "hybrid"
             else {mode: fused[i]}) for i in order]


def rerank(query: str, hits: list[Hit], reranker, k: int) -> list[Hit]:
    """Re-sort hits by a cross-encoder's score of (query, chunk text); keeps the first-stage score in `scores`."""
    if not hits:
        return hits
    scores = reranker.score([(query, h.chunk.text) for h in hits]).tolist()
    order = sorted(range(len(hits)), key=lambda i: (-scores[i], i))[:k]
    out = []
    for rank, i in enumerate(order, start=1):
        h = hits[i]
        out.append(Hit(h.chunk, float(scores[i]), rank, {**h.scores, "first_stage": h.score, "rerank": float(scores[i])}))
    return out


def _faiss():
    import logging

    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # it logs every CPU variant it tries
    try:
        import faiss
    except ImportError:
        raise ConfigError("vector search needs FAISS: pip install 'lmforge[rag]' (or build the index with "
                          "--no-dense for BM25 only)") from None

    return faiss


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("lmforge", "bm25s", "faiss-cpu", "torch"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out

