"""Cited answers: retrieve, build a prompt with numbered sources inside the model's context
budget, generate, and map the [n] citations in the answer back to documents and offsets.

When nothing relevant is retrieved (dense cosine below `min_similarity`, or no BM25 match for
a sparse-only index) the model is not called and the answer says so: a model asked to answer
without sources makes things up.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import regex

from lmforge.chat.templates import apply_chat_template
from lmforge.rag.config import AskConfig
from lmforge.rag.index import Hit, RagIndex
from lmforge.text import HAN_RUN

NO_ANSWER = "I don't know: the indexed documents contain nothing relevant to this question."
NO_ANSWER_ZH = "我不知道：索引中的文档没有与这个问题相关的内容。"
# --abstain's reply: sources were found, but the answer they gave is not supported by them
NOT_IN_DOCUMENTS = "The answer is not in the documents."
NOT_IN_DOCUMENTS_ZH = "文档中没有这个问题的答案。"
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
                 instructions: str = INSTRUCTIONS, number_from: int = 1) -> tuple[list[int], list[Hit]]:
    """The prompt's token ids with as many sources (best first, numbered from `number_from`) as fit in `budget`
    tokens; the last one may be cut. Uses the tokenizer's chat template when it has one. Sources and the question
    are data: a special token's text inside them is encoded as text, never as a control token."""
    def render(sources: list[str]) -> list[int]:
        body = instructions + "\n\n" + "\n\n".join(sources) + f"\n\nQuestion: {question}\n"
        if getattr(tokenizer, "chat_template", None):
            return apply_chat_template(tokenizer, [{"role": "user", "content": body}], add_generation_prompt=True,
                                       tokenize=True)
        return tokenizer.encode(body + "Answer:", disallowed_special=())

    sources: list[str] = []
    used: list[Hit] = []
    for h in hits:
        label = f"[{len(used) + number_from}] ({h.chunk.doc_id}{' > ' + ' > '.join(h.chunk.heading) if h.chunk.heading else ''})"
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


def retrieve(index: RagIndex, question: str, cfg: AskConfig) -> list[Hit]:
    """The relevant hits for `question` (`relevant_hits` of cfg.k hits, BM25 alone for an index without vectors)."""
    dense = index.cfg.dense
    return relevant_hits(index.search(question, k=cfg.k, mode=cfg.mode if dense else "sparse"), cfg,
                         dense and cfg.mode != "sparse")


def no_answer(question: str) -> str:
    """The reply when nothing relevant was retrieved, in the question's language."""
    return NO_ANSWER_ZH if HAN_RUN.search(question) else NO_ANSWER


