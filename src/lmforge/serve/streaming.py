"""Responses from a submitted request's events: whole (`collect`) or streamed as server-sent events in OpenAI's
chunk schema (`chat_stream`, `completion_stream`), with log-probabilities, a reasoning model's reasoning_content
apart from its content, and tool calls held back until they can be told from text."""

from __future__ import annotations

import json

from lmforge.chat.reasoning import ReasoningStream
from lmforge.chat.tools import HoldBack, parse_tool_calls
from lmforge.infer.batching import Event
from lmforge.serve.schemas import APIError, ChatRequest, CompletionRequest, StreamOptions
from lmforge.serve.server import Server, Submitted

SSE_HEADERS = {"Cache-Control": "no-cache"}


def sse(obj) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


def finish_reason(event: Event) -> str | None:
    """The API's finish_reason of an event (a cancelled reply reads "stop"); a failed step is a 500."""
    if not event.finish_reason:
        return None
    if event.finish_reason == "error":
        raise APIError(500, "generation failed on the server (its log says why)", "server_error")
    return "stop" if event.finish_reason == "cancelled" else event.finish_reason


def logprob_entry(server: Server, event: Event) -> dict:
    token, raw = server.token_text(event.token_id)
    top = [dict(zip(("token", "bytes"), server.token_text(t)), logprob=lp) for t, lp in (event.top_logprobs or [])]
    return {"token": token, "logprob": event.logprob, "bytes": raw, "top_logprobs": top}


def legacy_logprobs(prompt_entries: list[dict], entries: list[dict], server: Server, prefix_len: int) -> dict:
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


async def collect(server: Server, submitted: Submitted, logprobs: int) -> list[tuple[str, str, list[dict], int]]:
    """Per completion: its text, finish_reason, log-probability entries and token count."""
    text = [[] for _ in range(submitted.n)]
    entries = [[] for _ in range(submitted.n)]
    tokens, finish = [0] * submitted.n, ["stop"] * submitted.n
    async for i, event in submitted.events():
        text[i].append(event.text)
        if event.token_id is not None:
            tokens[i] += 1
            if logprobs >= 0 and event.logprob is not None:
                entries[i].append(logprob_entry(server, event))
        if event.finish_reason:
            finish[i] = finish_reason(event)
    return [("".join(t), f, e, n) for t, f, e, n in zip(text, finish, entries, tokens)]


def _delta(reasoning: str, content: str) -> dict:
    """A streamed chunk's delta: reasoning_content and content, each only when there is some."""
    return ({"reasoning_content": reasoning} if reasoning else {}) | ({"content": content} if content else {})


async def chat_stream(server: Server, prompt, submitted: Submitted, logprobs, req: ChatRequest, base: dict,
                      tool_names: set[str] | None = None):
    n = submitted.n
    holds = [HoldBack() for _ in range(n)] if tool_names else None  # text that may be a tool call waits
    inside = server.opens_reasoning(prompt)
    # a reasoning model's thinking goes out as reasoning_content deltas, its answer as content (held for tool calls)
    splits = [ReasoningStream(server.reasoning, inside) for _ in range(n)] if server.reasoning is not None else None
    base = dict(base)
    sources = base.pop("sources", None)  # --index: sent once, with the first chunk
    chunk = base | {"object": "chat.completion.chunk"}
    usage = (req.stream_options or StreamOptions()).include_usage
    extra = {"usage": None} if usage else {}
    for i in range(n):
        yield sse(chunk | {"choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None, "finish_reason": None}]} | extra
                  | ({"sources": sources} if sources is not None and i == 0 else {}))
    completion_tokens = 0
    async for i, event in submitted.events():
        if event.token_id is not None:
            completion_tokens += 1
        lp = {"content": [logprob_entry(server, event)]} if logprobs >= 0 and event.logprob is not None else None
        try:
            finish = finish_reason(event)
        except APIError as e:  # the response has started: the error goes in the stream, as OpenAI's does
            yield sse(e.body())
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
                        yield sse(chunk | {"choices": [{"index": i, "delta": _delta(reasoning, text + after),
                                                        "logprobs": None, "finish_reason": None}]} | extra)
                    deltas = [{"index": k} | c for k, c in enumerate(calls)]
                    yield sse(chunk | {"choices": [{"index": i, "delta": {"tool_calls": deltas}, "logprobs": lp,
                                                    "finish_reason": "tool_calls"}]} | extra)
                    continue
                text += holds[i].rest()
        if reasoning or text or finish or lp:
            yield sse(chunk | {"choices": [{"index": i, "delta": _delta(reasoning, text), "logprobs": lp,
                                            "finish_reason": finish}]} | extra)
    if usage:
        yield sse(chunk | {"choices": [], "usage": {"prompt_tokens": len(prompt), "completion_tokens": completion_tokens,
                                                    "total_tokens": len(prompt) + completion_tokens}})
    yield b"data: [DONE]\n\n"


async def completion_stream(server: Server, prompt, submitted: Submitted, req: CompletionRequest, base: dict):
    chunk = base | {"object": "text_completion"}
    completion_tokens = 0
    async for i, event in submitted.events():
        if event.token_id is not None:
            completion_tokens += 1
        try:
            finish = finish_reason(event)
        except APIError as e:
            yield sse(e.body())
            return
        if event.text or finish:
            yield sse(chunk | {"choices": [{"index": i, "text": event.text, "logprobs": None, "finish_reason": finish}]})
    if (req.stream_options or StreamOptions()).include_usage:
        yield sse(chunk | {"choices": [], "usage": {"prompt_tokens": len(prompt), "completion_tokens": completion_tokens,
                                                    "total_tokens": len(prompt) + completion_tokens}})
    yield b"data: [DONE]\n\n"


def fixed_answer(base: dict, text: str, req: ChatRequest, sources: list):
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
            yield sse(chunk | {"choices": [{"index": i, "delta": {"role": "assistant", "content": text},
                                            "logprobs": None, "finish_reason": None}]})
            yield sse(chunk | {"choices": [{"index": i, "delta": {}, "logprobs": None, "finish_reason": "stop"}]})
        if (req.stream_options or StreamOptions()).include_usage:
            yield sse(chunk | {"choices": [], "usage": usage})
        yield b"data: [DONE]\n\n"

    return StreamingResponse(chunks(), media_type="text/event-stream", headers=SSE_HEADERS)
