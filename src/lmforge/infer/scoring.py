"""Scoring: the log-probabilities a model gives the tokens of sequences, for everything that reads them (evaluation's
multiple-choice log-likelihoods and perplexity, the server's echo + logprobs).

`score_tokens(model, sequences, starts)` scores each sequence's tokens from `starts[i]` on, each given all the tokens
before it. The work: a sequence is a context (its tokens before `start`) and a continuation; sequences with the same
context (the choices of one question) run it once, into a KV cache batched with other contexts (a prefix that a
batch's contexts share, a few-shot block, runs once for all of them), and only the continuations' own tokens run
after it, batched. A continuation of one token (MMLU's " A".." D") needs no second pass.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmforge.model.transformer import KVCache, Transformer

PREFIX_PROBE = 32  # tokens compared to find contexts that share a few-shot block


@dataclass(frozen=True)
class TokenScores:
    """The scored tokens of one sequence: each one's log-probability (nats), whether it was the most likely token,
    and with `top` the most likely tokens at its position as (id, log-probability)."""

    logprobs: list[float]
    greedy: list[bool]
    top: list[list[tuple[int, float]]] | None = None

    @property
    def total(self) -> float:
        return sum(self.logprobs)


@torch.no_grad()
def score_tokens(model: Transformer, sequences: Sequence[Sequence[int]], starts: Sequence[int], top: int = 0,
                 batch_tokens: int = 8192, batch_size: int = 16,
                 progress: Callable[[list[int]], None] | None = None) -> list[TokenScores]:
    """The log-probabilities of sequences[i][starts[i]:] (starts[i] >= 1: the first token has nothing before it).

    Contexts run longest first in batches of at most `batch_size` contexts and about `batch_tokens` context tokens
    (similar lengths waste little on padding); `progress(indices)` is called after each batch with the sequences it
    scored. A sequence may hold max_seq_len + 1 tokens (its last token is scored, never fed)."""
    max_len = model.cfg.max_seq_len
    units: list[tuple[list[int], list[list[int]], list[int]]] = []  # (context, continuations, sequence indices)
    by_context: dict[tuple[int, ...], int] = {}
    for i, (seq, start) in enumerate(zip(sequences, starts)):
        seq = list(seq)
        if not 1 <= start < len(seq):
            raise ValueError(f"sequence {i}: start {start} leaves no token to score after at least one of context "
                             f"({len(seq)} tokens)")
        if len(seq) > max_len + 1:
            raise ValueError(f"sequence {i}: {len(seq)} tokens is more than the model's {max_len} positions + 1")
        key = tuple(seq[:start])
        if key not in by_context:
            by_context[key] = len(units)
            units.append((seq[:start], [], []))
        units[by_context[key]][1].append(seq[start:])
        units[by_context[key]][2].append(i)
    out: list[TokenScores | None] = [None] * len(sequences)
    # few-shot prompts share their examples: contexts whose first PREFIX_PROBE tokens recur are kept together (the
    # batch then runs that prefix once), the rest longest first (little padding)
    probe = Counter(tuple(u[0][:PREFIX_PROBE]) for u in units if len(u[0]) > PREFIX_PROBE)

    def key(u: int):
        ctx = units[u][0]
        head = tuple(ctx[:PREFIX_PROBE])
        return (head if len(ctx) > PREFIX_PROBE and probe[head] > 1 else (), -len(ctx))

    order = sorted(range(len(units)), key=key)
    device = next(model.parameters()).device
    # ALiBi and sliding windows measure distance in cache slots: a padded row would see wrong distances, so only
    # contexts of one length share a batch there (on the portable path always: transformers' modules may do either)
    cfg = model.cfg
    exact_slots = getattr(model, "portable", False) or model.alibi is not None or \
        any(cfg.window(i) is not None for i in range(cfg.n_layers))
    pos = 0
    while pos < len(order):
        batch = [order[pos]]
        width = len(units[order[pos]][0])
        while pos + len(batch) < len(order) and len(batch) < batch_size and (len(batch) + 1) * width <= batch_tokens and (
                not exact_slots or len(units[order[pos + len(batch)]][0]) == width):
            batch.append(order[pos + len(batch)])
        pos += len(batch)
        scored = _score_batch(model, [units[u] for u in batch], device, top)
        done = []
        for u, scores in zip(batch, scored):
            for i, s in zip(units[u][2], scores):
                out[i] = s
                done.append(i)
        if progress:
            progress(done)
    return out  # type: ignore[return-value]


def _common_prefix(seqs: list[list[int]]) -> int:
    n = min(len(s) for s in seqs) - 1  # every row keeps at least one token of its own (its last logit)
    first = seqs[0]
    for s in seqs[1:]:
        i = 0
        while i < n and s[i] == first[i]:
            i += 1
        n = i
    return max(n, 0)


def _scores(logp: torch.Tensor, target: list[int], top: int) -> TokenScores:
    """TokenScores of `target` under the (T, V) log-probabilities of its positions."""
    t = torch.tensor(target, device=logp.device)
    picked = logp.gather(1, t[:, None])[:, 0].tolist()
    greedy = (logp.argmax(-1) == t).tolist()
    best = None
    if top:
        values, ids = logp.topk(top)
        best = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    return TokenScores(picked, greedy, best)


def _score_batch(model: Transformer, units, device, top: int) -> list[list[TokenScores]]:
    """Run the contexts once, keep the KV cache, then every continuation's tokens after its own context.

    The contexts' common prefix (a few-shot block) runs once for the whole batch; the rest runs right-padded
    (causal attention never looks ahead, so that pass needs no mask and takes SDPA's fast path). The continuations
    then run with a mask that hides the other rows' padding and positions that continue from each context's end."""
    B = len(units)
    lens = [len(u[0]) for u in units]
    L = max(lens)
    dtype = next(model.parameters()).dtype
    cache = KVCache(model.cfg, B, L, device=device, dtype=dtype)
    shared = _common_prefix([u[0] for u in units]) if B > 1 else 0
    if shared:
        one = KVCache(model.cfg, 1, shared, device=device, dtype=dtype)
        model(torch.tensor([units[0][0][:shared]], device=device), cache=one)  # its keys and values only
        for layer in range(model.cfg.n_layers):
            cache.k[layer][:, :, :shared] = one.k[layer]
            cache.v[layer][:, :, :shared] = one.v[layer]
        cache.advance(shared)
    ids = torch.zeros(B, L - shared, dtype=torch.long)
    last = torch.zeros(B, L - shared, dtype=torch.bool)
    for b, (ctx, _, _) in enumerate(units):
        ids[b, :len(ctx) - shared] = torch.tensor(ctx[shared:])
        last[b, len(ctx) - shared - 1] = True
    ids, last = ids.to(device), last.to(device)
    first = model.logits(model(ids, cache=cache)[last])  # (B, vocab): each context's last position, in row order
    first = F.log_softmax(first.float(), dim=-1)  # the distribution of every continuation's first token
    rows = [(b, c) for b, u in enumerate(units) for c in u[1]]
    longer = [(r, b, c) for r, (b, c) in enumerate(rows) if len(c) > 1]
    rest: dict[int, torch.Tensor] = {}
    if longer:  # the continuations' tokens after the first, all rows in one pass over the shared caches
        T = max(len(c) - 1 for _, _, c in longer)
        n = len(longer)
        src = torch.tensor([b for _, b, _ in longer], device=device)
        cont_cache = KVCache(model.cfg, n, L + T, device=device, dtype=dtype)
        for layer in range(model.cfg.n_layers):
            cont_cache.k[layer][:, :, :L] = cache.k[layer].index_select(0, src)
            cont_cache.v[layer][:, :, :L] = cache.v[layer].index_select(0, src)
        cont_cache.advance(L)
        cont_ids = torch.zeros(n, T, dtype=torch.long)
        mask = torch.zeros(n, L + T, dtype=torch.long)
        positions = torch.zeros(n, T, dtype=torch.long)
        real = torch.zeros(n, T, dtype=torch.bool)
        for k, (_, b, c) in enumerate(longer):
            cont_ids[k, :len(c) - 1] = torch.tensor(c[:-1])
            mask[k, :lens[b]] = 1
            mask[k, L:] = 1  # the continuation's own tokens (pads after them are never seen: causal)
            positions[k] = lens[b] + torch.arange(T)
            real[k, :len(c) - 1] = True
        # logits only at the continuations' real tokens: the vocabulary matmul over padding would dominate the pass
        hidden = model(cont_ids.to(device), positions=positions.to(device), attention_mask=mask.to(device),
                       cache=cont_cache)
        logp = F.log_softmax(model.logits(hidden[real.to(device)]).float(), dim=-1)
        start = 0
        for r, _, c in longer:  # the masked positions come in row-major order
            rest[r] = logp[start:start + len(c) - 1]
            start += len(c) - 1
    out: list[list[TokenScores]] = [[] for _ in units]
    for r, (b, c) in enumerate(rows):
        lp = first[b][None] if r not in rest else torch.cat([first[b][None], rest[r]], 0)
        out[b].append(_scores(lp, c, top))
    return out
