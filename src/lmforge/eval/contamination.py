"""Benchmark contamination: how much of each benchmark item appears word for word in a training corpus.

An item's text (its question as the task renders it, plus the gold answer) is cut into n-grams: 13 words by
default (the GPT-3 paper's decontamination rule), or 13 characters for Chinese text (an item whose letters are at
least 30% CJK, the dedup stage's rule). The corpus streams through the data stage's vectorised shingle hashing
(lmforge.data.dedup.shingle_hashes); a document that shares a hash with an item is then checked exactly, n-gram by
n-gram, so a 32-bit hash collision never flags an item. An item is contaminated when at least `threshold` of its
n-grams occur in the corpus. Items shorter than one n-gram cannot be checked and are counted as such.
"""

from __future__ import annotations

import unicodedata
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import regex

from lmforge.data.dedup import shingle_hashes

_TOKEN = regex.compile(r"[\p{L}\p{N}]+")
_CJK = regex.compile(r"[\p{Han}\p{Hiragana}\p{Katakana}\p{Hangul}]")
_LETTER = regex.compile(r"[\p{L}\p{N}]")


def _unit(text: str) -> str:
    letters = len(_LETTER.findall(text))
    return "char" if letters and len(_CJK.findall(text)) >= 0.3 * letters else "word"


def _tokens(text: str, unit: str) -> list[str]:
    text = unicodedata.normalize("NFKC", text).lower()  # as the dedup stage's hashing reads text
    if unit == "char":
        return _LETTER.findall(text)
    return _TOKEN.findall(text)


def _ngrams(tokens: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}


@dataclass
class ContaminationReport:
    """Per item: the share of its n-grams found in the corpus (None: too short to check), and where."""

    ngram: int
    threshold: float
    overlap: list[float | None]
    documents: list[list[str]]  # ids of the corpus documents that hold the item's n-grams (the first few)

    @property
    def contaminated(self) -> list[int]:
        return [i for i, o in enumerate(self.overlap) if o is not None and o >= self.threshold]

    def summary(self) -> dict:
        checked = [o for o in self.overlap if o is not None]
        return {"items": len(self.overlap), "checked": len(checked), "too_short": len(self.overlap) - len(checked),
                "contaminated": len(self.contaminated),
                "contaminated_share": len(self.contaminated) / len(checked) if checked else 0.0,
                "mean_overlap": float(np.mean(checked)) if checked else 0.0, "ngram": self.ngram,
                "threshold": self.threshold}


def check_contamination(items: Sequence[str], corpus: Iterable[tuple[str, str]], ngram: int = 13,
                        threshold: float = 0.5, batch: int = 512, max_docs_listed: int = 5,
                        progress: Callable[[int], None] | None = None) -> ContaminationReport:
    """Overlap of each item with `corpus`, an iterable of (document id, text)."""
    units = [_unit(t) for t in items]
    exact = [_ngrams(_tokens(t, u), ngram) for t, u in zip(items, units)]
    owners: dict[tuple[str, int], list[int]] = defaultdict(list)  # (unit, hash) -> items
    for unit in ("word", "char"):
        idx = [i for i, u in enumerate(units) if u == unit and exact[i]]
        if not idx:
            continue
        hashes, offsets = shingle_hashes([items[i] for i in idx], ngram, unit)
        for k, i in enumerate(idx):
            for h in np.unique(hashes[offsets[k]:offsets[k + 1]]).tolist():
                owners[(unit, h)].append(i)
    tables = {u: np.array(sorted(h for uu, h in owners if uu == u), dtype=np.uint32) for u in ("word", "char")}
    found: list[set] = [set() for _ in items]
    docs: list[list[str]] = [[] for _ in items]

    def scan(chunk: list[tuple[str, str]]) -> None:
        texts = [t for _, t in chunk]
        for unit, table in tables.items():
            if not len(table):
                continue
            hashes, offsets = shingle_hashes(texts, ngram, unit)
            hit = np.isin(hashes, table)
            if not hit.any():
                continue
            owner_doc = np.repeat(np.arange(len(texts)), np.diff(offsets))
            for d in np.unique(owner_doc[hit]).tolist():
                doc_hashes = np.unique(hashes[offsets[d]:offsets[d + 1]][hit[offsets[d]:offsets[d + 1]]]).tolist()
                candidates = {i for h in doc_hashes for i in owners[(unit, h)]}
                doc_grams = _ngrams(_tokens(texts[d], unit), ngram)
                for i in candidates:  # the exact check: a hash collision flags nothing
                    shared = exact[i] & doc_grams
                    if shared:
                        found[i] |= shared
                        if len(docs[i]) < max_docs_listed and chunk[d][0] not in docs[i]:
                            docs[i].append(chunk[d][0])

    chunk: list[tuple[str, str]] = []
    for doc_id, text in corpus:
        chunk.append((doc_id, text))
        if len(chunk) >= batch:
            scan(chunk)
            if progress:
                progress(len(chunk))
            chunk = []
    if chunk:
        scan(chunk)
        if progress:
            progress(len(chunk))
    overlap = [len(f) / len(e) if e else None for f, e in zip(found, exact)]
    return ContaminationReport(ngram, threshold, overlap, docs)


def task_item_texts(task) -> list[str]:
    """What of a task's items could leak: the question as rendered (no few-shot, no description) and the gold
    answer."""
    return [task.text(d) + task.target_delimiter + task.target_text(d) for d in task.docs]
