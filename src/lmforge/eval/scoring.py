"""Scoring text with a model: the log-likelihood of continuations (multiple-choice tasks) and perplexity / bits per
byte of documents (strided windows).

Log-likelihoods follow lm-evaluation-harness's HF backend so that scores are comparable: trailing spaces of the
context move to the continuation, the pair is encoded whole and the continuation is what follows the context's own
encoding, the tokenizer adds its model's special tokens (a Llama BOS, nothing for GPT-2 or Qwen), and an input
longer than the model's context is cut from the left. The log-probabilities come from infer/scoring.py's
`score_tokens`, the one scoring function (the server's prompt scoring uses it too): the choices of one question
share its context, so the context runs once (into a KV cache, batched with other questions') and only the choices'
own tokens run after it, batched; a few-shot block that a batch's prompts share runs once for all of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from lmforge.infer.scoring import score_tokens
from lmforge.model.transformer import Transformer


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


@torch.no_grad()
def score_choices(model: Transformer, tokenizer, items: Sequence[tuple[str | Sequence[int], Sequence[str]]],
                  batch_tokens: int = 8192,
                  batch_size: int = 16, progress: Callable[[int], None] | None = None) -> list[list[Choice]]:
    """For each (context, continuations) item, the score of every continuation given the context (text, encoded
    by lm-eval's rules, or token ids, after which each continuation is encoded on its own).

    The pairs go through infer/scoring.py's `score_tokens` (each context run once, its choices after it), in
    batches of at most `batch_size` contexts and about `batch_tokens` context tokens. `progress(n)` is called after
    each batch with the items it finished.
    """
    max_len = model.cfg.max_seq_len
    sequences, starts, owner = [], [], []  # owner: (item, choice) of each sequence
    for i, (context, conts) in enumerate(items):
        if isinstance(context, str):
            pairs = [encode_pair(tokenizer, context, c) for c in conts]
        else:  # a context already encoded (a rendered chat): the choices are plain text after it
            pairs = [(list(context), tokenizer.encode(c, disallowed_special=())) for c in conts]
        for j, (ctx, cont) in enumerate(pairs):
            if not cont:
                raise ValueError(f"item {i}: choice {j} ({conts[j]!r}) encodes to no tokens")
            whole = (ctx + cont)[-(max_len + 1):]  # an input longer than the context is cut from the left, as lm-eval does
            sequences.append(whole)
            starts.append(len(whole) - len(cont))
            owner.append((i, j))
    out: list[list[Choice | None]] = [[None] * len(conts) for _, conts in items]
    left = [len(conts) for _, conts in items]

    def scored(indices: list[int]) -> None:
        finished = 0
        for k in indices:
            left[owner[k][0]] -= 1
            finished += left[owner[k][0]] == 0
        if progress and finished:
            progress(finished)

    for (i, j), s in zip(owner, score_tokens(model, sequences, starts, batch_tokens=batch_tokens,
                                             batch_size=batch_size, progress=scored)):
        out[i][j] = Choice(s.total, all(s.greedy), len(s.logprobs))
    return out  # type: ignore[return-value]


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
    scores = score_tokens(model, [w for w, _ in jobs], [f for _, f in jobs], batch_size=batch_size,
                          progress=(lambda done: progress(len(done))) if progress else None)
    return Perplexity(-sum(s.total for s in scores), n_tokens, n_bytes)
