"""Generation: one engine that every caller drives (generate, stream, chat, RAG answers, evaluation, the server).

`Decoder` runs a batch of prompts through the model over a preallocated KV cache, one forward per step for all
rows still running. Every row is a request with its own sampling settings and seed; it ends at one of its stop
ids, at its max_new_tokens, or when its caller finishes it (a stop string, a client gone). `generate_stream`
adds text: per request, streaming detokenization (infer/detokenize.py) and stop strings checked as the text
grows, so a request ends at the step its stop string appears. `generate`, `stream` and `ChatSession` are thin
layers over those two.

Prompts given as text are plain text: a special token's text in them stays text (only a chat template writes
control tokens, chat/render.py); pass token ids for a prompt that holds them. A request without stop ids stops at
the ids chat/stops.py gives every caller: the end-of-text token and the chat template's end of turn.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import torch

from lmforge.chat.render import encode_chat
from lmforge.chat.stops import stop_ids
from lmforge.infer.detokenize import IncrementalDetokenizer
from lmforge.infer.sampling import SamplingConfig, sample_tokens
from lmforge.model.transformer import KVCache, Transformer
from lmforge.peft import prefill, virtual_tokens

_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its compiled one-token step
_STATIC_CACHE_ROUND = 256  # static caches round their length up, so nearby lengths share one compiled graph


def _decode_step_model(model: Transformer):
    """torch.compile of the model, kept per model: compiled at the first decode step for each batch size, cache
    length (rounded up) and padding; the prompt's prefill runs eagerly (its length varies from call to call)."""
    if model not in _COMPILED:
        _COMPILED[model] = torch.compile(model, dynamic=False)
    return _COMPILED[model]


def _check_positions(model: Transformer, prompt_len: int, new_tokens: int) -> None:
    """Learned positions end at max_seq_len (RoPE/ALiBi extrapolate); checked up front, not inside a compiled step."""
    if model.cfg.pos == "learned" and prompt_len + new_tokens > model.cfg.max_seq_len:
        raise ValueError(f"prompt ({prompt_len}) + max_new_tokens ({new_tokens}) exceeds the model's "
                         f"{model.cfg.max_seq_len} positions")


