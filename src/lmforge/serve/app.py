"""The OpenAI-compatible HTTP API over the continuous batcher (infer/batching.py), and the web chat page.

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
a bad request (unknown fields, out-of-range values, empty messages, a prompt over the context), 401 without the
API key when one is set, 404, 429 with Retry-After when the queue is full. The server listens on 127.0.0.1 unless
told otherwise.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from lmforge.chat.reasoning import ReasoningStream, opens_reasoning, reasoning_markers, split_reasoning
from lmforge.chat.render import TemplateError, encode_chat
from lmforge.chat.stops import stop_ids
from lmforge.chat.templates import model_template
from lmforge.chat.tools import HoldBack, parse_tool_calls
from lmforge.infer.batching import ContinuousBatcher, Event, QueueFull
from lmforge.infer.sampling import SamplingConfig

STATIC = Path(__file__).parent / "static"


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ContentPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[ToolCall] | None = None

    def for_template(self) -> dict:
        """The message as chat templates read it (HF's convention: tool-call arguments as a dict)."""
        out = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.tool_calls:
            calls = []
            for c in self.tool_calls:
                try:
                    args = json.loads(c.function.arguments)
                except json.JSONDecodeError:
                    raise APIError(400, f"tool call {c.id}: arguments are not JSON", param="messages") from None
                calls.append({"id": c.id, "type": "function", "function": {"name": c.function.name,
                                                                            "arguments": args}})
            out["tool_calls"] = calls
        if self.tool_call_id:
            out["tool_call_id"] = self.tool_call_id
        if self.name:
            out["name"] = self.name
        return out

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class StreamOptions(_Strict):
    include_usage: bool = False


class FunctionSpec(_Strict):
    name: str
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionSpec


class _Sampling(_Strict):
    model: str | None = None
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop sequences")
        return v

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: dict | None = None
    tools: list[Tool] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None

    def active_tools(self) -> list[dict] | None:
        if not self.tools or self.tool_choice == "none":
            return None
        return [t.model_dump(exclude_none=True) for t in self.tools]


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int = Field(16, ge=0)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)


class EmbeddingRequest(_Strict):
    input: str | list[str] = Field(min_length=1)
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


