"""`lmforge serve`: the OpenAI-compatible server and web chat for one model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _tokens(text: str) -> int:
    n = int(text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {n}")
    return n


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {n}")
    return n


def build_server(args: argparse.Namespace):
    from lmforge.infer.load import load_from_args
    from lmforge.serve.app import Server

    loaded = load_from_args(args)  # warns when --template is not the template the model was trained with
    model, tokenizer = loaded.model, loaded.tokenizer
    print(f"loaded {loaded.description}", file=sys.stderr)
    name = args.name or Path(args.model).resolve().name
    embedder, embedder_name = None, "embedder"
    if args.embedder:
        from lmforge.model.encoder import SentenceEmbedder

        embedder = SentenceEmbedder.load(None if args.embedder == "default" else args.embedder)
        embedder_name = "all-MiniLM-L6-v2" if args.embedder == "default" else Path(args.embedder).resolve().name
    index = ask_cfg = None
    if args.index:
        from lmforge.rag.answer import AskConfig
        from lmforge.rag.index import RagIndex

        index, ask_cfg = RagIndex.open(args.index), AskConfig(k=args.k)
    return Server(model, tokenizer, name, api_key=args.api_key, max_batch=args.max_batch, max_queue=args.max_queue,
                  context=args.context, embedder=embedder, embedder_name=embedder_name, index=index, ask_cfg=ask_cfg,
                  template_kwargs=loaded.template_kwargs, max_prefill_tokens=args.max_prefill_tokens or None)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from lmforge.serve.app import create_app

    server = build_server(args)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"lmforge: warning: serving on {args.host} without --api-key: anyone who can reach it can use it",
              file=sys.stderr)
    app = create_app(server, cors=args.cors, host=args.host, port=args.port)
    print(f"serving {server.model_name} on http://{args.host}:{args.port} (web chat at /, API at /v1; "
          f"{server.context}-token context, batches of up to {args.max_batch}); Ctrl-C stops", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=10)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from lmforge.config import add_field_arg
    from lmforge.infer.config import BatchingConfig
    from lmforge.infer.load import add_inference_args
    from lmforge.rag.config import AskConfig

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching and a web chat",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Serve one model: /v1/chat/completions, /v1/completions, /v1/models (OpenAI's "
                                   "schemas, streaming included), /health, /metrics and a web chat at /. See "
                                   "docs/serve.md.",
                       epilog="examples:\n  lmforge serve --model runs/sft-merged\n"
                              "  lmforge serve --model runs/sft-merged --port 8080 --api-key secret --max-batch 16\n"
                              "  python -c \"from openai import OpenAI; c = OpenAI(base_url='http://127.0.0.1:8000/v1', "
                              "api_key='x'); print(c.chat.completions.create(model='m', messages=[{'role': 'user', "
                              "'content': 'hi'}]).choices[0].message.content)\"")
    add_inference_args(s, compile=False)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/*")
    s.add_argument("--name", help="the model id clients see (default: the directory's name)")
    add_field_arg(s, BatchingConfig, "max_batch", type=_positive)
    add_field_arg(s, BatchingConfig, "max_queue", type=_tokens)
    s.add_argument("--context", type=int, help="KV-cache tokens per request (default: the model's max_seq_len)")
    add_field_arg(s, BatchingConfig, "max_prefill_tokens", type=_tokens, metavar="N")
    s.add_argument("--cors", nargs="*", metavar="ORIGIN", help="allow browsers from these origins (CORS)")
    s.add_argument("--index", metavar="RAG_DIR", help="answer chat requests from this `lmforge rag index` (sources "
                                                       "in the response; \"I don't know\" when nothing is relevant)")
    add_field_arg(s, AskConfig, "k", help="--index: chunks retrieved per question")
    s.add_argument("--embedder", metavar="default|DIR", help="serve /v1/embeddings too: 'default' (all-MiniLM-L6-v2, "
                                                               "offline) or a sentence-transformers directory")
    s.set_defaults(func=cmd_serve, _parser=s)