def new_cache(model: Transformer, batch: int, length: int, compile: bool = False) -> KVCache:
    """A KV cache for `batch` rows of `length` slots (static and rounded up for a compiled decode step)."""
    device, dtype = model.embed.weight.device, model.embed.weight.dtype
    if compile:
        length = -(-length // _STATIC_CACHE_ROUND) * _STATIC_CACHE_ROUND
        if model.cfg.pos == "learned":
            length = min(length, model.cfg.max_seq_len)
    return KVCache(model.cfg, batch, length, device, dtype, static=compile)


class Decoder:
    """Token-level decoding of a batch of prompts, each with its own `SamplingConfig`.

    `step()` returns one new token per row (None for rows that have finished); a row finishes by itself at one of
    its stop ids (the stop token is returned) or at its max_new_tokens, and `finish(row)` ends it early. Prompts
    may differ in length (left padding with correct positions). `cache` continues from a KV cache that already
    holds the first `cache.length` tokens of a single prompt (a chat's earlier turns).
    """

    def __init__(self, model: Transformer, prompts: Sequence[Sequence[int]], configs: Sequence[SamplingConfig],
                 pad_id: int = 0, use_cache: bool = True, compile: bool = False, cache: KVCache | None = None):
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        if len(configs) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(configs)} sampling configs")
        self.model, self.configs = model, list(configs)
        # an adapter's virtual tokens (prompt / prefix tuning) take the KV cache's first slots, written by its
        # prefill before the prompt (a dynamic cache; the compiled static one does not take them); the attention
        # mask covers them
        self.offset = virtual_tokens(model)
        if self.offset:
            if cache is not None:
                raise ValueError("a prompt- or prefix-tuned model does not continue a KV cache")
            compile = False
        device = model.embed.weight.device
        B, P = len(prompts), max(len(p) for p in prompts)
        self.prompt_len = P
        max_new = max(c.max_new_tokens for c in configs)
        _check_positions(model, P, max_new)
        total = P + max_new
        if cache is not None:
            if B != 1:
                raise ValueError("a KV cache can be continued for one prompt at a time")
            if cache.length >= P:
                raise ValueError(f"the cache holds {cache.length} tokens; the prompt must add at least one ({P})")
            if cache.max_len < total:
                raise ValueError(f"prompt ({P}) + max_new_tokens ({max_new}) exceeds the KV cache's {cache.max_len} slots")
            compile = cache.static
        self.compile = compile and use_cache
        self.cache = cache if cache is not None else (new_cache(model, B, total + self.offset, self.compile)
                                                      if use_cache else None)
        if self.offset and self.cache is not None:
            prefill(model, self.cache)
        self.step_model = _decode_step_model(model) if self.compile else model
        self.ids = torch.full((B, total), pad_id, dtype=torch.long, device=device)
        # a static cache attends over all its slots, so the mask spans them (slots not yet filled stay 0); column
        # offset + j is ids[:, j]
        width = self.cache.max_len if self.compile else self.offset + total
        self.mask = torch.zeros((B, width), dtype=torch.long, device=device)
        self.mask[:, :self.offset] = 1
        self.starts = []
        for i, p in enumerate(prompts):
            self.ids[i, P - len(p):P] = torch.as_tensor(list(p), device=device)
            self.mask[i, self.offset + P - len(p):self.offset + P] = 1
            self.starts.append(P - len(p))
        self.padded = bool((self.mask[:, self.offset:self.offset + P] == 0).any())
        self.pad_id = pad_id
        self.generators = [torch.Generator(device=device).manual_seed(c.seed) if c.seed is not None else None
                           for c in configs]
        self.stop_ids = [set(c.stop_token_ids) for c in configs]
        self.active = [c.max_new_tokens > 0 for c in configs]
        self.generated = [0] * B
        self.end = P  # ids[:, :end] are known; the model has seen ids[:, :cache.length]

    @property
    def done(self) -> bool:
        return not any(self.active)

    def finish(self, row: int) -> None:
        self.active[row] = False

    @torch.no_grad()
    def step(self) -> list[int | None]:
        if self.done:
            raise RuntimeError("every row has finished")
        model, cache, end = self.model, self.cache, self.end
        if cache is not None:
            start = max(0, cache.length - self.offset)  # real tokens the cache holds (after any virtual ones)
            run = self.step_model if end - start == 1 else model
            # a copy: a slice of `ids` has the width as its stride, and a new stride would recompile the graph
            step_ids = self.ids[:, start:end].clone(memory_format=torch.contiguous_format)
            step_mask = (self.mask if self.compile else self.mask[:, :self.offset + end]) if self.padded else None
            hidden = run(step_ids, attention_mask=step_mask, cache=cache)
        else:  # without a cache the model's adapter puts its virtual tokens first itself
            hidden = model(self.ids[:, :end], attention_mask=self.mask[:, self.offset:self.offset + end]
                           if self.padded else None)
        logits = model.logits(hidden[:, -1])
        rows = [r for r, a in enumerate(self.active) if a]
        index = torch.tensor(rows, device=logits.device)
        previous = [self.ids[r, self.starts[r]:end] if self.configs[r].repetition_penalty != 1.0 else None for r in rows]
        sampled = sample_tokens(logits.index_select(0, index), [self.configs[r] for r in rows],
                                [self.generators[r] for r in rows], previous)
        tokens = torch.full((len(self.active),), self.pad_id, dtype=torch.long, device=logits.device)
        tokens[index] = sampled
        self.ids[:, end], self.mask[:, self.offset + end] = tokens, 1
        self.end += 1
        out: list[int | None] = [None] * len(self.active)
        for r, token in zip(rows, sampled.tolist()):
            out[r] = token
            self.generated[r] += 1
            if token in self.stop_ids[r] or self.generated[r] >= self.configs[r].max_new_tokens:
                self.active[r] = False
        return out

    def tokens(self, row: int) -> list[int]:
        """The ids generated for `row` so far (its stop token included)."""
        return self.ids[row, self.prompt_len:self.prompt_len + self.generated[row]].tolist()


