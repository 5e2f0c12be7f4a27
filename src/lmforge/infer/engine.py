"""Generation: the functions every caller uses (generate, stream, generate_ids, generate_stream, ChatSession), all
over the one step loop of infer/scheduler.py.

A request is a prompt with its sampling settings and seed; it ends at one of its stop ids or stop strings, at its
max_new_tokens, or where the context ends: a reply's budget is clipped to what the prompt leaves of the model's
context, and the functions here say so once per call (a warning). `n` completions of one prompt share its prefill.
`batch_size` bounds the rows decoded together: more requests queue and take the rows that free up.

Prompts given as text are plain text: a special token's text in them stays text (only a chat template writes
control tokens, chat/render.py); pass token ids for a prompt that holds them. A request without stop ids stops at
the ids chat/stops.py gives every caller: the end-of-text token and the chat template's end of turn.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import torch

from lmforge.chat.render import encode_chat
from lmforge.chat.stops import stop_ids
from lmforge.infer.sampling import SamplingConfig
from lmforge.infer.scheduler import STATIC_CACHE_ROUND, Group, Scheduler, model_context
from lmforge.model.transformer import KVCache, Transformer


def new_cache(model: Transformer, batch: int, length: int, compile: bool = False) -> KVCache:
    """A KV cache for `batch` rows of `length` slots (static and rounded up, the layout a compiled step takes)."""
    device, dtype = model.embed.weight.device, model.embed.weight.dtype
    if compile:
        length = -(-length // STATIC_CACHE_ROUND) * STATIC_CACHE_ROUND
    return KVCache(model.cfg, batch, length, device, dtype, static=compile)


@dataclass
class Request:
    """One generation: prompt text (plain text) or token ids, its sampling settings, and how many completions
    (completion k samples with seed + k when a seed is set)."""

    prompt: str | Sequence[int]
    sampling: SamplingConfig
    n: int = 1


@dataclass
class TextEvent:
    """New text of request `index` (its completion `choice`); `finish_reason` is set on its last event: "stop" (a
    stop id or string) or "length" (max_new_tokens or the context). `token_id` is the step's token (None on a
    flush)."""

    index: int
    text: str
    token_id: int | None = None
    finish_reason: str | None = None
    choice: int = 0


def _prompt_ids(tokenizer, prompt: str | Sequence[int]) -> list[int]:
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt, disallowed_special=())  # user text: special tokens' text stays text
        if not ids:
            raise ValueError("the prompt encodes to no tokens")
        return ids
    return list(prompt)


def _with_stops(configs: Sequence[SamplingConfig], tokenizer, model: Transformer) -> list[SamplingConfig]:
    """The configs, those without stop ids given the model's (worked out once: the template is rendered for them)."""
    if tokenizer is None or all(c.stop_token_ids for c in configs):
        return list(configs)
    stops = stop_ids(tokenizer, model.cfg)
    return [c if c.stop_token_ids else replace(c, stop_token_ids=stops) for c in configs]


def _choices(cfg: SamplingConfig, n: int) -> list[SamplingConfig]:
    """n completions of one request: completion k samples with seed + k."""
    return [cfg if cfg.seed is None or k == 0 else replace(cfg, seed=cfg.seed + k) for k in range(n)]


def _static_batch(model: Transformer, tokenizer, prompts: list[list[int]], configs: list[SamplingConfig],
                  ns: list[int], compile: bool = False, use_cache: bool = True,
                  batch_size: int | None = None) -> tuple[Scheduler, list[Group]]:
    """A scheduler holding every request (prompt i with ns[i] completions): a static batch, or a queue through
    `batch_size` rows. Warns once when a reply's budget is clipped to the context."""
    context = model_context(model)
    room = [min(c.max_new_tokens, context - len(p)) for p, c in zip(prompts, configs)]
    rows = sum(ns)
    scheduler = Scheduler(model, tokenizer, capacity=min(batch_size or rows, rows), compile=compile,
                          width=max(len(p) for p in prompts) + max(max(room), 1), use_cache=use_cache)
    groups = [scheduler.add(p, _choices(c, k), tag=i) for i, (p, c, k) in enumerate(zip(prompts, configs, ns))]
    clipped = [(p, c, b) for p, c, b in zip(prompts, configs, room) if b < c.max_new_tokens]
    if clipped:
        p, c, b = clipped[0]
        more = f" ({len(clipped)} of {len(prompts)} requests are clipped)" if len(prompts) > 1 else ""
        warnings.warn(f"prompt ({len(p)} tokens) + max_new_tokens ({c.max_new_tokens}) exceeds the model's context "
                      f"of {context} tokens: the reply stops at {max(b, 0)} tokens{more}", stacklevel=3)
    return scheduler, groups


@torch.no_grad()
def generate_ids(model: Transformer, prompts: Sequence[Sequence[int]], cfg: SamplingConfig | Sequence[SamplingConfig],
                 use_cache: bool = True, compile: bool = False, n: int = 1,
                 batch_size: int | None = None) -> list[list[int]]:
    """New token ids for each prompt (its stop token included); `cfg` is one config for all or one per prompt.
    With n > 1, n completions per prompt sharing its prefill (completion k with seed + k), prompt-major: the
    completions of prompt i are rows i * n .. i * n + n - 1. `batch_size` bounds the rows decoded together.

    `compile=True` runs the one-token decode steps through torch.compile with a static KV cache: the first
    call for a shape pays the compilation (seconds for a tiny model, minutes for 100M+ parameters on a
    small CPU), later calls and steps reuse it. Same tokens as eager (tested), fewer kernel launches.
    `use_cache=False` runs every step over the whole sequences (the reference the cache is tested against).
    """
    configs = [cfg] * len(prompts) if isinstance(cfg, SamplingConfig) else list(cfg)
    if len(configs) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(configs)} sampling configs")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    scheduler, groups = _static_batch(model, None, [list(p) for p in prompts], configs, [n] * len(prompts), compile,
                                      use_cache, batch_size)
    scheduler.run()
    return [g.tokens(k) for g in groups for k in range(n)]


