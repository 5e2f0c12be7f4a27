"""Cited answers: retrieve, build a prompt with numbered sources inside the model's context
budget, generate, and map the [n] citations in the answer back to documents and offsets.

When nothing relevant is retrieved (dense cosine below `min_similarity`, or no BM25 match for
a sparse-only index) the model is not called and the answer says so: a model asked to answer
without sources makes things up.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import regex

from lmforge.chat.templates import apply_chat_template
from lmforge.rag.index import Hit, RagIndex
from lmforge.text import HAN_RUN

NO_ANSWER = "I don't know: the indexed documents contain nothing relevant to this question."
NO_ANSWER_ZH = "我不知道：索引中的文档没有与这个问题相关的内容。"
INSTRUCTIONS = ("Answer the question using only the numbered sources below. Cite the sources you use as [1], [2]. "
                "If the sources do not contain the answer, say you don't know.")
_CITATION = regex.compile(r"\[(\d+(?:\s*,\s*\d+)*)\]")



class ContextTooSmall(ValueError):
    """The model's context cannot hold the instructions, the question and one source."""


@dataclass
class AskConfig:
    k: int = 5
    mode: str = field(default="hybrid", metadata={"choices": ["sparse", "dense", "hybrid"]})
    min_similarity: float = 0.3  # dense cosine a source needs to count as relevant
    min_bm25: float = 0.0  # sparse-only indexes: BM25 score a source needs
    max_new_tokens: int = 200
    temperature: float = 0.0
    context_tokens: int | None = None  # default: the model's max_seq_len


def relevant_hits(hits: list[Hit], cfg: AskConfig, dense: bool) -> list[Hit]:
    """Hits that count as evidence: dense cosine >= min_similarity where the hit has a dense score,
    else (BM25-only index, or a query the embedder cannot read) BM25 > min_bm25."""
    def ok(h: Hit) -> bool:
        if "dense" in h.scores and dense:
            return h.scores["dense"] >= cfg.min_similarity
        return h.scores.get("sparse", 0.0) > cfg.min_bm25
    return [h for h in hits if ok(h)]


def build_prompt(question: str, hits: list[Hit], tokenizer, budget: int) -> tuple[list[int], list[Hit]]:
    """The prompt's token ids with as many sources (best first) as fit in `budget` tokens; the last one may be cut.
    Uses the tokenizer's chat template when it has one. Sources and the question are data: a special token's
    text inside them is encoded as text, never as a control token."""
    def render(sources: list[str]) -> list[int]:
        body = INSTRUCTIONS + "\n\n" + "\n\n".join(sources) + f"\n\nQuestion: {question}\n"
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


def ask(index: RagIndex, question: str, model=None, tokenizer=None, cfg: AskConfig | None = None) -> dict:
    """Retrieve, answer, cite. Without a model: the retrieved sources only (retrieval-only mode)."""
    cfg = cfg or AskConfig()
    hits = index.search(question, k=cfg.k, mode=cfg.mode if index.cfg.dense else "sparse")
    hits = relevant_hits(hits, cfg, index.cfg.dense and cfg.mode != "sparse")
    zh = bool(HAN_RUN.search(question))
    if not hits:
        return {"question": question, "answer": NO_ANSWER_ZH if zh else NO_ANSWER, "answered": False,
                "citations": [], "sources": []}
    if model is None or tokenizer is None:
        return {"question": question, "answer": None, "answered": False, "citations": [],
                "sources": [numbered_source(i + 1, h) for i, h in enumerate(hits)]}
    from lmforge.infer import SamplingConfig, generate

    context = cfg.context_tokens or model.cfg.max_seq_len
    budget = context - cfg.max_new_tokens
    prompt, used = build_prompt(question, hits, tokenizer, budget)
    if not used:  # not even a cut source fits next to the instructions and the question
        raise ContextTooSmall(f"the model's context ({context} tokens, {cfg.max_new_tokens} of them kept for the answer) "
                         f"cannot hold the question and one source; the prompt alone takes {len(prompt)} tokens: "
                         "use a model with a longer context, or lower --max-new-tokens")
    text = generate(model, tokenizer, prompt, SamplingConfig(max_new_tokens=cfg.max_new_tokens,
                                                            temperature=cfg.temperature, seed=0)).strip()
    cited = parse_citations(text, len(used))
    sources = [numbered_source(i + 1, h) for i, h in enumerate(used)]
    return {"question": question, "answer": text, "answered": True, "prompt_tokens": len(prompt),
            "citations": [sources[n - 1] for n in cited], "sources": sources}


def numbered_source(n: int, h: Hit) -> dict:
    """A hit as the n-th source of a prompt (what answers list and citations point to)."""
    c = h.chunk
    return {"n": n, "doc_id": c.doc_id, "start": c.start, "end": c.end, "heading": c.heading,
            "score": round(h.score, 6), "scores": {k: round(v, 6) for k, v in h.scores.items()}, "text": c.text}
