"""The one step loop of generation: a scheduler that steps a set of rows over one KV cache.

Everything in lmforge that samples from a model runs here: `generate` / `stream` / `generate_ids` (a static batch:
every request arrives before the first step, none after), `ChatSession` (one row; the conversation's keys and values
stay cached between turns), the server's continuous batcher (requests arrive and leave between steps), evaluation's
generation tasks and prompting's EngineClient (a queue of requests through `batch_size` rows).

A request (`Group`) is a prompt and its n completions. Each completion is a row with its own sampling settings and
seed, stop ids and stop strings, budget, and the request's decoding constraint, log-probabilities and presence /
frequency penalties. `step()`:
  1. ends the rows of cancelled requests;
  2. admits waiting requests while rows are free: their prompts run in one batched prefill, each prompt once (a
     group's n rows then copy its keys and values: RL's G completions per prompt pay for one prefill), reusing the
     keys and values of a cached prefix (a recent prompt or reply the prompt begins with); each row samples its
     first token. A prompt longer than `max_prefill_tokens` is prefilled before, one chunk of that many tokens per
     step (chunked prefill: the running rows keep getting a token at every step while it arrives);
  3. runs one forward of one token for every running row (compiled over a static cache with compile=True) and
     samples every row's next token with a few tensor ops (infer/sampling.py `RowSampler`);
  4. checks each row's stop ids, stop strings (streaming text, infer/detokenize.py), constraint and budget, emits
     its event, and frees the rows that ended.

Layout. One KV cache of `capacity` rows x `width` slots. The first slots hold an adapter's virtual tokens (prompt /
prefix tuning: the same for every row, written once by `peft.prefill`); after them every row's tokens end at one
shared column `col`, where the next step writes (left padding; each row counts its own positions). A prompt longer
than the running rows shifts them right; when `col` reaches the end, every row shifts left by the padding they all
share. A row that ends is replaced by the last running row, so the running rows are slots 0..n-1 and a step computes
nothing for empty slots (with compile=True every slot runs: one graph for the whole run). A reply never goes beyond
the context: a row's budget is min(max_new_tokens, context - prompt), which is also why a shift always finds room.
A sliding-window layer's cache is a ring of its window's slots instead, indexed by position (model/transformer.py
`KVCache`): shifts leave it alone, and a row's ring moves and copies whole.
"""

from __future__ import annotations

import collections
import logging
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lmforge.infer.constrain import allowed_logits
from lmforge.infer.detokenize import TextStream
from lmforge.infer.sampling import RowSampler, SamplingConfig
from lmforge.model.transformer import KVCache, Transformer
from lmforge.peft import prefill, virtual_tokens

log = logging.getLogger(__name__)

STATIC_CACHE_ROUND = 256  # static caches round their width up, so nearby lengths share one compiled graph
_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its compiled one-token step


def compiled_step_model(model: Transformer):
    """torch.compile of the model, kept per model: compiled at the first decode step for each batch size and cache
    width; prefills run eagerly (their lengths vary from call to call)."""
    if model not in _COMPILED:
        _COMPILED[model] = torch.compile(model, dynamic=False)
    return _COMPILED[model]


class ContextLimit(ValueError):
    """A prompt that does not fit the model's context (a user-facing limit: reported in one line)."""


def model_context(model: Transformer) -> int:
    """The most tokens a sequence holds with this model: its max_seq_len, less an adapter's virtual tokens (they
    take positions too)."""
    return model.cfg.max_seq_len - virtual_tokens(model)


@dataclass
class Event:
    """What a step produced for one completion: new text, the sampled token, and on the completion's last event its
    `finish_reason`: "stop" (a stop id or string, or a constrained document complete), "length" (max_new_tokens or
    the context), "cancelled", or "error" (the step failed). `logprob` / `top_logprobs` (token id, log-probability:
    the model's distribution before any penalty or filter) are set when the request asked for them. `index` is the
    completion's place among its request's n; `group` the request."""

    text: str
    token_id: int | None = None
    finish_reason: str | None = None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    index: int = 0
    group: Group | None = field(default=None, repr=False)


class _Row:
    """One completion: its settings, its tokens so far, its streaming text."""

    __slots__ = ("group", "index", "cfg", "budget", "generator", "stops", "text", "tokens", "raw", "done")

    def __init__(self, group: Group, index: int, cfg: SamplingConfig, budget: int, tokenizer, device):
        self.group, self.index, self.cfg, self.budget = group, index, cfg, budget
        self.generator = torch.Generator(device=device).manual_seed(cfg.seed) if cfg.seed is not None else None
        self.stops = set(cfg.stop_token_ids)
        self.text = TextStream(tokenizer, cfg.stop_strings) if tokenizer is not None else None
        self.tokens: list[int] = []
        self.raw = b""  # the reply's bytes, which a constraint reads as text
        self.done = False

    @property
    def fed(self) -> int:
        """Tokens of this row in the KV cache: the prompt and every sampled token but the last."""
        return len(self.group.prompt) + max(len(self.tokens) - 1, 0)


