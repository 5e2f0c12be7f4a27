"""Continuous batching: requests join and leave one running batch between decode steps, so a new request never
waits for a long one to finish. The server (lmforge serve) drives it; it reuses the engine's sampling, stop rules
and streaming detokenization (infer/engine.py, infer/sampling.py).

Layout. One KV cache of `max_batch` rows x `context` slots. Every running request owns one row, and all rows
write their next token into the same slot column `col`: a request's tokens fill the slots just before `col`
(left padding, its own positions counted from 0). A new request is prefilled alone (batch 1, its own cache),
samples its first token at once (time to first token = one prefill), and its keys and values are copied into a
free row, ending at `col`; if its prompt is longer than `col`, the running rows shift right first. When `col`
reaches the end of the cache, every row shifts left by the padding they all share. A finished row is replaced
by the last running row, so the running rows are always the first `n` and a step computes nothing for empty
rows.

Each request keeps its own sampling settings and seed (`torch.Generator`), stop ids, stop strings (text held
back until it cannot begin one), presence / frequency penalties, max_new_tokens, optional log-probabilities of
the chosen and top tokens, and can be cancelled at any time (a client that disconnects). The queue of requests
waiting for a row is bounded: `submit` raises QueueFull, which the server answers with 429. Recent prompts' keys and
values are kept (up to `prefix_cache_tokens`): a prompt that begins like one of them, a shared system prompt or the
earlier turns of a conversation, prefills only what is new.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lmforge.infer.engine import _TextState
from lmforge.infer.sampling import SamplingConfig, sample_tokens
from lmforge.model.transformer import KVCache, Transformer
from lmforge.peft import virtual_tokens

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """Every row is busy and the waiting queue is at its bound."""


@dataclass
class Event:
    """New text of a request. `finish_reason` is set on its last event: "stop" (a stop id or string), "length"
    (max_new_tokens or the context), "cancelled", or "error" (the step failed; the server logs why). `logprob` /
    `top_logprobs` (token id, log-probability) are set for the step's token when the request asked for them."""

    text: str
    token_id: int | None = None
    finish_reason: str | None = None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


@dataclass
class _Row:
    prompt: list[int]
    cfg: SamplingConfig
    emit: Callable[[Event], None]
    logprobs: int  # top log-probabilities to report per token (0: the chosen token's only; -1: none)
    presence: float
    frequency: float
    text: _TextState
    generator: torch.Generator | None
    stops: set[int]
    tokens: list[int] = field(default_factory=list)
    constraint: object | None = None  # infer/constrain.py: what the text must stay a prefix of (JSON)
    raw: bytes = b""  # the generated tokens' bytes (the constraint reads them as text)
    n: int = 0  # tokens of this request in the cache
    cancelled: bool = False
    done: bool = False
    submitted: float = field(default_factory=time.perf_counter)
    first_token_s: float | None = None


class Handle:
    """What `submit` returns: `cancel()` ends the request at the next step (its last event says "cancelled")."""

    def __init__(self, row: _Row):
        self._row = row

    def cancel(self) -> None:
        self._row.cancelled = True


class _View(KVCache):
    """The first `n` rows of the shared cache, filled up to `length` (a view: writes land in the shared tensors)."""

    def __init__(self, parent: KVCache, n: int, length: int):  # no super().__init__(): it would allocate
        self.k = [k[:n] for k in parent.k]
        self.v = [v[:n] for v in parent.v]
        self._length, self.max_len, self.static = length, parent.max_len, False
        self.pos = parent.pos


