"""Sampling: the settings of one request and the logit processing that turns a step's logits into a token.

Logit processing follows transformers' order and definitions so seeded results are comparable: repetition
penalty (Keskar et al. 2019) -> temperature -> top-k -> top-p (nucleus, Holtzman et al. 2020) -> min-p (Nguyen
et al. 2024). Every row of a batch may have its own settings and seed (`sample_tokens`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where logits are processed: the CLI reads SamplingConfig without it
    import torch


@dataclass
class SamplingConfig:
    max_new_tokens: int = field(default=128, metadata={"help": "tokens to generate at most"})
    temperature: float = field(default=1.0, metadata={"help": "0 = greedy"})
    top_k: int = field(default=0, metadata={"help": "keep the k most likely tokens (0 = off)"})
    top_p: float = field(default=1.0, metadata={"help": "keep the smallest set with this probability mass"})
    min_p: float = field(default=0.0, metadata={"help": "drop tokens below min_p x the top probability"})
    repetition_penalty: float = field(default=1.0, metadata={"help": "> 1 discourages repeating tokens"})
    stop_token_ids: list[int] = field(default_factory=list, metadata={"help": "token ids that end a sequence"})
    stop_strings: list[str] = field(default_factory=list, metadata={"help": "strings that end a sequence"})
    seed: int | None = field(default=None, metadata={"help": "fixes sampling"})

    def __post_init__(self):
        checks = [(self.max_new_tokens >= 0, "max_new_tokens must be >= 0"),
                  (self.temperature >= 0, "temperature must be >= 0"),
                  (self.top_k >= 0, "top_k must be >= 0"), (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
                  (0 <= self.min_p < 1, "min_p must be in [0, 1)"),
                  (self.repetition_penalty > 0, "repetition_penalty must be > 0")]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


def process_logits(logits: torch.Tensor, previous: torch.Tensor | None, cfg: SamplingConfig) -> torch.Tensor:
    """Apply penalty, temperature and filters to (B, V) logits; filtered entries become -inf."""
    import torch

    logits = logits.float()
    if cfg.repetition_penalty != 1.0 and previous is not None and previous.numel():
        logits = apply_repetition_penalty(logits, previous, cfg.repetition_penalty)
    if cfg.temperature > 0 and cfg.temperature != 1.0:
        logits = logits / cfg.temperature
    if cfg.top_k > 0 and cfg.top_k < logits.shape[-1]:
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        remove = cumulative <= (1 - cfg.top_p)
        remove[:, -1] = False  # always keep the most likely token
        logits = logits.masked_fill(remove.scatter(1, order, remove), float("-inf"))
    if cfg.min_p > 0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < cfg.min_p * probs.max(-1, keepdim=True).values, float("-inf"))
    return logits


def apply_repetition_penalty(logits: torch.Tensor, previous: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty on (B, V) logits for the ids in `previous` (B, L): positive logits / penalty, negative * penalty."""
    import torch

    seen = torch.gather(logits, 1, previous)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter(1, previous, seen)


def _filter_key(cfg: SamplingConfig) -> tuple:
    return (cfg.temperature, cfg.top_k, cfg.top_p, cfg.min_p)


