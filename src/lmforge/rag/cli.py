"""`lmforge rag index | search | ask | eval`."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

from lmforge.config import add_config_args, add_field_arg
from lmforge.rag.config import AskConfig, IndexCommand


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
    """An index directory, or a PostgreSQL URL (`postgresql://user:pw@host/db#table`) for the pgvector backend;
    with `cfg` (rag index) a new pgvector index is created with it."""
    from lmforge.rag.index import RagIndex

    if _is_pg(spec):
        from lmforge.rag.pgvector import PgVectorIndex

        dsn, _, table = spec.partition("#")
        return PgVectorIndex(dsn, table or "lmforge_chunks", cfg, create=cfg is not None)
    return RagIndex.open(spec)


def _documents(inputs: list[str], text_field: str, encoding: str = "utf-8", on_bad=None):
    from lmforge.data.sources import iter_documents, resolve_inputs
    from lmforge.rag.evaluate import load_beir_corpus

    for item in resolve_inputs(inputs):
        if Path(item).name in ("corpus.jsonl", "corpus.jsonl.gz"):  # BEIR: title + text, "_id"
            yield from load_beir_corpus(item)
        else:
            yield from iter_documents([item], text_field=text_field, encoding=encoding, on_bad=on_bad)


def cmd_index(args: argparse.Namespace) -> int:
    from lmforge.config import ConfigError, config_from_args
    from lmforge.rag.index import RagIndex
    from lmforge.rag.pgvector import redact_dsn

    c = config_from_args(IndexCommand, args)
    if not c.out:
        raise ConfigError("rag index: --out (the index directory or PostgreSQL URL) is required")
    given = {k for k in vars(args) if k in {f.name for f in fields(IndexCommand)}}
    if _is_pg(c.out):
        index = _open(c.out, c.index_config())
    elif (Path(c.out) / "CURRENT").exists():
        index = RagIndex.open(c.out)
        if given & set(IndexCommand.BUILD_SETTINGS):
            print("note: adding to an existing index keeps its chunker, embedder and analyzer", file=sys.stderr)
    else:
        index = RagIndex(c.out, c.index_config())
    result = {}
    if c.delete:
        result["delete"] = index.delete(c.delete)
    from lmforge.data.sources import RejectLog, check_encoding

    check_encoding(c.encoding)
    rejects = RejectLog() if c.on_error == "skip" else None
    if c.input:
        docs = _documents(c.input, c.text_field, c.encoding, rejects)
        result.update(index.upsert(docs) if _is_pg(c.out) else index.upsert(docs, progress=True))
    if rejects is not None and rejects.items:
        result["rejected"] = len(rejects.items)
        if not _is_pg(c.out):
            rejects.write(c.out)
        else:
            for item in rejects.items:
                print(f"skipped {item['where']}: {item['reason']}", file=sys.stderr)
    print(json.dumps(result, ensure_ascii=False) if c.json else
          " ".join(f"{k}={v}" for k, v in result.items()) + f" -> {redact_dsn(c.out)}")
    return 0


def _mode(index, asked: str | None) -> str:
    """hybrid where the index has vectors, else BM25; asking for vectors an index lacks is an error."""
    if asked is None:
        return "hybrid" if index.cfg.dense else "sparse"
    if asked != "sparse" and not index.cfg.dense:
        from lmforge.config import ConfigError

        raise ConfigError(f"--mode {asked}: this index has no vectors (built with --no-dense); use --mode sparse")
    return asked


def add_transform_args(parser: argparse.ArgumentParser, model_flags: bool) -> None:
    """--query-transform and the model that writes the queries: --model (this process) or --endpoint."""
    parser.add_argument("--query-transform", dest="query_transform", metavar="KIND",
                        help="let a model rewrite the query first, fusing the rankings of its queries and the "
                             "original by RRF: rewrite | hyde | multi-query[:N] | decompose[:N] (needs --model or "
                             "--endpoint; replies cached in INDEX/query_transforms.jsonl)")
    if model_flags:
        from lmforge.infer.load import add_inference_args

        add_inference_args(parser, model_required=False, compile=False,
                           model_help="model directory (in this process) that writes --query-transform's queries "
                                      "(rag eval --generate: and the answers)")
    parser.add_argument("--endpoint", metavar="URL",
                        help="an OpenAI-compatible base URL that writes --query-transform's queries instead of --model")
    parser.add_argument("--served-model", dest="served_model", default="default",
                        help="the model name the endpoint expects")
    parser.add_argument("--api-key", dest="api_key", help="the endpoint's key (default: $OPENAI_API_KEY)")


def _transformed(index, args: argparse.Namespace, loaded=None):
    """The index itself, or with --query-transform the index behind a TransformedIndex and its model client."""
    if not getattr(args, "query_transform", None):
        return index
    from lmforge.config import ConfigError
    from lmforge.infer.client import EngineClient, HTTPClient
    from lmforge.rag.transforms import QueryTransform, TransformCache, TransformedIndex, default_cache_path

    transform = QueryTransform.parse(args.query_transform)
    if args.endpoint:
        import os

        client = HTTPClient(args.endpoint, args.served_model, args.api_key or os.environ.get("OPENAI_API_KEY"))
    elif loaded is not None:
        client = EngineClient(loaded.model, loaded.tokenizer)
        client.name = args.model
    elif args.model:
        client = EngineClient(args.model, template=args.template, dtype=args.dtype, quantize=args.quantize,
                              pack=args.pack)
    else:
        raise ConfigError(f"--query-transform {args.query_transform}: give the model that writes the queries "
                          "(--model DIR or --endpoint URL)")
    return TransformedIndex(index, transform, client, TransformCache(default_cache_path(args.index)))


def _explain(index, query: str) -> None:
    """--explain: the queries the transform wrote, on stderr (stdout stays the result)."""
    from lmforge.rag.transforms import TransformedIndex

    if isinstance(index, TransformedIndex):
        print(f"{index.transform}: searched the query and {len(index.generated(query))} generated:", file=sys.stderr)
        for q in index.generated(query):
            print(f"  - {q}", file=sys.stderr)
    else:
        print("(--explain: no --query-transform; the query was searched as written)", file=sys.stderr)


def cmd_search(args: argparse.Namespace) -> int:
    index = _open(args.index)
    reranker = None
    if args.reranker:
        from lmforge.model.encoder import CrossEncoder

        reranker = CrossEncoder.load(args.reranker)
    mode = _mode(index, args.mode)
    index = _transformed(index, args)
    if args.explain:
        _explain(index, args.query)
    hits = index.search(args.query, k=args.k, mode=mode, filters=_filters(args.filter),
                        fusion=args.fusion,
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
    from lmforge.rag.answer import ContextTooSmall, ask

    index = _open(args.index)
    model = tokenizer = loaded = None
    if args.model:
        from lmforge.infer.load import load_from_args

        loaded = load_from_args(args)
        model, tokenizer = loaded.model, loaded.tokenizer
    mode = _mode(index, args.mode)
    index = _transformed(index, args, loaded)
    if args.explain:
        _explain(index, args.question)
    try:
        result = ask(index, args.question, model, tokenizer, answer_config(args, k=args.k, mode=mode,
                                                                         min_similarity=args.min_similarity))
    except ContextTooSmall as e:
        raise UserError(str(e)) from None
    if getattr(index, "transform", None) is not None:  # a TransformedIndex
        result["query_transform"] = {"kind": str(index.transform), "queries": index.generated(args.question)}
    if args.json:
        print(json.dumps(result, ensure_ascii=False, indent=2))
        return 0
    if result["answer"] is not None:
        print(result["answer"])
    for sentence in result.get("sentences", []):  # --cite: what no source backs
        if not sentence["supported"]:
            print(f"  (not supported by the sources: {sentence['text']})")
    cited = {c["n"] for c in result["citations"]}
    if result["sources"]:
        print("\nsources:")
    for s in result["sources"]:
        mark = "*" if s["n"] in cited else " "
        print(f" {mark}[{s['n']}] {s['doc_id']} [{s['start']}:{s['end']}]  {' '.join(s['text'].split())[:120]}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from lmforge.config import ConfigError
    from lmforge.rag.evaluate import builtin_questions, evaluate_index, load_qrels, load_queries, metrics_table

    index = _open(args.index)
    if args.queries == BUILTIN_QUESTIONS:
        queries, qrels = builtin_questions()
        # the built-in corpus names its documents python-docs/<topic>; an index of other text finds none of them
        qrels = {q: {f"python-docs/{d}": r for d, r in rels.items()} for q, rels in qrels.items()}
    else:
        if not args.qrels:
            raise ConfigError("rag eval: --qrels is required with your own --queries (or use --queries "
                              f"{BUILTIN_QUESTIONS})")
        queries, qrels = load_queries(args.queries), load_qrels(args.qrels)
    modes = args.modes or (["sparse", "dense", "hybrid"] if index.cfg.dense else ["sparse"])
    for m in modes:
        _mode(index, m)
    if args.limit:
        qrels = {q: qrels[q] for q in sorted(q for q in qrels if q in queries)[:args.limit]}
    loaded = None
    if args.generate:
        if not args.model:
            raise ConfigError("rag eval --generate: give the model that answers (--model DIR)")
        from lmforge.infer.load import load_from_args

        loaded = load_from_args(args)
    index = _transformed(index, args, loaded)
    transform = getattr(index, "transform", None)
    if transform is not None:
        index.prepare([queries[q] for q in qrels if q in queries])  # one batch of generations, then cached
    if args.generate:
        return _eval_answers(index, args, queries, qrels, loaded)
    results = evaluate_index(index, queries, qrels, modes=modes, progress=True, fusion=args.fusion,
                             dense_weight=args.dense_weight)
    if transform is not None:
        results["query_transform"] = str(transform)
    if args.out:
        from lmforge.files import write_json

        write_json(args.out, results)
    print(json.dumps(results, indent=2) if args.json else metrics_table(results) + f"\n{results['queries']} queries")
    return 0


def _eval_answers(index, args, queries, qrels, loaded) -> int:
    """rag eval --generate: answer each query with the model and score the answers (rag/grounding.py)."""
    import os

    from lmforge.rag.grounding import JudgeSupport, OverlapSupport, evaluate_answers

    judge = embed = None
    if args.judge_endpoint:
        from lmforge.infer.client import HTTPClient

        judge = HTTPClient(args.judge_endpoint, args.served_model, args.api_key or os.environ.get("OPENAI_API_KEY"))
    elif args.judge_model:
        from lmforge.infer.client import EngineClient

        judge = EngineClient(args.judge_model) if args.judge_model != args.model else EngineClient(
            loaded.model, loaded.tokenizer)
    if judge is not None:
        from lmforge.model.encoder import SentenceEmbedder

        embedder = SentenceEmbedder.load(None)
        embed = lambda texts: embedder.embed(texts).numpy()  # noqa: E731
    cfg = answer_config(args, k=args.answer_k, mode=_mode(index, args.modes[0] if args.modes else None))
    results = evaluate_answers(index, queries, qrels, loaded.model, loaded.tokenizer, cfg,
                               support=JudgeSupport(judge) if judge is not None else OverlapSupport(),
                               judge=judge, embed=embed, progress=True)
    if args.out:
        from lmforge.files import write_json

        write_json(args.out, results)
    if args.json:
        print(json.dumps({k: v for k, v in results.items() if k != "rows"}, indent=2, ensure_ascii=False))
    else:
        for name, value in results["metrics"].items():
            print(f"{name:<20} {value:.4f}" if isinstance(value, float) else f"{name:<20} {value}")
        print(f"{results['queries']} queries, support judged by {results['support']}")
    return 0


BUILTIN_QUESTIONS = "builtin:python-docs"
ANSWER_FIELDS = ("max_new_tokens", "rag", "prior_temperature", "cite", "abstain")  # how an answer is made


def add_answer_args(parser: argparse.ArgumentParser) -> None:
    """The flags of how an answer is made and grounded (AskConfig's ANSWER_FIELDS): rag ask, rag eval --generate,
    eval rag."""
    add_field_arg(parser, AskConfig, "max_new_tokens")
    add_field_arg(parser, AskConfig, "rag")
    add_field_arg(parser, AskConfig, "prior_temperature")
    add_field_arg(parser, AskConfig, "cite", action=argparse.BooleanOptionalAction, type=None)
    add_field_arg(parser, AskConfig, "abstain", metavar="THRESHOLD")


def answer_config(args: argparse.Namespace, **retrieval) -> AskConfig:
    """The AskConfig of `add_answer_args`' flags (each checked: a one-line error naming its flag) and `retrieval`'s
    settings (k, mode, ...)."""
    from lmforge.config import field_value

    return AskConfig(**retrieval, **{name: field_value(AskConfig, name, getattr(args, name)) for name in ANSWER_FIELDS})


class _Help(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Examples as written, and every flag's default in its help (where there is one)."""

    def _get_help_string(self, action):
        if action.default in (None, False) or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rag", help="retrieval-augmented generation: index, search, ask, evaluate",
                       description="RAG stage: chunk + index documents (BM25 and dense vectors), search them, "
                                   "answer questions with citations, evaluate retrieval on BEIR data.")
    rsub = p.add_subparsers(dest="rag_command", metavar="ACTION", parser_class=type(p))
    p.set_defaults(func=lambda a: p.print_help())
    _add_index(rsub)
    _add_search(rsub)
    _add_ask(rsub)
    _add_eval(rsub)


