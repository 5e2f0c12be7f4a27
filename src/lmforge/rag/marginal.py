"""RAG-Sequence and RAG-Token (Lewis et al. 2020, "Retrieval-Augmented Generation for Knowledge-Intensive NLP
Tasks"): the answer is marginalised over the k retrieved documents instead of reading them all from one prompt.

Each document d gets a prompt of its own (the instructions, that one source under its rank's number [n], the
question), and a prior p(d|q) from its retrieval score (`document_log_prior`).

  RAG-Sequence   p(y|q) = Σ_d p(d|q) · Π_t p(y_t | d, q, y_<t). Every document's prompt is decoded (k rows through
                 the one engine), giving up to k distinct candidate answers; each candidate is then scored under
                 every document's prompt with infer/scoring.py's `score_tokens` and the candidates are ranked by the
                 marginal: the paper's "thorough decoding" (not its "fast decoding", which takes p(y|d) = 0 where
                 document d's own beam did not produce y).
  RAG-Token      p(y|q) = Π_t Σ_d p(d|q) · p(y_t | d, q, y_<t). One decode: the k prompts are k rows of one batch of
                 the scheduler, their KV caches side by side; at every step the k next-token distributions are mixed
                 by the prior, one token is chosen from the mixture (greedy, or sampled at the temperature) and every
                 row takes it (the scheduler's `choose` hook).

Log-probabilities are natural logs (nats) of the model's distributions before any temperature.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from lmforge.infer.sampling import SamplingConfig, process_logits
from lmforge.infer.scheduler import Scheduler
from lmforge.rag.index import Hit


def prior_scores(hits: Sequence[Hit]) -> list[float]:
    """The score each hit's prior is computed from: its dense cosine where the hits carry one (dense and hybrid
    retrieval), else its BM25 score divided by the best hit's (so both lie in about 0..1 and one temperature suits
    them)."""
    if all("dense" in h.scores for h in hits):
        return [h.scores["dense"] for h in hits]
    bm25 = [h.scores.get("sparse", h.score) for h in hits]
    top = max(bm25, default=0.0)
    return [s / top if top > 0 else 0.0 for s in bm25]


def document_log_prior(hits: Sequence[Hit], temperature: float) -> list[float]:
    """log p(d|q) = log softmax(s_d / temperature) over the hits, s_d from `prior_scores` (temperature in the same
    units: cosine, or BM25 relative to the best hit)."""
    scores = torch.tensor(prior_scores(hits), dtype=torch.float64)
    return torch.log_softmax(scores / temperature, dim=0).tolist()


@dataclass
class Marginal:
    """One answer: its tokens (the stop token included when it stopped), its text, log p(y|q) marginalised over the
    documents (nats) and log p(y|d, q) under each document's prompt, in the documents' order."""

    tokens: list[int]
    text: str
    logprob: float
    per_document: list[float] = field(default_factory=list)


def _scheduler(model, tokenizer, prompts: Sequence[Sequence[int]], budget: int) -> Scheduler:
    """One scheduler holding the k prompts as k rows (each prompt once: admitted together in one prefill)."""
    return Scheduler(model, tokenizer, capacity=len(prompts), width=max(map(len, prompts)) + budget)


def _row_config(model, tokenizer, cfg: SamplingConfig) -> SamplingConfig:
    """cfg with the model's stop ids where it names none (as `generate` does)."""
    from lmforge.chat.stops import stop_ids

    return cfg if cfg.stop_token_ids else replace(cfg, stop_token_ids=stop_ids(tokenizer, model.cfg))