@torch.no_grad()
def generate_ids(model: Transformer, prompts: Sequence[Sequence[int]], cfg: SamplingConfig | Sequence[SamplingConfig],
                 pad_id: int = 0, use_cache: bool = True, compile: bool = False) -> list[list[int]]:
    """New token ids for each prompt (its stop token included); `cfg` is one config for all or one per prompt.

    `compile=True` runs the one-token decode steps through torch.compile with a static KV cache: the first
    call for a shape pays the compilation (seconds for a tiny model, minutes for 100M+ parameters on a
    small CPU), later calls and steps reuse it. Same tokens as eager (tested), fewer kernel launches.
    """
    configs = [cfg] * len(prompts) if isinstance(cfg, SamplingConfig) else list(cfg)
    decoder = Decoder(model, prompts, configs, pad_id=pad_id, use_cache=use_cache, compile=compile)
    while not decoder.done:
        decoder.step()
    return [decoder.tokens(r) for r in range(len(prompts))]


@dataclass
class Request:
    """One generation: prompt text (plain text) or token ids, and its sampling settings."""

    prompt: str | Sequence[int]
    sampling: SamplingConfig


@dataclass
class TextEvent:
    """New text of request `index`; `finish_reason` is set on its last event: "stop" (a stop id or string) or
    "length" (max_new_tokens). `token_id` is the step's token (None on a flush)."""

    index: int
    text: str
    token_id: int | None = None
    finish_reason: str | None = None


class _TextState:
    """Detokenized text of one request, with stop strings: text that could still begin a stop string is held
    back until it cannot."""

    def __init__(self, tokenizer, stop_strings: Sequence[str]):
        self.detok = IncrementalDetokenizer(tokenizer)
        self.stops = [s for s in stop_strings if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.text, self.emitted = "", 0

    def _cut(self) -> bool:
        cuts = [self.text.find(s) for s in self.stops if s in self.text]
        if cuts:
            self.text = self.text[:min(cuts)]
        return bool(cuts)

    def push(self, token_id: int) -> tuple[str, bool]:
        self.text += self.detok.push(token_id)
        stopped = self._cut()
        safe = len(self.text) if stopped else max(self.emitted, len(self.text) - self.hold)
        return self._emit(safe), stopped

    def flush(self) -> tuple[str, bool]:
        self.text += self.detok.flush()
        stopped = self._cut()
        return self._emit(len(self.text)), stopped

    def _emit(self, upto: int) -> str:
        piece = self.text[self.emitted:upto] if upto > self.emitted else ""
        self.emitted = max(self.emitted, upto)
        return piece


def _prompt_ids(tokenizer, prompt: str | Sequence[int]) -> list[int]:
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt, disallowed_special=())  # user text: special tokens' text stays text
        if not ids:
            raise ValueError("the prompt encodes to no tokens")
        return ids
    return list(prompt)


def _with_stops(configs: Sequence[SamplingConfig], tokenizer, model: Transformer) -> list[SamplingConfig]:
    """The configs, those without stop ids given the model's (worked out once: the template is rendered for them)."""
    if all(c.stop_token_ids for c in configs):
        return list(configs)
    stops = stop_ids(tokenizer, model.cfg)
    return [c if c.stop_token_ids else replace(c, stop_token_ids=stops) for c in configs]


def warn_if_context_overflows(model: Transformer, prompt_len: int, max_new_tokens: int) -> None:
    limit = model.cfg.max_seq_len
    if prompt_len + max_new_tokens > limit and model.cfg.pos != "learned":  # learned positions: an error instead
        warnings.warn(f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's context "
                      f"of {limit} tokens: what comes after position {limit} is extrapolated and usually degrades",
                      stacklevel=3)


def generate_stream(model: Transformer, tokenizer, requests: Sequence[Request], compile: bool = False,
                    decoder: Decoder | None = None) -> Iterator[TextEvent]:
    """Run requests as one batch and yield their text as it is generated (one event per request per step with
    new text, plus its last event). A request without stop ids stops at `chat.stop_ids` (EOS, end of turn)."""
    configs = _with_stops([r.sampling for r in requests], tokenizer, model)
    if decoder is None:
        prompts = [_prompt_ids(tokenizer, r.prompt) for r in requests]
        for p, c in zip(prompts, configs):
            warn_if_context_overflows(model, len(p), c.max_new_tokens)
        pad = configs[0].stop_token_ids[0] if configs[0].stop_token_ids else 0
        decoder = Decoder(model, prompts, configs, pad_id=pad, compile=compile)
    states = [_TextState(tokenizer, c.stop_strings) for c in configs]
    for r, c in enumerate(configs):
        if c.max_new_tokens == 0:
            yield TextEvent(r, "", None, "length")
    while not decoder.done:
        was_active = list(decoder.active)
        tokens = decoder.step()
        for r, token in enumerate(tokens):
            if token is None or not was_active[r]:
                continue
            state = states[r]
            if token in decoder.stop_ids[r]:
                piece, _ = state.flush()
                yield TextEvent(r, piece, token, "stop")
                continue
            piece, stopped = state.push(token)
            if stopped:
                decoder.finish(r)
                yield TextEvent(r, piece, token, "stop")
            elif not decoder.active[r]:  # max_new_tokens reached
                rest, stopped = state.flush()
                yield TextEvent(r, piece + rest, token, "stop" if stopped else "length")
            elif piece:
                yield TextEvent(r, piece, token)


