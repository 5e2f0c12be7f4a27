"""Scoring text with a model: the log-likelihood of continuations (multiple-choice tasks) and perplexity / bits per
byte of documents (strided windows).

Log-likelihoods follow lm-evaluation-harness's HF backend so that scores are comparable: trailing spaces of the
context move to the continuation, the pair is encoded whole and the continuation is what follows the context's own
encoding, the tokenizer adds its model's special tokens (a Llama BOS, nothing for GPT-2 or Qwen), and an input
longer than the model's context is cut from the left. What differs is the work: the choices of one question share
its context, so the context runs once (into a KV cache, batched with other questions') and only the choices' own
tokens run after it, batched; a few-shot block that a batch's prompts share runs once for all of them. A question
whose choices are single tokens (MMLU's " A".." D") needs no second pass at all.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmforge.model.transformer import KVCache, Transformer

PREFIX_PROBE = 32  # tokens compared to find prompts that share a few-shot block


@dataclass(frozen=True)
class Choice:
    """One continuation's score: summed log-probability (nats), whether greedy decoding would produce it, and
    its length in tokens."""

    logprob: float
    greedy: bool
    n_tokens: int


def _encode(tokenizer, text: str) -> list[int]:
    """Text as the model reads it: the tokenizer's own special tokens added (lm-eval's tok_encode), text never
    read as control tokens."""
    return tokenizer.encode_for_model([text])[0]


def prefix_token_id(tokenizer) -> int | None:
    """The token an empty context stands for (lm-eval: BOS, else EOS)."""
    for name in ("bos_token", "eos_token"):
        tok = tokenizer.special_tokens_map().get(name)
        if tok is not None and tokenizer.token_to_id(tok) is not None:
            return tokenizer.token_to_id(tok)
    return None


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) by lm-evaluation-harness's rule."""
    if not context:
        prefix = prefix_token_id(tokenizer)
        if prefix is None:
            raise ValueError("an empty context needs a BOS or EOS token, and this tokenizer has neither")
        return [prefix], _encode(tokenizer, continuation)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = _encode(tokenizer, context + continuation)
    ctx = _encode(tokenizer, context)
    return ctx, whole[len(ctx):]


def _device_of(model: Transformer) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def score_choices(model: Transformer, tokenizer, items: Sequence[tuple[str | Sequence[int], Sequence[str]]],
                  batch_tokens: int = 8192,
                  batch_size: int = 16, progress: Callable[[int], None] | None = None) -> list[list[Choice]]:
    """For each (context, continuations) item, the score of every continuation given the context (text, encoded
    by lm-eval's rules, or token ids, after which each continuation is encoded on its own).

    Items are processed longest first in batches of at most `batch_size` contexts and about `batch_tokens` context
    tokens (small batches of similar lengths waste little on padding). `progress(n)` is called after each batch
    with the items it finished.
    """
    max_len = model.cfg.max_seq_len
    # (context ids, [continuation ids]) per item; an item whose longest choice does not fit after the whole
    # context is split into one item per choice, each cut from the left as lm-eval cuts it
    units: list[tuple[int, list[int] | None, list[list[int]], list[int]]] = []  # (item, ctx, conts, choice indices)
    for i, (context, conts) in enumerate(items):
        if isinstance(context, str):
            pairs = [encode_pair(tokenizer, context, c) for c in conts]
        else:  # a context already encoded (a rendered chat): the choices are plain text after it
            pairs = [(list(context), tokenizer.encode(c, disallowed_special=())) for c in conts]
        for j, (_, cont) in enumerate(pairs):
            if not cont:
                raise ValueError(f"item {i}: choice {j} ({conts[j]!r}) encodes to no tokens")
        ctx = pairs[0][0] if pairs else []
        if pairs and all(p[0] == ctx for p in pairs) and len(ctx) + max(len(p[1]) for p in pairs) <= max_len + 1:
            units.append((i, ctx, [p[1] for p in pairs], list(range(len(pairs)))))
        else:
            for j, (c, cont) in enumerate(pairs):
                whole = (c + cont)[-(max_len + 1):]
                units.append((i, whole[:len(whole) - len(cont)], [cont], [j]))
    out: list[list[Choice | None]] = [[None] * len(conts) for _, conts in items]
    # few-shot prompts share their examples: units whose first PREFIX_PROBE tokens recur are kept together (the
    # batch then runs that prefix once), the rest longest first (little padding)
    probe = Counter(tuple(u[1][:PREFIX_PROBE]) for u in units if len(u[1]) > PREFIX_PROBE)

    def key(u: int):
        ctx = units[u][1]
        head = tuple(ctx[:PREFIX_PROBE])
        return (head if len(ctx) > PREFIX_PROBE and probe[head] > 1 else (), -len(ctx))

    order = sorted(range(len(units)), key=key)
    device = _device_of(model)
    # ALiBi and sliding windows measure distance in cache slots: a padded row would see wrong distances, so only
    # contexts of one length share a batch there
    exact_slots = model.alibi is not None or model.cfg.sliding_window is not None
    pos = 0
    while pos < len(order):
        batch = [order[pos]]
        width = len(units[order[pos]][1])
        while pos + len(batch) < len(order) and len(batch) < batch_size and (len(batch) + 1) * width <= batch_tokens and (
                exact_slots is False or len(units[order[pos + len(batch)]][1]) == width):
            batch.append(order[pos + len(batch)])
        pos += len(batch)
        results = _score_batch(model, [units[u] for u in batch], device)
        done = set()
        for u, scores in zip(batch, results):
            item, _, _, idx = units[u]
            for j, s in zip(idx, scores):
                out[item][j] = s
            done.add(item)
        if progress:
            progress(sum(1 for i in done if all(s is not None for s in out[i])))
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