def budget_for(model, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> int:
    """The answer's room: max_new_tokens, less where the longest prompt leaves less of the model's context (every
    row of a RAG-Token decode must hold the whole answer, and RAG-Sequence scores each candidate under every
    prompt)."""
    from lmforge.infer.scheduler import model_context

    return max(0, min(max_new_tokens, model_context(model) - max(map(len, prompts))))


@torch.no_grad()
def rag_sequence(model, tokenizer, prompts: Sequence[Sequence[int]], log_prior: Sequence[float],
                 cfg: SamplingConfig) -> list[Marginal]:
    """RAG-Sequence, thorough decoding: decode each document's prompt (cfg: greedy or sampled, seeded per row), score
    every distinct candidate under every prompt, and return the candidates best first by log p(y|q) (module
    docstring)."""
    from lmforge.infer.scoring import score_tokens

    budget = budget_for(model, prompts, cfg.max_new_tokens)
    if budget == 0:
        return []
    row_cfg = _row_config(model, tokenizer, replace(cfg, max_new_tokens=budget))
    scheduler = _scheduler(model, tokenizer, prompts, budget)
    groups = [scheduler.add(p, row_cfg, tag=d) for d, p in enumerate(prompts)]
    texts = [""] * len(prompts)
    for event in scheduler.run():
        texts[event.group.tag] += event.text
    candidates: dict[tuple[int, ...], str] = {}
    for g in groups:
        candidates.setdefault(tuple(g.tokens(0)), texts[g.tag].strip())
    order = list(candidates)
    sequences = [list(p) + list(c) for c in order for p in prompts]
    starts = [len(p) for _ in order for p in prompts]
    scores = score_tokens(model, sequences, starts)
    prior = torch.tensor(log_prior, dtype=torch.float64)
    out = []
    for i, c in enumerate(order):
        per_doc = [s.total for s in scores[i * len(prompts):(i + 1) * len(prompts)]]
        total = torch.logsumexp(prior + torch.tensor(per_doc, dtype=torch.float64), 0).item()
        out.append(Marginal(list(c), candidates[c], total, per_doc))
    return sorted(out, key=lambda m: -m.logprob)


class TokenMixer:
    """The scheduler's `choose` hook for RAG-Token: mixes the rows' next-token distributions by the document prior,
    chooses one token from the mixture (cfg's temperature and filters; greedy at 0) and gives it to every row.
    `logprobs` collects log Σ_d p(d|q) p(y_t|d, ...) of each chosen token."""

    def __init__(self, log_prior: Sequence[float], cfg: SamplingConfig, device):
        self.log_prior = torch.tensor(log_prior, dtype=torch.float32, device=device)
        self.cfg = cfg
        self.generator = torch.Generator(device=device).manual_seed(cfg.seed) if cfg.seed is not None else None
        self.logprobs: list[float] = []

    def __call__(self, rows, logits: torch.Tensor) -> torch.Tensor:
        if len(rows) != len(self.log_prior):
            raise RuntimeError(f"RAG-Token mixes all {len(self.log_prior)} documents' rows at once, got {len(rows)}")
        prior = self.log_prior[[r.group.tag for r in rows]]
        mixed = torch.logsumexp(torch.log_softmax(logits.float(), -1) + prior[:, None], 0)  # (V,) log p(y_t | q, y_<t)
        if self.cfg.temperature == 0:
            token = mixed.argmax()
        else:
            probs = process_logits(mixed[None], None, self.cfg).softmax(-1)[0]
            token = torch.multinomial(probs, 1, generator=self.generator)[0]
        self.logprobs.append(mixed[token].item())
        return token.expand(len(rows)).clone()


@torch.no_grad()
def rag_token(model, tokenizer, prompts: Sequence[Sequence[int]], log_prior: Sequence[float],
              cfg: SamplingConfig) -> Marginal:
    """RAG-Token: one decode of the k prompts side by side, each token chosen from the prior-weighted mixture of the
    k next-token distributions (module docstring). `per_document` is left empty (each document's own score of the
    answer is RAG-Sequence's quantity)."""
    budget = budget_for(model, prompts, cfg.max_new_tokens)
    if budget == 0:
        return Marginal([], "", 0.0)
    row_cfg = _row_config(model, tokenizer, SamplingConfig(max_new_tokens=budget, temperature=0.0,
                                                           stop_token_ids=cfg.stop_token_ids,
                                                           stop_strings=cfg.stop_strings))
    scheduler = _scheduler(model, tokenizer, prompts, budget)
    mixer = TokenMixer(log_prior, cfg, scheduler.device)
    scheduler.choose = mixer
    first = scheduler.add(prompts[0], row_cfg, tag=0)
    for d, p in enumerate(prompts[1:], start=1):
        scheduler.add(p, row_cfg, tag=d)
    text = "".join(e.text for e in scheduler.run() if e.group is first)
    return Marginal(first.tokens(0), text.strip(), float(sum(mixer.logprobs)))