class Server:
    """The state the routes share: the model, its tokenizer and template (and the markers of its reasoning blocks,
    None for a template without them), the batcher, counters, and an optional sentence embedder for
    /v1/embeddings."""

    def __init__(self, model, tokenizer, model_name: str, api_key: str | None = None, max_batch: int = 8,
                 max_queue: int = 64, context: int | None = None, embedder=None, embedder_name: str = "embedder",
                 index=None, ask_cfg=None):
        self.model, self.tokenizer, self.model_name, self.api_key = model, tokenizer, model_name, api_key
        self.batcher = ContinuousBatcher(model, tokenizer, max_batch=max_batch, max_queue=max_queue, context=context)
        self.context = self.batcher.context
        self.stop_ids = stop_ids(tokenizer, model.cfg)
        self.reasoning = reasoning_markers(tokenizer.chat_template, tokenizer.special_tokens_map())
        self.created = int(time.time())
        self.latencies: list[float] = []  # seconds per finished request, for the /metrics histogram
        self.http_errors = 0
        self.embedder, self.embedder_name = embedder, embedder_name
        self.index, self.ask_cfg = index, ask_cfg  # --index: chat answers come from a RAG index, with sources
        self.embed_lock = None  # created on the event loop: one embedding batch at a time

    # --- prompts ---
    def chat_prompt(self, messages: list[Message], tools: list[dict] | None = None) -> list[int]:
        msgs = [m.for_template() for m in messages]
        tok = self.tokenizer
        if not tok.chat_template:
            if tools:
                raise APIError(400, "this model has no chat template, so it cannot be offered tools", param="tools")
            return tok.encode("\n".join(m["content"] for m in msgs) + "\n", disallowed_special=())
        try:
            return encode_chat(tok, model_template(tok, tools=tools), msgs, add_generation_prompt=True,
                               tools=tools).ids
        except TemplateError as e:
            raise APIError(400, f"the model's chat template refused these messages: {e}", param="messages") from None

    def rag_prompt(self, messages: list[Message], max_tokens: int | None) -> tuple[list[int] | None, list[dict], str]:
        """With --index: the last user message is the question; (prompt ids, sources, "") from the index's hits,
        or (None, [], the "I don't know" answer) when nothing relevant is found (the model is not asked)."""
        from lmforge.rag.answer import NO_ANSWER, NO_ANSWER_ZH, build_prompt, numbered_source, relevant_hits
        from lmforge.text import HAN_RUN

        question = next((m.text() for m in reversed(messages) if m.role == "user"), "")
        if not question.strip():
            raise APIError(400, "with --index the conversation needs a user message to answer", param="messages")
        cfg = self.ask_cfg
        mode = cfg.mode if self.index.cfg.dense else "sparse"
        hits = relevant_hits(self.index.search(question, k=cfg.k, mode=mode), cfg,
                             self.index.cfg.dense and mode != "sparse")
        if not hits:
            return None, [], NO_ANSWER_ZH if HAN_RUN.search(question) else NO_ANSWER
        budget = self.context - (max_tokens or cfg.max_new_tokens)
        prompt, used = build_prompt(question, hits, self.tokenizer, budget)
        if not used:
            raise APIError(400, f"the {self.context}-token context cannot hold the question and one source",
                           param="messages", code="context_length_exceeded")
        return prompt, [numbered_source(i + 1, h) for i, h in enumerate(used)], ""

    def opens_reasoning(self, prompt: list[int]) -> bool:
        """Whether the prompt ends inside a reasoning block (DeepSeek-R1's generation prompt opens <think>), so the
        reply is reasoning up to the closing marker."""
        return self.reasoning is not None and opens_reasoning(self.tokenizer.decode(prompt[-32:]), self.reasoning)

    def reply_message(self, text: str, inside: bool, tool_names: set[str] | None) -> tuple[dict, str]:
        """The assistant message of a whole reply: its reasoning apart (for a template with reasoning blocks) and
        its tool calls parsed out of the answer; and the answer's text."""
        message = {"role": "assistant", "content": text}
        if self.reasoning is not None:
            split = split_reasoning(text, self.reasoning, inside)
            text = split.content
            message = {"role": "assistant", "content": text, "reasoning_content": split.reasoning}
        if tool_names:
            content, calls = parse_tool_calls(text, tool_names)
            if calls:
                message |= {"content": content, "tool_calls": calls}
        return message, text

    def sampling(self, req: _Sampling, prompt_len: int, max_tokens: int | None, index: int) -> SamplingConfig:
        room = self.context - prompt_len
        if room <= 0 or (max_tokens is not None and max_tokens > room):
            raise APIError(400, f"this model's context is {self.context} tokens; the prompt has {prompt_len} and "
                                f"{max_tokens} were asked for" if max_tokens else
                           f"the prompt ({prompt_len} tokens) does not fit the {self.context}-token context",
                           param="messages" if isinstance(req, ChatRequest) else "prompt",
                           code="context_length_exceeded")
        seed = None if req.seed is None else req.seed + index
        return SamplingConfig(max_new_tokens=max_tokens if max_tokens is not None else room,
                              temperature=req.temperature, top_p=req.top_p, seed=seed,
                              stop_token_ids=list(self.stop_ids), stop_strings=req.stops())

    def token_text(self, token_id: int) -> tuple[str, list[int]]:
        raw = self.tokenizer.raw_bytes([token_id])
        if raw is None:
            text = self.tokenizer.decode([token_id])
            return text, list(text.encode("utf-8"))
        return raw.decode("utf-8", "replace"), list(raw)

    def open(self, prompt: list[int], configs: list[SamplingConfig], logprobs: int, presence: float,
             frequency: float, constraint=None) -> list[_Stream]:
        """Submit the n choices of a request now (so a full queue is a 429 before any response starts)."""
        streams: list[_Stream] = []
        try:
            for cfg in configs:
                streams.append(_Stream(self, prompt, cfg, logprobs, presence, frequency, constraint))
        except APIError:
            for st in streams:
                st.handle.cancel()
            raise
        return streams