def _score_batch(model: Transformer, units, device) -> list[list[Choice]]:
    """Run the contexts once, keep the KV cache, then every choice's tokens after its own context.

    The contexts' common prefix (a few-shot block) runs once for the whole batch; the rest runs right-padded
    (causal attention never looks ahead, so that pass needs no mask and takes SDPA's fast path). The choices then
    run with a mask that hides the other rows' padding and positions that continue from each context's end."""
    B = len(units)
    lens = [len(u[1]) for u in units]
    L = max(lens)
    dtype = next(model.parameters()).dtype
    cache = KVCache(model.cfg, B, L, device=device, dtype=dtype)
    shared = _common_prefix([u[1] for u in units]) if B > 1 else 0
    if shared:
        one = KVCache(model.cfg, 1, shared, device=device, dtype=dtype)
        model(torch.tensor([units[0][1][:shared]], device=device), cache=one)  # its keys and values only
        for layer in range(model.cfg.n_layers):
            cache.k[layer][:, :, :shared] = one.k[layer]
            cache.v[layer][:, :, :shared] = one.v[layer]
        cache.advance(shared)
    ids = torch.zeros(B, L - shared, dtype=torch.long)
    last = torch.zeros(B, L - shared, dtype=torch.bool)
    for b, (_, ctx, _, _) in enumerate(units):
        ids[b, :len(ctx) - shared] = torch.tensor(ctx[shared:])
        last[b, len(ctx) - shared - 1] = True
    ids, last = ids.to(device), last.to(device)
    first = model.logits(model(ids, cache=cache)[last])  # (B, vocab): each context's last position, in row order
    first = F.log_softmax(first.float(), dim=-1)  # the distribution of every choice's first token
    rows = [(b, c) for b, u in enumerate(units) for c in u[2]]
    longer = [(r, b, c) for r, (b, c) in enumerate(rows) if len(c) > 1]
    rest: dict[int, torch.Tensor] = {}
    if longer:  # the choices' tokens after the first, all rows in one pass over the shared caches
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
        for k, (_, b, c) in enumerate(longer):
            cont_ids[k, :len(c) - 1] = torch.tensor(c[:-1])
            mask[k, :lens[b]] = 1
            mask[k, L:] = 1  # the choice's own tokens (pads after them are never seen: causal)
            positions[k] = lens[b] + torch.arange(T)
        real = torch.zeros(n, T, dtype=torch.bool)
        for k, (_, _, c) in enumerate(longer):
            real[k, :len(c) - 1] = True
        # logits only at the choices' real tokens: the vocabulary matmul over padding would dominate the pass
        hidden = model(cont_ids.to(device), positions=positions.to(device), attention_mask=mask.to(device),
                       cache=cont_cache)
        logits = model.logits(hidden[real.to(device)])
        logp = F.log_softmax(logits.float(), dim=-1)
        start = 0
        for r, _, c in longer:  # the masked positions come in row-major order
            rest[r] = logp[start:start + len(c) - 1]
            start += len(c) - 1
    out: list[list[Choice]] = [[] for _ in units]
    for r, (b, c) in enumerate(rows):
        target = torch.tensor(c, device=device)
        lp = first[b][None]
        if r in rest:
            lp = torch.cat([lp, rest[r][:len(c) - 1]], 0)
        token_lp = lp.gather(1, target[:, None]).squeeze(1)
        greedy = bool((lp.argmax(-1) == target).all())
        out[b].append(Choice(float(token_lp.sum()), greedy, len(c)))
    return out


