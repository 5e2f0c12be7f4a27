"""How grounded a generated answer is: citation recall and precision, faithfulness, answer relevance, and the
context precision / recall of what was retrieved, judged against qrels.

    support = OverlapSupport()                  # or JudgeSupport(client): an NLI-style prompt to a judge model
    m = answer_metrics(answer, sources, support)          # sources: the numbered passages the answer cites as [n]
    m["citation_recall"], m["citation_precision"], m["faithfulness"]
    context_precision(["d3", "d1", "d7"], qrels["q1"]), context_recall(["d3", "d1"], qrels["q1"])

Definitions (the sources named here are the reference the tests transcribe):
  citation recall / precision   ALCE (Gao et al. 2023, "Enabling Large Language Models to Generate Text with
      Citations"; princeton-nlp/ALCE eval.py `compute_autoais`): the answer is cut into sentences; a sentence is
      recalled when the concatenation of its cited passages (at most 3, in order) supports it; a sentence without
      citations, or citing a number out of range, is not. Precision counts, over all citations of sentences with valid
      citations, those that are not superfluous: a citation of a supported sentence with one citation counts; of a
      supported sentence with several, a citation is superfluous when it does not support the sentence alone and the
      other citations still do. Per answer: recall = recalled / sentences, precision = precise / citations (0 with no
      citations); over a set, the mean of the answers'.
  faithfulness   RAGAS's Faithfulness: supported statements / statements, with the answer's sentences as the
      statements (RAGAS has an LLM split them into claims first) and the support judged against all sources given.
  answer relevance   RAGAS's ResponseRelevancy: a judge writes `n` questions the answer would answer; the score is the
      mean cosine similarity of their embeddings to the question's, 0 when the judge calls the answer noncommittal.
  context precision   RAGAS's NonLLMContextPrecisionWithReference with qrels as the reference: the mean of
      precision@k over the ranks k that hold a relevant document (sum(precision@k * v_k) / (relevant in top K)).
  context recall   RAGAS's IDBasedContextRecall: relevant documents retrieved / relevant documents judged.

Support ("does this passage back this sentence?") comes from one of two judges:
  OverlapSupport   no model: the share of the sentence's content words (BM25's analyzer: stemmed, stop words out;
                   jieba words for Chinese) that occur in the passage, >= `threshold` (default 0.6).
  JudgeSupport     an NLI-style prompt ("Premise ... Hypothesis ... answer yes or no"), English or Chinese by the
                   sentence's script, to any ModelClient; "yes"/"是" is support. Greedy, so the verdicts repeat.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import regex

from lmforge.text import HAN_RUN, split_sentences

_CITE = regex.compile(r"\[(\d+)")  # ALCE's pattern: every "[n" opens a citation ([1][2] and [1, 2]'s first)
_CITE_GROUP = regex.compile(r"\s*\[(\d+(?:\s*,\s*\d+)*)\]")
AT_MOST_CITATIONS = 3  # ALCE's default --at_most_citations

NLI_PROMPT = {
    "en": "Premise: {premise}\n\nHypothesis: {hypothesis}\n\nDoes the premise support the hypothesis, so that "
          "someone who reads only the premise knows the hypothesis is true? Answer with one word, yes or no.",
    "zh": "前提：{premise}\n\n假设：{hypothesis}\n\n只读前提的人能否确定假设为真（前提是否支持假设）？只用一个字回答：是 或 否。",
}
QUESTION_PROMPT = {
    "en": "Write one question that the following answer answers, and say whether the answer is noncommittal (evasive, "
          "vague or \"I don't know\"). Reply in two lines:\nQuestion: ...\nNoncommittal: yes or no\n\nAnswer: {answer}",
    "zh": "写出下面这个回答所回答的一个问题，并判断这个回答是否含糊其辞（回避、含糊或“不知道”）。"
          "用两行回答：\n问题：...\n含糊：是 或 否\n\n回答：{answer}",
}


def citations(sentence: str) -> list[int]:
    """Source numbers (1-based) cited in a sentence, in order, repeats kept (ALCE's reading, plus [1, 2] lists)."""
    out: list[int] = []
    for m in _CITE_GROUP.finditer(sentence):
        out.extend(int(p) for p in m.group(1).split(","))
    if not out:
        out = [int(n) for n in _CITE.findall(sentence)]
    return out


def strip_citations(text: str) -> str:
    return " ".join(_CITE_GROUP.sub("", text).split())


class OverlapSupport:
    """Support by word overlap (no model): share of the sentence's content words found in the passage."""

    def __init__(self, threshold: float = 0.6):
        from lmforge.rag.sparse import Analyzer

        self.threshold, self.analyzer = threshold, Analyzer()

    def share(self, premise: str, hypothesis: str) -> float:
        """The share (0..1) of the hypothesis's distinct content words found in the premise (0 without any)."""
        words = set(self.analyzer(hypothesis))
        return len(words & set(self.analyzer(premise))) / len(words) if words else 0.0

    def __call__(self, pairs: Sequence[tuple[str, str]]) -> list[bool]:
        """(premise, hypothesis) pairs -> supported or not."""
        return [bool(self.analyzer(h)) and self.share(p, h) >= self.threshold for p, h in pairs]


class JudgeSupport:
    """Support by an NLI-style prompt to a judge model (any ModelClient); verdicts cached per pair."""

    def __init__(self, client, max_premise_chars: int = 6000):
        self.client, self.max_premise_chars = client, max_premise_chars
        self.verdicts: dict[tuple[str, str], bool] = {}

    def __call__(self, pairs: Sequence[tuple[str, str]]) -> list[bool]:
        from lmforge.infer.client import Sampling

        todo = list(dict.fromkeys(p for p in pairs if p not in self.verdicts))
        if todo:
            prompts = [NLI_PROMPT["zh" if HAN_RUN.search(h) else "en"].format(
                premise=p[:self.max_premise_chars], hypothesis=h) for p, h in todo]
            replies = self.client.complete(prompts, Sampling(temperature=0.0, max_tokens=4))
            for pair, reply in zip(todo, replies):
                self.verdicts[pair] = is_yes(reply[0].text)
        return [self.verdicts[p] for p in pairs]


def is_yes(reply: str) -> bool:
    """A judge's verdict: the reply starts with yes / 是 / 对 / 能 (case and punctuation aside)."""
    head = reply.strip().lstrip("*\"'「").lower()
    return head.startswith(("yes", "是", "对", "能", "支持"))


@dataclass
class Judged:
    """One sentence of an answer: its text without citations, the sources it cites, whether they support it."""

    text: str
    cites: list[int]
    supported: bool
    precise: int  # its citations that count towards precision


def answer_sentences(answer: str) -> list[str]:
    """The answer's sentences, each with its citations ("... purr. [1]": a citation after the full stop belongs to
    the sentence before); pieces that are only citations are left out."""
    sentences: list[str] = []
    for piece in split_sentences(answer):
        if strip_citations(piece) or not sentences:
            sentences.append(piece)
        else:
            sentences[-1] += " " + piece
    return [s for s in sentences if strip_citations(s)]


def judge_citations(answer: str, sources: Sequence[str], support) -> list[Judged]:
    """ALCE's per-sentence judgement (module docstring); `sources[n - 1]` is the passage cited as [n]."""
    out: list[Judged] = []
    for sentence in answer_sentences(answer):
        text, refs = strip_citations(sentence), citations(sentence)
        if not refs or any(not 1 <= r <= len(sources) for r in refs):  # ALCE: unsupported, its citations uncounted
            out.append(Judged(text, [], False, 0))
            continue
        refs = refs[:AT_MOST_CITATIONS]
        joint = support([("\n".join(sources[r - 1] for r in refs), text)])[0]
        precise = 0
        if joint and len(refs) == 1:
            precise = 1
        elif joint:
            for i, r in enumerate(refs):
                alone = support([(sources[r - 1], text)])[0]
                rest = refs[:i] + refs[i + 1:]
                superfluous = not alone and support([("\n".join(sources[x - 1] for x in rest), text)])[0]
                precise += not superfluous
        out.append(Judged(text, refs, joint, precise))
    return out


_CJK_END = regex.compile(r"[\p{Han}。！？；：”’）」』]$")
_SENTENCE_TAIL = regex.compile(r"[.!?。！？…]+[\"'”’）)]*$")


def cite_sentences(answer: str, sources: dict[int, str], support: OverlapSupport | None = None
                   ) -> tuple[str, list[dict], float]:
    """`rag ask --cite`: every sentence of `answer` made to carry its sources. `sources` maps a source's number n
    (cited as [n]) to its text. A sentence that cites sources in range keeps them, its support being the overlap
    share (`OverlapSupport.share`) against their joint text; a sentence without one gets the source with the
    highest share, written as [n] before its final punctuation, when that share reaches `support.threshold`, and
    is marked unsupported otherwise (its support is then that best share). Returns the answer with the added
    markers, one {"text", "cites", "support", "added", "supported"} per sentence, and the answer's support: the
    mean of its sentences' (0 for an answer without sentences)."""
    support = support or OverlapSupport()
    out, texts = [], []
    for sentence in answer_sentences(answer):
        plain = strip_citations(sentence)
        cites = [n for n in dict.fromkeys(citations(sentence)) if n in sources]
        if cites:
            share = support.share("\n".join(sources[n] for n in cites), plain)
            added = False
        else:
            shares = {n: support.share(text, plain) for n, text in sources.items()}
            best = max(shares, key=lambda n: (shares[n], -n), default=None)
            share = shares[best] if best is not None else 0.0
            added = best is not None and share >= support.threshold
            if added:
                cites = [best]
                tail = _SENTENCE_TAIL.search(sentence)
                cut = tail.start() if tail else len(sentence)
                head = sentence[:cut].rstrip()
                sentence = f"{head}{'' if HAN_RUN.search(head[-1:]) else ' '}[{best}]{sentence[cut:]}"
        texts.append(sentence)
        out.append({"text": plain, "cites": cites, "support": round(share, 6), "added": added,
                    "supported": share >= support.threshold})
    joined = ""
    for sentence in texts:  # Chinese sentences follow each other without a space
        joined += sentence if not joined or HAN_RUN.match(sentence) or _CJK_END.search(joined) else " " + sentence
    return joined, out, (sum(s["support"] for s in out) / len(out) if out else 0.0)


def answer_metrics(answer: str, sources: Sequence[str], support) -> dict:
    """Citation recall and precision (ALCE) and faithfulness (RAGAS, statements = sentences) of one answer."""
    judged = judge_citations(answer, sources, support)
    if not judged:
        return {"sentences": 0, "citation_recall": 0.0, "citation_precision": 0.0, "faithfulness": 0.0}
    n_citations = sum(len(j.cites) for j in judged)
    everything = "\n".join(sources)
    faithful = support([(everything, j.text) for j in judged])
    return {"sentences": len(judged),
            "citation_recall": sum(j.supported for j in judged) / len(judged),
            "citation_precision": sum(j.precise for j in judged) / n_citations if n_citations else 0.0,
            "faithfulness": sum(faithful) / len(judged)}


def context_precision(retrieved: Sequence[str], relevant: dict[str, int]) -> float:
    """RAGAS's average precision over the retrieved list, relevance from qrels (> 0); 0 when none is relevant."""
    verdicts = [1 if relevant.get(d, 0) > 0 else 0 for d in retrieved]
    hits = sum(verdicts)
    if not hits:
        return 0.0
    return sum(sum(verdicts[:i + 1]) / (i + 1) * v for i, v in enumerate(verdicts)) / hits


def context_recall(retrieved: Sequence[str], relevant: dict[str, int]) -> float:
    """Relevant documents retrieved / relevant documents judged (RAGAS's IDBasedContextRecall)."""
    wanted = {d for d, r in relevant.items() if r > 0}
    return len(wanted & set(retrieved)) / len(wanted) if wanted else 0.0


def answer_relevance(question: str, answer: str, client, embed, n: int = 3) -> float:
    """RAGAS's ResponseRelevancy: `client` writes n questions for the answer (sampled, seeds 0..n-1), `embed`
    (texts -> L2-normalised rows) embeds them and the question; mean cosine, 0 if any reply calls it noncommittal."""
    from lmforge.infer.client import Sampling

    lang = "zh" if HAN_RUN.search(question + answer) else "en"
    replies = client.complete([QUESTION_PROMPT[lang].format(answer=strip_citations(answer))],
                              Sampling(temperature=0.7 if n > 1 else 0.0, max_tokens=64, seed=0), n=n)[0]
    generated, noncommittal = [], False
    for r in replies:
        q, flag = parse_generated_question(r.text)
        if q:
            generated.append(q)
        noncommittal |= flag
    if not generated:
        return 0.0
    vectors = np.asarray(embed([question] + generated), dtype=np.float64)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return 0.0 if noncommittal else float(np.mean(vectors[1:] @ vectors[0]))


def parse_generated_question(reply: str) -> tuple[str, bool]:
    """("Question: ..." line, Noncommittal: yes) from a QUESTION_PROMPT reply (English or Chinese labels)."""
    question, noncommittal = "", False
    for line in reply.splitlines():
        label, sep, value = regex.sub(r"[：]", ":", line, count=1).partition(":")
        label = label.strip().lower()
        if not sep:
            continue
        if label in ("question", "问题") and not question:
            question = value.strip()
        elif label in ("noncommittal", "含糊"):
            noncommittal = is_yes(value)
    return question, noncommittal


def evaluate_answers(index, queries: dict[str, str], qrels: dict[str, dict[str, int]], model, tokenizer, cfg,
                     support=None, judge=None, embed=None, progress: bool = False) -> dict:
    """`rag eval --generate`: answer every judged query with rag/answer.py's `ask` (model + tokenizer, AskConfig
    `cfg`) and score each answer: citation recall / precision and faithfulness by `support` (default
    OverlapSupport), context precision / recall of the sources' documents against the qrels, and answer relevance
    when a `judge` client and an `embed` function are given; each row also keeps the answer's support (`ask`'s, what
    --abstain compares), whether it abstained and its seconds. Returns the means and the per-query rows."""
    from lmforge.progress import progress as progress_bar
    from lmforge.rag.answer import ask

    support = support or OverlapSupport()
    rows = []
    for q in progress_bar([q for q in qrels if q in queries], desc="answers", unit="query", enabled=progress):
        started = time.perf_counter()
        result = ask(index, queries[q], model, tokenizer, cfg)
        seconds = time.perf_counter() - started
        sources = result["sources"]
        docs = list(dict.fromkeys(s["doc_id"] for s in sources))
        answer = result["answer"] or ""
        row = {"query": q, "answer": answer, "answered": result["answered"], "sources": docs,
               **answer_metrics(answer, [s["text"] for s in sources], support),
               "context_precision": context_precision(docs, qrels[q]), "context_recall": context_recall(docs, qrels[q]),
               "answer_support": result.get("support", 0.0), "abstained": bool(result.get("abstained")),
               "seconds": round(seconds, 3)}
        if judge is not None and embed is not None:
            row["answer_relevance"] = answer_relevance(queries[q], answer, judge, embed) if answer else 0.0
        rows.append(row)
    names = ["citation_recall", "citation_precision", "faithfulness", "answer_support", "context_precision",
             "context_recall"] + (
        ["answer_relevance"] if judge is not None and embed is not None else [])
    means = {n: float(np.mean([r[n] for r in rows])) if rows else 0.0 for n in names}
    means["answered"] = sum(r["answered"] for r in rows)
    means["abstained"] = sum(r["abstained"] for r in rows)
    means["seconds_per_answer"] = float(np.mean([r["seconds"] for r in rows])) if rows else 0.0
    return {"queries": len(rows), "support": "judge" if isinstance(support, JudgeSupport) else "overlap",
            "metrics": means, "rows": rows}