def _add_index(rsub) -> None:
    """`lmforge rag index`: its flags are IndexCommand's fields (rag/config.py)."""
    i = rsub.add_parser("index", help="add/update/delete documents in an index directory",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="Chunk documents, embed them (all-MiniLM-L6-v2 by default, offline) and index "
                                    "them for BM25 and vector search. Rerunning on the same index adds new documents, "
                                    "re-indexes changed ones and skips unchanged ones. A BEIR corpus.jsonl is read "
                                    "as title + text with its _id.",
                        epilog="examples:\n  lmforge rag index --input docs/ --out runs/index\n"
                               "  lmforge rag index --input scifact/corpus.jsonl --out runs/scifact --chunker none\n"
                               "  lmforge rag index --input notes/ --out runs/bm25 --no-dense   # BM25 only\n"
                               "  lmforge rag index --config index.yaml --input more/   # flags override the file\n"
                               "  lmforge rag index --out runs/index --delete doc-17 doc-18")
    add_config_args(i, IndexCommand)
    i.set_defaults(func=cmd_index, _parser=i)


def _add_retrieval_args(parser: argparse.ArgumentParser) -> None:
    """--index, which search, ask and eval share."""
    parser.add_argument("--index", required=True, help="index directory or postgresql:// URL")


MODES = ["sparse", "dense", "hybrid"]
MODE_HELP = "retriever (default: hybrid, or sparse for a BM25-only index)"