class _Stream:
    """One submitted request: its events arrive on an asyncio queue from the batcher's thread."""

    def __init__(self, server: Server, prompt, cfg, logprobs, presence, frequency, constraint=None):
        loop = asyncio.get_running_loop()
        self.server, self.queue = server, asyncio.Queue()
        kw = {"constraint": constraint} if constraint is not None else {}
        try:
            self.handle = server.batcher.submit(prompt, cfg, lambda e: loop.call_soon_threadsafe(self.queue.put_nowait, e),
                                                logprobs=logprobs, presence_penalty=presence,
                                                frequency_penalty=frequency, **kw)
        except QueueFull as e:
            raise APIError(429, f"the server is busy ({e}); retry shortly", type_="rate_limit_exceeded",
                           headers={"Retry-After": "1"}) from None
        self.start = time.perf_counter()

    async def events(self):
        """The request's events; leaving early (a client gone) cancels it, which frees its row."""
        try:
            while True:
                event = await self.queue.get()
                yield event
                if event.finish_reason:
                    self.server.latencies.append(time.perf_counter() - self.start)
                    return
        finally:
            self.handle.cancel()  # a no-op for a finished request


def _logprob_entry(server: Server, event: Event) -> dict:
    token, raw = server.token_text(event.token_id)
    top = [dict(zip(("token", "bytes"), server.token_text(t)), logprob=lp) for t, lp in (event.top_logprobs or [])]
    return {"token": token, "logprob": event.logprob, "bytes": raw, "top_logprobs": top}


