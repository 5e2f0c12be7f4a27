"""The state the HTTP routes share (`Server`: the model, its tokenizer and template, the continuous batcher) and what
turns a request into work for it: the prompt (the chat template, or the RAG prompt of rag/answer.py with --index),
the sampling settings within the context, a decoding constraint, and the submitted request's events."""

from __future__ import annotations

import asyncio
import logging
import time

from lmforge.chat.reasoning import opens_reasoning, reasoning_markers, split_reasoning
from lmforge.chat.render import TemplateError, encode_chat
from lmforge.chat.stops import stop_ids
from lmforge.chat.templates import check_template_variables, model_template
from lmforge.chat.tools import parse_tool_calls
from lmforge.config import ConfigError
from lmforge.infer.batching import ContinuousBatcher, Event, QueueFull
from lmforge.infer.config import BatchingConfig
from lmforge.infer.sampling import SamplingConfig
from lmforge.serve.schemas import APIError, ChatRequest, Message, SamplingRequest

log = logging.getLogger(__name__)


class Server:
    """The state the routes share: the model, its tokenizer and template (and the markers of its reasoning blocks,
    None for a template without them), the batcher, counters, an optional sentence embedder for /v1/embeddings,
    and with --index a RAG index the chat answers come from."""

    def __init__(self, model, tokenizer, model_name: str, api_key: str | None = None,
                 max_batch: int = BatchingConfig.max_batch, max_queue: int = BatchingConfig.max_queue,
                 context: int | None = None, embedder=None, embedder_name: str = "embedder", index=None, ask_cfg=None,
                 template_kwargs: dict | None = None, max_prefill_tokens: int | None = BatchingConfig.max_prefill_tokens):
        self.model, self.tokenizer, self.model_name, self.api_key = model, tokenizer, model_name, api_key
        self.batcher = ContinuousBatcher(model, tokenizer, max_batch=max_batch, max_queue=max_queue, context=context,
                                         max_prefill_tokens=max_prefill_tokens)
        self.context = self.batcher.context
        self.stop_ids = stop_ids(tokenizer, model.cfg)
        self.reasoning = reasoning_markers(tokenizer.chat_template, tokenizer.special_tokens_map())
        self.created = int(time.time())
        self.latencies: list[float] = []  # seconds per finished request, for the /metrics histogram
        self.http_errors = 0
        self.clip_said = False  # a clipped max_tokens is logged once
        self.embedder, self.embedder_name = embedder, embedder_name
        self.index, self.ask_cfg = index, ask_cfg
        self.embed_lock = None  # created on the event loop: one embedding batch at a time
        self.template_kwargs = dict(template_kwargs or {})  # --chat-template-kwargs: a request's own override them

    # --- prompts ---
    def chat_prompt(self, messages: list[Message], tools: list[dict] | None = None,
                    template_kwargs: dict | None = None) -> list[int]:
        """The prompt's ids: the messages (and tools) through the chat template, with the server's template variables
        and the request's own (`chat_template_kwargs`) over them."""
        msgs = [m.for_template() for m in messages]
        tok = self.tokenizer
        variables = {**self.template_kwargs, **(template_kwargs or {})}
        if template_kwargs:
            try:
                check_template_variables(template_kwargs, tok.chat_template, "the model's chat template")
            except ConfigError as e:
                raise APIError(400, str(e), param="chat_template_kwargs") from None
        if not tok.chat_template:
            if tools:
                raise APIError(400, "this model has no chat template, so it cannot be offered tools", param="tools")
            return tok.encode("\n".join(m["content"] for m in msgs) + "\n", disallowed_special=())
        try:
            return encode_chat(tok, model_template(tok, tools=tools), msgs, add_generation_prompt=True,
                               tools=tools, **variables).ids
        except TemplateError as e:
            raise APIError(400, f"the model's chat template refused these messages: {e}", param="messages") from None

    def rag_prompt(self, messages: list[Message], max_tokens: int | None):
        """With --index: the last user message is the question; what rag/answer.py answers it from (the prompt and
        its sources, the reply's budget within the context; no prompt when nothing relevant is found)."""
        from lmforge.rag.answer import ContextTooSmall, answer_prompt

        question = next((m.text() for m in reversed(messages) if m.role == "user"), "")
        if not question.strip():
            raise APIError(400, "with --index the conversation needs a user message to answer", param="messages")
        try:
            return answer_prompt(self.index, question, self.tokenizer, self.ask_cfg, self.context, max_tokens)
        except ContextTooSmall as e:
            raise APIError(400, str(e), param="messages", code="context_length_exceeded") from None

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

    def sampling(self, req: SamplingRequest, prompt_len: int, max_tokens: int | None) -> list[SamplingConfig]:
        """The request's n completions' settings (completion i samples with seed + i). The reply's budget is
        max_tokens (default: what the prompt leaves of the context), clipped to what the prompt leaves (said once in
        the log; the reply then ends with finish_reason "length"); a prompt that fills the context, or a max_tokens
        beyond the whole context, is a 400."""
        param = "messages" if isinstance(req, ChatRequest) else "prompt"
        room = self.context - prompt_len
        if room <= 0:
            raise APIError(400, f"the prompt ({prompt_len} tokens) does not fit the {self.context}-token context",
                           param=param, code="context_length_exceeded")
        if max_tokens is not None and max_tokens > self.context:
            raise APIError(400, f"this model's context is {self.context} tokens; max_tokens {max_tokens} cannot fit "
                                "in it", param="max_tokens", code="context_length_exceeded")
        if max_tokens is not None and max_tokens > room and not self.clip_said:
            self.clip_said = True
            log.warning("a request asked for %d tokens after a %d-token prompt: replies are clipped to what fits the "
                        "%d-token context (finish_reason 'length')", max_tokens, prompt_len, self.context)
        budget = room if max_tokens is None else min(max_tokens, room)
        return [SamplingConfig(max_new_tokens=budget, temperature=req.temperature, top_p=req.top_p,
                               seed=None if req.seed is None else req.seed + i, stop_token_ids=list(self.stop_ids),
                               stop_strings=req.stops()) for i in range(req.n)]

    def token_text(self, token_id: int) -> tuple[str, list[int]]:
        raw = self.tokenizer.raw_bytes([token_id])
        if raw is None:
            text = self.tokenizer.decode([token_id])
            return text, list(text.encode("utf-8"))
        return raw.decode("utf-8", "replace"), list(raw)

    def submit(self, prompt: list[int], configs: list[SamplingConfig], logprobs: int, presence: float,
               frequency: float, constraint=None) -> Submitted:
        """Submit a request's n completions now (one prefill for all; a full queue is a 429 before any response
        starts)."""
        return Submitted(self, prompt, configs, logprobs, presence, frequency, constraint)