def generate_stream(model: Transformer, tokenizer, requests: Sequence[Request], compile: bool = False,
                    batch_size: int | None = None) -> Iterator[TextEvent]:
    """Run requests through the scheduler and yield their text as it is generated (one event per completion per
    step with new text, plus its last event). A request without stop ids stops at `chat.stop_ids` (EOS, end of
    turn). `batch_size`: rows decoded together (default: every completion at once; more wait for a free row)."""
    configs = _with_stops([r.sampling for r in requests], tokenizer, model)
    prompts = [_prompt_ids(tokenizer, r.prompt) for r in requests]
    scheduler, _ = _static_batch(model, tokenizer, prompts, configs, [r.n for r in requests], compile,
                                 batch_size=batch_size)
    while scheduler.busy:
        for e in scheduler.step():
            if e.text or e.finish_reason:
                yield TextEvent(e.group.tag, e.text, e.token_id, e.finish_reason, e.index)


def generate(model: Transformer, tokenizer, prompts: str | Sequence[int] | Sequence[str | Sequence[int]],
             cfg: SamplingConfig | None = None, compile: bool = False, batch_size: int | None = None,
             **overrides) -> list[str] | str:
    """Text in (or token ids), text out; stop strings cut the text (the stop string itself is not returned)."""
    cfg = cfg or SamplingConfig(**overrides)
    single = isinstance(prompts, str) or (len(prompts) > 0 and isinstance(prompts[0], int))
    items = [prompts] if single else list(prompts)
    out = [""] * len(items)
    for event in generate_stream(model, tokenizer, [Request(p, cfg) for p in items], compile=compile,
                                 batch_size=batch_size):
        out[event.index] += event.text
    return out[0] if single else out


def stream(model: Transformer, tokenizer, prompt: str | Sequence[int], cfg: SamplingConfig | None = None,
           compile: bool = False, **overrides) -> Iterator[str]:
    """Yield decoded text as it is generated (one prompt; stop ids and strings honoured); `compile` as in
    generate_ids."""
    cfg = cfg or SamplingConfig(**overrides)
    for event in generate_stream(model, tokenizer, [Request(prompt, cfg)], compile=compile):
        if event.text:
            yield event.text


class ChatSession:
    """A conversation that keeps its KV cache between turns: each turn renders the whole conversation with the
    chat template, reuses the cached keys and values of what it shares with the last turn (its prompt and the
    reply), and feeds only the rest. A reply gets what the conversation leaves of `context` tokens, up to
    max_new_tokens; when less than min(max_new_tokens, context / 2) would be left, the oldest turns are left out
    (a system message stays). `variables`: the chat template's own, as apply_chat_template's keyword arguments."""

    def __init__(self, model: Transformer, tokenizer, cfg: SamplingConfig, system: str | None = None,
                 context: int | None = None, compile: bool = False, variables: dict | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.variables = dict(variables or {})  # the template's own (Qwen3's enable_thinking), every turn
        self.scheduler = Scheduler(model, tokenizer, capacity=1, context=context, compile=compile,
                                   prefix_cache_tokens=2 * model_context(model), min_prefix=1)
        self.context = self.scheduler.context
        self.reserve = min(cfg.max_new_tokens, self.context // 2)  # the reply's room that trimming keeps
        if cfg.max_new_tokens > self.reserve:
            warnings.warn(f"max_new_tokens ({cfg.max_new_tokens}) is more than half of the {self.context}-token "
                          f"context: each reply gets what the conversation leaves of it (at least {self.reserve} "
                          "tokens; older turns are left out to keep that much)", stacklevel=2)
        self.cfg = _with_stops([cfg], tokenizer, model)[0]
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self.dropped_turns = 0
        self.prompt_text = ""  # the last turn's rendered prompt (a reasoning model's may open its <think> block)

    def _fit(self) -> list[int]:
        """The conversation's prompt ids, leaving out the oldest turns until it and the reply's room fit."""
        while True:
            ids = self._render()
            if len(ids) + self.reserve <= self.context:
                return ids
            first = 1 if self.messages and self.messages[0]["role"] == "system" else 0
            if len(self.messages) - first <= 1:
                self.messages.pop()
                raise ValueError(f"this message is {len(ids)} tokens; with {self.reserve} kept for the reply it does "
                                 f"not fit the {self.context}-token context")
            # drop the oldest exchange: a user turn and the replies up to the next user turn
            end = first + 1
            while end < len(self.messages) - 1 and self.messages[end]["role"] != "user":
                end += 1
            del self.messages[first:end]
            self.dropped_turns += 1

    def _render(self) -> list[int]:
        tok = self.tokenizer
        if tok.chat_template:
            encoded = encode_chat(tok, tok.chat_template, self.messages, add_generation_prompt=True, **self.variables)
            self.prompt_text = encoded.text
            return encoded.ids
        self.prompt_text = "\n".join(m["content"] for m in self.messages) + "\n"
        return tok.encode(self.prompt_text, disallowed_special=())

    def reply(self, user: str) -> Iterator[str]:
        """Add a user turn and stream the model's reply (it becomes an assistant turn when done)."""
        self.messages.append({"role": "user", "content": user})
        ids = self._fit()
        self.scheduler.add(ids, self.cfg)
        reply = ""
        while self.scheduler.busy:
            for event in self.scheduler.step():
                reply += event.text
                if event.text:
                    yield event.text
        self.messages.append({"role": "assistant", "content": reply})
