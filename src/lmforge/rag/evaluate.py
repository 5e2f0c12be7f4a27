"""Retrieval evaluation on BEIR-format data: nDCG@k, recall@k, MRR@k, MAP@k, latency.

BEIR layout: `corpus.jsonl` ({"_id", "title", "text"}), `queries.jsonl` ({"_id", "text"}),
`qrels/test.tsv` (header `query-id corpus-id score`). Metric definitions follow trec_eval /
pytrec_eval as BEIR reports them: graded gains (nDCG gain = relevance, discount log2(rank+1),
ideal DCG over all judged-relevant documents), recall over all relevant documents, MAP with
precision summed at each relevant rank and divided by the number of relevant documents.
Chunk hits are turned into a document ranking by first occurrence.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lmforge.data.document import Document
from lmforge.data.sources import CorpusError


def _open_text(path: str | os.PathLike):
    """A text file, gzip-compressed when its name ends in .gz (BEIR sets are often kept compressed)."""
    if str(path).endswith(".gz"):
        import gzip

        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def find_beir_file(beir_dir: str | os.PathLike, name: str) -> Path:
    """BEIR_DIR/name, or BEIR_DIR/name.gz."""
    for candidate in (Path(beir_dir) / name, Path(beir_dir) / f"{name}.gz"):
        if candidate.exists():
            return candidate
    raise CorpusError(f"{beir_dir}: no {name} (or {name}.gz): not a BEIR dataset folder")


def _records(path: str | os.PathLike, needs: str):
    """(line number, object) of a BEIR jsonl file (or .jsonl.gz) whose objects have "_id" and a string "text"."""
    with _open_text(path) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{path}:{lineno}: malformed JSON: {e.msg}") from None
            if not isinstance(r, dict) or "_id" not in r or not isinstance(r.get("text"), str):
                raise CorpusError(f"{path}:{lineno}: {needs} needs '_id' and a string 'text'")
            yield lineno, r


def load_beir_corpus(path: str | os.PathLike) -> list[Document]:
    """corpus.jsonl -> Documents whose text is "title\ntext" (the BEIR convention for BM25 and dense);
    a title-only entry (empty text) is kept."""
    docs = []
    for _, r in _records(path, "a BEIR corpus line"):
        title = (r.get("title") or "").strip()
        text = f"{title}\n{r['text']}" if title else r["text"]
        meta = {k: v for k, v in r.items() if k not in ("_id", "text")}
        docs.append(Document(str(r["_id"]), text, meta))
    return docs


def load_queries(path: str | os.PathLike) -> dict[str, str]:
    return {str(r["_id"]): r["text"] for _, r in _records(path, "a query line")}


def load_qrels(path: str | os.PathLike) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    if not rows:
        raise CorpusError(f"{path}: empty qrels file")
    start = 1 if rows[0] and rows[0][0].strip().lower() in ("query-id", "query_id", "qid", "query") else 0  # header
    for lineno, row in enumerate(rows[start:], start=start + 1):
        if not row:
            continue
        if len(row) == 4:  # TREC format: qid 0 docid rel
            row = [row[0], row[2], row[3]]
        if len(row) != 3:
            raise CorpusError(f"{path}:{lineno}: expected query-id, corpus-id, score (tab-separated)")
        try:
            qrels.setdefault(row[0], {})[row[1]] = int(row[2])
        except ValueError:
            raise CorpusError(f"{path}:{lineno}: score {row[2]!r} is not an integer") from None
    return qrels


# ----- metrics (per query) ----------------------------------------------------------------------

def ndcg_at_k(ranking: Sequence[str], relevant: dict[str, int], k: int) -> float:
    dcg = sum(relevant.get(d, 0) / math.log2(i + 2) for i, d in enumerate(ranking[:k]))
    ideal = sorted((r for r in relevant.values() if r > 0), reverse=True)[:k]
    idcg = sum(r / math.log2(i + 2) for i, r in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def recall_at_k(ranking: Sequence[str], relevant: dict[str, int], k: int) -> float:
    rel = {d for d, r in relevant.items() if r > 0}
    return len(rel & set(ranking[:k])) / len(rel) if rel else 0.0


def mrr_at_k(ranking: Sequence[str], relevant: dict[str, int], k: int) -> float:
    for i, d in enumerate(ranking[:k]):
        if relevant.get(d, 0) > 0:
            return 1.0 / (i + 1)
    return 0.0


def average_precision_at_k(ranking: Sequence[str], relevant: dict[str, int], k: int) -> float:
    n_rel = sum(1 for r in relevant.values() if r > 0)
    if not n_rel:
        return 0.0
    hits, total = 0, 0.0
    for i, d in enumerate(ranking[:k]):
        if relevant.get(d, 0) > 0:
            hits += 1
            total += hits / (i + 1)
    return total / n_rel


def evaluate_rankings(rankings: dict[str, list[str]], qrels: dict[str, dict[str, int]],
                      ks: Sequence[int] = (1, 3, 5, 10, 100)) -> dict[str, float]:
    """Mean of each metric over the queries that have judgements (missing rankings count as empty)."""
    judged = [q for q, rel in qrels.items() if any(r > 0 for r in rel.values())]
    out: dict[str, float] = {}
    for k in ks:
        out[f"ndcg@{k}"] = float(np.mean([ndcg_at_k(rankings.get(q, []), qrels[q], k) for q in judged])) if judged else 0
        out[f"recall@{k}"] = float(np.mean([recall_at_k(rankings.get(q, []), qrels[q], k) for q in judged])) if judged else 0
    out["mrr@10"] = float(np.mean([mrr_at_k(rankings.get(q, []), qrels[q], 10) for q in judged])) if judged else 0
    out["map@100"] = float(np.mean([average_precision_at_k(rankings.get(q, []), qrels[q], 100) for q in judged])) \
        if judged else 0
    out["queries"] = len(judged)
    return out


def doc_ranking(hits) -> list[str]:
    seen, out = set(), []
    for h in hits:
        if h.chunk.doc_id not in seen:
            seen.add(h.chunk.doc_id)
            out.append(h.chunk.doc_id)
    return out


def evaluate_index(index, queries: dict[str, str], qrels: dict[str, dict[str, int]],
                   modes: Sequence[str] = ("sparse", "dense", "hybrid"), k: int = 100, progress: bool = False,
                   fusion: str = "rrf", dense_weight: float = 0.5) -> dict:
    """Metrics and per-query latency of each retrieval mode."""
    from lmforge.progress import progress as progress_bar

    results = {}
    qids = [q for q in qrels if q in queries]
    missing = [q for q in qrels if q not in queries]
    for mode in modes:
        if mode != "sparse" and not index.cfg.dense:
            continue
        rankings, latency = {}, []
        if mode != "sparse":
            index._embed(["warm up"])  # load the embedder outside the timed loop
        for q in progress_bar(qids, desc=mode, unit="query", enabled=progress):
            t0 = time.perf_counter()
            hits = index.search(queries[q], k=k, mode=mode, fusion=fusion, dense_weight=dense_weight, distinct=False)
            latency.append(time.perf_counter() - t0)
            rankings[q] = doc_ranking(hits)
        metrics = evaluate_rankings(rankings, {q: qrels[q] for q in qids})
        metrics["latency_ms_mean"] = round(1000 * float(np.mean(latency)), 2) if latency else 0.0
        metrics["latency_ms_p95"] = round(1000 * float(np.percentile(latency, 95)), 2) if latency else 0.0
        results[mode] = metrics
    return {"queries": len(qids), "queries_without_text": len(missing), "modes": results}


def metrics_table(results: dict) -> str:
    cols = ["ndcg@10", "recall@10", "recall@100", "mrr@10", "map@100", "latency_ms_mean"]
    lines = ["mode     " + "  ".join(f"{c:>15}" for c in cols)]
    for mode, m in results["modes"].items():
        lines.append(f"{mode:<8} " + "  ".join(f"{m[c]:>15.4f}" if c != "latency_ms_mean" else f"{m[c]:>15.2f}"
                                              for c in cols))
    return "\n".join(lines)


def find_qrels(beir_dir: str | os.PathLike, split: str = "test") -> Path:
    p = Path(beir_dir) / "qrels" / f"{split}.tsv"
    if not p.exists():
        raise CorpusError(f"{p}: no qrels for split '{split}'")
    return p


def builtin_questions() -> tuple[dict[str, str], dict[str, dict[str, int]]]:
    """The built-in evaluation set: 54 questions written by hand for the Python reference
    (`builtin:python-docs`), judged against topic names (2 = the page that answers, 1 = a larger
    page that contains it)."""
    from importlib import resources

    queries: dict[str, str] = {}
    qrels: dict[str, dict[str, int]] = {}
    text = resources.files("lmforge").joinpath("rag/data/pydocs_queries.tsv").read_text(encoding="utf-8")
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        qid, question, rels = line.split("\t")
        queries[qid] = question
        qrels[qid] = {doc: int(score) for doc, score in (r.split(":") for r in rels.split(","))}
    return queries, qrels


def write_builtin_beir(out: str | os.PathLike) -> Path:
    """The built-in set in BEIR layout (corpus = the Python reference topics, `_id` = topic name)."""
    from pydoc_data.topics import topics

    out = Path(out)
    (out / "qrels").mkdir(parents=True, exist_ok=True)
    queries, qrels = builtin_questions()
    with open(out / "corpus.jsonl", "w", encoding="utf-8") as f:
        for name in sorted(topics):
            f.write(json.dumps({"_id": name, "title": "", "text": topics[name]}) + "\n")
    with open(out / "queries.jsonl", "w", encoding="utf-8") as f:
        for q, text in queries.items():
            f.write(json.dumps({"_id": q, "text": text}) + "\n")
    with open(out / "qrels" / "test.tsv", "w", encoding="utf-8") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        for q, rels in qrels.items():
            for doc, score in rels.items():
                f.write(f"{q}\t{doc}\t{score}\n")
    return out