class ContinuousBatcher:
    """Run requests through one model with continuous batching, on a background thread (`start()`)."""

    def __init__(self, model: Transformer, tokenizer, max_batch: int = 8, max_queue: int = 64,
                 context: int | None = None, prefix_cache_tokens: int = 16384, min_prefix: int = 16):
        if virtual_tokens(model):
            raise ValueError("the continuous batcher serves models without virtual tokens; generate with a prompt- or "
                             "prefix-tuned model through lmforge.infer.generate")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.context = min(context or model.cfg.max_seq_len, model.cfg.max_seq_len)
        device, dtype = model.embed.weight.device, model.embed.weight.dtype
        self.device = device
        self.cache = KVCache(model.cfg, max_batch, self.context, device=device, dtype=dtype)
        self.col = 0
        self.rows: list[_Row] = []
        self.waiting: collections.deque[_Row] = collections.deque()
        self.cond = threading.Condition()
        self.thread: threading.Thread | None = None
        self.stopping = False
        # counters for /metrics
        self.stats = {"requests": 0, "tokens": 0, "steps": 0, "rejected": 0, "prefill_tokens": 0}
        self.ttft: collections.deque[float] = collections.deque(maxlen=1000)
        self.finished: dict[str, int] = {}  # requests finished, by reason
        self.recent: collections.deque[float] = collections.deque(maxlen=100_000)  # when the last tokens came
        # prefix cache: the keys and values of recent prompts (batch-1 caches), so a prompt that begins like one of
        # them (a shared system prompt, a conversation's earlier turns) prefills only the rest; bounded in tokens
        self.prefixes: collections.OrderedDict[tuple[int, ...], KVCache] = collections.OrderedDict()
        self.prefix_cache_tokens, self.min_prefix = prefix_cache_tokens, min_prefix
        self.stats |= {"prefix_hits": 0, "prefix_tokens_reused": 0}

    # --- the caller's side --------------------------------------------------------------------------------------
    def submit(self, prompt: Sequence[int], cfg: SamplingConfig, emit: Callable[[Event], None],
               logprobs: int = -1, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
               constraint=None) -> Handle:
        """Queue a request; `emit(event)` is called on the batcher's thread for each piece of text. `constraint`
        (infer/constrain.JSONConstraint) restricts the tokens to those that keep the text a valid prefix."""
        prompt = list(prompt)
        if not prompt:
            raise ValueError("the prompt has no tokens")
        if len(prompt) >= self.context:
            raise ValueError(f"the prompt ({len(prompt)} tokens) does not fit the {self.context}-token context")
        gen = torch.Generator(device=self.device).manual_seed(cfg.seed) if cfg.seed is not None else None
        row = _Row(prompt, cfg, emit, logprobs, presence_penalty, frequency_penalty,
                   _TextState(self.tokenizer, cfg.stop_strings), gen, set(cfg.stop_token_ids), constraint=constraint)
        with self.cond:
            if len(self.waiting) >= self.max_queue:
                self.stats["rejected"] += 1
                raise QueueFull(f"{len(self.waiting)} requests are waiting (the bound is {self.max_queue})")
            self.waiting.append(row)
            self.stats["requests"] += 1
            self.cond.notify()
        return Handle(row)

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def running(self) -> int:
        return len(self.rows)

    def start(self) -> ContinuousBatcher:
        if self.thread is None:
            self.thread = threading.Thread(target=self._loop, name="lmforge-batcher", daemon=True)
            self.thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Let running requests finish for up to `timeout` seconds, then cancel what is left."""
        deadline = time.monotonic() + timeout
        with self.cond:
            self.stopping = True
            self.cond.notify()
        while self.thread is not None and self.thread.is_alive() and time.monotonic() < deadline:
            self.thread.join(0.05)
        for row in list(self.rows) + list(self.waiting):
            row.cancelled = True
        if self.thread is not None:
            self.thread.join(5.0)

    # --- the batcher's thread -----------------------------------------------------------------------------------
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self.cond:
                while not self.waiting and not self.rows:
                    if self.stopping:
                        return
                    self.cond.wait()
                if self.stopping and not self.rows and not self.waiting:
                    return
                admit = []
                while self.waiting and len(self.rows) + len(admit) < self.max_batch:
                    admit.append(self.waiting.popleft())
            try:
                for row in admit:
                    if row.cancelled:
                        self._finish(row, "cancelled")
                    else:
                        self._admit(row)
                if self.rows:
                    self._step()
            except Exception:  # a bug or an out-of-memory must not stop serving: fail what was running, go on
                log.exception("the batcher failed a step; its requests end with finish_reason 'error'")
                for row in admit + self.rows:
                    if not row.done:
                        self._finish(row, "error")
                self.rows, self.col = [], 0

    def _finish(self, row: _Row, reason: str, text: str = "", token: int | None = None, lp=None, top=None) -> None:
        row.done = True
        self.finished[reason] = self.finished.get(reason, 0) + 1
        rest, _ = row.text.flush() if reason not in ("cancelled", "error") else ("", False)
        row.emit(Event(text + rest, token, reason, lp, top))

    def _logprobs(self, row: _Row, logp: torch.Tensor, token: int):
        if row.logprobs < 0:
            return None, None
        chosen = float(logp[token])
        if row.logprobs == 0:
            return chosen, None
        values, ids = logp.topk(row.logprobs)
        return chosen, list(zip(ids.tolist(), values.tolist()))

    def _penalise(self, logits: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
        """OpenAI's presence and frequency penalties: logit -= presence * [count > 0] + frequency * count."""
        for i, row in enumerate(rows):
            if (row.presence or row.frequency) and row.tokens:
                ids, counts = torch.unique(torch.tensor(row.tokens, device=logits.device), return_counts=True)
                logits[i, ids] -= row.presence + row.frequency * counts.to(logits.dtype)
        return logits

    def _token_bytes(self, token: int) -> bytes:
        raw = self.tokenizer.raw_bytes([token])
        return raw if raw is not None else self.tokenizer.decode([token]).encode("utf-8")

    def _constrain(self, logits: torch.Tensor, row: _Row, keep: int) -> torch.Tensor:
        """-inf for every token that would break the row's constraint, best logits checked first until `keep`
        allowed ones are found (1 for greedy); a stop token only once the text is complete."""
        allowed: list[int] = []
        order = torch.argsort(logits, descending=True).tolist()
        complete = row.constraint.complete(row.raw.decode("utf-8", "replace"))
        for t in order:
            if t in row.stops:
                ok = complete
            else:
                ok = row.constraint.prefix_ok((row.raw + self._token_bytes(t)).decode("utf-8", "replace"))
            if ok:
                allowed.append(t)
                if len(allowed) >= keep:
                    break
        if not allowed:  # nothing can continue the text (a gap in the constraint): end it, and say so in the log
            log.warning("constrained decoding reached a dead end after %r; ending the reply", row.raw[-40:])
            allowed = sorted(row.stops)[:1] or order[:1]
        out = torch.full_like(logits, float("-inf"))
        out[allowed] = logits[allowed]
        return out

    def _sample(self, logits: torch.Tensor, rows: list[_Row]) -> list[int]:
        logits = self._penalise(logits.float(), rows)
        for i, row in enumerate(rows):
            if row.constraint is not None:
                keep = 1 if row.cfg.temperature == 0 else max(row.cfg.top_k or 0, 40)
                logits[i] = self._constrain(logits[i], row, keep)
        previous = [torch.tensor(r.prompt + r.tokens, device=logits.device) if r.cfg.repetition_penalty != 1.0
                    else None for r in rows]
        return sample_tokens(logits, [r.cfg for r in rows], [r.generator for r in rows], previous).tolist()

    def _accept(self, row: _Row, token: int, logp: torch.Tensor | None) -> bool:
        """Record one sampled token, emit its text; True while the request goes on."""
        row.tokens.append(token)
        self.stats["tokens"] += 1
        self.recent.append(time.perf_counter())
        if row.first_token_s is None:
            row.first_token_s = time.perf_counter() - row.submitted
            self.ttft.append(row.first_token_s)
        lp, top = self._logprobs(row, logp, token) if logp is not None else (None, None)
        if row.cancelled:
            self._finish(row, "cancelled")
            return False
        if token in row.stops:
            self._finish(row, "stop", token=token, lp=lp, top=top)
            return False
        piece, stopped = row.text.push(token)
        if stopped:
            self._finish(row, "stop", piece, token, lp, top)
            return False
        if row.constraint is not None:  # the document is whole: the reply ends here
            row.raw += self._token_bytes(token)
            if row.constraint.complete(row.raw.decode("utf-8", "replace")):
                self._finish(row, "stop", piece, token, lp, top)
                return False
        if len(row.tokens) >= row.cfg.max_new_tokens or len(row.prompt) + len(row.tokens) >= self.context:
            self._finish(row, "length", piece, token, lp, top)
            return False
        row.emit(Event(piece, token, None, lp, top))
        return True

    def _admit(self, row: _Row) -> None:
        """Prefill alone, sample the first token, then move the request's keys and values into a free row."""
        model, p = self.model, len(row.prompt)
        if row.cfg.max_new_tokens <= 0:
            self._finish(row, "length")
            return
        one = KVCache(model.cfg, 1, p, device=self.device, dtype=self.cache.k[0].dtype)
        reused = self._reuse_prefix(row.prompt, one)
        logits = model.logits(model(torch.tensor([row.prompt[reused:]], device=self.device), cache=one)[:, -1])
        self.stats["prefill_tokens"] += p - reused
        self._remember_prefix(row.prompt, one)
        token = self._sample(logits, [row])[0]
        logp = F.log_softmax(logits[0].float(), -1) if row.logprobs >= 0 else None
        if not self._accept(row, token, logp):
            return
        n = len(self.rows)
        if self.col < p:  # the running rows move right so the new prompt ends at the shared column (p < context)
            shift = p - self.col
            for k, v in zip(self.cache.k, self.cache.v):
                k[:n, :, shift:shift + self.col] = k[:n, :, :self.col].clone()
                v[:n, :, shift:shift + self.col] = v[:n, :, :self.col].clone()
            self.col = p
        for layer in range(model.cfg.n_layers):
            self.cache.k[layer][n, :, self.col - p:self.col] = one.k[layer][0]
            self.cache.v[layer][n, :, self.col - p:self.col] = one.v[layer][0]
        row.n = p
        self.rows.append(row)

    def _reuse_prefix(self, prompt: list[int], one: KVCache) -> int:
        """Copy the longest cached prefix of `prompt` (at least min_prefix tokens, and one token short of the whole
        prompt, whose last logits are needed) into `one`; returns how many tokens it holds."""
        if self.prefix_cache_tokens <= 0 or not self.prefixes:
            return 0
        best, best_key = 0, None
        for key in self.prefixes:
            n = min(len(key), len(prompt) - 1)
            i = 0
            while i < n and key[i] == prompt[i]:
                i += 1
            if i > best:
                best, best_key = i, key
        if best < self.min_prefix:
            return 0
        src = self.prefixes[best_key]
        self.prefixes.move_to_end(best_key)
        for layer in range(self.model.cfg.n_layers):
            one.k[layer][:, :, :best] = src.k[layer][:, :, :best]
            one.v[layer][:, :, :best] = src.v[layer][:, :, :best]
        one.advance(best)
        self.stats["prefix_hits"] += 1
        self.stats["prefix_tokens_reused"] += best
        return best

    def _remember_prefix(self, prompt: list[int], one: KVCache) -> None:
        if self.prefix_cache_tokens <= 0 or len(prompt) < self.min_prefix or len(prompt) > self.prefix_cache_tokens:
            return
        self.prefixes[tuple(prompt)] = one
        self.prefixes.move_to_end(tuple(prompt))
        while sum(len(k) for k in self.prefixes) > self.prefix_cache_tokens:
            self.prefixes.popitem(last=False)

    def _compact(self) -> None:
        """Shift every row left by the padding they all share, so the shared column moves back."""
        m = min(self.col - r.n for r in self.rows) if self.rows else self.col
        if m:
            n = len(self.rows)
            for k, v in zip(self.cache.k, self.cache.v):
                k[:n, :, :self.col - m] = k[:n, :, m:self.col].clone()
                v[:n, :, :self.col - m] = v[:n, :, m:self.col].clone()
            self.col -= m

    def _step(self) -> None:
        """One token for every running row."""
        if self.col >= self.context:
            self._compact()
        if self.col >= self.context:  # a row fills the whole context: it ends there
            for row in [r for r in self.rows if r.n >= self.context]:
                self._finish(row, "length")
            self._drop_done()
            if not self.rows:
                return
        rows, n, col = self.rows, len(self.rows), self.col
        tokens = torch.tensor([[r.tokens[-1]] for r in rows], device=self.device)
        positions = torch.tensor([[r.n] for r in rows], device=self.device)
        mask = torch.zeros(n, col + 1, dtype=torch.long, device=self.device)
        for i, r in enumerate(rows):
            mask[i, col - r.n:] = 1
        logits = self.model.logits(self.model(tokens, positions=positions, attention_mask=mask,
                                              cache=_View(self.cache, n, col))[:, -1])
        self.col += 1
        self.stats["steps"] += 1
        for r in rows:
            r.n += 1
        sampled = self._sample(logits, rows)
        logp = F.log_softmax(logits.float(), -1) if any(r.logprobs >= 0 for r in rows) else None
        for i, (row, token) in enumerate(zip(rows, sampled)):
            if row.cancelled:
                self._finish(row, "cancelled")
            else:
                self._accept(row, token, logp[i] if logp is not None else None)
        self._drop_done()

    def _drop_done(self) -> None:
        """Remove finished rows; the last running row takes a freed row's place (its cache row is copied)."""
        i = 0
        while i < len(self.rows):
            if self.rows[i].done:
                last = len(self.rows) - 1
                if i != last:
                    for k, v in zip(self.cache.k, self.cache.v):
                        k[i, :, :self.col] = k[last, :, :self.col]
                        v[i, :, :self.col] = v[last, :, :self.col]
                    self.rows[i] = self.rows[last]
                self.rows.pop()
            else:
                i += 1
        if not self.rows:
            self.col = 0

    def metrics(self) -> dict:
        """Counters and gauges for /metrics."""
        ttft = sorted(self.ttft)
        q = (lambda f: ttft[min(int(f * len(ttft)), len(ttft) - 1)]) if ttft else (lambda f: math.nan)
        now = time.perf_counter()
        last_10s = sum(1 for t in list(self.recent) if now - t <= 10.0)
        return self.stats | {"queue_depth": self.queue_depth, "running": self.running, "ttft_p50_s": q(0.5),
                             "tokens_per_s_10s": last_10s / 10.0,
                             "ttft_p99_s": q(0.99), "finished": dict(self.finished)}