class Group:
    """One request: a prompt and its n completions (`rows`), each with its own `SamplingConfig`. `budgets[i]` is
    completion i's token budget (its max_new_tokens, clipped to what the prompt leaves of the context: `clipped`
    says whether any was). `cancel()` ends the request at the next step (its rows' last events say "cancelled")."""

    def __init__(self, scheduler: Scheduler, prompt: list[int], configs: Sequence[SamplingConfig], tag, emit,
                 logprobs: int, presence: float, frequency: float, constraint):
        self.scheduler, self.prompt, self.tag, self.emit = scheduler, prompt, tag, emit
        self.logprobs, self.presence, self.frequency, self.constraint = logprobs, presence, frequency, constraint
        room = scheduler.context - len(prompt)
        self.rows = [_Row(self, i, c, min(c.max_new_tokens, room), scheduler.tokenizer, scheduler.device)
                     for i, c in enumerate(configs)]
        self.clipped = any(r.budget < r.cfg.max_new_tokens for r in self.rows)
        self.pending = list(self.rows)  # rows not yet in the batch
        self.kv: KVCache | None = None  # the prompt's keys and values while some rows wait for a free slot
        self.logits: torch.Tensor | None = None  # and its last position's logits
        self.cancelled = False
        self.submitted = time.perf_counter()
        self.first_token_s: float | None = None

    @property
    def budgets(self) -> list[int]:
        return [r.budget for r in self.rows]

    @property
    def done(self) -> bool:
        return all(r.done for r in self.rows)

    def tokens(self, index: int = 0) -> list[int]:
        """The ids completion `index` generated (its stop token included)."""
        return self.rows[index].tokens

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            self.scheduler._cancelled.append(self)  # a list append: safe from another thread


class _Rows(KVCache):
    """The first n rows of the scheduler's KV cache, filled up to the shared column (views: writes land in the
    shared tensors). One object for the scheduler's life: an adapter's `prefill` marks it as starting with the
    virtual tokens."""

    def __init__(self, parent: KVCache):  # no super().__init__(): it would allocate
        self.parent, self.static, self.max_len, self.pos = parent, False, parent.max_len, parent.pos
        self.rings, self._ring_writes = parent.rings, None
        self.n, self._length = -1, 0
        self.use(parent.k[0].shape[0], 0)

    def use(self, n: int, length: int) -> KVCache:
        if n != self.n:
            self.k = [k[:n] for k in self.parent.k]
            self.v = [v[:n] for v in self.parent.v]
            self.n = n
        self._length = length
        return self


