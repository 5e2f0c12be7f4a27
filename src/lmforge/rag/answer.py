"""Cited answers: retrieve, build a prompt with numbered sources inside the model's context
budget, generate, and map the [n] citations in the answer back to documents and offsets.

When nothing relevant is retrieved (dense cosine below `min_similarity`, or no BM25 match for
a sparse-only index) the model is not called and the answer says so: a model asked to answer
without sources makes things up.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import regex

from lmforge.chat.templates import apply_chat_template
from lmforge.rag.config import AskConfig
from lmforge.rag.index import Hit, RagIndex
from lmforge.text import HAN_RUN

NO_ANSWER = "I don't know: the indexed documents contain nothing relevant to this question."
NO_ANSWER_ZH = "我不知道：索引中的文档没有与这个问题相关的内容。"
INSTRUCTIONS = ("Answer the question using only the numbered sources below. Cite the sources you use as [1], [2]. "
                "If the sources do not contain the answer, say you don't know.")
# what a small context (a 128-token model's) gets in their place: the same request in a few tokens
BRIEF_INSTRUCTIONS = "Answer from the sources; cite them as [1]."
_CITATION = regex.compile(r"\[(\d+(?:\s*,\s*\d+)*)\]")


class ContextTooSmall(ValueError):
    """The model's context cannot hold the instructions, the question and one source."""


def relevant_hits(hits: list[Hit], cfg: AskConfig, dense: bool) -> list[Hit]:
    """Hits that count as evidence: dense cosine >= min_similarity where the hit has a dense score,
    else (BM25-only index, or a query the embedder cannot read) BM25 > min_bm25."""
    def ok(h: Hit) -> bool:
        if "dense" in h.scores and dense:
            return h.scores["dense"] >= cfg.min_similarity
        return h.scores.get("sparse", 0.0) > cfg.min_bm25
    return [h for h in hits if ok(h)]


def build_prompt(question: str, hits: list[Hit], tokenizer, budget: int,
                 instructions: str = INSTRUCTIONS) -> tuple[list[int], list[Hit]]:
    """The prompt's token ids with as many sources (best first) as fit in `budget` tokens; the last one may be cut.
    Uses the tokenizer's chat template when it has one. Sources and the question are data: a special token's
    text inside them is encoded as text, never as a control token."""
    def render(sources: list[str]) -> list[int]:
        body = instructions + "\n\n" + "\n\n".join(sources) + f"\n\nQuestion: {question}\n"
        if getattr(tokenizer, "chat_template", None):
            return apply_chat_template(tokenizer, [{"role": "user", "content": body}], add_generation_prompt=True,
                                       tokenize=True)
        return tokenizer.encode(body + "Answer:", disallowed_special=())

    sources: list[str] = []
    used: list[Hit] = []
    for h in hits:
        label = f"[{len(used) + 1}] ({h.chunk.doc_id}{' > ' + ' > '.join(h.chunk.heading) if h.chunk.heading else ''})"
        candidate = f"{label}\n{h.chunk.text}"
        if len(render(sources + [candidate])) <= budget:
            sources.append(candidate)
            used.append(h)
            continue
        room = budget - len(render(sources + [label + "\n"]))
        if room > 20:  # cut this source to what fits (by tokens), then stop
            ids = tokenizer.encode(h.chunk.text, disallowed_special=())[:room]
            text = tokenizer.decode(ids)
            while text and len(render(sources + [f"{label}\n{text}"])) > budget:
                text = text[: int(len(text) * 0.9)]
            if text:
                sources.append(f"{label}\n{text}")
                used.append(h)
        break
    return render(sources), used


def parse_citations(answer: str, n_sources: int) -> list[int]:
    """Distinct source numbers cited as [n] or [n, m], in order of first appearance (1-based, in range)."""
    out: list[int] = []
    for m in _CITATION.finditer(answer):
        for part in m.group(1).split(","):
            n = int(part)
            if 1 <= n <= n_sources and n not in out:
                out.append(n)
    return out


@dataclass
class AnswerPrompt:
    """What a question is answered from: the prompt's ids (None when nothing relevant was found; `no_answer` is then
    the reply), the retrieved sources it holds (best first, as `numbered_source` dicts), and the reply's token budget (at
    most the asked max_new_tokens, less where the prompt leaves less of the context)."""

    prompt: list[int] | None
    sources: list[dict]
    max_new_tokens: int
    no_answer: str = ""


