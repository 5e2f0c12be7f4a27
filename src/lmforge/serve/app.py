"""The OpenAI-compatible HTTP API over the continuous batcher (infer/batching.py), and the web chat page: the
FastAPI application and its routes. The request bodies are serve/schemas.py, what a request becomes (prompt,
sampling, constraint, submission) serve/server.py, the responses and their SSE streams serve/streaming.py.

  POST /v1/chat/completions   messages through the model's chat template; stream (SSE, OpenAI's chunk schema, a
                              usage chunk with stream_options.include_usage), n, max_tokens / max_completion_tokens,
                              temperature, top_p, seed, stop (added to the model's own stop tokens), presence /
                              frequency penalties, logprobs + top_logprobs, tools (tool_choice auto / none: the
                              tools go through the template, the calls the model writes come back as tool_calls,
                              streamed ones ending with finish_reason "tool_calls"), response_format json_object /
                              json_schema enforced by constrained decoding (infer/constrain.py); a reasoning model's
                              <think> part (its template's markers) comes back as reasoning_content, apart from
                              content, in whole replies and in streamed deltas (as vLLM and DeepSeek's API do)
  POST /v1/completions        a text or token-id prompt; echo + logprobs score the prompt (lm-evaluation-harness's
                              loglikelihood through a server: max_tokens 0, echo, logprobs)
                              with --index: answered from a RAG index (lmforge's hybrid retrieval), the sources with
                              their offsets in an extra "sources" field, "I don't know" when nothing relevant is found
  POST /v1/embeddings         sentence vectors from the server's embedder (--embedder: all-MiniLM-L6-v2 offline by
                              default, or any sentence-transformers directory)
  GET  /v1/models, /health, /metrics (Prometheus text), /  (the web chat page, no CDN)

Errors are OpenAI's error JSON ({"error": {"message", "type", "param", "code"}}) with the matching status: 400 for
a bad request (unknown fields, out-of-range values, empty messages, a prompt that fills the context, a max_tokens
beyond it; a max_tokens beyond what the prompt leaves is clipped to it), 401 without the
API key when one is set, 404, 429 with Retry-After when the queue is full, 403 for a request addressed to another
Host (DNS rebinding) or sent from another site's page (serve/security.py). The server listens on 127.0.0.1 unless
told otherwise.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

from lmforge.serve.schemas import APIError, ChatRequest, CompletionRequest, EmbeddingRequest
from lmforge.serve.security import RequestGuard
from lmforge.serve.server import (
    Server,
    completion_prompts,
    forced_tool,
    response_constraint,
    score_prompt,
)
from lmforge.serve.streaming import (
    SSE_HEADERS,
    chat_stream,
    collect,
    completion_stream,
    fixed_answer,
    legacy_logprobs,
)

STATIC = Path(__file__).parent / "static"

__all__ = ["STATIC", "Server", "create_app"]


def create_app(server: Server, cors: list[str] | None = None, host: str = "127.0.0.1", port: int | None = None):
    """The FastAPI application over `server` (its batcher starts with the app and stops with it). `host`, `port`:
    where it listens, for the Host / Origin checks of serve/security.py (port None: any port)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @asynccontextmanager
    async def lifespan(app):
        server.batcher.start()
        yield
        server.batcher.stop(timeout=10.0)

    app = FastAPI(title="lmforge", version="1", lifespan=lifespan,
                  description="OpenAI-compatible API of one lmforge model")
    if cors:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=cors, allow_methods=["*"], allow_headers=["*"])
    # added last, so it runs first: a request for another Host (DNS rebinding) or from another site's page is
    # refused before CORS or a route sees it
    app.add_middleware(RequestGuard, host=host, port=port, origins=cors or ())

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        server.http_errors += 1
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        server.http_errors += 1
        err = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        message = err.get("msg", "invalid request")
        if err.get("type") == "json_invalid":
            message = "the request body is not valid JSON"
        elif err.get("type") == "extra_forbidden":
            message = f"unknown field {where!r}"
        return JSONResponse(APIError(400, f"{message}" + (f" (at {where})" if where and "unknown" not in message
                                                           else ""), param=where or None).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc):
        server.http_errors += 1
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(exc.status_code, str(exc.detail), kind).body(), status_code=exc.status_code)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if (server.api_key and request.url.path.startswith("/v1/")
                and request.headers.get("authorization", "") != f"Bearer {server.api_key}"):
            server.http_errors += 1
            return JSONResponse(APIError(401, "missing or wrong API key (Authorization: Bearer KEY)",
                                         "authentication_error", code="invalid_api_key").body(), status_code=401)
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": server.model_name, "running": server.batcher.running,
                "queue_depth": server.batcher.queue_depth, "max_model_len": server.context}

    @app.get("/v1/models")
    async def models():
        # max_model_len (vLLM's field): the context the web page fits its max_tokens into
        data = [{"id": server.model_name, "object": "model", "created": server.created, "owned_by": "lmforge",
                 "max_model_len": server.context}]
        if server.embedder is not None:
            data.append({"id": server.embedder_name, "object": "model", "created": server.created,
                         "owned_by": "lmforge"})
        return {"object": "list", "data": data}

    @app.post("/v1/embeddings")
    async def embeddings(req: EmbeddingRequest):
        if server.embedder is None:
            raise APIError(404, "this server has no embedding model (start it with --embedder)", "not_found_error",
                           param="model")
        texts = [req.input] if isinstance(req.input, str) else list(req.input)
        if any(not t for t in texts):
            raise APIError(400, "an input is empty", param="input")
        if req.dimensions is not None and req.dimensions != server.embedder.dim:
            raise APIError(400, f"this embedder has {server.embedder.dim} dimensions", param="dimensions")
        if server.embed_lock is None:
            server.embed_lock = asyncio.Lock()
        async with server.embed_lock:
            vectors = await asyncio.get_running_loop().run_in_executor(None, server.embedder.embed, texts)
        tokens = sum(len(ids) for ids in server.embedder.tokenizer.encode_for_model(texts))
        data = []
        for i, v in enumerate(vectors):
            if req.encoding_format == "base64":
                import base64

                emb = base64.b64encode(v.numpy().astype("<f4").tobytes()).decode()
            else:
                emb = v.tolist()
            data.append({"object": "embedding", "index": i, "embedding": emb})
        return {"object": "list", "data": data, "model": server.embedder_name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        m = server.batcher.metrics()
        lines = [f"lmforge_requests_total {m['requests']}", f"lmforge_generated_tokens_total {m['tokens']}",
                 f"lmforge_prefill_tokens_total {m['prefill_tokens']}", f"lmforge_decode_steps_total {m['steps']}",
                 f"lmforge_rejected_requests_total {m['rejected']}", f"lmforge_http_errors_total {server.http_errors}",
                 f"lmforge_prefix_cache_hits_total {m['prefix_hits']}",
                 f"lmforge_prefix_cache_reused_tokens_total {m['prefix_tokens_reused']}",
                 f"lmforge_queue_depth {m['queue_depth']}", f"lmforge_running_requests {m['running']}",
                 f"lmforge_generated_tokens_per_second {m['tokens_per_s_10s']}"]  # over the last 10 s
        lines += [f'lmforge_finished_requests_total{{reason="{k}"}} {v}' for k, v in sorted(m["finished"].items())]
        lat = list(server.latencies)
        lines.append("# TYPE lmforge_request_seconds histogram")
        for bound in (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60):
            lines.append(f'lmforge_request_seconds_bucket{{le="{bound}"}} {sum(1 for x in lat if x <= bound)}')
        lines += [f'lmforge_request_seconds_bucket{{le="+Inf"}} {len(lat)}', f"lmforge_request_seconds_sum {sum(lat)}",
                  f"lmforge_request_seconds_count {len(lat)}", "# TYPE lmforge_time_to_first_token_seconds summary"]
        for q, key in (("0.5", "ttft_p50_s"), ("0.99", "ttft_p99_s")):
            lines.append(f'lmforge_time_to_first_token_seconds{{quantile="{q}"}} {m[key]}')
        return "\n".join(lines) + "\n"

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return (STATIC / "index.html").read_text(encoding="utf-8")

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest):
        tools = req.active_tools()
        forced = forced_tool(req, tools)  # tool_choice required / a named function: decoding enforces the call
        if tools and server.index is not None:
            raise APIError(400, "tools and --index answers do not combine", param="tools")
        constraint = response_constraint(req.response_format)
        if forced is not None:
            if constraint is not None:
                raise APIError(400, "a required tool call and response_format exclude each other", param="tool_choice")
            from lmforge.infer.constrain import tool_call_constraint

            constraint = tool_call_constraint(tools, forced or None, server.tokenizer.chat_template)
        max_tokens = req.max_completion_tokens or req.max_tokens
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        base = {"id": rid, "created": created, "model": server.model_name}
        sources = None
        if server.index is not None:
            found = await asyncio.get_running_loop().run_in_executor(None, server.rag_prompt, req.messages, max_tokens)
            sources = found.sources
            if found.prompt is None:  # nothing relevant: say so without asking the model
                return fixed_answer(base, found.no_answer, req, sources)
            base["sources"] = sources  # an extra field (the OpenAI client ignores it): what the answer stands on
            prompt, max_tokens = found.prompt, found.max_new_tokens
        else:
            prompt = server.chat_prompt(req.messages, tools, req.chat_template_kwargs)
        names = {t["function"]["name"] for t in tools} if tools else None
        configs = server.sampling(req, len(prompt), max_tokens)
        logprobs = (req.top_logprobs or 0) if req.logprobs else -1
        submitted = server.submit(prompt, configs, logprobs, req.presence_penalty, req.frequency_penalty, constraint)
        if req.stream:
            return StreamingResponse(chat_stream(server, prompt, submitted, logprobs, req, base, names),
                                     media_type="text/event-stream", headers=SSE_HEADERS)
        results = await collect(server, submitted, logprobs)
        choices, completion_tokens = [], 0
        inside = server.opens_reasoning(prompt)
        for i, (text, finish, entries, n_tokens) in enumerate(results):
            completion_tokens += n_tokens
            message, text = server.reply_message(text, inside, names)
            if "tool_calls" in message:
                finish = "tool_calls"
            choice = {"index": i, "message": message,
                      "logprobs": {"content": entries} if req.logprobs else None, "finish_reason": finish}
            if sources is not None:
                from lmforge.rag.answer import parse_citations

                choice["citations"] = [sources[n - 1] for n in parse_citations(text, len(sources))]
            choices.append(choice)
        return base | {"object": "chat.completion", "choices": choices,
                       "usage": {"prompt_tokens": len(prompt), "completion_tokens": completion_tokens,
                                 "total_tokens": len(prompt) + completion_tokens}}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        prompts = completion_prompts(server, req.prompt)
        logprobs = req.logprobs if req.logprobs is not None else -1
        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        base = {"id": rid, "created": created, "model": server.model_name}
        if req.stream:
            if req.echo:
                raise APIError(400, "echo is not supported with stream", param="echo")
            if len(prompts) != 1:
                raise APIError(400, "stream takes one prompt", param="prompt")
            configs = server.sampling(req, len(prompts[0]), req.max_tokens or None)
            submitted = server.submit(prompts[0], configs, logprobs, req.presence_penalty, req.frequency_penalty)
            return StreamingResponse(completion_stream(server, prompts[0], submitted, req, base),
                                     media_type="text/event-stream", headers=SSE_HEADERS)
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for p in prompts:
            prompt_tokens += len(p)
            if len(p) >= server.context:
                raise APIError(400, f"the prompt ({len(p)} tokens) does not fit the {server.context}-token context",
                               param="prompt", code="context_length_exceeded")
            echo_lp = await asyncio.get_running_loop().run_in_executor(None, score_prompt, server, p, logprobs) \
                if req.echo and logprobs >= 0 else None
            if req.max_tokens == 0:
                results = [("", "length", [], 0)] * req.n
            else:
                configs = server.sampling(req, len(p), req.max_tokens)
                submitted = server.submit(p, configs, logprobs, req.presence_penalty, req.frequency_penalty)
                results = await collect(server, submitted, logprobs)
            for text, finish, entries, n_tokens in results:
                completion_tokens += n_tokens
                prefix = server.tokenizer.decode(p) if req.echo else ""
                lp = None
                if logprobs >= 0:
                    lp = legacy_logprobs(echo_lp or [], entries, server, len(prefix))
                choices.append({"index": len(choices), "text": prefix + text, "logprobs": lp,
                                "finish_reason": finish})
        return base | {"object": "text_completion", "choices": choices,
                       "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                 "total_tokens": prompt_tokens + completion_tokens}}

    return app