def create_app(server: Server, cors: list[str] | None = None):
    """The FastAPI application over `server` (its batcher starts with the app and stops with it)."""
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
                "queue_depth": server.batcher.queue_depth}

    @app.get("/v1/models")
    async def models():
        data = [{"id": server.model_name, "object": "model", "created": server.created, "owned_by": "lmforge"}]
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
        forced = _forced_tool(req, tools)  # tool_choice required / a named function: decoding enforces the call
        if tools and server.index is not None:
            raise APIError(400, "tools and --index answers do not combine", param="tools")
        constraint = _response_constraint(req.response_format)
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
            prompt, sources, no_answer = await asyncio.get_running_loop().run_in_executor(
                None, server.rag_prompt, req.messages, max_tokens)
            if prompt is None:  # nothing relevant: say so without asking the model
                return _fixed_answer(base, no_answer, req, sources)
            base["sources"] = sources  # an extra field (the OpenAI client ignores it): what the answer stands on
        else:
            prompt = server.chat_prompt(req.messages, tools)
        names = {t["function"]["name"] for t in tools} if tools else None
        configs = [server.sampling(req, len(prompt), max_tokens, i) for i in range(req.n)]
        logprobs = (req.top_logprobs or 0) if req.logprobs else -1
        streams = server.open(prompt, configs, logprobs, req.presence_penalty, req.frequency_penalty, constraint)
        if req.stream:
            return StreamingResponse(_chat_stream(server, prompt, streams, logprobs, req, base, names),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        results = await asyncio.gather(*[_collect(server, st, logprobs) for st in streams])
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
        prompts = _completion_prompts(server, req.prompt)
        logprobs = req.logprobs if req.logprobs is not None else -1
        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        base = {"id": rid, "created": created, "model": server.model_name}
        if req.stream:
            if req.echo:
                raise APIError(400, "echo is not supported with stream", param="echo")
            if len(prompts) != 1:
                raise APIError(400, "stream takes one prompt", param="prompt")
            configs = [server.sampling(req, len(prompts[0]), req.max_tokens or None, i) for i in range(req.n)]
            streams = server.open(prompts[0], configs, logprobs, req.presence_penalty, req.frequency_penalty)
            return StreamingResponse(_completion_stream(server, prompts[0], streams, logprobs, req, base),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for p in prompts:
            prompt_tokens += len(p)
            echo_lp = await asyncio.get_running_loop().run_in_executor(None, _score_prompt, server, p, logprobs) \
                if req.echo and logprobs >= 0 else None
            if req.max_tokens == 0:
                results = [("", "length", [], 0)] * req.n
                if len(p) >= server.context:
                    raise APIError(400, f"the prompt ({len(p)} tokens) does not fit the {server.context}-token "
                                        "context", param="prompt", code="context_length_exceeded")
            else:
                configs = [server.sampling(req, len(p), req.max_tokens, i) for i in range(req.n)]
                streams = server.open(p, configs, logprobs, req.presence_penalty, req.frequency_penalty)
                results = await asyncio.gather(*[_collect(server, st, logprobs) for st in streams])
            for text, finish, entries, n_tokens in results:
                completion_tokens += n_tokens
                prefix = server.tokenizer.decode(p) if req.echo else ""
                lp = None
                if logprobs >= 0:
                    lp = _legacy_logprobs(echo_lp or [], entries, server, len(prefix))
                choices.append({"index": len(choices), "text": prefix + text, "logprobs": lp,
                                "finish_reason": finish})
        return base | {"object": "text_completion", "choices": choices,
                       "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                 "total_tokens": prompt_tokens + completion_tokens}}

    return app


def _forced_tool(req: ChatRequest, tools: list[dict] | None) -> str | None:
    """None (the model may answer in text), "" (some tool must be called) or the name of the tool to call."""
    choice = req.tool_choice
    if choice in (None, "none", "auto"):
        return None
    if not tools:
        raise APIError(400, "tool_choice asks for a tool call but no tools were given", param="tool_choice")
    if choice == "required":
        return ""
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if not isinstance(name, str):
        raise APIError(400, "tool_choice: 'none', 'auto', 'required' or {\"type\": \"function\", \"function\": "
                            "{\"name\": ...}}", param="tool_choice")
    if name not in {t["function"]["name"] for t in tools}:
        raise APIError(400, f"tool_choice names {name!r}, which is not among the tools", param="tool_choice")
    return name


def _response_constraint(response_format: dict | None):
    """response_format -> a JSONConstraint (json_object: any object; json_schema: its schema), or None for text."""
    if not response_format or response_format.get("type") in (None, "text"):
        return None
    from lmforge.infer.constrain import JSONConstraint

    kind = response_format.get("type")
    if kind == "json_object":
        return JSONConstraint()
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise APIError(400, "response_format json_schema needs json_schema.schema (a JSON Schema object)",
                           param="response_format")
        return JSONConstraint(schema)
    raise APIError(400, f"response_format type {kind!r}: one of text, json_object, json_schema",
                   param="response_format")


def _fixed_answer(base: dict, text: str, req: ChatRequest, sources: list):
    """A reply the server writes itself (RAG found nothing relevant), streamed or not, in the usual schema."""
    from fastapi.responses import StreamingResponse

    base = base | {"sources": sources}
    usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    if not req.stream:
        return base | {"object": "chat.completion", "usage": usage, "choices": [
            {"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": "stop",
             "citations": []} for i in range(req.n)]}

    async def chunks():
        chunk = base | {"object": "chat.completion.chunk"}
        for i in range(req.n):
            yield _sse(chunk | {"choices": [{"index": i, "delta": {"role": "assistant", "content": text},
                                             "logprobs": None, "finish_reason": None}]})
            yield _sse(chunk | {"choices": [{"index": i, "delta": {}, "logprobs": None, "finish_reason": "stop"}]})
        if (req.stream_options or StreamOptions()).include_usage:
            yield _sse(chunk | {"choices": [], "usage": usage})
        yield b"data: [DONE]\n\n"

    return StreamingResponse(chunks(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _completion_prompts(server: Server, prompt) -> list[list[int]]:
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "the prompt is empty", param="prompt")
    if isinstance(prompt[0], int):
        prompt = [prompt]
    out = []
    vocab = server.tokenizer.vocab_size
    for p in prompt:
        ids = server.tokenizer.encode(p, disallowed_special=()) if isinstance(p, str) else list(p)
        if not ids:
            raise APIError(400, "a prompt encodes to no tokens", param="prompt")
        if any(not 0 <= t < vocab for t in ids):
            raise APIError(400, f"token ids must be in 0..{vocab - 1}", param="prompt")
        out.append(ids)
    return out


def _score_prompt(server: Server, ids: list[int], top: int) -> list[dict]:
    """Log-probabilities of a prompt's own tokens (the first has none), as echo + logprobs reports them."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        logits = server.model.logits(server.model(torch.tensor([ids], device=server.batcher.device))[0])
    logp = F.log_softmax(logits.float(), -1)
    out = [{"token_id": ids[0], "logprob": None, "top": None}]
    for i in range(1, len(ids)):
        row = logp[i - 1]
        entry = {"token_id": ids[i], "logprob": float(row[ids[i]]), "top": None}
        if top:
            v, t = row.topk(top)
            entry["top"] = list(zip(t.tolist(), v.tolist()))
        out.append(entry)
    return out


def _legacy_logprobs(prompt_entries: list[dict], entries: list[dict], server: Server, prefix_len: int) -> dict:
    """The completions API's logprobs object: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens, lps, tops, offsets = [], [], [], []
    offset = 0
    for e in prompt_entries:
        text, _ = server.token_text(e["token_id"])
        tokens.append(text)
        lps.append(e["logprob"])
        tops.append({server.token_text(t)[0]: lp for t, lp in e["top"]} if e["top"] else None)
        offsets.append(offset)
        offset += len(text)
    offset = prefix_len if prompt_entries else 0
    for e in entries:
        tokens.append(e["token"])
        lps.append(e["logprob"])
        tops.append({t["token"]: t["logprob"] for t in e["top_logprobs"]} or None)
        offsets.append(offset)
        offset += len(e["token"])
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


async def _collect(server: Server, stream: _Stream, logprobs: int) -> tuple[str, str, list[dict], int]:
    text, entries, n_tokens, finish = [], [], 0, "stop"
    async for event in stream.events():
        text.append(event.text)
        if event.token_id is not None:
            n_tokens += 1
            if logprobs >= 0 and event.logprob is not None:
                entries.append(_logprob_entry(server, event))
        if event.finish_reason:
            finish = _finish(event)
    return "".join(text), finish, entries, n_tokens


def _sse(obj) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


async def _merged(streams: list[_Stream]):
    """Events of the n choices of one request, as (choice index, event), as they come."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i, st):
        async for event in st.events():
            await queue.put((i, event))

    tasks = [asyncio.create_task(pump(i, st)) for i, st in enumerate(streams)]
    try:
        left = len(streams)
        while left:
            i, event = await queue.get()
            if event.finish_reason:
                left -= 1
            yield i, event
    finally:  # the client left (or we are done): stop the pumps, which cancels their requests
        for t in tasks:
            t.cancel()
        for st in streams:
            st.handle.cancel()


def _finish(event: Event) -> str | None:
    if not event.finish_reason:
        return None
    if event.finish_reason == "error":
        raise APIError(500, "generation failed on the server (its log says why)", "server_error")
    return "stop" if event.finish_reason == "cancelled" else event.finish_reason


def _delta(reasoning: str, content: str) -> dict:
    """A streamed chunk's delta: reasoning_content and content, each only when there is some."""
    return ({"reasoning_content": reasoning} if reasoning else {}) | ({"content": content} if content else {})


async def _chat_stream(server: Server, prompt, streams, logprobs, req: ChatRequest, base: dict,
                       tool_names: set[str] | None = None):
    holds = [HoldBack() for _ in streams] if tool_names else None  # text that may be a tool call waits
    inside = server.opens_reasoning(prompt)
    # a reasoning model's thinking goes out as reasoning_content deltas, its answer as content (held for tool calls)
    splits = [ReasoningStream(server.reasoning, inside) for _ in streams] if server.reasoning is not None else None
    base = dict(base)
    sources = base.pop("sources", None)  # --index: sent once, with the first chunk
    chunk = base | {"object": "chat.completion.chunk"}
    usage = (req.stream_options or StreamOptions()).include_usage
    extra = {"usage": None} if usage else {}
    for i in range(len(streams)):
        yield _sse(chunk | {"choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                         "logprobs": None, "finish_reason": None}]} | extra
                   | ({"sources": sources} if sources is not None and i == 0 else {}))
    completion_tokens = 0
    async for i, event in _merged(streams):
        if event.token_id is not None:
            completion_tokens += 1
        lp = {"content": [_logprob_entry(server, event)]} if logprobs >= 0 and event.logprob is not None else None
        try:
            finish = _finish(event)
        except APIError as e:  # the response has started: the error goes in the stream, as OpenAI's does
            yield _sse(e.body())
            return
        reasoning, text = "", event.text
        if splits is not None:
            reasoning, text = splits[i].push(text)
            if finish:
                rest = splits[i].flush()
                reasoning, text = reasoning + rest[0], text + rest[1]
        if holds is not None:
            text = holds[i].push(text)
            if finish:
                content, calls = parse_tool_calls(holds[i].text, tool_names)
                if calls:  # what was held is the calls (and any text after them)
                    sent = holds[i].text[:holds[i].sent]
                    after = (content or "")[len(sent.strip()):].strip() if content else ""
                    if reasoning or text or after:
                        yield _sse(chunk | {"choices": [{"index": i, "delta": _delta(reasoning, text + after),
                                                         "logprobs": None, "finish_reason": None}]} | extra)
                    deltas = [{"index": k} | c for k, c in enumerate(calls)]
                    yield _sse(chunk | {"choices": [{"index": i, "delta": {"tool_calls": deltas}, "logprobs": lp,
                                                     "finish_reason": "tool_calls"}]} | extra)
                    continue
                text += holds[i].rest()
        if reasoning or text or finish or lp:
            yield _sse(chunk | {"choices": [{"index": i, "delta": _delta(reasoning, text), "logprobs": lp,
                                             "finish_reason": finish}]} | extra)
    if usage:
        yield _sse(chunk | {"choices": [], "usage": {"prompt_tokens": len(prompt), "completion_tokens": completion_tokens,
                                                     "total_tokens": len(prompt) + completion_tokens}})
    yield b"data: [DONE]\n\n"


async def _completion_stream(server: Server, prompt, streams, logprobs, req: CompletionRequest, base: dict):
    chunk = base | {"object": "text_completion"}
    completion_tokens = 0
    async for i, event in _merged(streams):
        if event.token_id is not None:
            completion_tokens += 1
        try:
            finish = _finish(event)
        except APIError as e:
            yield _sse(e.body())
            return
        if event.text or finish:
            yield _sse(chunk | {"choices": [{"index": i, "text": event.text, "logprobs": None, "finish_reason": finish}]})
    if (req.stream_options or StreamOptions()).include_usage:
        yield _sse(chunk | {"choices": [], "usage": {"prompt_tokens": len(prompt), "completion_tokens": completion_tokens,
                                                     "total_tokens": len(prompt) + completion_tokens}})
    yield b"data: [DONE]\n\n"
