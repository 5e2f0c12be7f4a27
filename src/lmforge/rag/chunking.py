"""Chunkers: split documents into retrievable pieces that keep exact character offsets.

Every chunk records its document id, `start`/`end` offsets such that
`document.text[start:end] == chunk.text` (tested for every chunker on English and Chinese),
and the heading path it sits under (markdown). Chunkers:

  none       the whole document (BEIR corpora: one passage per entry)
  fixed      windows of `size` characters (or tokens, with a tokenizer) overlapping by `overlap`
  recursive  split on paragraphs, then sentences (English and Chinese punctuation), then words,
             then characters, merging neighbours up to `size` (LangChain's recursive splitter, with offsets)
  markdown   sections by heading (the heading path kept as metadata), code fences never split;
             long sections are cut recursively
  semantic   sentences grouped where the embedding distance between adjacent sentence windows
             stays below a breakpoint (percentile, standard deviation or interquartile rule),
             never beyond `max_size` so a chunk always fits the embedder
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import regex

from lmforge.data.document import Document
from lmforge.rag.config import ChunkerConfig
from lmforge.text import SENTENCE_BREAK, UNSPACED


@dataclass
class Chunk:
    doc_id: str
    text: str
    start: int  # character offsets into the document text
    end: int
    heading: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def chunk_id(self) -> str:
        return f"{self.doc_id}#{self.start}-{self.end}"


# ----- splitting into spans ---------------------------------------------------------------------

_PARAGRAPH = regex.compile(r"\n\s*\n")
_SENTENCE = SENTENCE_BREAK  # lmforge/text.py: . ! ? before a space, or 。！？；… anywhere, closers included
# a word break: after a space, or after/before a character of an unspaced script (every such character can end a piece)
_WORD = regex.compile(rf"(?<=\s)(?=\S)|(?<=[{UNSPACED}])(?=\S)|(?<=\S)(?=[\p{{Han}}])")


def _split_spans(text: str, start: int, end: int, pattern: regex.Pattern) -> list[tuple[int, int]]:
    """Cut [start, end) at every match of `pattern`; the separator stays with the left piece."""
    spans, pos = [], start
    for m in pattern.finditer(text, start, end):
        cut = m.end()
        if cut > pos and cut < end:
            spans.append((pos, cut))
            pos = cut
    spans.append((pos, end))
    return [(a, b) for a, b in spans if b > a]


def _trim(text: str, a: int, b: int) -> tuple[int, int]:
    while a < b and text[a].isspace():
        a += 1
    while b > a and text[b - 1].isspace():
        b -= 1
    return a, b


def _recursive_spans(text: str, start: int, end: int, size: int, length: Callable[[str], int]) -> list[tuple[int, int]]:
    """Spans of at most `size` (by `length`): paragraphs, else sentences, else words, else characters."""
    if length(text[start:end]) <= size:
        return [(start, end)]
    for pattern in (_PARAGRAPH, _SENTENCE, _WORD):
        pieces = _split_spans(text, start, end, pattern)
        if len(pieces) > 1:
            break
    else:  # one unbreakable run: cut by characters
        step = max(1, size)
        while length(text[start:start + step]) > size and step > 1:
            step //= 2
        return [(a, min(a + step, end)) for a in range(start, end, step)]
    out: list[tuple[int, int]] = []
    for a, b in pieces:
        out.extend(_recursive_spans(text, a, b, size, length) if length(text[a:b]) > size else [(a, b)])
    return out


def _merge(text: str, spans: list[tuple[int, int]], size: int, overlap: int,
           length: Callable[[str], int]) -> list[tuple[int, int]]:
    """Greedily join adjacent spans up to `size`; the next chunk starts `overlap` back (whole pieces)."""
    chunks, i = [], 0
    while i < len(spans):
        j = i + 1
        while j < len(spans) and length(text[spans[i][0]:spans[j][1]]) <= size:
            j += 1
        chunks.append((spans[i][0], spans[j - 1][1]))
        if j >= len(spans):
            break
        back = j
        while overlap and back - 1 > i and length(text[spans[back - 1][0]:spans[j - 1][1]]) <= overlap:
            back -= 1
        i = back if back > i else j
    return chunks


# ----- chunkers ---------------------------------------------------------------------------------

class Chunker:
    def __init__(self, cfg: ChunkerConfig | None = None, tokenizer=None,
                 embed: Callable[[list[str]], np.ndarray] | None = None):
        self.cfg = cfg or ChunkerConfig()
        self.tokenizer = tokenizer
        self.embed = embed
        self.length: Callable[[str], int] = (lambda s: len(tokenizer.encode(s))) if tokenizer is not None else len
        if self.cfg.overlap >= self.cfg.size and self.cfg.kind != "none":
            raise ValueError(f"chunk overlap ({self.cfg.overlap}) must be smaller than size ({self.cfg.size})")

    def __call__(self, doc: Document) -> list[Chunk]:
        kind = self.cfg.kind
        if kind == "none":
            spans = [(0, len(doc.text))]
            headings = [[]]
        elif kind == "fixed":
            spans, headings = self._fixed(doc.text), None
        elif kind == "recursive":
            spans = _merge(doc.text, _recursive_spans(doc.text, 0, len(doc.text), self.cfg.size, self.length),
                           self.cfg.size, self.cfg.overlap, self.length)
            headings = None
        elif kind == "markdown":
            spans, headings = self._markdown(doc.text)
        elif kind == "semantic":
            spans, headings = self._semantic(doc.text), None
        else:
            raise ValueError(f"unknown chunker {kind!r}")
        out = []
        for n, (a, b) in enumerate(spans):
            a, b = _trim(doc.text, a, b)
            if b > a:
                out.append(Chunk(doc.id, doc.text[a:b], a, b, headings[n] if headings else [], dict(doc.meta)))
        return out

    def _fixed(self, text: str) -> list[tuple[int, int]]:
        size, overlap = self.cfg.size, self.cfg.overlap
        if self.tokenizer is None:
            return [(a, min(a + size, len(text))) for a in range(0, max(1, len(text) - overlap), size - overlap)]
        spans = token_offsets(self.tokenizer, text)
        out = []
        for i in range(0, max(1, len(spans) - overlap), size - overlap):
            window = spans[i:i + size]
            if window:
                out.append((window[0][0], window[-1][1]))
        return out

    def _markdown(self, text: str) -> tuple[list[tuple[int, int]], list[list[str]]]:
        sections: list[tuple[int, int, list[str]]] = []  # (start, end, heading path)
        path: list[tuple[int, str]] = []
        start, in_fence, pos = 0, False, 0
        for line in text.splitlines(keepends=True):
            stripped = line.strip()
            if stripped.startswith(("```", "~~~")):
                in_fence = not in_fence
            m = None if in_fence else regex.match(r"(#{1,6})\s+(.+?)\s*#*\s*$", stripped)
            if m:
                if pos > start:
                    sections.append((start, pos, [h for _, h in path]))
                level = len(m.group(1))
                path = [(lv, h) for lv, h in path if lv < level] + [(level, m.group(2))]
                start = pos
            pos += len(line)
        sections.append((start, len(text), [h for _, h in path]))
        spans, headings = [], []
        for a, b, head in sections:
            if b <= a or not text[a:b].strip():
                continue
            for x, y in self._cut_section(text, a, b):
                spans.append((x, y))
                headings.append(head)
        return spans, headings

    def _cut_section(self, text: str, a: int, b: int) -> list[tuple[int, int]]:
        """A section as is if it fits; else recursive pieces, with fenced code blocks kept whole."""
        if self.length(text[a:b]) <= self.cfg.size:
            return [(a, b)]
        blocks, pos = [], a
        for m in regex.finditer(r"(?ms)^(```|~~~).*?^\1[^\n]*$", text, pos=a, endpos=b):
            if m.start() > pos:
                blocks.append((pos, m.start(), False))
            blocks.append((m.start(), m.end(), True))
            pos = m.end()
        if pos < b:
            blocks.append((pos, b, False))
        pieces: list[tuple[int, int]] = []
        for x, y, fence in blocks:
            pieces.extend([(x, y)] if fence else _recursive_spans(text, x, y, self.cfg.size, self.length))
        return _merge(text, pieces, self.cfg.size, 0, self.length)

    def _semantic(self, text: str) -> list[tuple[int, int]]:
        if self.embed is None:
            raise ValueError("the semantic chunker needs an embedding function (e.g. SentenceEmbedder.embed)")
        sentences = [s for s in _split_spans(text, 0, len(text), _SENTENCE) if text[s[0]:s[1]].strip()]
        if len(sentences) < 3:
            return _merge(text, _recursive_spans(text, 0, len(text), self.cfg.max_size, self.length),
                          self.cfg.max_size, 0, self.length)
        w = self.cfg.window
        windows = [text[sentences[max(0, i - w)][0]:sentences[min(len(sentences) - 1, i + w)][1]]
                   for i in range(len(sentences))]
        vectors = np.asarray(self.embed(windows), dtype=np.float32)
        vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        distance = 1 - np.sum(vectors[:-1] * vectors[1:], axis=1)  # between sentence i and i+1
        threshold = breakpoint_threshold(distance, self.cfg.breakpoint, self.cfg.breakpoint_amount)
        groups, current = [], [sentences[0]]
        for i, sent in enumerate(sentences[1:]):
            too_big = self.length(text[current[0][0]:sent[1]]) > self.cfg.max_size
            if distance[i] > threshold or too_big:
                groups.append((current[0][0], current[-1][1]))
                current = []
            current.append(sent)
        groups.append((current[0][0], current[-1][1]))
        out = []  # a single sentence longer than max_size is cut recursively
        for a, b in groups:
            out.extend(_merge(text, _recursive_spans(text, a, b, self.cfg.max_size, self.length), self.cfg.max_size, 0,
                              self.length) if self.length(text[a:b]) > self.cfg.max_size else [(a, b)])
        return out


def token_offsets(tokenizer, text: str) -> list[tuple[int, int]]:
    """(start, end) character offsets of every token piece of `text` (a character split over
    several byte-level tokens is one piece)."""
    out, pos = [], 0
    for piece, _ in tokenizer.token_spans(text):
        at = text.find(piece, pos) if piece else -1
        if at < 0:  # a normalising tokenizer: no exact piece, advance by its length
            at = pos
        out.append((at, at + len(piece)))
        pos = at + len(piece)
    return out


def breakpoint_threshold(distance: np.ndarray, rule: str, amount: float | None) -> float:
    """The distance above which adjacent sentences start a new chunk (LlamaIndex/LangChain rules)."""
    if rule == "percentile":
        return float(np.percentile(distance, 95 if amount is None else amount))
    if rule == "stddev":
        return float(np.mean(distance) + (3 if amount is None else amount) * np.std(distance))
    if rule == "iqr":
        q1, q3 = np.percentile(distance, [25, 75])
        return float(np.mean(distance) + (1.5 if amount is None else amount) * (q3 - q1))
    raise ValueError(f"breakpoint must be percentile, stddev or iqr, got {rule!r}")