def _add_search(rsub) -> None:
    """`lmforge rag search`."""
    s = rsub.add_parser("search", help="search an index", formatter_class=_Help,
                        description="The k best chunks for a query: BM25, vectors, or both fused.",
                        epilog='examples:\n  lmforge rag search --index runs/index "how do I catch an exception" --k 5\n'
                               '  lmforge rag search --index runs/index "装饰器" --mode sparse --json\n'
                               '  lmforge rag search --index runs/index "yield" --filter lang=en --reranker runs/ce')
    _add_retrieval_args(s)
    s.add_argument("query", help="the question or keywords")
    s.add_argument("--k", type=int, default=10, help="chunks to return")
    s.add_argument("--mode", choices=MODES, default=None, help=MODE_HELP)
    s.add_argument("--fusion", choices=["rrf", "weighted"], default="rrf", help="how hybrid fuses the two rankings")
    s.add_argument("--dense-weight", dest="dense_weight", type=float, default=0.5, help="weighted fusion: dense share")
    s.add_argument("--filter", nargs="+", metavar="FIELD=VALUE", help="metadata filters (same field: any value)")
    s.add_argument("--reranker", metavar="DIR", help="cross-encoder directory (BertForSequenceClassification) to "
                                                     "re-score the top 30")
    s.add_argument("--json", action="store_true", help="print the hits as JSON")
    add_transform_args(s, model_flags=True)
    s.add_argument("--explain", action="store_true", help="show the queries --query-transform wrote (on stderr)")
    s.set_defaults(func=cmd_search, _parser=s)


