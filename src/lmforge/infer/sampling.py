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
