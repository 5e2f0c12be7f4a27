"""`lmforge rag index | search | ask | eval`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _filters(pairs: list[str] | None) -> dict | None:
    if not pairs:
        return None
    out: dict[str, list[str]] = {}
    for p in pairs:
        if "=" not in p:
            from lmforge.config import ConfigError

            raise ConfigError(f"--filter {p!r}: expected FIELD=VALUE")
        k, v = p.split("=", 1)
        out.setdefault(k, []).append(v)
    return out


def _is_pg(spec: str) -> bool:
    return spec.startswith(("postgresql://", "postgres://"))


def _open(spec: str, cfg=None):
    """An index directory, or a PostgreSQL URL (`postgresql://user:pw@host/db#table`) for the pgvector backend."""
    from lmforge.rag.index import RagIndex

    if _is_pg(spec):
        from lmforge.rag.pgvector import PgVectorIndex

        dsn, _, table = spec.partition("#")
        return PgVectorIndex(dsn, table or "lmforge_chunks", cfg)
    return RagIndex.open(spec)


def _documents(inputs: list[str], text_field: str):
    from lmforge.data.sources import iter_documents, resolve_inputs
    from lmforge.rag.evaluate import load_beir_corpus

    for item in resolve_inputs(inputs):
        if Path(item).name in ("corpus.jsonl",):  # BEIR: title + text, "_id"
            yield from load_beir_corpus(item)
        else:
            yield from iter_documents([item], text_field=text_field)


def cmd_index(args: argparse.Namespace) -> int:
    from lmforge.rag.chunking import ChunkerConfig
    from lmforge.rag.index import IndexConfig, RagIndex
    from lmforge.rag.sparse import AnalyzerConfig

    chunker = ChunkerConfig(kind=args.chunker or "recursive", size=args.size, overlap=args.overlap)
    cfg = IndexConfig(embedder=args.embedder or "default", chunker=chunker,
                      analyzer=AnalyzerConfig(stem=args.stem, chinese=args.chinese), k1=args.k1, b=args.b,
                      vector_index=args.vector_index, dense=not args.no_dense,
                      embedder_languages=args.embedder_languages if args.embedder_languages is not None
                      else (["en"] if not args.embedder else []))
    if _is_pg(args.out):
        index = _open(args.out, cfg)
    elif (Path(args.out) / "CURRENT").exists():
        index = RagIndex.open(args.out)
        if args.chunker or args.embedder or args.no_dense:
            print("note: adding to an existing index keeps its chunker, embedder and analyzer", file=sys.stderr)
    else:
        index = RagIndex(args.out, cfg)
    result = {}
    if args.delete:
        result["delete"] = index.delete(args.delete)
    if args.input:
        docs = _documents(args.input, args.text_field)
        result.update(index.upsert(docs) if _is_pg(args.out) else index.upsert(docs, progress=sys.stderr.isatty()))
    print(json.dumps(result, ensure_ascii=False) if args.json else
          " ".join(f"{k}={v}" for k, v in result.items()) + f" -> {args.out}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    index = _open(args.index)
    reranker = None
    if args.reranker:
        from lmforge.model.encoder import CrossEncoder

        reranker = CrossEncoder.load(args.reranker)
    hits = index.search(args.query, k=args.k, mode=args.mode, filters=_filters(args.filter), fusion=args.fusion,
                        dense_weight=args.dense_weight, reranker=reranker)
    if args.json:
        print(json.dumps([h.as_dict() for h in hits], ensure_ascii=False, indent=2))
    else:
        for h in hits:
            where = h.chunk.doc_id + (" > " + " > ".join(h.chunk.heading) if h.chunk.heading else "")
            text = " ".join(h.chunk.text.split())
            print(f"{h.rank:>2}. {h.score:.4f}  {where}  [{h.chunk.start}:{h.chunk.end}]\n    {text[:200]}")
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    from lmforge.cli import UserError
    from lmforge.rag.answer import AskConfig, ContextTooSmall, ask

    index = _open(args.index)
    model = tokenizer = None
    if args.model:
        from lmforge.model import load_hf_model
        from lmforge.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(args.model)
        model = load_hf_model(args.model)
    try:
        result = ask(index, args.question, model, tokenizer,
                     AskConfig(k=args.k, mode=args.mode, min_similarity=args.min_similarity,
                               max_new_tokens=args.max_new_tokens))
    except ContextTooSmall as e:
        raise UserError(str(e)) from None
    if args.json:
        print(json.dumps(result, ensure_ascii=False, indent=2))
        return 0
    if result["answer"] is not None:
        print(result["answer"])
    cited = {c["n"] for c in result["citations"]}
    if result["sources"]:
        print("\nsources:")
    for s in result["sources"]:
        mark = "*" if s["n"] in cited else " "
        print(f" {mark}[{s['n']}] {s['doc_id']} [{s['start']}:{s['end']}]  {' '.join(s['text'].split())[:120]}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from lmforge.rag.evaluate import evaluate_index, load_qrels, load_queries, metrics_table

    index = _open(args.index)
    results = evaluate_index(index, load_queries(args.queries), load_qrels(args.qrels), modes=args.modes,
                             progress=sys.stderr.isatty(), fusion=args.fusion, dense_weight=args.dense_weight)
    if args.out:
        from lmforge.files import write_json

        write_json(args.out, results)
    print(json.dumps(results, indent=2) if args.json else metrics_table(results) + f"\n{results['queries']} queries")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rag", help="retrieval-augmented generation: index, search, ask, evaluate",
                       description="RAG stage: chunk + index documents (BM25 and dense vectors), search them, "
                                   "answer questions with citations, evaluate retrieval on BEIR data.")
    rsub = p.add_subparsers(dest="rag_command", metavar="ACTION", parser_class=type(p))
    p.set_defaults(func=lambda a: p.print_help())

    i = rsub.add_parser("index", help="add/update/delete documents in an index directory",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="Chunk documents, embed them (all-MiniLM-L6-v2 by default, offline) and index "
                                    "them for BM25 and vector search. Rerunning on the same index adds new documents, "
                                    "re-indexes changed ones and skips unchanged ones. A BEIR corpus.jsonl is read "
                                    "as title + text with its _id.",
                        epilog="examples:\n  lmforge rag index --input docs/ --out runs/index\n"
                               "  lmforge rag index --input scifact/corpus.jsonl --out runs/scifact --chunker none\n"
                               "  lmforge rag index --out runs/index --delete doc-17 doc-18")
    i.add_argument("--input", nargs="+", help="files, directories, globs, builtin:python-docs, BEIR corpus.jsonl")
    i.add_argument("--out", required=True, help="index directory, or postgresql://user:pw@host/db#table (pgvector)")
    i.add_argument("--chunker", choices=["none", "fixed", "recursive", "markdown", "semantic"],
                   help="how documents are cut (default: recursive)")
    i.add_argument("--size", type=int, default=800, help="chunk size in characters (default: 800)")
    i.add_argument("--overlap", type=int, default=100, help="chunk overlap in characters (default: 100)")
    i.add_argument("--embedder", help="sentence-transformers / HF encoder directory (default: all-MiniLM-L6-v2)")
    i.add_argument("--embedder-languages", dest="embedder_languages", nargs="*", metavar="LANG",
                   help="languages the embedder reads (default: en for the default embedder, all for --embedder); "
                        "hybrid queries in other scripts (Chinese) use BM25 alone")
    i.add_argument("--no-dense", dest="no_dense", action="store_true", help="BM25 only: no embeddings")
    i.add_argument("--vector-index", dest="vector_index", choices=["flat", "hnsw"], default="flat")
    i.add_argument("--stem", action="store_true", help="English stemming for BM25")
    i.add_argument("--chinese", choices=["jieba", "bigram"], default="jieba", help="Chinese BM25 terms")
    i.add_argument("--k1", type=float, default=1.5)
    i.add_argument("--b", type=float, default=0.75)
    i.add_argument("--delete", nargs="+", metavar="DOC_ID", help="remove these documents")
    i.add_argument("--text-field", dest="text_field", default="text")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_index, _parser=i)

    s = rsub.add_parser("search", help="search an index",
                        epilog='example: lmforge rag search --index runs/index "how do I catch an exception" --k 5')
    s.add_argument("--index", required=True)
    s.add_argument("query")
    s.add_argument("--k", type=int, default=10)
    s.add_argument("--mode", choices=["sparse", "dense", "hybrid"], default="hybrid")
    s.add_argument("--fusion", choices=["rrf", "weighted"], default="rrf")
    s.add_argument("--dense-weight", dest="dense_weight", type=float, default=0.5, help="weighted fusion: dense share")
    s.add_argument("--filter", nargs="+", metavar="FIELD=VALUE", help="metadata filters (same field: any value)")
    s.add_argument("--reranker", metavar="DIR", help="cross-encoder directory (BertForSequenceClassification) to "
                                                     "re-score the top 30")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_search, _parser=s)

    a = rsub.add_parser("ask", help="answer a question from the index, with [n] citations",
                        epilog='example: lmforge rag ask --index runs/index --model runs/sft "What does yield do?"')
    a.add_argument("--index", required=True)
    a.add_argument("--model", help="HF model directory (without: show the sources only)")
    a.add_argument("question")
    a.add_argument("--k", type=int, default=5)
    a.add_argument("--mode", choices=["sparse", "dense", "hybrid"], default="hybrid")
    a.add_argument("--min-similarity", dest="min_similarity", type=float, default=0.3,
                   help="dense cosine a source needs; below it for all sources the answer is 'I don't know'")
    a.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=200)
    a.add_argument("--json", action="store_true")
    a.set_defaults(func=cmd_ask, _parser=a)

    e = rsub.add_parser("eval", help="nDCG@10, recall, MRR, MAP and latency on BEIR-format queries + qrels",
                        epilog="example: lmforge rag eval --index runs/scifact --queries scifact/queries.jsonl "
                               "--qrels scifact/qrels/test.tsv")
    e.add_argument("--index", required=True)
    e.add_argument("--queries", required=True)
    e.add_argument("--qrels", required=True)
    e.add_argument("--modes", nargs="+", choices=["sparse", "dense", "hybrid"], default=["sparse", "dense", "hybrid"])
    e.add_argument("--fusion", choices=["rrf", "weighted"], default="rrf", help="hybrid fusion (default: rrf, k=60)")
    e.add_argument("--dense-weight", dest="dense_weight", type=float, default=0.5, help="weighted fusion: dense share")
    e.add_argument("--out", help="also write the results JSON here")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_eval, _parser=e)
