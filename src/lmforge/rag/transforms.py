"""Query transforms: a model rewrites the user's query before retrieval; the rankings of the generated queries and of
the original are fused by reciprocal rank fusion.

    transform = QueryTransform.parse("multi-query:3")          # rewrite | hyde | multi-query[:n] | decompose
    index = TransformedIndex(RagIndex.open("runs/index"), transform, client)   # client: prompting/client.py
    hits = index.search("how do I catch an exception", k=5)     # the same search() as the index it wraps
    index.generated("how do I catch an exception")              # the queries the model wrote (for --explain)

The transforms (each prompt, English and Chinese, is in PROMPTS below; the query's script picks the language):
  rewrite      one clearer search query (Ma et al. 2023, "Query Rewriting for Retrieval-Augmented LLMs")
  hyde         a short passage that would answer the query, searched for as if it were the query (Gao et al. 2022,
               "Precise Zero-Shot Dense Retrieval without Relevance Labels")
  multi-query  n differently worded queries (LangChain's MultiQueryRetriever; fused by RRF as in RAG-Fusion)
  decompose    the simpler sub-questions a compound question needs (least-to-most / LlamaIndex's sub-question engine)

Generation is greedy, so one (model, prompt) pair has one answer: it is cached in a JSONL file beside the index
(INDEX/query_transforms.jsonl; for a pgvector index in the user's cache directory), keyed by the model's name and the
full prompt, and the raw reply is stored, so a later change to the parsing needs no new generation.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from lmforge.config import ConfigError
from lmforge.prompting.client import ModelClient, Sampling
from lmforge.text import HAN_RUN

KINDS = ("rewrite", "hyde", "multi-query", "decompose")

# One place for every prompt. {query} is the user's query, {n} the number of queries multi-query asks for.
PROMPTS = {
    "rewrite": {
        "en": "Rewrite the following question as one clear, specific search query for a search engine. Keep every "
              "important term; add the technical terms an expert would use. Write only the query.\n\n"
              "Question: {query}\nSearch query:",
        "zh": "把下面的问题改写成一个清楚、具体的搜索查询，保留所有重要的词，并加上专业人士会用的术语。只写出查询。\n\n"
              "问题：{query}\n搜索查询：",
    },
    "hyde": {
        "en": "Write a short passage (three or four sentences) from a reference text that answers the following "
              "question. Write only the passage.\n\nQuestion: {query}\nPassage:",
        "zh": "写一段简短的文字（三四句话），像是参考资料中回答下面问题的段落。只写出这段文字。\n\n问题：{query}\n段落：",
    },
    "multi-query": {
        "en": "Write {n} different search queries that would find documents answering the following question, "
              "each worded differently. Write one query per line, without numbers.\n\nQuestion: {query}\nQueries:",
        "zh": "写出 {n} 个不同的搜索查询，用来查找能回答下面问题的文档，每个查询的措辞都不同。每行写一个查询，不要编号。\n\n"
              "问题：{query}\n查询：",
    },
    "decompose": {
        "en": "Break the following question into the simpler sub-questions that must be answered to answer it (at "
              "most {n}). Write one sub-question per line, without numbers. If it is already simple, write it "
              "once.\n\nQuestion: {query}\nSub-questions:",
        "zh": "把下面的问题拆成回答它所需要的更简单的子问题（最多 {n} 个）。每行写一个子问题，不要编号。如果问题已经很简单，"
              "就照原样写一次。\n\n问题：{query}\n子问题：",
    },
}
# Reply lengths (tokens): a query is short, a HyDE passage a few sentences, a list a few lines.
MAX_TOKENS = {"rewrite": 64, "hyde": 160, "multi-query": 40, "decompose": 40}  # list kinds: per line
_LIST_MARK = re.compile(r"^\s*(?:[-*•·]|\(?\d+[.)、:：]|[一二三四五六七八九十]+[、.．])\s*")


@dataclass(frozen=True)
class QueryTransform:
    """One transform: `kind` (KINDS) and `n`, the queries multi-query asks for (decompose: the most sub-questions)."""

    kind: str
    n: int = 3

    @classmethod
    def parse(cls, spec: str, flag: str = "--query-transform") -> QueryTransform:
        """"rewrite", "hyde", "multi-query", "multi-query:5", "decompose", "decompose:4"."""
        kind, _, count = spec.partition(":")
        if kind not in KINDS:
            raise ConfigError(f"{flag} {spec!r}: expected one of {', '.join(KINDS)} (multi-query:N for N queries)")
        if count and kind in ("rewrite", "hyde"):
            raise ConfigError(f"{flag} {spec!r}: {kind} writes one query; only multi-query and decompose take :N")
        if count and (not count.isdigit() or not 1 <= int(count) <= 10):
            raise ConfigError(f"{flag} {spec!r}: N must be a whole number from 1 to 10")
        return cls(kind, int(count) if count else 3)

    def __str__(self) -> str:
        return self.kind if self.kind in ("rewrite", "hyde") else f"{self.kind}:{self.n}"

    def prompt(self, query: str) -> str:
        """The prompt for `query`, in Chinese when the query is written in Han characters."""
        lang = "zh" if HAN_RUN.search(query) else "en"
        return PROMPTS[self.kind][lang].format(query=query.strip(), n=self.n)

    def sampling(self) -> Sampling:
        per = MAX_TOKENS[self.kind]
        return Sampling(temperature=0.0, max_tokens=per * self.n if self.kind in ("multi-query", "decompose") else per)

    def queries(self, reply: str, query: str) -> list[str]:
        """The queries a reply holds: one for rewrite / hyde, up to n lines (list marks stripped) for the others;
        without the original query and without repeats. An empty reply gives none (the original is searched alone)."""
        reply = reply.strip()
        if self.kind == "hyde":
            found = [" ".join(reply.split())]
        elif self.kind == "rewrite":
            found = [_unquote(next((line for line in reply.splitlines() if line.strip()), ""))]
        else:
            found = [_unquote(_LIST_MARK.sub("", line)) for line in reply.splitlines()]
        out: list[str] = []
        seen = {_key(query)}
        for q in found:
            if q and _key(q) not in seen:
                seen.add(_key(q))
                out.append(q)
        return out[:self.n] if self.kind in ("multi-query", "decompose") else out


def _unquote(text: str) -> str:
    return text.strip().strip("\"'“”「」").strip()


def _key(text: str) -> str:
    return " ".join(text.lower().split()).rstrip("?？.。")


class TransformCache:
    """Model replies to transform prompts, one JSON object a line ({"key", "model", "prompt", "reply"}), appended as
    they come; the key is sha256 of the model name and the prompt."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path) if path else None
        self.replies: dict[str, str] = {}
        if self.path is not None and self.path.exists():
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    try:
                        r = json.loads(line)
                        self.replies[r["key"]] = r["reply"]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        # a line cut by a crash mid-write: the reply is generated again
                        continue

    @staticmethod
    def key(model: str, prompt: str) -> str:
        return hashlib.sha256(f"{model}\0{prompt}".encode("utf-8", "surrogatepass")).hexdigest()

    def get(self, model: str, prompt: str) -> str | None:
        return self.replies.get(self.key(model, prompt))

    def put(self, model: str, prompt: str, reply: str) -> None:
        key = self.key(model, prompt)
        self.replies[key] = reply
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"key": key, "model": model, "prompt": prompt, "reply": reply},
                                   ensure_ascii=False) + "\n")