def fit_prompt(question: str, hits: list[Hit], tokenizer, context: int, want: int,
               number_from: int = 1) -> tuple[list[int], list[Hit]]:
    """`build_prompt` within a `context`-token model leaving `want` tokens for the answer; in a context too small for
    that and one source, the answer's room shrinks to a quarter of the context (at least 16 tokens), then the
    instructions to their brief form; ContextTooSmall when not even a cut source fits."""
    prompt, used = build_prompt(question, hits, tokenizer, context - want, number_from=number_from)
    small = min(want, max(16, context // 4))
    if not used:  # a small context: less room for the answer rather than no answer
        prompt, used = build_prompt(question, hits, tokenizer, context - small, number_from=number_from)
    if not used:  # and brief instructions rather than none
        prompt, used = build_prompt(question, hits, tokenizer, context - small, BRIEF_INSTRUCTIONS, number_from)
    if not used:  # not even a cut source fits next to the instructions and the question
        raise ContextTooSmall(f"the model's {context}-token context cannot hold the question and one source (the "
                              f"prompt alone takes {len(prompt)} tokens): use a model with a longer context")
    return prompt, used


def answer_prompt(index: RagIndex, question: str, tokenizer, cfg: AskConfig, context: int,
                  max_new_tokens: int | None = None) -> AnswerPrompt:
    """Retrieve the relevant sources of `question` and build its prompt within a `context`-token model, leaving
    `max_new_tokens` (default cfg.max_new_tokens) for the answer (`fit_prompt`: in a small context the answer's room
    and then the instructions shrink, and the budget says so). What `lmforge rag ask` and `lmforge serve --index`
    both answer from."""
    hits = retrieve(index, question, cfg)
    if not hits:
        return AnswerPrompt(None, [], 0, no_answer(question))
    want = max_new_tokens or cfg.max_new_tokens
    prompt, used = fit_prompt(question, hits, tokenizer, context, want)
    return AnswerPrompt(prompt, [numbered_source(i + 1, h) for i, h in enumerate(used)], min(want, context - len(prompt)))


def ask(index: RagIndex, question: str, model=None, tokenizer=None, cfg: AskConfig | None = None) -> dict:
    """Retrieve, answer, cite. Without a model: the retrieved sources only (retrieval-only mode). cfg.rag picks how
    the sources reach the model: one prompt holding them all ("stuff"), or one prompt per source with the answer
    marginalised over them ("sequence", "token": rag/marginal.py). Then cfg.cite and cfg.abstain (`ground`)."""
    cfg = cfg or AskConfig()
    if model is None or tokenizer is None:
        hits = retrieve(index, question, cfg)
        if not hits:
            return {"question": question, "answer": no_answer(question), "answered": False, "citations": [],
                    "sources": []}
        return {"question": question, "answer": None, "answered": False, "citations": [],
                "sources": [numbered_source(i + 1, h) for i, h in enumerate(hits)]}
    context = cfg.context_tokens or model.cfg.max_seq_len
    if cfg.rag == "stuff":
        result = _ask_stuffed(index, question, model, tokenizer, cfg, context)
    else:
        result = _ask_marginal(index, question, model, tokenizer, cfg, context)
    return ground(result, cfg) if result["answered"] else result


def _ask_stuffed(index: RagIndex, question: str, model, tokenizer, cfg: AskConfig, context: int) -> dict:
    """One prompt with as many sources as fit, one generation."""
    from lmforge.infer import SamplingConfig, generate

    found = answer_prompt(index, question, tokenizer, cfg, context)
    if found.prompt is None:
        return {"question": question, "answer": found.no_answer, "answered": False, "citations": [], "sources": []}
    if found.max_new_tokens < cfg.max_new_tokens:
        warnings.warn(f"the answer gets {found.max_new_tokens} tokens, not {cfg.max_new_tokens}: the question and its "
                      f"sources take {len(found.prompt)} of the model's {context}-token context", stacklevel=3)
    text = generate(model, tokenizer, found.prompt, SamplingConfig(max_new_tokens=found.max_new_tokens,
                                                                  temperature=cfg.temperature, seed=0)).strip()
    return {"question": question, "answer": text, "answered": True, "rag": "stuff",
            "prompt_tokens": len(found.prompt), "sources": found.sources}


def _ask_marginal(index: RagIndex, question: str, model, tokenizer, cfg: AskConfig, context: int) -> dict:
    """RAG-Sequence / RAG-Token: source n alone in its own prompt (numbered [n], as in the stuffed prompt), the
    answer marginalised over the sources by their retrieval prior (rag/marginal.py)."""
    from lmforge.infer import SamplingConfig
    from lmforge.rag.marginal import document_log_prior, rag_sequence, rag_token

    hits = retrieve(index, question, cfg)
    if not hits:
        return {"question": question, "answer": no_answer(question), "answered": False, "citations": [], "sources": []}
    prompts = [fit_prompt(question, [h], tokenizer, context, cfg.max_new_tokens, number_from=n)[0]
               for n, h in enumerate(hits, start=1)]
    log_prior = document_log_prior(hits, cfg.prior_temperature)
    sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=0)
    sources = [numbered_source(n, h) | {"prior": round(math.exp(lp), 6)}
               for n, (h, lp) in enumerate(zip(hits, log_prior), start=1)]
    result = {"question": question, "answered": True, "rag": cfg.rag, "prompt_tokens": max(map(len, prompts)),
              "sources": sources}
    if cfg.rag == "sequence":
        ranked = rag_sequence(model, tokenizer, prompts, log_prior, sampling)
        best = ranked[0]
        result["candidates"] = [{"answer": m.text, "logprob": round(m.logprob, 6),
                                 "per_source": [round(x, 6) for x in m.per_document]} for m in ranked]
    else:
        best = rag_token(model, tokenizer, prompts, log_prior, sampling)
    return {**result, "answer": best.text, "logprob": round(best.logprob, 6)}


def ground(result: dict, cfg: AskConfig) -> dict:
    """An answered result made grounded: with cfg.cite every sentence carries its sources (`grounding.cite_sentences`:
    a sentence without [n] gets its best-supporting source, or is marked unsupported), with cfg.abstain the answer
    becomes the fixed "not in the documents" reply (in the question's language) when its support is below the
    threshold; `citations` lists the sources the final answer cites."""
    from lmforge.rag.grounding import cite_sentences

    sources = result["sources"]
    texts = {s["n"]: s["text"] for s in sources}
    answer, sentences, support = cite_sentences(result["answer"], texts)
    result = {**result, "support": round(support, 6)}
    if cfg.cite:
        result |= {"answer": answer, "sentences": sentences}
    if cfg.abstain is not None and support < cfg.abstain:
        result |= {"answer": NOT_IN_DOCUMENTS_ZH if HAN_RUN.search(result["question"]) else NOT_IN_DOCUMENTS,
                   "abstained": True, "model_answer": result["answer"]}
        result.pop("sentences", None)
    cited = parse_citations(result["answer"], max(texts, default=0))
    by_n = {s["n"]: s for s in sources}
    return {**result, "citations": [by_n[n] for n in cited if n in by_n]}


def numbered_source(n: int, h: Hit) -> dict:
    """A hit as the n-th source of a prompt (what answers list and citations point to)."""
    c = h.chunk
    return {"n": n, "doc_id": c.doc_id, "start": c.start, "end": c.end, "heading": c.heading,
            "score": round(h.score, 6), "scores": {k: round(v, 6) for k, v in h.scores.items()}, "text": c.text}
