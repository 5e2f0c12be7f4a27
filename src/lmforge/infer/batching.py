"""Continuous batching for the server: the scheduler (infer/scheduler.py) stepping on a background thread while
requests arrive from other threads, so a new request never waits for a long one to finish.

Requests join the running batch between steps and leave it when they finish or their client goes (`Handle.cancel`).
The queue of requests waiting for a row is bounded: `submit` raises QueueFull, which the server answers with 429.
Recent prompts' and replies' keys and values are kept (up to `prefix_cache_tokens`): a prompt that begins like one
of them, a shared system prompt or the earlier turns of a conversation, prefills only what is new. A step that
raises (a bug, out of memory) ends the requests it held with finish_reason "error" and serving goes on.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence

import torch

from lmforge.infer.config import BatchingConfig
from lmforge.infer.sampling import SamplingConfig
from lmforge.infer.scheduler import Event, Group, Scheduler
from lmforge.model.transformer import Transformer

log = logging.getLogger(__name__)

__all__ = ["ContinuousBatcher", "Event", "Handle", "QueueFull"]


class QueueFull(RuntimeError):
    """Every row is busy and the waiting queue is at its bound."""


class Handle:
    """What `submit` returns: `cancel()` ends the request at the next step (its last events say "cancelled")."""

    def __init__(self, group: Group):
        self.group = group

    def cancel(self) -> None:
        self.group.cancel()


class ContinuousBatcher:
    """Run requests through one model with continuous batching, on a background thread (`start()`). `max_batch`
    rows decode together over a KV cache of `context` slots each; `max_queue` requests may wait; `max_prefill_tokens`
    bounds the prompt tokens one step prefills: prompts admitted together, or one chunk of a longer prompt (chunked
    prefill: a long prompt or a burst of them would otherwise stall every running stream for one long forward)."""

    def __init__(self, model: Transformer, tokenizer, max_batch: int = BatchingConfig.max_batch,
                 max_queue: int = BatchingConfig.max_queue, context: int | None = None,
                 prefix_cache_tokens: int = 16384, min_prefix: int = 16,
                 max_prefill_tokens: int = BatchingConfig.max_prefill_tokens):
        self.scheduler = Scheduler(model, tokenizer, capacity=max_batch, context=context,
                                   prefix_cache_tokens=prefix_cache_tokens, min_prefix=min_prefix,
                                   max_prefill_tokens=max_prefill_tokens)
        self.tokenizer, self.max_batch, self.max_queue = tokenizer, max_batch, max_queue
        self.context, self.device = self.scheduler.context, self.scheduler.device
        self.cond = threading.Condition()
        self.thread: threading.Thread | None = None
        self.stopping = False
        self.rejected = 0

    @property
    def model(self):
        return self.scheduler.model

    @model.setter
    def model(self, model) -> None:
        self.scheduler.model = model

    # --- the caller's side --------------------------------------------------------------------------------------
    def submit(self, prompt: Sequence[int], cfg: SamplingConfig | Sequence[SamplingConfig],
               emit: Callable[[Event], None], logprobs: int = -1, presence_penalty: float = 0.0,
               frequency_penalty: float = 0.0, constraint=None) -> Handle:
        """Queue a request with one completion per config (they share the prompt's prefill); `emit(event)` is called
        on the batcher's thread for each piece of text, `event.index` telling the completion. `constraint`
        (infer/constrain.JSONConstraint) restricts the tokens to those that keep the text a valid prefix."""
        with self.cond:
            if len(self.scheduler.waiting) >= self.max_queue:
                self.rejected += 1
                raise QueueFull(f"{len(self.scheduler.waiting)} requests are waiting (the bound is {self.max_queue})")
            group = self.scheduler.add(prompt, cfg, emit=emit, logprobs=logprobs, presence=presence_penalty,
                                       frequency=frequency_penalty, constraint=constraint)
            self.cond.notify()
        return Handle(group)

    @property
    def queue_depth(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def running(self) -> int:
        return len(self.scheduler.rows)

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
        for group in {r.group for r in list(self.scheduler.rows)} | set(list(self.scheduler.waiting)):
            group.cancel()
        if self.thread is not None:
            self.thread.join(5.0)

    # --- the batcher's thread -----------------------------------------------------------------------------------
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        scheduler = self.scheduler
        while True:
            with self.cond:
                while not scheduler.busy:
                    if self.stopping:
                        return
                    self.cond.wait()
            try:
                scheduler.step()  # events go to each request's emit
            except Exception:  # a bug or an out-of-memory must not stop serving: fail what was running, go on
                log.exception("the batcher failed a step; its requests end with finish_reason 'error'")
                scheduler.fail()

    def metrics(self) -> dict:
        """Counters and gauges for /metrics."""
        s = self.scheduler
        ttft = sorted(s.ttft)
        q = (lambda f: ttft[min(int(f * len(ttft)), len(ttft) - 1)]) if ttft else (lambda f: math.nan)
        now = time.perf_counter()
        last_10s = sum(n for t, n in list(s.recent) if now - t <= 10.0)
        return s.stats | {"rejected": self.rejected, "queue_depth": self.queue_depth, "running": self.running,
                          "ttft_p50_s": q(0.5), "ttft_p99_s": q(0.99), "tokens_per_s_10s": last_10s / 10.0,
                          "finished": dict(s.finished)}