class Scheduler:
    """Steps a set of rows (see the module docstring). `capacity`: rows decoded together; `context`: the most tokens
    a row holds, prompt and reply (default: the model's max_seq_len less its virtual tokens); `width`: KV-cache slots
    per row (default: the context; a static batch passes the longest prompt + the longest budget); `compile`: the
    one-token step through torch.compile over a static cache; `use_cache=False` runs every step over whole sequences
    (the reference the cached path is tested against); `prefix_cache_tokens`: keys and values of recent prompts and
    replies kept for prompts that begin like them (0: none), reused from `min_prefix` tokens on;
    `max_prefill_tokens`: padded prompt tokens one admission prefills together (at least one request); a longer
    prompt is prefilled in chunks of that many tokens, one chunk per step between the running rows' decode steps
    (chunked prefill: running streams keep their pace while a long prompt arrives)."""

    def __init__(self, model: Transformer, tokenizer=None, capacity: int = 8, context: int | None = None,
                 width: int | None = None, compile: bool = False, use_cache: bool = True,
                 prefix_cache_tokens: int = 0, min_prefix: int = 16, max_prefill_tokens: int | None = None):
        cfg = model.cfg
        if max_prefill_tokens is not None and max_prefill_tokens <= 0:
            raise ValueError(f"max_prefill_tokens must be positive (None: no bound), got {max_prefill_tokens}")
        self.model, self.tokenizer, self.capacity = model, tokenizer, capacity
        self.use_cache = use_cache
        # an adapter's virtual tokens take the first slots of every row (a forward without a cache gets them from
        # the adapter's hook instead); a compiled step does not take them
        self.offset = virtual_tokens(model) if use_cache else 0
        self.compile = compile and use_cache and not self.offset
        limit = model_context(model)
        self.context = min(context or limit, limit)
        self.width = self.offset + min(width or self.context, self.context)
        if self.compile:
            self.width = -(-self.width // STATIC_CACHE_ROUND) * STATIC_CACHE_ROUND
        device = model.embed.weight.device
        self.device = device
        # sliding-window layers keep a ring of their window's positions (KVCache) where the window is shorter than
        # a row; not with an adapter's virtual tokens (they would have to stay in every ring), ALiBi's bias masks, or
        # the portable path (transformers' attention reads the slots as positions)
        self.ring = (use_cache and not self.offset and not getattr(model, "portable", False) and model.alibi is None
                     and any(w is not None and w < self.width for w in map(cfg.window, range(cfg.n_layers))))
        self.cache = self.view = None
        if use_cache:
            self.cache = self._new_cache(capacity, self.width, static=self.compile)
            if not self.compile:
                self.view = _Rows(self.cache)
                if self.offset:
                    prefill(model, self.view)  # the virtual tokens' keys and values, in every row's first slots
        self.ids = None if use_cache else torch.zeros(capacity, self.width, dtype=torch.long, device=device)
        self.mask = torch.zeros(capacity, self.width, dtype=torch.long, device=device)  # 1: the slot is the row's
        self.mask[:, :self.offset] = 1
        self.last = torch.zeros(capacity, 1, dtype=torch.long, device=device)  # the token each row feeds next
        self.positions = torch.zeros(capacity, 1, dtype=torch.long, device=device)  # and its position
        self.sampler = RowSampler(capacity, cfg.vocab_size, device)
        # a joint choice over rows in place of each row's own sample (RAG-Token, rag/marginal.py): given the rows
        # and their (n, V) logits after penalties, the n tokens they take
        self.choose: Callable[[list[_Row], torch.Tensor], torch.Tensor] | None = None
        self.rows: list[_Row] = []  # running rows; rows[i] is in slot i
        self.waiting: collections.deque[Group] = collections.deque()
        self.col = self.offset
        self.padded = False  # some running row has left padding (the step then needs the attention mask)
        self.constrained = False  # some running row has a decoding constraint
        self.logprobs = False  # some running row reports log-probabilities
        self.max_prefill_tokens = max_prefill_tokens
        self.prefixes: collections.OrderedDict[tuple[int, ...], KVCache] = collections.OrderedDict()
        self.prefix_cache_tokens, self.min_prefix = (prefix_cache_tokens if use_cache else 0), min_prefix
        self._cancelled: list[Group] = []
        self._events: list[Event] = []
        self._admitting: list[Group] = []
        self.stats = {"requests": 0, "tokens": 0, "steps": 0, "prefill_tokens": 0, "prefix_hits": 0,
                      "prefix_tokens_reused": 0}
        self.finished: dict[str, int] = {}  # rows finished, by reason
        self.ttft: collections.deque[float] = collections.deque(maxlen=1000)  # seconds to a request's first token
        self.recent: collections.deque[tuple[float, int]] = collections.deque(maxlen=100_000)  # (time, tokens)

    def _new_cache(self, rows: int, width: int, static: bool = False) -> KVCache:
        """A KV cache laid out as the scheduler's (rings for the sliding layers or not), so rows copy between them."""
        return KVCache(self.model.cfg, rows, width, device=self.device, dtype=self.model.embed.weight.dtype,
                       static=static, sliding=self.ring)

    # --- the caller's side ----------------------------------------------------------------------------------------
    def add(self, prompt: Sequence[int], configs: SamplingConfig | Sequence[SamplingConfig], *, tag=None,
            emit: Callable[[Event], None] | None = None, logprobs: int = -1, presence: float = 0.0,
            frequency: float = 0.0, constraint=None) -> Group:
        """Queue a request: `prompt` and one completion per config (a group sharing the prompt's prefill). Its events
        go to `emit` (called on the stepping thread) or come back from `step()`. `logprobs`: the top log-probabilities
        to report per token (0: the chosen token's only, -1: none); `constraint` (infer/constrain.py) restricts the
        tokens to those that keep the text a valid prefix of what it allows."""
        prompt = list(prompt)
        configs = [configs] if isinstance(configs, SamplingConfig) else list(configs)
        if not prompt:
            raise ValueError("the prompt has no tokens")
        if not configs:
            raise ValueError("a request needs at least one completion")
        if len(prompt) >= self.context:
            raise ContextLimit(f"the prompt ({len(prompt)} tokens) does not fit the {self.context}-token context")
        if self.tokenizer is None and (constraint is not None or any(c.stop_strings for c in configs)):
            raise ValueError("stop strings and constraints read text: the scheduler needs the tokenizer")
        group = Group(self, prompt, configs, tag, emit, logprobs, presence, frequency, constraint)
        if len(prompt) + max(group.budgets) > self.width - self.offset:
            raise ValueError(f"prompt ({len(prompt)}) + budget ({max(group.budgets)}) exceeds the scheduler's "
                             f"{self.width - self.offset} slots per row")
        self.stats["requests"] += 1
        self.waiting.append(group)
        return group

    @property
    def busy(self) -> bool:
        """Some request is running or waiting."""
        return bool(self.rows or self.waiting)

    def run(self) -> list[Event]:
        """Step until every request has finished; the events of every step."""
        events: list[Event] = []
        while self.busy:
            events += self.step()
        return events

    # --- the step -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> list[Event]:
        """Admit what fits, then one token for every running row; the events of requests without `emit`."""
        if self._cancelled:
            self._end_cancelled()
        if self.waiting and len(self.rows) < self.capacity:
            self._prefill_chunk()
            self._admit()
            self._release()
        if self.rows:
            if self.col == self.width:
                self._compact()
            n, col = len(self.rows), self.col
            self.mask[:n, col] = 1
            if self.compile:  # every slot, the whole static cache: the same shapes at every step
                self.cache.pos.fill_(col)
                hidden = compiled_step_model(self.model)(self.last, positions=self.positions,
                                                         attention_mask=self.mask, cache=self.cache)[:n, -1]
            elif self.use_cache:
                mask = self.mask[:n, :col + 1] if self.padded else None
                hidden = self.model(self.last[:n], positions=self.positions[:n], attention_mask=mask,
                                    cache=self.view.use(n, col))[:, -1]
            else:  # whole sequences, no cache: an adapter's hook puts its virtual tokens first
                self.ids[:n, col] = self.last[:n, 0]
                hidden = self.model(self.ids[:n, :col + 1],
                                    attention_mask=self.mask[:n, :col + 1] if self.padded else None)[:, -1]
            self.col += 1
            self.positions[:n] += 1
            self.stats["steps"] += 1
            self._sample(self.model.logits(hidden), 0, n)
            self._release()
        events, self._events = self._events, []
        return events

    def _sample(self, logits: torch.Tensor, start: int, end: int) -> None:
        """Sample the next token of the rows in slots start..end-1 from their (n, V) logits and accept each."""
        rows = self.rows[start:end]
        x = self.sampler.penalise(logits.float(), start, end)
        if self.constrained:
            for i, row in enumerate(rows):
                if row.group.constraint is not None:
                    keep = 1 if row.cfg.temperature == 0 else max(row.cfg.top_k or 0, 40)
                    x[i] = allowed_logits(x[i], row.group.constraint, row.raw, row.stops, self._token_bytes, keep)
        tokens = self.sampler.sample(x, start, end) if self.choose is None else self.choose(rows, x)
        self.last[start:end, 0] = tokens
        self.sampler.observe(tokens, start, end)
        chosen, top = self._logprobs(logits, tokens, rows)
        now = time.perf_counter()
        self.stats["tokens"] += end - start
        self.recent.append((now, end - start))
        for i, (row, token) in enumerate(zip(rows, tokens.tolist())):
            group = row.group
            if group.first_token_s is None:
                group.first_token_s = now - group.submitted
                self.ttft.append(group.first_token_s)
            self._accept(row, token, chosen[i] if chosen else None, top[i] if top else None)

    def _logprobs(self, logits: torch.Tensor, tokens: torch.Tensor, rows: list[_Row]):
        """Per row: the chosen token's log-probability and the top ones, for the rows that asked (else None)."""
        if not self.logprobs:
            return None, None
        want = [i for i, r in enumerate(rows) if r.group.logprobs >= 0]
        if not want:
            return None, None
        index = torch.tensor(want, device=logits.device)
        logp = F.log_softmax(logits.index_select(0, index).float(), -1)
        picked = logp.gather(1, tokens.index_select(0, index)[:, None])[:, 0].tolist()
        k = max(rows[i].group.logprobs for i in want)
        values, ids = logp.topk(k) if k else (None, None)
        values, ids = (values.tolist(), ids.tolist()) if k else (None, None)
        chosen: list[float | None] = [None] * len(rows)
        top: list[list | None] = [None] * len(rows)
        for j, i in enumerate(want):
            chosen[i] = picked[j]
            n = rows[i].group.logprobs
            top[i] = list(zip(ids[j][:n], values[j][:n])) if n else None
        return chosen, top

    def _accept(self, row: _Row, token: int, lp: float | None, top) -> None:
        """Record one sampled token and emit its text, or end the row."""
        row.tokens.append(token)
        if row.group.cancelled:
            self._finish(row, "cancelled")
            return
        if token in row.stops:
            self._finish(row, "stop", token=token, lp=lp, top=top)
            return
        piece, stopped = row.text.push(token) if row.text is not None else ("", False)
        if stopped:  # a stop string: the text is cut where it starts, nothing after it is flushed
            self._finish(row, "stop", piece, token, lp, top, flush=False)
            return
        constraint = row.group.constraint
        if constraint is not None:  # the document is whole: the reply ends here
            row.raw += self._token_bytes(token)
            if constraint.complete(row.raw.decode("utf-8", "replace")):
                self._finish(row, "stop", piece, token, lp, top)
                return
        if len(row.tokens) >= row.budget:
            self._finish(row, "length", piece, token, lp, top)
            return
        self._emit(Event(piece, token, None, lp, top, row.index, row.group))

    def _finish(self, row: _Row, reason: str, text: str = "", token: int | None = None, lp=None, top=None,
                flush: bool = True) -> None:
        row.done = True
        if flush and reason in ("stop", "length") and row.text is not None:
            rest, stopped = row.text.flush()  # what the detokenizer and the stop-string check still held
            text += rest
            reason = "stop" if stopped else reason
        if reason != "error":
            self._remember_reply(row)
        self.finished[reason] = self.finished.get(reason, 0) + 1
        self._emit(Event(text, token, reason, lp, top, row.index, row.group))

    def _emit(self, event: Event) -> None:
        if event.group.emit is not None:
            event.group.emit(event)
        else:
            self._events.append(event)

    def _token_bytes(self, token: int) -> bytes:
        raw = self.tokenizer.raw_bytes([token])
        return raw if raw is not None else self.tokenizer.decode([token]).encode("utf-8")

    # --- requests in and out --------------------------------------------------------------------------------------
    def _end_cancelled(self) -> None:
        while self._cancelled:
            group = self._cancelled.pop()
            if group.pending and group in self.waiting:
                self.waiting.remove(group)
            for row in group.rows:
                if not row.done:
                    self._finish(row, "cancelled")
            group.pending, group.kv, group.logits = [], None, None
        self._release()

    def _admit(self) -> None:
        """Take waiting requests while rows are free: prefill those not prefilled yet (one batched forward), copy
        every admitted row's prompt keys and values into a free slot, and sample its first token."""
        free = self.capacity - len(self.rows)
        taken: list[tuple[Group, list[_Row]]] = []
        fresh: list[Group] = []  # requests whose prompts this admission prefills
        while self.waiting and free > 0:
            group = self.waiting[0]
            for row in [r for r in group.pending if r.budget <= 0 or group.cancelled]:  # nothing to generate
                group.pending.remove(row)
                self._finish(row, "cancelled" if group.cancelled else "length")
            if not group.pending:
                self.waiting.popleft()
                continue
            if group.logits is None and self._chunked(group):
                break  # its prompt is being prefilled a chunk per step (`_prefill_chunk`); the queue waits behind it
            if group.logits is None:
                longest = max([len(g.prompt) for g in fresh] + [len(group.prompt)])
                if fresh and self.max_prefill_tokens is not None and (len(fresh) + 1) * longest > self.max_prefill_tokens:
                    break
                fresh.append(group)
            rows, group.pending = group.pending[:free], group.pending[free:]
            taken.append((group, rows))
            free -= len(rows)
            if not group.pending:
                self.waiting.popleft()
        if not taken:
            return
        self._admitting = [g for g, _ in taken]
        logits, sources = self._prefill(fresh) if fresh else ({}, {})
        longest = max(len(g.prompt) for g, _ in taken)  # every admitted prompt ends at the shared column
        if not self.rows:
            self.col = self.offset + longest
        elif self.col - self.offset < longest:
            self._shift(longest - (self.col - self.offset))
        start = len(self.rows)
        copies: dict[int, tuple[KVCache, list[int], list[int]]] = {}  # id(cache) -> (cache, its rows, slots)
        first_logits = []
        for group, rows in taken:
            p = len(group.prompt)
            kv, src = sources.get(group, (group.kv, 0))
            for row in rows:
                slot = len(self.rows)
                self.rows.append(row)
                if kv is not None:
                    copy = copies.setdefault(id(kv), (kv, [], []))
                    copy[1].append(src)
                    copy[2].append(slot)
                self.mask[slot, self.offset:] = 0
                self.mask[slot, self.col - p:self.col] = 1
                self.positions[slot, 0] = self.offset + p
                if self.ids is not None:
                    self.ids[slot, self.col - p:self.col] = torch.tensor(group.prompt, device=self.device)
                self.sampler.set(slot, row.cfg, group.prompt, group.presence, group.frequency, row.generator)
                first_logits.append(logits.get(group, group.logits))
            if group.pending and group.logits is None:  # rows still wait for a slot: keep what they will copy
                group.logits = logits[group]
                group.kv = self._copy_out(kv, src, p) if kv is not None else None
            elif not group.pending:
                group.kv = group.logits = None
        for kv, srcs, slots in copies.values():
            index, dest = torch.tensor(srcs, device=self.device), torch.tensor(slots, device=self.device)
            width = kv.max_len - self.offset  # its tokens end at its last slot
            for layer in range(len(self.cache.k)):
                for mine, theirs in ((self.cache.k[layer], kv.k[layer]), (self.cache.v[layer], kv.v[layer])):
                    if self.cache.rings[layer] is not None:  # a ring is indexed by position: the row as it is
                        mine[dest] = theirs.index_select(0, index)
                    else:
                        mine[dest, :, self.col - width:self.col] = theirs.index_select(0, index)[:, :, self.offset:]
        self._update_flags()
        self._sample(torch.stack(first_logits), start, len(self.rows))
        self._admitting = []

    def _chunked(self, group: Group) -> bool:
        """Whether `group`'s prompt is prefilled in chunks of max_prefill_tokens, one per step."""
        return self.use_cache and self.max_prefill_tokens is not None and len(group.prompt) > self.max_prefill_tokens

    def _prefill_chunk(self) -> None:
        """Chunked prefill: the next max_prefill_tokens tokens of the first waiting prompt, if it is longer than that,
        into its own one-row cache (after the keys and values of its longest cached prefix). One chunk per step, so
        the running rows still get a token at every step while a long prompt arrives; the last chunk gives the
        prompt's logits, and `_admit` then takes the request as one prefilled before."""
        group = self.waiting[0]
        if group.logits is not None or not self._chunked(group):
            return
        self._admitting = [group]  # a chunk that raises ends the request (`fail`)
        offset, n = self.offset, len(group.prompt)
        if group.kv is None:  # the first chunk: a cache for the whole prompt, and the cached prefix
            cache = group.kv = self._new_cache(1, offset + n)
            if offset:
                prefill(self.model, cache)
            entry, reused = self._lookup(group.prompt)
            if entry is not None:
                self._copy_prefix(entry, cache, 0, offset, reused)
                cache.advance(reused)
                self.stats["prefix_hits"] += 1
                self.stats["prefix_tokens_reused"] += reused
        cache = group.kv
        done = cache.length - offset
        T = min(self.max_prefill_tokens, n - done)
        ids = torch.tensor([group.prompt[done:done + T]], device=self.device)
        positions = torch.arange(offset + done, offset + done + T, device=self.device)[None]
        hidden = self.model(ids, positions=positions, cache=cache)
        self.stats["prefill_tokens"] += T
        if done + T == n:
            group.logits = self.model.logits(hidden[:, -1])[0]
            if self.prefix_cache_tokens > 0 and self.min_prefix <= n <= self.prefix_cache_tokens:
                self._remember(tuple(group.prompt), cache)
        self._admitting = []

    def _prefill(self, groups: list[Group]) -> tuple[dict[Group, torch.Tensor], dict[Group, tuple[KVCache, int]]]:
        """Run the prompts of `groups` in one batch (left-padded to the longest) into a new KV cache, after the
        keys and values of each one's longest cached prefix: each prompt's last logits, and where its keys and
        values are (that cache, its row; nothing without a cache)."""
        model, offset = self.model, self.offset
        lens = [len(g.prompt) for g in groups]
        L = max(lens)
        if not self.use_cache:  # whole prompts; the step's forward reads them from `ids`
            ids = torch.zeros(len(groups), L, dtype=torch.long, device=self.device)
            mask = torch.zeros(len(groups), L, dtype=torch.long, device=self.device)
            for i, g in enumerate(groups):
                ids[i, L - lens[i]:] = torch.tensor(g.prompt, device=self.device)
                mask[i, L - lens[i]:] = 1
            hidden = model(ids, attention_mask=mask if min(lens) < L else None)[:, -1]
            self.stats["prefill_tokens"] += sum(lens)
            return dict(zip(groups, model.logits(hidden))), {}
        reused = [self._lookup(g.prompt) for g in groups]
        if self.ring and len(groups) > 1 and any(r for _, r in reused):
            # a row that feeds more than its uncached tail would find later positions in its copied ring than the
            # ring mask assumes: with rings, prompts that reuse a prefix are prefilled one at a time
            logits, sources = {}, {}
            for g in groups:
                one_logits, one_sources = self._prefill([g])
                logits |= one_logits
                sources |= one_sources
            return logits, sources
        T = max(n - r for n, (_, r) in zip(lens, reused))  # every row feeds its last min(len, T) tokens
        cache = self._new_cache(len(groups), offset + L)
        if offset:
            prefill(model, cache)
        cache.advance(L - T)
        ids = torch.zeros(len(groups), T, dtype=torch.long, device=self.device)
        positions = torch.zeros(len(groups), T, dtype=torch.long, device=self.device)
        mask = torch.zeros(len(groups), offset + L, dtype=torch.long, device=self.device)
        mask[:, :offset] = 1
        for i, (g, n, (entry, _)) in enumerate(zip(groups, lens, reused)):
            fed = min(n, T)
            self.stats["prefill_tokens"] += fed
            if n > fed:  # the first n - fed tokens come from the cached prefix
                self.stats["prefix_hits"] += 1
                self.stats["prefix_tokens_reused"] += n - fed
                self._copy_prefix(entry, cache, i, offset + L - n, n - fed)
            ids[i, T - fed:] = torch.tensor(g.prompt[n - fed:], device=self.device)
            positions[i, T - fed:] = torch.arange(offset + n - fed, offset + n, device=self.device)
            mask[i, offset + L - n:] = 1
        hidden = model(ids, positions=positions, attention_mask=mask if min(lens) < L else None, cache=cache)
        logits = model.logits(hidden[:, -1])
        for i, (g, n) in enumerate(zip(groups, lens)):
            if self.prefix_cache_tokens > 0 and self.min_prefix <= n <= self.prefix_cache_tokens:
                self._remember(tuple(g.prompt), cache if len(groups) == 1 else self._copy_out(cache, i, n))
        return dict(zip(groups, logits)), {g: (cache, i) for i, g in enumerate(groups)}

    def _copy_prefix(self, entry: KVCache, cache: KVCache, row: int, at: int, n: int) -> None:
        """The first n tokens of a prefix-cache entry into row `row` of `cache`, from slot `at` on (a ring: the
        entry's ring as it is, which holds the positions before n where `_lookup` allowed it)."""
        offset = self.offset
        for layer in range(len(cache.k)):
            for mine, theirs in ((cache.k[layer], entry.k[layer]), (cache.v[layer], entry.v[layer])):
                if cache.rings[layer] is not None:
                    mine[row] = theirs[0]
                else:
                    mine[row, :, at:at + n] = theirs[0, :, offset:offset + n]

    def _copy_out(self, cache: KVCache, row: int, n: int) -> KVCache:
        """A one-row cache holding row `row`'s virtual tokens and its last n tokens."""
        out = self._new_cache(1, self.offset + n)
        end = cache.max_len if cache is not self.cache else self.col
        for layer in range(len(cache.k)):
            for mine, theirs in ((out.k[layer], cache.k[layer]), (out.v[layer], cache.v[layer])):
                if cache.rings[layer] is not None:  # indexed by position: the row's ring as it is
                    mine[0] = theirs[row]
                    continue
                mine[0, :, :self.offset] = theirs[row, :, :self.offset]
                mine[0, :, self.offset:] = theirs[row, :, end - n:end]
        out.advance(self.offset + n)
        return out

    def _release(self) -> None:
        """Free the slots of rows that ended: the last running rows move into them."""
        if not any(r.done for r in self.rows):
            return
        alive = [r for r in self.rows if not r.done]
        m = len(alive)
        holes = [i for i in range(m) if self.rows[i].done]
        movers = [i for i in range(m, len(self.rows)) if not self.rows[i].done]
        if holes:
            self._move(holes, movers)
            for d, s in zip(holes, movers):
                self.rows[d] = self.rows[s]
        self.mask[m:len(self.rows), self.offset:] = 0
        self.rows = self.rows[:m]
        if not self.rows:
            self.col = self.offset
        self._update_flags()

    def _move(self, dst: list[int], src: list[int]) -> None:
        d, s = torch.tensor(dst, device=self.device), torch.tensor(src, device=self.device)
        col = self.col
        if self.cache is not None:
            for k, v, ring in zip(self.cache.k, self.cache.v, self.cache.rings):
                for t in (k, v):
                    if ring is not None:  # the whole ring: its slots are positions, not columns
                        t[d] = t[s]
                    else:
                        t[d, :, :col] = t[s, :, :col]
        for t in (self.mask, self.ids):
            if t is not None:
                t[d, :col] = t[s, :col]
        self.last[d] = self.last[s]
        self.positions[d] = self.positions[s]
        self.sampler.move(dst, src)

    def _shift(self, by: int) -> None:
        """Move every running row right by `by` slots (a longer prompt joins)."""
        n, a, b = len(self.rows), self.offset, self.col
        self._slide(n, a, b, a + by)
        self.col += by

    def _compact(self) -> None:
        """Move every running row left by the padding they all share (the shared column reached the end)."""
        n, a = len(self.rows), self.offset
        shared = min(self.col - a - r.fed for r in self.rows)
        assert shared > 0, "a row outgrew its budget"
        self._slide(n, a + shared, self.col, a)
        self.col -= shared
        self._update_flags()

    def _slide(self, n: int, start: int, end: int, to: int) -> None:
        """Slots start..end-1 of the first n rows move to `to`; the slots they leave are no longer the rows'."""
        # a ring is indexed by position, which a shift does not change
        tensors = [] if self.cache is None else [t for ts, ring in zip(zip(self.cache.k, self.cache.v),
                                                                       self.cache.rings) if ring is None for t in ts]
        for t in tensors:
            t[:n, :, to:to + end - start] = t[:n, :, start:end].clone()
        for t in (self.mask, self.ids):
            if t is not None:
                t[:n, to:to + end - start] = t[:n, start:end].clone()
        if to > start:  # right: the slots before the rows are padding now
            self.mask[:n, start:to] = 0
        else:
            self.mask[:n, to + end - start:end] = 0

    def _update_flags(self) -> None:
        self.padded = any(self.col - self.offset - r.fed > 0 for r in self.rows)
        self.constrained = any(r.group.constraint is not None for r in self.rows)
        self.logprobs = any(r.group.logprobs >= 0 for r in self.rows)

    def fail(self) -> None:
        """After a step raised: end every running and admitted request with "error" and start empty."""
        groups = {id(r.group): r.group for r in self.rows} | {id(g): g for g in self._admitting}
        for group in groups.values():
            if group in self.waiting:
                self.waiting.remove(group)
            group.pending = []
            group.kv = group.logits = None
            for row in group.rows:
                if not row.done:
                    self._finish(row, "error")
        self.rows, self._admitting = [], []
        self.col = self.offset
        self.mask[:, self.offset:] = 0
        self._update_flags()

    # --- the prefix cache -----------------------------------------------------------------------------------------
    def _lookup(self, prompt: list[int]) -> tuple[KVCache | None, int]:
        """The cached entry sharing the longest prefix with `prompt` (at least min_prefix tokens, and one short of
        the whole prompt, whose last logits are needed) and that prefix's length. With rings (sliding layers), an
        entry longer than the smallest window serves only a prompt that begins with all of it: its rings hold its
        last positions and have overwritten the earlier ones a shorter prefix would need."""
        if self.prefix_cache_tokens <= 0 or not self.prefixes:
            return None, 0
        smallest = min((w for w in self.cache.rings if w), default=None)
        best, best_key = 0, None
        for key in self.prefixes:
            n = min(len(key), len(prompt) - 1)
            i = 0
            while i < n and key[i] == prompt[i]:
                i += 1
            if smallest is not None and i < len(key) and len(key) > smallest:
                continue
            if i > best:
                best, best_key = i, key
        if best < self.min_prefix:
            return None, 0
        self.prefixes.move_to_end(best_key)
        return self.prefixes[best_key], best

    def _remember(self, key: tuple[int, ...], kv: KVCache) -> None:
        self.prefixes[key] = kv
        self.prefixes.move_to_end(key)
        while sum(len(k) for k in self.prefixes) > self.prefix_cache_tokens:
            self.prefixes.popitem(last=False)

    def _remember_reply(self, row: _Row) -> None:
        """Keep a finished row's prompt + reply (a conversation's next turn begins with them), in place of its
        prompt's entry."""
        fed = row.fed
        if (self.prefix_cache_tokens <= 0 or len(row.tokens) < 2 or fed > self.prefix_cache_tokens
                or row not in self.rows):
            return
        slot = self.rows.index(row)
        self.prefixes.pop(tuple(row.group.prompt), None)
        self._remember(tuple((row.group.prompt + row.tokens)[:fed]), self._copy_out(self.cache, slot, fed))