@dataclass(frozen=True)
class Perplexity:
    """Perplexity = exp(nll / tokens); bits per byte = nll / (ln 2 * UTF-8 bytes), comparable across tokenizers."""

    nll: float  # summed negative log-likelihood, nats
    tokens: int
    bytes: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens) if self.tokens else float("nan")

    @property
    def bits_per_byte(self) -> float:
        return self.nll / (math.log(2) * self.bytes) if self.bytes else float("nan")

    def as_dict(self) -> dict:
        return {"perplexity": self.perplexity, "bits_per_byte": self.bits_per_byte, "nll": self.nll,
                "tokens": self.tokens, "bytes": self.bytes}


def windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first scored) of each window over a text of n_tokens (the text's first token is the prefix,
    never scored): windows of `window` tokens, `stride` apart, each scoring the tokens the previous did not, so
    every token is scored once with at least window - stride tokens of context (or all there is; stride = window
    keeps one token of overlap, lm-eval's disjoint rolling windows)."""
    if not 0 < stride <= window:
        raise ValueError(f"stride must be in 1..window ({window}), got {stride}")
    out, scored = [], 1
    start = 0
    while scored < n_tokens:
        end = min(start + window, n_tokens)
        out.append((start, end, scored))
        scored = end
        start = end - max(window - stride, 1)  # at least one token before the first one scored
    return out


@torch.no_grad()
def perplexity(model: Transformer, tokenizer, texts: Sequence[str], window: int | None = None,
               stride: int | None = None, batch_size: int = 8,
               progress: Callable[[int], None] | None = None) -> Perplexity:
    """Perplexity and bits per byte of `texts`, each text scored on its own: it starts with the tokenizer's BOS
    (else EOS) so that its first token is scored too, as lm-eval's rolling log-likelihood does; windows of
    `window` tokens (default: the model's context) advance by `stride` (default: window / 2)."""
    window = window or model.cfg.max_seq_len
    if window > model.cfg.max_seq_len:
        raise ValueError(f"window {window} is longer than the model's context ({model.cfg.max_seq_len})")
    stride = stride or max(window // 2, 1)
    prefix = prefix_token_id(tokenizer)
    jobs, n_bytes, n_tokens = [], 0, 0
    for text in texts:
        ids = _encode(tokenizer, text)
        if prefix is not None and (not ids or ids[0] != prefix):
            ids = [prefix] + ids
        n_bytes += len(text.encode("utf-8"))
        n_tokens += max(len(ids) - 1, 0)
        jobs += [(ids[s:e], f - s) for s, e, f in windows(len(ids), window, stride)]
    device = _device_of(model)
    nll = 0.0
    jobs.sort(key=lambda j: -len(j[0]))
    for i in range(0, len(jobs), batch_size):
        chunk = jobs[i:i + batch_size]
        T = len(chunk[0][0])
        ids = torch.zeros(len(chunk), T, dtype=torch.long)
        for b, (w, _) in enumerate(chunk):
            ids[b, :len(w)] = torch.tensor(w)
        logits = model.logits(model(ids.to(device))).float()
        logp = F.log_softmax(logits[:, :-1], dim=-1)
        target = ids[:, 1:].to(device)
        token_lp = logp.gather(2, target[..., None]).squeeze(-1)
        for b, (w, first) in enumerate(chunk):
            nll -= float(token_lp[b, first - 1:len(w) - 1].sum())
        if progress:
            progress(len(chunk))
    return Perplexity(nll, n_tokens, n_bytes)