def sample_tokens(logits: torch.Tensor, configs: Sequence[SamplingConfig], generators: Sequence[torch.Generator | None],
                  previous: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """One token per row of (B, V) logits, each row with its own settings, generator (a seeded request's own; None:
    torch's global one) and previous ids (1-D, for the repetition penalty; None when it is off)."""
    import torch

    logits = logits.float()
    rows_by_key: dict[tuple, list[int]] = {}
    for r, cfg in enumerate(configs):
        if cfg.repetition_penalty != 1.0 and previous[r] is not None and previous[r].numel():
            logits[r:r + 1] = apply_repetition_penalty(logits[r:r + 1], previous[r][None], cfg.repetition_penalty)
        rows_by_key.setdefault(_filter_key(cfg), []).append(r)
    out = torch.empty(len(configs), dtype=torch.long, device=logits.device)
    for rows in rows_by_key.values():  # rows with the same filters are processed together
        cfg = configs[rows[0]]
        index = torch.tensor(rows, device=logits.device)
        processed = process_logits(logits.index_select(0, index), None, cfg)
        if cfg.temperature == 0:
            out[index] = processed.argmax(-1)
            continue
        probs = processed.softmax(-1)
        for i, r in enumerate(rows):
            out[r] = torch.multinomial(probs[i], 1, generator=generators[r])[0]
    return out


class RowSampler:
    """The sampling state of a batch's rows (slots 0..capacity-1), kept as tensors so that a step samples every row
    with a few tensor ops: each slot's settings, its seeded generator, the ids it has seen (the repetition penalty
    reads the prompt and the reply) and how often it generated each id (OpenAI's presence / frequency penalties
    count the reply only). The scheduler sets a slot when a request takes it and moves slots when rows leave.

    The result equals `sample_tokens` on the same logits: the same processing in transformers' order, rows with
    equal filters processed together, and each seeded row drawing from its own generator (so a request gets the
    tokens it gets alone); unseeded rows draw together from torch's global generator.
    """

    def __init__(self, capacity: int, vocab_size: int, device):
        import torch

        self.capacity, self.vocab_size, self.device = capacity, vocab_size, device
        self.configs: list[SamplingConfig | None] = [None] * capacity
        self.generators: list[torch.Generator | None] = [None] * capacity
        self.counted = [False] * capacity  # the slot has presence / frequency penalties
        self.repetition = torch.ones(capacity, device=device)
        self.presence = torch.zeros(capacity, device=device)
        self.frequency = torch.zeros(capacity, device=device)
        self.seen: torch.Tensor | None = None  # (capacity, vocab) bool, once a row has a repetition penalty
        self.counts: torch.Tensor | None = None  # (capacity, vocab) float, once a row has presence / frequency
        self._plans: dict[tuple[int, int], _Plan] = {}  # (start, end) -> what sampling those slots takes

    def set(self, slot: int, cfg: SamplingConfig, prompt: Sequence[int], presence: float = 0.0,
            frequency: float = 0.0, generator: torch.Generator | None = None) -> None:
        """Slot `slot` now samples for a request with `cfg` whose prompt is `prompt`."""
        import torch

        self.configs[slot], self.generators[slot] = cfg, generator
        self.counted[slot] = bool(presence or frequency)
        self.repetition[slot], self.presence[slot], self.frequency[slot] = cfg.repetition_penalty, presence, frequency
        if cfg.repetition_penalty != 1.0:
            if self.seen is None:
                self.seen = torch.zeros(self.capacity, self.vocab_size, dtype=torch.bool, device=self.device)
            self.seen[slot] = False
            if len(prompt):
                self.seen[slot, torch.as_tensor(list(prompt), device=self.device)] = True
        if self.counted[slot]:
            if self.counts is None:
                self.counts = torch.zeros(self.capacity, self.vocab_size, device=self.device)
            self.counts[slot] = 0
        self._plans.clear()

    def move(self, dst: list[int], src: list[int]) -> None:
        """Slots `src` move to slots `dst` (the rows that stay take the places of the rows that left)."""
        import torch

        for d, s in zip(dst, src):
            self.configs[d], self.generators[d], self.counted[d] = self.configs[s], self.generators[s], self.counted[s]
        d, s = torch.tensor(dst, device=self.device), torch.tensor(src, device=self.device)
        for t in (self.repetition, self.presence, self.frequency, self.seen, self.counts):
            if t is not None:
                t[d] = t[s]
        self._plans.clear()

    def _plan(self, start: int, end: int) -> _Plan:
        """Slots start..end-1: their groups of equal filters and which penalties apply (kept until slots change)."""
        import torch

        key = (start, end)
        if key not in self._plans:
            by: dict[tuple, list[int]] = {}
            for r in range(start, end):
                by.setdefault(_filter_key(self.configs[r]), []).append(r)
            groups = [(self.configs[rows[0]], torch.tensor([r - start for r in rows], device=self.device), rows)
                      for rows in by.values()]
            self._plans[key] = _Plan(groups, any(self.counted[start:end]),
                                     any(self.configs[r].repetition_penalty != 1.0 for r in range(start, end)))
        return self._plans[key]

    def penalise(self, logits: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """OpenAI's presence / frequency penalties (logit -= presence * [count > 0] + frequency * count), then the
        repetition penalty, on the float32 (n, V) logits of slots start..end-1."""
        import torch

        plan = self._plan(start, end)
        if plan.counted:
            counts = self.counts[start:end]
            logits = logits - (self.presence[start:end, None] * (counts > 0) + self.frequency[start:end, None] * counts)
        if plan.repeated:
            penalty = self.repetition[start:end, None]
            logits = torch.where(self.seen[start:end], torch.where(logits > 0, logits / penalty, logits * penalty),
                                 logits)
        return logits

    def sample(self, logits: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """One token for each of slots start..end-1 from its float32 (n, V) logits, penalties already applied
        (`penalise`): temperature and filters by groups of equal settings, then argmax (temperature 0) or a draw."""
        import torch

        out = None
        for cfg, index, slots in self._plan(start, end).groups:
            whole = len(slots) == end - start
            processed = process_logits(logits if whole else logits.index_select(0, index), None, cfg)
            if cfg.temperature == 0:
                picked = processed.argmax(-1)
            else:
                probs = processed.softmax(-1)
                if all(self.generators[s] is None for s in slots):  # torch's global generator: one draw for all
                    picked = torch.multinomial(probs, 1)[:, 0]
                else:
                    picked = torch.cat([torch.multinomial(probs[i], 1, generator=self.generators[s])
                                        for i, s in enumerate(slots)])
            if whole:
                return picked
            if out is None:
                out = torch.empty(end - start, dtype=torch.long, device=logits.device)
            out[index] = picked
        return out

    def observe(self, tokens: torch.Tensor, start: int, end: int) -> None:
        """Slots start..end-1 generated `tokens` (n,): the penalties see them from the next step on."""
        import torch

        plan = self._plan(start, end)
        if plan.repeated or plan.counted:
            rows = torch.arange(start, end, device=tokens.device)
            if plan.repeated:
                self.seen[rows, tokens] = True
            if plan.counted:
                self.counts.index_put_((rows, tokens), torch.ones_like(tokens, dtype=self.counts.dtype),
                                       accumulate=True)


@dataclass
class _Plan:
    groups: list  # (config, indices within the rows, slots) per group of equal filters
    counted: bool  # some row has presence / frequency penalties
    repeated: bool  # some row has a repetition penalty