def answer_prompt(index: RagIndex, question: str, tokenizer, cfg: AskConfig, context: int,
                  max_new_tokens: int | None = None) -> AnswerPrompt:
    """Retrieve the relevant sources of `question` and build its prompt within a `context`-token model, leaving
    `max_new_tokens` (default cfg.max_new_tokens) for the answer; in a context too small for that and one source,
    the answer's room shrinks to a quarter of the context (at least 16 tokens), then the instructions to their brief
    form, and the budget says so. What
    `lmforge rag ask` and `lmforge serve --index` both answer from."""
    dense = index.cfg.dense
    hits = relevant_hits(index.search(question, k=cfg.k, mode=cfg.mode if dense else "sparse"), cfg,
                         dense and cfg.mode != "sparse")
    if not hits:
        return AnswerPrompt(None, [], 0, NO_ANSWER_ZH if HAN_RUN.search(question) else NO_ANSWER)
    want = max_new_tokens or cfg.max_new_tokens
    prompt, used = build_prompt(question, hits, tokenizer, context - want)
    if not used:  # a small context: less room for the answer rather than no answer
        prompt, used = build_prompt(question, hits, tokenizer, context - min(want, max(16, context // 4)))
    if not used:  # and brief instructions rather than none
        prompt, used = build_prompt(question, hits, tokenizer, context - min(want, max(16, context // 4)),
                                    BRIEF_INSTRUCTIONS)
    if not used:  # not even a cut source fits next to the instructions and the question
        raise ContextTooSmall(f"the model's {context}-token context cannot hold the question and one source (the "
                              f"prompt alone takes {len(prompt)} tokens): use a model with a longer context")
    return AnswerPrompt(prompt, [numbered_source(i + 1, h) for i, h in enumerate(used)], min(want, context - len(prompt)))


def ask(index: RagIndex, question: str, model=None, tokenizer=None, cfg: AskConfig | None = None) -> dict:
    """Retrieve, answer, cite. Without a model: the retrieved sources only (retrieval-only mode)."""
    cfg = cfg or AskConfig()
    if model is None or tokenizer is None:
        hits = relevant_hits(index.search(question, k=cfg.k, mode=cfg.mode if index.cfg.dense else "sparse"), cfg,
                             index.cfg.dense and cfg.mode != "sparse")
        if not hits:
            return {"question": question, "answer": NO_ANSWER_ZH if HAN_RUN.search(question) else NO_ANSWER,
                    "answered": False, "citations": [], "sources": []}
        return {"question": question, "answer": None, "answered": False, "citations": [],
                "sources": [numbered_source(i + 1, h) for i, h in enumerate(hits)]}
    from lmforge.infer import SamplingConfig, generate

    context = cfg.context_tokens or model.cfg.max_seq_len
    found = answer_prompt(index, question, tokenizer, cfg, context)
    if found.prompt is None:
        return {"question": question, "answer": found.no_answer, "answered": False, "citations": [], "sources": []}
    if found.max_new_tokens < cfg.max_new_tokens:
        warnings.warn(f"the answer gets {found.max_new_tokens} tokens, not {cfg.max_new_tokens}: the question and its "
                      f"sources take {len(found.prompt)} of the model's {context}-token context", stacklevel=2)
    text = generate(model, tokenizer, found.prompt, SamplingConfig(max_new_tokens=found.max_new_tokens,
                                                                  temperature=cfg.temperature, seed=0)).strip()
    cited = parse_citations(text, len(found.sources))
    return {"question": question, "answer": text, "answered": True, "prompt_tokens": len(found.prompt),
            "citations": [found.sources[n - 1] for n in cited], "sources": found.sources}


def numbered_source(n: int, h: Hit) -> dict:
    """A hit as the n-th source of a prompt (what answers list and citations point to)."""
    c = h.chunk
    return {"n": n, "doc_id": c.doc_id, "start": c.start, "end": c.end, "heading": c.heading,
            "score": round(h.score, 6), "scores": {k: round(v, 6) for k, v in h.scores.items()}, "text": c.text}
