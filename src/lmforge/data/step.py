"""The contract every pipeline step follows, the registry of steps by name, and the text
statistics (words, lines, sentences) that cleaners and filters share.

A step is a dataclass whose fields are its parameters (so a YAML pipeline is validated
like any config: unknown keys name the nearest valid one) with one method:

    apply(doc) -> Document        the (possibly changed) document goes on
               -> str             the document is rejected; the string is the reason

Steps are registered under a name with `@register("name")`; `build_step("name", {...})`
makes one from a pipeline file. Global steps (deduplication) need every document before
deciding; they subclass `GlobalStep` and the pipeline runs them between map stages.
"""

from __future__ import annotations

import logging
from collections import Counter
from functools import lru_cache
from typing import ClassVar

import regex

from lmforge.config import ConfigError, _nearest, from_dict
from lmforge.data.document import Document

STEPS: dict[str, type[Step]] = {}


class Step:
    name: ClassVar[str] = ""
    kind: ClassVar[str] = "filter"  # "cleaner" or "filter": shown in docs and stats

    def apply(self, doc: Document) -> Document | str:
        raise NotImplementedError

    def setup(self) -> None:
        """Load models etc. once per worker process (called before the first document)."""


class GlobalStep(Step):
    """A step that must see every document first (exact and near-duplicate removal)."""


def register(name: str):
    def wrap(cls):
        cls.name = name
        STEPS[name] = cls
        return cls
    return wrap


def build_step(name: str, params: dict | None, where: str = "steps") -> Step:
    _load_all()
    if name not in STEPS:
        raise ConfigError(f"{where}: unknown step '{name}'.{_nearest(name, sorted(STEPS))}")
    return from_dict(STEPS[name], params or {}, f"{where}.{name}")


def _load_all() -> None:
    from lmforge.data import clean, dedup_step, filters  # noqa: F401  (registration side effects)


# ----- text statistics shared by cleaners and filters -------------------------------------------

_CJK = regex.compile(r"[\p{Han}\p{Hiragana}\p{Katakana}\p{Hangul}]")
_WORD = regex.compile(r"[\p{L}\p{N}][\p{L}\p{N}\p{M}'’_-]*")
# sentence ends in English and Chinese (full-width and half-width), with closing quotes after
TERMINAL_PUNCT = (".", "!", "?", '"', "'", "”", "’", "。", "！", "？", "…", "」", "』", "）", ")", "；")
_SENTENCE_END = regex.compile(r"[.!?。！？…]+[\"'”’」』）)]*(?=\s|$)|[。！？]+")


def language_of(doc: Document) -> str:
    """The language a step should assume: `meta["language"]` when a language-id step set it,
    otherwise "zh" for text that is mostly CJK and "en" for the rest."""
    lang = doc.meta.get("language")
    if isinstance(lang, str) and lang:
        return lang
    return "zh" if is_mostly_cjk(doc.text) else "en"


def is_mostly_cjk(text: str, sample: int = 4000) -> bool:
    head = text[:sample]
    letters = sum(1 for _ in _WORD.finditer(head))  # non-CJK words
    cjk = len(_CJK.findall(head))
    return cjk > 0 and cjk >= letters


@lru_cache(maxsize=1)
def _jieba():
    import jieba

    jieba.setLogLevel(logging.WARNING)
    jieba.initialize()
    return jieba


def split_words(text: str, lang: str = "en") -> list[str]:
    """Words without punctuation or spaces. Chinese (and Japanese) have no spaces between
    words, so text containing CJK characters is segmented with jieba (which also splits
    the Latin words in it); other text splits on non-letters. `lang` is kept for callers
    that know the language; CJK detection does not depend on it."""
    if lang in ("zh", "ja") or _CJK.search(text):
        return [w for w in _jieba().lcut(text) if _WORD.match(w) or _CJK.match(w)]
    return _WORD.findall(text)


def split_sentences(text: str) -> list[str]:
    out, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        piece = text[start:m.end()].strip()
        if piece:
            out.append(piece)
        start = m.end()
    tail = text[start:].strip()
    if tail:
        out.append(tail)
    return out


def ngram_counts(words: list[str], n: int) -> Counter:
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
