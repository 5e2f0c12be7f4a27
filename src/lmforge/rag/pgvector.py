"""PostgreSQL + pgvector backend: the same chunking, embedding, search modes and filters as
`RagIndex`, with chunks, vectors and full-text terms stored in the database, for corpora
that outgrow one machine's disk or need concurrent writers.

    index = PgVectorIndex("postgresql://user:pass@host:5432/db", table="docs")
    index.upsert(documents)                      # transactional: a crash leaves the old rows
    hits = index.search("question", k=5, mode="hybrid", filters={"lang": "zh"})

Storage: table `<table>` (doc_id, chunk text, offsets, heading and metadata as jsonb,
`embedding vector(dim)` with an HNSW cosine index, `terms tsvector` with a GIN index) and
`<table>_docs` (doc_id, content hash). Full-text terms come from lmforge's analyzer (English
words without stop words, Chinese words by jieba) stored with PostgreSQL's 'simple'
configuration, so Chinese is searchable without a database-side Chinese parser; text search
is ranked by ts_rank_cd (PostgreSQL has no BM25). Dense search orders by cosine distance
(`<=>`). Hybrid fuses the two lists with RRF (k=60) or weighted fusion, as `RagIndex` does.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable

import numpy as np
import regex

from lmforge.config import ConfigError, from_dict
from lmforge.data.document import Document
from lmforge.rag.chunking import Chunk
from lmforge.rag.index import Hit, IndexConfig, content_hash, distinct_passages, embedder_reads, fuse, make_chunker, rerank
from lmforge.rag.sparse import Analyzer

_IDENT = regex.compile(r"[A-Za-z_][A-Za-z0-9_]{0,40}")


def _vec(v: np.ndarray) -> str:
    return "[" + ",".join(f"{x:.7g}" for x in v.tolist()) + "]"


def redact_dsn(dsn: str) -> str:
    """A connection string fit to print: the password of a URL (user:PASSWORD@host) or a keyword DSN
    (password=...) replaced by ***."""
    dsn = re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", dsn)
    return re.sub(r"(password\s*=\s*)('[^']*'|\S+)", r"\1***", dsn, flags=re.IGNORECASE)


class PgVectorIndex:
    """The RagIndex interface (upsert, delete, search with the same modes, filters and fusion) on PostgreSQL.

    The index's settings are stored with it (table `<table>_config`) the first time it is created, and an existing
    index keeps them, as an index directory does. A BM25-only index (`dense=False`) has no embedding column and
    never loads an embedder."""

    def __init__(self, dsn: str, table: str = "lmforge_chunks", cfg: IndexConfig | None = None, create: bool = True):
        self.where = redact_dsn(dsn)
        try:
            import psycopg
        except ImportError:
            raise ConfigError("the pgvector backend needs psycopg: pip install 'lmforge[pgvector]'") from None
        if not _IDENT.fullmatch(table):
            raise ConfigError(f"table name {table!r}: letters, digits and _ only")
        self.table = table
        self._embedder = None
        try:
            self.conn = psycopg.connect(dsn, autocommit=False)
        except psycopg.OperationalError as e:
            raise ConfigError(f"cannot connect to PostgreSQL ({self.where}): {redact_dsn(str(e).strip())}") from None
        self._chunks_table = False
        self.cfg = self._setup(cfg or IndexConfig(), create)
        self.analyzer = Analyzer(self.cfg.analyzer)

    # -- schema ---------------------------------------------------------------------------------
    def _setup(self, cfg: IndexConfig, create: bool) -> IndexConfig:
        """Create the tables that do not exist (`create`; else a missing index is an error); the stored settings
        win over `cfg` for an existing index."""
        import dataclasses

        t = self.table
        with self.conn.cursor() as cur:
            if not create:
                cur.execute("SELECT to_regclass(%s) IS NOT NULL", (f"{t}_docs",))
                if not cur.fetchone()[0]:
                    self.conn.rollback()
                    raise ConfigError(f"{self.where}#{t}: no such index (build one with `lmforge rag index --out ...`)")
            try:
                cur.execute("CREATE EXTENSION IF NOT EXISTS vector")
            except Exception as e:
                self.conn.rollback()
                raise ConfigError(f"the pgvector extension is not available on this server: {e}") from None
            cur.execute(f"CREATE TABLE IF NOT EXISTS {t}_docs (doc_id text PRIMARY KEY, hash text NOT NULL, "
                        "n_chunks int NOT NULL, config jsonb)")
            cur.execute(f"CREATE TABLE IF NOT EXISTS {t}_config (id int PRIMARY KEY, config jsonb NOT NULL)")
            cur.execute(f"SELECT config FROM {t}_config WHERE id = 1")
            row = cur.fetchone()
            if row is None:
                cur.execute(f"INSERT INTO {t}_config VALUES (1, %s)", (json.dumps(dataclasses.asdict(cfg)),))
            else:
                cfg = from_dict(IndexConfig, row[0], f"{self.where}#{t} config")
            cur.execute("SELECT to_regclass(%s) IS NOT NULL", (t,))
            self._chunks_table = cur.fetchone()[0]
        self.conn.commit()
        return cfg

    def _create_chunks_table(self, dim: int | None) -> None:
        t = self.table
        embedding = f", embedding vector({dim})" if dim else ""
        with self.conn.cursor() as cur:
            cur.execute(f"""CREATE TABLE IF NOT EXISTS {t} (
                id bigserial PRIMARY KEY, doc_id text NOT NULL REFERENCES {t}_docs(doc_id) ON DELETE CASCADE,
                text text NOT NULL, start_char int NOT NULL, end_char int NOT NULL, heading jsonb, meta jsonb,
                terms tsvector{embedding})""")
            cur.execute(f"CREATE INDEX IF NOT EXISTS {t}_doc ON {t} (doc_id)")
            cur.execute(f"CREATE INDEX IF NOT EXISTS {t}_terms ON {t} USING gin (terms)")
            cur.execute(f"CREATE INDEX IF NOT EXISTS {t}_meta ON {t} USING gin (meta)")
            if dim:
                cur.execute(f"CREATE INDEX IF NOT EXISTS {t}_hnsw ON {t} USING hnsw (embedding vector_cosine_ops)")
        self._chunks_table = True

    @property
    def embedder(self):
        if self._embedder is None:
            from lmforge.model.encoder import SentenceEmbedder

            self._embedder = SentenceEmbedder.load(None if self.cfg.embedder == "default" else self.cfg.embedder)
        return self._embedder

    def _embed(self, texts: list[str]) -> np.ndarray:
        return self.embedder.embed(texts, batch_size=self.cfg.batch_size).numpy().astype(np.float32)

    # -- changing -------------------------------------------------------------------------------
    def upsert(self, documents: Iterable[Document]) -> dict:
        chunker = make_chunker(self.cfg, self)
        t, dense = self.table, self.cfg.dense
        added = updated = unchanged = 0
        try:
            with self.conn.cursor() as cur:
                for doc in documents:
                    h = content_hash(doc.text)
                    cur.execute(f"SELECT hash FROM {t}_docs WHERE doc_id = %s", (doc.id,))
                    row = cur.fetchone()
                    if row and row[0] == h:
                        unchanged += 1
                        continue
                    chunks = chunker(doc)
                    vectors = self._embed([c.text for c in chunks]) if dense and chunks else None
                    if not self._chunks_table:
                        self._create_chunks_table((vectors.shape[1] if vectors is not None else self.embedder.dim)
                                                  if dense else None)
                    if row:
                        cur.execute(f"DELETE FROM {t}_docs WHERE doc_id = %s", (doc.id,))  # chunks cascade
                        updated += 1
                    else:
                        added += 1
                    cur.execute(f"INSERT INTO {t}_docs VALUES (%s, %s, %s, %s)", (doc.id, h, len(chunks), None))
                    columns = "doc_id, text, start_char, end_char, heading, meta, terms" + (", embedding" if dense else "")
                    values = "%s, %s, %s, %s, %s, %s, to_tsvector('simple', %s)" + (", %s::vector" if dense else "")
                    cur.executemany(
                        f"INSERT INTO {t} ({columns}) VALUES ({values})",
                        [(c.doc_id, c.text, c.start, c.end, json.dumps(c.heading, ensure_ascii=False),
                          json.dumps(c.meta, ensure_ascii=False, default=str), " ".join(self.analyzer(c.text)))
                         + ((_vec(vectors[i]),) if dense else ()) for i, c in enumerate(chunks)])
            self.conn.commit()  # one transaction: a crash before this leaves the previous rows
        except BaseException:
            self.conn.rollback()
            raise
        return {"added": added, "updated": updated, "unchanged": unchanged, **self.counts()}

    def delete(self, doc_ids: Iterable[str]) -> dict:
        ids = sorted(set(doc_ids))
        with self.conn.cursor() as cur:
            cur.execute(f"SELECT doc_id FROM {self.table}_docs WHERE doc_id = ANY(%s)", (ids,))
            missing = sorted(set(ids) - {r[0] for r in cur.fetchall()})
            if missing:  # as the index directory: nothing is deleted when an id is wrong
                self.conn.rollback()
                raise ConfigError(f"--delete: not in the index: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
            cur.execute(f"DELETE FROM {self.table}_docs WHERE doc_id = ANY(%s)", (ids,))
            deleted = cur.rowcount
        self.conn.commit()
        return {"deleted": deleted, **self.counts()}

    def counts(self) -> dict:
        with self.conn.cursor() as cur:
            cur.execute(f"SELECT count(*) FROM {self.table}_docs")
            docs = cur.fetchone()[0]
            chunks = 0
            if self._chunks_table:
                cur.execute(f"SELECT count(*) FROM {self.table}")
                chunks = cur.fetchone()[0]
        self.conn.commit()
        return {"documents": docs, "chunks": chunks}

    def drop(self) -> None:
        with self.conn.cursor() as cur:
            for suffix in ("", "_docs", "_config"):
                cur.execute(f"DROP TABLE IF EXISTS {self.table}{suffix}")
        self.conn.commit()
        self._chunks_table = False

    # -- searching ------------------------------------------------------------------------------
    def _where(self, filters: dict | None) -> tuple[str, list]:
        """Filters as RagIndex applies them: a chunk passes a field when one of its values (a list's items, or
        the value itself) is among the wanted ones; `doc_id` and `heading` are columns, the rest meta fields."""
        clauses, params = [], []
        for key, want in (filters or {}).items():
            values = [str(v) for v in (want if isinstance(want, (list, tuple, set)) else [want])]
            if key == "doc_id":
                clauses.append("doc_id = ANY(%s)")
                params.append(values)
            elif key == "heading":
                clauses.append("heading ?| %s")
                params.append(values)
            else:
                clauses.append("(meta->>%s = ANY(%s) OR (jsonb_typeof(meta->%s) = 'array' AND meta->%s ?| %s))")
                params += [key, values, key, key, values]
        return (" AND " + " AND ".join(clauses)) if clauses else "", params

    def _rows(self, sql: str, params: list, exact: bool = False) -> list[tuple]:
        with self.conn.cursor() as cur:
            if exact:
                # an HNSW scan filters after it has taken its ef_search candidates, so a selective filter would
                # leave fewer than k rows: filtered vector search scores every allowed chunk, as RagIndex does
                cur.execute("SET LOCAL enable_indexscan = off")
            cur.execute(sql, params)
            rows = cur.fetchall()
        self.conn.commit()
        return rows

    _COLUMNS = "id, doc_id, text, start_char, end_char, heading, meta"

    def search(self, query: str, k: int = 10, mode: str = "hybrid", filters: dict | None = None,
               fusion: str = "rrf", dense_weight: float = 0.5, depth: int | None = None,
               reranker=None, rerank_depth: int = 30, distinct: bool = True) -> list[Hit]:
        if mode not in ("sparse", "dense", "hybrid"):
            raise ValueError(f"mode must be sparse, dense or hybrid, got {mode!r}")
        if mode != "sparse" and not self.cfg.dense:
            raise ConfigError(f"{self.where}#{self.table}: built without dense vectors; use mode='sparse'")
        if not self._chunks_table:
            return []
        depth = depth or max(100, 4 * k)
        if mode == "hybrid" and not embedder_reads(self.cfg, query):
            mode = "sparse"
        where, wparams = self._where(filters)
        rows: dict[int, tuple] = {}
        sparse: dict[int, float] = {}
        dense: dict[int, float] = {}
        if mode in ("sparse", "hybrid"):
            terms = sorted(set(self.analyzer(query)))
            if terms:
                tsq = " | ".join("'" + t.replace("'", "''").replace("\\", "") + "'" for t in terms)
                for r in self._rows(f"SELECT {self._COLUMNS}, ts_rank_cd(terms, q) AS s FROM {self.table}, "
                                    f"to_tsquery('simple', %s) q WHERE terms @@ q{where} ORDER BY s DESC, id LIMIT %s",
                                    [tsq, *wparams, depth]):
                    rows[r[0]] = r[:7]
                    sparse[r[0]] = float(r[7])
        if mode in ("dense", "hybrid"):
            qv = _vec(self._embed([query])[0])
            for r in self._rows(f"SELECT {self._COLUMNS}, 1 - (embedding <=> %s::vector) AS s FROM {self.table} "
                                f"WHERE true{where} ORDER BY embedding <=> %s::vector, id LIMIT %s",
                                [qv, *wparams, qv, depth], exact=bool(filters)):
                rows[r[0]] = r[:7]
                dense[r[0]] = float(r[7])
        want = 2 * k if distinct else k  # room for the copies that distinct_passages folds away
        ranked = fuse(mode, sparse, dense, fusion, dense_weight, max(want, rerank_depth) if reranker is not None else want)
        hits = []
        for rank, (i, score, parts) in enumerate(ranked, start=1):
            _, doc_id, text, start, end, heading, meta = rows[i]
            hits.append(Hit(Chunk(doc_id, text, start, end, heading or [], meta or {}), score, rank, parts))
        hits = rerank(query, hits, reranker, want) if reranker is not None else hits
        return distinct_passages(hits, k) if distinct else hits[:k]