def default_cache_path(index_spec: str) -> Path:
    """INDEX/query_transforms.jsonl for a directory index; for a PostgreSQL URL, a file named after the table in
    $XDG_CACHE_HOME/lmforge (~/.cache/lmforge)."""
    if index_spec.startswith(("postgresql://", "postgres://")):
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lmforge"
        return base / f"query_transforms-{hashlib.sha256(index_spec.encode()).hexdigest()[:16]}.jsonl"
    return Path(index_spec) / "query_transforms.jsonl"


class TransformedIndex:
    """An index (RagIndex or PgVectorIndex) whose search() first asks `client` for the transform's queries, searches
    the original and each generated query the same way, and fuses the rankings by RRF (k=60, the index's own
    constant). Everything else is the wrapped index's."""

    def __init__(self, index, transform: QueryTransform, client: ModelClient, cache: TransformCache | None = None,
                 depth: int = 100):
        self.index, self.transform, self.client = index, transform, client
        self.cache = cache or TransformCache(None)
        self.depth = depth

    def __getattr__(self, name):  # cfg, chunks, _embed, ...: the wrapped index's
        if name == "index":  # not yet set (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.index, name)

    def prepare(self, queries: list[str]) -> None:
        """Generate (in one batch) the replies the cache lacks for these queries."""
        model = self.client.name
        prompts = list(dict.fromkeys(self.transform.prompt(q) for q in queries))
        todo = [p for p in prompts if self.cache.get(model, p) is None]
        if not todo:
            return
        replies = self.client.complete(todo, self.transform.sampling())
        for prompt, reply in zip(todo, replies):
            self.cache.put(model, prompt, reply[0].text)

    def generated(self, query: str) -> list[str]:
        """The queries the model wrote for `query` (the original not among them)."""
        self.prepare([query])
        return self.transform.queries(self.cache.get(self.client.name, self.transform.prompt(query)), query)

    def search(self, query: str, k: int = 10, mode: str = "hybrid", filters: dict | None = None,
               distinct: bool = True, **options) -> list:
        from lmforge.rag.index import Hit, distinct_passages, rrf

        queries = [query] + self.generated(query)
        depth = max(self.depth, 4 * k)
        rankings, chunks, scores = [], {}, {}
        for q in queries:
            hits = self.index.search(q, k=depth, mode=mode, filters=filters, distinct=False, **options)
            rankings.append([h.chunk.chunk_id for h in hits])
            for h in hits:
                chunks.setdefault(h.chunk.chunk_id, h.chunk)
                # per retriever, the best score any of the queries gave the chunk: what `rag ask` checks against
                # --min-similarity (the chunk matched a query written for the question)
                best = scores.setdefault(h.chunk.chunk_id, {})
                for name, s in h.scores.items():
                    best[name] = max(best.get(name, s), s)
        fused = rrf(rankings)
        order = sorted(fused, key=lambda c: (-fused[c], c))[:2 * k if distinct else k]
        hits = [Hit(chunks[c], fused[c], rank, {**scores[c], "fused": fused[c],
                                                "queries": float(sum(c in r for r in rankings))})
                for rank, c in enumerate(order, start=1)]
        return distinct_passages(hits, k) if distinct else hits