def _add_ask(rsub) -> None:
    """`lmforge rag ask`: --k, --min-similarity and --max-new-tokens are AskConfig's (rag/config.py)."""
    from lmforge.infer.load import add_inference_args

    a = rsub.add_parser("ask", help="answer a question from the index, with [n] citations", formatter_class=_Help,
                        description="Retrieve, build a prompt of numbered sources within the model's context, "
                                    "generate, and map the [n] citations back to documents and offsets. Without "
                                    "--model: the sources only.",
                        epilog='examples:\n  lmforge rag ask --index runs/index "What does the yield statement do?"\n'
                               '  lmforge rag ask --index runs/index --model runs/sft "What does yield do?" --json')
    _add_retrieval_args(a)
    add_inference_args(a, model_required=False, compile=False,
                       model_help="HF model directory or Hub id (without: show the sources only)")
    a.add_argument("question", help="the question")
    add_field_arg(a, AskConfig, "k")
    a.add_argument("--mode", choices=MODES, default=None, help=MODE_HELP)
    add_field_arg(a, AskConfig, "min_similarity")
    add_answer_args(a)
    a.add_argument("--json", action="store_true", help="print the answer, citations and sources as JSON")
    add_transform_args(a, model_flags=False)
    a.add_argument("--explain", action="store_true", help="show the queries --query-transform wrote (on stderr)")
    a.set_defaults(func=cmd_ask, _parser=a)


