"""Chain-of-thought prompting, answer extraction, self-consistency and Auto-CoT, over any ModelClient.

    cot = ChainOfThought(client, demos=None)                  # zero-shot: "Let's think step by step." (Kojima 2022)
    r = cot.answer("A pen costs 3 dollars ...", rule="number")  # {"answer", "reasoning", ...}
    sc = self_consistency(client, question, k=10, temperature=0.7)   # majority vote (Wang et al. 2022)
    demos = auto_cot(client, questions, n_clusters=8)          # Zhang et al. 2022: cluster, pick, generate

Extraction rules: "number" (the last number, lm-evaluation-harness's GSM8K flexible-extract, then its normalisation:
commas, $ and a final period dropped), "letter" (an option letter A-E), "regex:PATTERN" (group 1 of the last match),
"text" (the reply stripped). A reply where the rule finds nothing gives None, counted as a failure, never a vote.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lmforge.infer.client import ModelClient, Sampling
from lmforge.prompting.config import MAX_TOKENS, METHODS, AutoCotCommand, CotCommand, EvalCommand

ZERO_SHOT_TRIGGER = "Let's think step by step."
ZERO_SHOT_TRIGGER_ZH = "让我们一步一步地思考。"
ANSWER_PHRASES = ("the answer is", "answer:", "答案是", "答案：", "答案:")
_NUMBER = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")  # lm-eval's GSM8K flexible-extract
_LETTER = re.compile(r"\(([A-E])\)|\b([A-E])\b")


def _clean_number(s: str) -> str | None:
    s = s.replace(",", "").replace("$", "").rstrip(".")
    try:
        float(s)
    except ValueError:
        return None
    return s


def _find(text: str, rule: str, first: bool) -> str | None:
    if rule == "number":
        found = [c for c in (_clean_number(m[0] or m[1]) for m in _NUMBER.findall(text)) if c is not None]
    elif rule == "letter":
        found = [m[0] or m[1] for m in _LETTER.findall(text)]
    else:
        raise ValueError(f"rule {rule!r}: number, letter, text or regex:PATTERN")
    return (found[0] if first else found[-1]) if found else None


def extract_answer(text: str, rule: str = "number") -> str | None:
    """The answer a reply states, by `rule` (module docstring). After the last "the answer is" (or 答案是) the first
    match counts; without such a phrase, the last match in the reply."""
    if rule == "text":
        return text.strip() or None
    if rule.startswith("regex:"):
        matches = re.findall(rule[6:], text)
        if not matches:
            return None
        m = matches[-1]
        return (m if isinstance(m, str) else next((g for g in m if g), m[0])).strip() or None
    lowered = text.lower()
    for phrase in ANSWER_PHRASES:
        i = lowered.rfind(phrase)
        if i >= 0:
            found = _find(text[i + len(phrase):], rule, first=True)
            if found is not None:
                return found
            break
    return _find(text, rule, first=False)


@dataclass
class Vote:
    """A self-consistency result: the majority answer, its votes, ties and failures."""

    answer: str | None
    votes: dict = field(default_factory=dict)
    tie: list = field(default_factory=list)  # the answers sharing the top count, when more than one
    failures: int = 0  # replies where the rule found no answer
    samples: list = field(default_factory=list)


def majority_vote(answers: Sequence[str | None]) -> Vote:
    """The most frequent answer; a tie is broken by the answer seen first (and reported); None never votes."""
    counts = Counter(a for a in answers if a is not None)
    failures = sum(a is None for a in answers)
    if not counts:
        return Vote(None, {}, [], failures)
    top = max(counts.values())
    leaders = [a for a in dict.fromkeys(a for a in answers if a is not None) if counts[a] == top]
    return Vote(leaders[0], dict(counts), leaders if len(leaders) > 1 else [], failures)


def read_demos(path: str | None) -> list[dict]:
    """Few-shot chain-of-thought demonstrations from a JSONL file (each with 'question' and 'rationale'; what
    `auto_cot` writes); none without a path."""
    if not path:
        return []
    from lmforge.config import ConfigError

    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    for i, r in enumerate(rows, 1):
        if "question" not in r or "rationale" not in r:
            raise ConfigError(f"{path}:{i}: a demonstration needs 'question' and 'rationale'")
    return rows


def cot_prompt(question: str, demos: Sequence[dict] = (), trigger: str = ZERO_SHOT_TRIGGER) -> str:
    """Few-shot CoT ("Q: ...\\nA: rationale. The answer is X." per demo) or zero-shot ("Q: ...\\nA: Let's think ...")."""
    parts = [f"Q: {d['question']}\nA: {d['rationale'].strip()}" for d in demos]
    parts.append(f"Q: {question}\nA:" + ("" if demos else f" {trigger}"))
    return "\n\n".join(parts)


class ChainOfThought:
    """CoT over a client: `answer(question)` -> {"answer", "reasoning", "prompt"}; `demos` makes it few-shot."""

    def __init__(self, client: ModelClient, demos: Sequence[dict] = (), trigger: str = ZERO_SHOT_TRIGGER,
                 sampling: Sampling | None = None):
        self.client, self.demos, self.trigger = client, list(demos), trigger
        self.sampling = sampling or Sampling(temperature=0.0, max_tokens=MAX_TOKENS, stop=["\n\nQ:", "\nQ:"])

    def answer(self, question: str, rule: str = "number", n: int = 1, sampling: Sampling | None = None) -> list[dict]:
        prompt = cot_prompt(question, self.demos, self.trigger)
        replies = self.client.complete([prompt], sampling or self.sampling, n=n)[0]
        return [{"answer": extract_answer(r.text, rule), "reasoning": r.text.strip(), "prompt": prompt}
                for r in replies]

    def answer_many(self, questions: Sequence[str], rule: str = "number") -> list[dict]:
        prompts = [cot_prompt(q, self.demos, self.trigger) for q in questions]
        replies = self.client.complete(prompts, self.sampling)
        return [{"answer": extract_answer(r[0].text, rule), "reasoning": r[0].text.strip(), "prompt": p}
                for r, p in zip(replies, prompts)]


def self_consistency(client: ModelClient, question: str, k: int = 10, temperature: float = CotCommand.temperature,
                     rule: str = CotCommand.rule,
                     demos: Sequence[dict] = (), max_tokens: int = MAX_TOKENS, seed: int = 0) -> Vote:
    """k sampled chains of thought, their answers extracted, the majority answer (Wang et al. 2022)."""
    cot = ChainOfThought(client, demos)
    s = Sampling(temperature=temperature, max_tokens=max_tokens, stop=["\n\nQ:", "\nQ:"], seed=seed)
    chains = cot.answer(question, rule, n=k, sampling=s)
    vote = majority_vote([c["answer"] for c in chains])
    vote.samples = chains
    return vote


# --- Auto-CoT --------------------------------------------------------------------------------------------------------

def kmeans_plus_plus(x: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """k initial centres by k-means++ (Arthur and Vassilvitskii 2007): each next centre drawn with probability
    proportional to its squared distance from the nearest centre so far."""
    x = np.asarray(x, dtype=np.float64)
    rng = np.random.default_rng(seed)
    centres = [x[rng.integers(len(x))]]
    for _ in range(1, k):
        d2 = np.min(((x[:, None] - np.array(centres)[None]) ** 2).sum(-1), axis=1)
        centres.append(x[rng.choice(len(x), p=d2 / d2.sum())] if d2.sum() > 0 else x[rng.integers(len(x))])
    return np.array(centres)


def kmeans(x: np.ndarray, k: int, seed: int = 0, iters: int = 300, tol: float = 1e-4,
           init: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """(labels, centres, inertia): Lloyd's algorithm from k-means++ centres (or `init`), with scikit-learn's
    stopping rule (the centres moved less than tol x the data's mean variance)."""
    x = np.asarray(x, dtype=np.float64)
    centres = kmeans_plus_plus(x, k, seed) if init is None else np.array(init, dtype=np.float64)
    threshold = tol * np.mean(np.var(x, axis=0))
    for _ in range(iters):
        d2 = ((x[:, None] - centres[None]) ** 2).sum(-1)
        labels = d2.argmin(1)
        new = np.array([x[labels == j].mean(0) if (labels == j).any() else centres[j] for j in range(k)])
        shift = ((new - centres) ** 2).sum()
        centres = new
        if shift <= threshold:
            break
    d2 = ((x[:, None] - centres[None]) ** 2).sum(-1)
    labels = d2.argmin(1)
    return labels, centres, float(d2[np.arange(len(x)), labels].sum())


def auto_cot(client: ModelClient, questions: Sequence[str], n_clusters: int = AutoCotCommand.clusters, embedder=None,
             seed: int = 0, max_question_tokens: int = 60, max_steps: int = 5, rule: str = "number",
             tokenizer=None) -> list[dict]:
    """Auto-CoT demonstrations: embed the questions (MiniLM, as the authors), k-means into n_clusters, and in each
    cluster take the question nearest its centre whose zero-shot CoT passes the paper's rules (question at most
    max_question_tokens tokens, rationale at most max_steps steps, an extractable answer). Each demo: {"question",
    "rationale", "answer", "cluster"}; a cluster where no question passes gives no demo."""
    if embedder is None:
        from lmforge.model.encoder import SentenceEmbedder

        embedder = SentenceEmbedder.load()
    vectors = embedder.embed(list(questions)).numpy()
    labels, centres, _ = kmeans(vectors, min(n_clusters, len(questions)), seed)
    cot = ChainOfThought(client)
    demos = []
    for c in range(len(centres)):
        members = np.flatnonzero(labels == c)
        order = members[np.argsort(((vectors[members] - centres[c]) ** 2).sum(-1), kind="stable")]
        for i in order:
            q = questions[i]
            length = len(tokenizer.encode(q)) if tokenizer is not None else len(q.split())
            if length > max_question_tokens:
                continue
            reply = cot.answer(q, rule)[0]
            steps = [s for s in re.split(r"\n+|(?<=[.。!?！？])\s+", reply["reasoning"]) if s.strip()]
            if reply["answer"] is None or len(steps) > max_steps:
                continue
            demos.append({"question": q, "rationale": f"{ZERO_SHOT_TRIGGER} {reply['reasoning']}",
                          "answer": reply["answer"], "cluster": c})
            break
    return demos


# --- the evaluation hook ---------------------------------------------------------------------------------------------



def gsm8k_target(doc: dict) -> str:
    """The reference number of a GSM8K answer ("... #### 72"), cleaned like the predictions."""
    return _clean_number(doc["answer"].split("####")[-1].strip()) or doc["answer"].split("####")[-1].strip()


def compare_methods(client: ModelClient, docs: Sequence[dict], methods: Sequence[str] = METHODS,
                    demos: Sequence[dict] = (), k: int = EvalCommand.samples,
                    temperature: float = EvalCommand.temperature, max_tokens: int = MAX_TOKENS,
                    seed: int = 0) -> dict:
    """GSM8K-style accuracy of each method on the same questions: greedy (the question alone, the last number of
    the reply), cot (chain of thought, few-shot with `demos` else zero-shot) and self-consistency (k sampled chains,
    majority vote). Answers are compared with lmforge.eval's exact match after the same number clean-up.
    Returns {"methods": {name: {"accuracy", "failures"}}, "predictions": [...]}."""
    from lmforge.metrics import exact_match

    gold = [gsm8k_target(d) for d in docs]
    out, rows = {}, [{"question": d["question"], "target": g} for d, g in zip(docs, gold)]
    for method in methods:
        if method == "greedy":
            replies = client.complete([d["question"] for d in docs],
                                      Sampling(temperature=0.0, max_tokens=max_tokens))
            preds = [extract_answer(r[0].text) for r in replies]
        elif method == "cot":
            preds = [r["answer"] for r in ChainOfThought(client, demos, sampling=Sampling(
                temperature=0.0, max_tokens=max_tokens, stop=["\n\nQ:", "\nQ:"])).answer_many(
                [d["question"] for d in docs])]
        elif method == "self-consistency":
            preds = [self_consistency(client, d["question"], k, temperature, demos=demos, max_tokens=max_tokens,
                                      seed=seed + i).answer for i, d in enumerate(docs)]
        else:
            raise ValueError(f"method {method!r}: one of {', '.join(METHODS)}")
        out[method] = {"accuracy": exact_match([p or "[invalid]" for p in preds], gold),
                       "failures": sum(p is None for p in preds)}
        for row, p in zip(rows, preds):
            row[method] = p
    return {"methods": out, "predictions": rows, "examples": len(docs)}