def generate(model: Transformer, tokenizer, prompts: str | Sequence[int] | Sequence[str | Sequence[int]],
             cfg: SamplingConfig | None = None, compile: bool = False, **overrides) -> list[str] | str:
    """Text in (or token ids), text out; stop strings cut the text (the stop string itself is not returned)."""
    cfg = cfg or SamplingConfig(**overrides)
    single = isinstance(prompts, str) or (len(prompts) > 0 and isinstance(prompts[0], int))
    items = [prompts] if single else list(prompts)
    out = [""] * len(items)
    for event in generate_stream(model, tokenizer, [Request(p, cfg) for p in items], compile=compile):
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
    chat template, reuses the cached tokens it shares with the last one, and feeds only the rest. When the
    conversation and the reply no longer fit in `context` tokens, the oldest turns are left out (a system message
    stays)."""

    def __init__(self, model: Transformer, tokenizer, cfg: SamplingConfig, system: str | None = None,
                 context: int | None = None, compile: bool = False):
        self.model, self.tokenizer = model, tokenizer
        self.context = min(context or model.cfg.max_seq_len, model.cfg.max_seq_len)
        if cfg.max_new_tokens >= self.context:
            raise ValueError(f"max_new_tokens ({cfg.max_new_tokens}) leaves no room for a message in the "
                             f"{self.context}-token context")
        self.cfg = _with_stops([cfg], tokenizer, model)[0]
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self.cache = new_cache(model, 1, self.context, compile)
        self.cached: list[int] = []  # the tokens whose keys and values the cache holds
        self.dropped_turns = 0
        self.prompt_text = ""  # the last turn's rendered prompt (a reasoning model's may open its <think> block)

    def _fit(self) -> list[int]:
        """The conversation's prompt ids, leaving out the oldest turns until it and the reply fit."""
        while True:
            ids = self._render()
            if len(ids) + self.cfg.max_new_tokens <= self.context:
                return ids
            first = 1 if self.messages and self.messages[0]["role"] == "system" else 0
            if len(self.messages) - first <= 1:
                self.messages.pop()
                raise ValueError(f"this message is {len(ids)} tokens; with max_new_tokens {self.cfg.max_new_tokens} "
                                 f"it does not fit the {self.context}-token context")
            # drop the oldest exchange: a user turn and the replies up to the next user turn
            end = first + 1
            while end < len(self.messages) - 1 and self.messages[end]["role"] != "user":
                end += 1
            del self.messages[first:end]
            self.dropped_turns += 1

    def _render(self) -> list[int]:
        tok = self.tokenizer
        if tok.chat_template:
            encoded = encode_chat(tok, tok.chat_template, self.messages, add_generation_prompt=True)
            self.prompt_text = encoded.text
            return encoded.ids
        self.prompt_text = "\n".join(m["content"] for m in self.messages) + "\n"
        return tok.encode(self.prompt_text, disallowed_special=())

    def reply(self, user: str) -> Iterator[str]:
        """Add a user turn and stream the model's reply (it becomes an assistant turn when done)."""
        self.messages.append({"role": "user", "content": user})
        ids = self._fit()
        keep = 0
        for a, b in zip(self.cached, ids[:-1]):  # at least one token must be fed
            if a != b:
                break
            keep += 1
        self.cache.truncate(keep)
        decoder = Decoder(self.model, [ids], [self.cfg], cache=self.cache)
        reply = ""
        for event in generate_stream(self.model, self.tokenizer, [Request(ids, self.cfg)], decoder=decoder):
            reply += event.text
            if event.text:
                yield event.text
        generated = decoder.tokens(0)
        self.cached = (ids + generated)[:self.cache.length]
        self.messages.append({"role": "assistant", "content": reply})
