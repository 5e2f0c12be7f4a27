"""Prompt templates with variables, and few-shot example selection: fixed, random (seeded), by embedding similarity
(lmforge's SentenceEmbedder), and maximal marginal relevance (MMR: similar to the query, unlike each other).

    t = PromptTemplate("Q: {question}\\nA:")
    t.format(question="2+2?")                       # a missing or unknown variable is an error naming it
    pick = ExampleSelector(pool, "similarity", k=4, key="question")
    shots = pick.select({"question": "3+5?"})
"""

from __future__ import annotations

import string
from collections.abc import Sequence

import numpy as np

from lmforge.config import ConfigError

STRATEGIES = ("fixed", "random", "similarity", "mmr")


class PromptTemplate:
    """`{name}` variables (Python format syntax; `{{` and `}}` are literal braces)."""

    def __init__(self, text: str):
        self.text = text
        try:
            self.variables = sorted({f for _, f, _, _ in string.Formatter().parse(text) if f})
        except ValueError as e:
            raise ConfigError(f"template: {e} in {text[:60]!r}") from None
        bad = [v for v in self.variables if not v.isidentifier()]
        if bad:
            raise ConfigError(f"template: variable {{{bad[0]}}} is not a name (use {{{{ and }}}} for braces)")

    def format(self, **values) -> str:
        missing = [v for v in self.variables if v not in values]
        if missing:
            raise ConfigError(f"template: no value for {{{missing[0]}}} (it uses {', '.join(self.variables)})")
        return self.text.format(**{v: values[v] for v in self.variables})


def mmr(query: np.ndarray, candidates: np.ndarray, k: int, lambda_mult: float = 0.5) -> list[int]:
    """Maximal marginal relevance over unit vectors: each pick maximises lambda * sim(query, c) - (1 - lambda) *
    max sim(c, picked) (Carbonell and Goldstein 1998; LangChain's and LlamaIndex's default lambda 0.5)."""
    if len(candidates) == 0 or k <= 0:
        return []
    rel = candidates @ query
    picked = [int(np.argmax(rel))]
    while len(picked) < min(k, len(candidates)):
        red = (candidates @ candidates[picked].T).max(1)
        score = lambda_mult * rel - (1 - lambda_mult) * red
        score[picked] = -np.inf
        picked.append(int(np.argmax(score)))
    return picked


class ExampleSelector:
    """Chooses k examples from a pool for each query. `key`: the field compared with the query (similarity, MMR);
    `embedder`: a SentenceEmbedder (default all-MiniLM-L6-v2, offline)."""

    def __init__(self, pool: Sequence[dict], strategy: str = "fixed", k: int = 4, key: str = "question",
                 seed: int = 0, embedder=None, lambda_mult: float = 0.5):
        if strategy not in STRATEGIES:
            raise ConfigError(f"fewshot: {strategy!r} is not one of {', '.join(STRATEGIES)}")
        self.pool, self.strategy, self.k, self.key, self.lambda_mult = list(pool), strategy, k, key, lambda_mult
        self.rng = np.random.default_rng(seed)
        self.vectors = None
        if strategy in ("similarity", "mmr") and self.pool:
            if any(key not in ex for ex in self.pool):
                raise ConfigError(f"fewshot: every example needs the field '{key}' to compare with the query")
            if embedder is None:
                from lmforge.model.encoder import SentenceEmbedder

                embedder = SentenceEmbedder.load()
            self.embedder = embedder
            self.vectors = embedder.embed([str(ex[key]) for ex in self.pool]).numpy()

    def select(self, query: dict | str) -> list[dict]:
        k = min(self.k, len(self.pool))
        if self.strategy == "fixed":
            return self.pool[:k]
        if self.strategy == "random":
            return [self.pool[i] for i in self.rng.choice(len(self.pool), size=k, replace=False)]
        text = query if isinstance(query, str) else str(query[self.key])
        q = self.embedder.embed([text]).numpy()[0]
        if self.strategy == "similarity":
            order = np.argsort(-(self.vectors @ q), kind="stable")[:k]
            return [self.pool[i] for i in order]
        return [self.pool[i] for i in mmr(q, self.vectors, k, self.lambda_mult)]