class Submitted:
    """One submitted request: its completions' events arrive on an asyncio queue from the batcher's thread."""

    def __init__(self, server: Server, prompt, configs, logprobs, presence, frequency, constraint=None):
        loop = asyncio.get_running_loop()
        self.server, self.queue, self.n = server, asyncio.Queue(), len(configs)
        kw = {"constraint": constraint} if constraint is not None else {}
        try:
            self.handle = server.batcher.submit(prompt, configs, lambda e: loop.call_soon_threadsafe(
                self.queue.put_nowait, e), logprobs=logprobs, presence_penalty=presence, frequency_penalty=frequency,
                **kw)
        except QueueFull as e:
            raise APIError(429, f"the server is busy ({e}); retry shortly", type_="rate_limit_exceeded",
                           headers={"Retry-After": "1"}) from None
        self.start = time.perf_counter()

    async def events(self):
        """(completion index, event) as they come, until every completion has finished; leaving early (a client
        gone) cancels the request, which frees its rows."""
        left = self.n
        try:
            while left:
                event: Event = await self.queue.get()
                if event.finish_reason:
                    left -= 1
                yield event.index, event
            self.server.latencies.append(time.perf_counter() - self.start)
        finally:
            self.handle.cancel()  # a no-op for a finished request


def forced_tool(req: ChatRequest, tools: list[dict] | None) -> str | None:
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


def response_constraint(response_format: dict | None):
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


def completion_prompts(server: Server, prompt) -> list[list[int]]:
    """/v1/completions' prompt field (text, token ids, or a list of either) as token ids, each checked."""
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


def score_prompt(server: Server, ids: list[int], top: int) -> list[dict]:
    """Log-probabilities of a prompt's own tokens (the first has none), as echo + logprobs reports them: the one
    scoring function of infer/scoring.py."""
    from lmforge.infer.scoring import score_tokens

    out = [{"token_id": ids[0], "logprob": None, "top": None}]
    if len(ids) > 1:
        scores = score_tokens(server.model, [ids], [1], top=top)[0]
        out += [{"token_id": t, "logprob": lp, "top": best if top else None}
                for t, lp, best in zip(ids[1:], scores.logprobs, scores.top or [None] * len(scores.logprobs))]
    return out
