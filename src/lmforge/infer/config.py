"""The continuous batcher's settings (infer/batching.py), apart from its torch code so that `lmforge serve` builds its
flags from them at start-up (config.py's `add_field_arg`); the batcher's and the server's keyword defaults are these."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class BatchingConfig:
    """How many requests run and wait at once, and how much prompt one step prefills."""

    max_batch: int = field(default=8, metadata={"help": "requests decoded together"})
    max_queue: int = field(default=64, metadata={"help": "requests waiting for a slot before 429s"})
    max_prefill_tokens: int = field(default=256, metadata={
        "help": "prompt tokens prefilled per step: a longer prompt is prefilled in chunks of N between the running "
                "streams' tokens (chunked prefill); 0: no bound, each prompt in one forward"})