def _add_eval(rsub) -> None:
    """`lmforge rag eval`: retrieval metrics, or with --generate the answers' (AskConfig's defaults)."""
    e = rsub.add_parser("eval", help="nDCG@10, recall, MRR, MAP and latency on BEIR-format queries + qrels",
                        formatter_class=_Help,
                        description="Retrieval quality of an index per mode, on BEIR-format queries and qrels, or on "
                                    f"the 54 built-in questions about Python's reference ({BUILTIN_QUESTIONS}).",
                        epilog="examples:\n  lmforge rag eval --index runs/scifact --queries scifact/queries.jsonl "
                               "--qrels scifact/qrels/test.tsv\n"
                               "  lmforge rag index --input builtin:python-docs --out runs/pydocs && "
                               f"lmforge rag eval --index runs/pydocs --queries {BUILTIN_QUESTIONS}")
    add_eval_args(e)
    e.set_defaults(func=cmd_eval, _parser=e)


def add_eval_args(e: argparse.ArgumentParser, answers_only: bool = False) -> None:
    """`rag eval`'s flags; `answers_only`: the answers' metrics always (no --generate flag, --model required), for
    `lmforge eval rag` (eval/cli.py), which runs the same `cmd_eval`."""
    _add_retrieval_args(e)
    e.add_argument("--queries", required=True, help=f"BEIR queries.jsonl, or {BUILTIN_QUESTIONS} (the built-in set)")
    e.add_argument("--qrels", help="BEIR qrels .tsv (not needed for the built-in set)")
    e.add_argument("--modes", nargs="+", choices=MODES, default=None,
                   help="the retriever the answers use: the first one given (default: hybrid, or sparse for a "
                        "BM25-only index)" if answers_only else "modes to evaluate (default: all the index supports)")
    e.add_argument("--fusion", choices=["rrf", "weighted"], default="rrf", help="hybrid fusion (default: rrf, k=60)")
    e.add_argument("--dense-weight", dest="dense_weight", type=float, default=0.5, help="weighted fusion: dense share")
    e.add_argument("--out", help="also write the results JSON here")
    e.add_argument("--json", action="store_true", help="print the results as JSON")
    e.add_argument("--limit", type=int, default=0, help="the first N judged queries only (by id; 0: all)")
    if answers_only:
        e.set_defaults(generate=True)
    else:
        e.add_argument("--generate", action="store_true",
                       help="answer each query with --model (rag ask) and score the answers: citation recall/"
                            "precision, faithfulness, context precision/recall, answer relevance (with a judge) — "
                            "docs/rag.md (also: lmforge eval rag)")
    e.add_argument("--judge-model", dest="judge_model", metavar="DIR",
                   help="--generate: a model that judges support by an NLI-style prompt and writes questions for "
                        "answer relevance (without a judge: word-overlap support, no answer relevance)")
    e.add_argument("--judge-endpoint", dest="judge_endpoint", metavar="URL",
                   help="--generate: the judge behind an OpenAI-compatible endpoint (--served-model, --api-key)")
    add_field_arg(e, AskConfig, "k", "--answer-k", dest="answer_k", help="--generate: sources per answer")
    add_answer_args(e)
    add_transform_args(e, model_flags=True)


def add_eval_rag(esub) -> None:
    """`lmforge eval rag`: `rag eval --generate` under eval's command. This module owns its flags and its run;
    lmforge/cli.py adds it to eval's subcommands (a stage's CLI imports no other stage's CLI)."""
    g = esub.add_parser("rag", help="RAG answers: citation recall / precision, faithfulness, context precision / "
                                    "recall, answer relevance (= lmforge rag eval --generate)",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="Answer each judged query from an index with --model (as lmforge rag ask does) "
                                    "and score the answers: ALCE citation recall / precision, RAGAS faithfulness, "
                                    "context precision / recall against the qrels, answer relevance with a judge. "
                                    "See docs/rag.md.",
                        epilog=f"example:\n  lmforge eval rag --index runs/pydocs --queries {BUILTIN_QUESTIONS} "
                               "--model runs/smollm2 --rag token")
    add_eval_args(g, answers_only=True)
    g.set_defaults(func=cmd_eval, _parser=g)
