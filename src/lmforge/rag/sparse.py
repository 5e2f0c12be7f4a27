"""BM25 over chunks: an analyzer that handles English and Chinese, scored by bm25s.

The analyzer lowercases, splits Latin text into words of 2+ characters (dropping Lucene's English stop words, Snowball-
stemmed unless `stem: false`) and Chinese into jieba words (`chinese: jieba`, default) or
overlapping character bigrams (`chinese: bigram`), so a Chinese query never scores zero
against Chinese text for want of spaces. bm25s does the indexing and scoring (Lucene's BM25
variant by default, `k1`, `b` configurable) and saves its index as numpy arrays + JSON.
"""

from __future__ import annotations

import os
from functools import lru_cache

import numpy as np
import regex

from lmforge.rag.config import AnalyzerConfig
from lmforge.text import UNSPACED, UNSPACED_RUN, jieba

# Lucene's English stop words (the list bm25s and Elasticsearch use)
ENGLISH_STOP_WORDS = frozenset([
    "a", "an", "and", "are", "as", "at", "be", "but", "by", "for", "if", "in", "into", "is", "it", "no", "not", "of",
    "on", "or", "such", "that", "the", "their", "then", "there", "these", "they", "this", "to", "was", "will", "with"])

# CJK runs (segmented below), else words of two or more word characters: the token pattern of
# scikit-learn and bm25s, so scores are comparable with theirs
# a run of unspaced script (segmented below), or a word of 2+ other word characters (bm25s's \w\w+)
_TOKEN = regex.compile(rf"[{UNSPACED}]+|[^\W{UNSPACED}]{{2,}}")
_CJK_RUN = UNSPACED_RUN


@lru_cache(maxsize=1)
def _stemmer():
    import Stemmer

    return Stemmer.Stemmer("english")


class Analyzer:
    def __init__(self, cfg: AnalyzerConfig | None = None):
        self.cfg = cfg or AnalyzerConfig()

    def __call__(self, text: str) -> list[str]:
        out: list[str] = []
        for m in _TOKEN.finditer(text.lower()):
            tok = m.group(0)
            if _CJK_RUN.fullmatch(tok):
                out.extend(self._chinese(tok))
            elif not (self.cfg.stop_words and tok in ENGLISH_STOP_WORDS):
                out.append(tok)
        if self.cfg.stem:
            stemmer = _stemmer()
            out = [stemmer.stemWord(t) if t.isascii() else t for t in out]
        return out

    def _chinese(self, run: str) -> list[str]:
        if self.cfg.chinese == "bigram":
            return [run] if len(run) == 1 else [run[i:i + 2] for i in range(len(run) - 1)]
        return [w for w in jieba().lcut_for_search(run) if w.strip()]


def _bm25s():
    import logging

    try:
        import bm25s
    except ImportError:
        from lmforge.config import ConfigError

        raise ConfigError("BM25 needs the bm25s package: pip install 'lmforge[rag]'") from None
    logging.getLogger("bm25s").setLevel(logging.WARNING)  # its import sets DEBUG and logs every indexing phase
    return bm25s


class BM25Index:
    """BM25 scores of chunk texts (bm25s underneath)."""

    def __init__(self, k1: float = 1.5, b: float = 0.75, method: str = "lucene", analyzer: Analyzer | None = None):
        self.k1, self.b, self.method = k1, b, method
        self.analyzer = analyzer or Analyzer()
        self._bm25 = None
        self.size = 0

    def build(self, texts: list[str]) -> BM25Index:
        bm25s = _bm25s()

        self._bm25 = bm25s.BM25(k1=self.k1, b=self.b, method=self.method)
        self.size = len(texts)
        if texts:
            self._bm25.index([self.analyzer(t) for t in texts], show_progress=False)
        return self

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every chunk for `query` (0 where no query term occurs)."""
        if self._bm25 is None or not self.size:
            return np.zeros(self.size, np.float32)
        vocab = self._bm25.vocab_dict
        terms = [t for t in self.analyzer(query) if t in vocab]
        if not terms:
            return np.zeros(self.size, np.float32)
        return np.asarray(self._bm25.get_scores(terms), np.float32)

    def save(self, directory: str | os.PathLike) -> None:
        if self._bm25 is not None and self.size:
            self._bm25.save(str(directory), allow_pickle=False, show_progress=False)

    def load(self, directory: str | os.PathLike, size: int) -> BM25Index:
        bm25s = _bm25s()

        self.size = size
        self._bm25 = bm25s.BM25.load(str(directory), allow_pickle=False) if size else None
        return self
