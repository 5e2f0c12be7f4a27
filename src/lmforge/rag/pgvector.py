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

from lmforge.config import ConfigError
from lmforge.data.document import Document
from lmforge.rag.chunking import Chunk
from lmforge.rag.index import Hit, IndexConfig, content_hash, embedder_reads, fuse, make_chunker, rerank
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
    def __init__(self, dsn: str, table: str = "lmforge_chunks", cfg: IndexConfig | None = None):
        self.where = redact_dsn(dsn)
        try:
            import psycopg
        except ImportError:
            raise ConfigError("the pgvector backend needs psycopg: pip install 'lmforge[pgvector]'") from None
        if not _IDENT.fullmatch(table):
            raise ConfigError(f"table name {table!r}: letters, digits and _ only")
        self.cfg = cfg or IndexConfig()
        self.table = table
        self.analyzer = Analyzer(self.cfg.analyzer)
        self._embedder = None
        try:
            self.conn = psycopg.connect(dsn, autocommit=False)
        except psycopg.OperationalError as e:
            raise ConfigError(f"cannot connect to PostgreSQL ({self.where}): {redact_dsn(str(e).strip())}") from None
        self._dim: int | None = None
        self._setup()

    # -- schema ---------------------------------------------------------------------------------
    def _setup(self) -> None:
        t = self.table
        with self.conn.cursor() as cur:
            try:
                cur.execute("CREATE EXTENSION IF NOT EXISTS vector")
            except Exception as e:
                self.conn.rollback()
                raise ConfigError(f"the pgvector extension is not available on this server: {e}") from None
            cur.execute(f"CREATE TABLE IF NOT EXISTS {t}_docs (doc_id text PRIMARY KEY, hash text NOT NULL, "
                        "n_chunks int NOT NULL, config jsonb)")
            cur.execute("""SELECT atttypmod FROM pg_attribute WHERE attrelid = to_regclass(%s) AND attname = 'embedding'""",
                        (t,))
            row = cur.fetchone()
            self._dim = row[0] if row else None
        self.conn.commit()

    def _create_chunks_table(self, dim: int) -> None:
        t = self.table
        with self.conn.cursor() as cur:
            cur.execute(f"""CREATE TABLE IF NOT EXISTS {t} (
                id bigserial PRIMARY KEY, doc_id text NOT NULL REFERENCES {t}_docs(doc_id) ON DELETE CASCADE,
                text text NOT NULL, start_char int NOT NULL, end_char int NOT NULL, heading jsonb, meta jsonb,
                embedding vector({dim}), terms tsvector)""")
            cur.execute(f"CREATE INDEX IF NOT EXISTS {t}_doc ON {t} (doc_id)")
            cur.execute(f"CREATE INDEX IF NOT EXISTS {t}_terms ON {t} USING gin (terms)")
            cur.execute(f"CREATE INDEX IF NOT EXISTS {t}_meta ON {t} USING gin (meta)")
            cur.execute(f"CREATE INDEX IF NOT EXISTS {t}_hnsw ON {t} USING hnsw (embedding vector_cosine_ops)")
        self._dim = dim

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
        t = self.table
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
                    vectors = self._embed([c.text for c in chunks]) if chunks else np.zeros((0, 0))
                    if self._dim is None:
                        self._create_chunks_table(vectors.shape[1] if len(vectors) else self.embedder.dim)
                    if row:
                        cur.execute(f"DELETE FROM {t}_docs WHERE doc_id = %s", (doc.id,))  # chunks cascade
                        updated += 1
                    else:
                        added += 1
                    cur.execute(f"INSERT INTO {t}_docs VALUES (%s, %s, %s, %s)", (doc.id, h, len(chunks), None))
                    cur.executemany(
                        f"INSERT INTO {t} (doc_id, text, start_char, end_char, heading, meta, embedding, terms) "
                        "VALUES (%s, %s, %s, %s, %s, %s, %s::vector, to_tsvector('simple', %s))",
                        [(c.doc_id, c.text, c.start, c.end, json.dumps(c.heading, ensure_ascii=False),
                          json.dumps(c.meta, ensure_ascii=False, default=str), _vec(v), " ".join(self.analyzer(c.text)))
                         for c, v in zip(chunks, vectors)])
            self.conn.commit()  # one transaction: a crash before this leaves the previous rows
        except BaseException:
            self.conn.rollback()
            raise
        return {"added": added, "updated": updated, "unchanged": unchanged, **self.counts()}

    def delete(self, doc_ids: Iterable[str]) -> dict:
        ids = list(doc_ids)
        with self.conn.cursor() as cur:
            cur.execute(f"DELETE FROM {self.table}_docs WHERE doc_id = ANY(%s)", (ids,))
            deleted = cur.rowcount
        self.conn.commit()
        return {"deleted": deleted, **self.counts()}

    def counts(self) -> dict:
        with self.conn.cursor() as cur:
            cur.execute(f"SELECT count(*) FROM {self.table}_docs")
            docs = cur.fetchone()[0]
            chunks = 0
            if self._dim is not None:
                cur.execute(f"SELECT count(*) FROM {self.table}")
                chunks = cur.fetchone()[0]
        self.conn.commit()
        return {"documents": docs, "chunks": chunks}

    def drop(self) -> None:
        with self.conn.cursor() as cur:
            cur.execute(f"DROP TABLE IF EXISTS {self.table}")
            cur.execute(f"DROP TABLE IF EXISTS {self.table}_docs")
        self.conn.commit()
        self._dim = None

    # -- searching ------------------------------------------------------------------------------
    def _where(self, filters: dict | None) -> tuple[str, list]:
        clauses, params = [], []
        for key, want in (filters or {}).items():
            values = [str(v) for v in (want if isinstance(want, (list, tuple, set)) else [want])]
            if key == "doc_id":
                clauses.append("doc_id = ANY(%s)")
            else:
                clauses.append("meta->>%s = ANY(%s)")
                params.append(key)
            params.append(values)
        return (" AND " + " AND ".join(clauses)) if clauses else "", params

    def _rows(self, sql: str, params: list) -> list[tuple]:
        with self.conn.cursor() as cur:
            cur.execute(sql, params)
            rows = cur.fetchall()
        self.conn.commit()
        return rows

    _COLUMNS = "id, doc_id, text, start_char, end_char, heading, meta"

    def search(self, query: str, k: int = 10, mode: str = "hybrid", filters: dict | None = None,
               fusion: str = "rrf", dense_weight: float = 0.5, depth: int | None = None,
               reranker=None, rerank_depth: int = 30) -> list[Hit]:
        if self._dim is None:
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
                                [qv, *wparams, qv, depth]):
                rows[r[0]] = r[:7]
                dense[r[0]] = float(r[7])
        ranked = fuse(mode, sparse, dense, fusion, dense_weight, max(k, rerank_depth) if reranker is not None else k)
        hits = []
        for rank, (i, score, parts) in enumerate(ranked, start=1):
            _, doc_id, text, start, end, heading, meta = rows[i]
            hits.append(Hit(Chunk(doc_id, text, start, end, heading or [], meta or {}), score, rank, parts))
        return rerank(query, hits, reranker, k) if reranker is not None else hits
