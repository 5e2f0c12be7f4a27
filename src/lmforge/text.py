"""The rules of writing systems that every stage shares: which characters are CJK, where sentences end, how
Chinese is cut into words. Data filters, dedup, chunking, BM25, answers and the tokenizer report all import them
from here, so a rule changes in one place.

Two sets of scripts, for two questions:
  UNSPACED  Han, Hiragana, Katakana: written without spaces between words, so words come from segmentation
            (jieba) or characters, never from splitting on spaces. Korean (Hangul) uses spaces: not in it.
  CJK       UNSPACED + Hangul: what counts as a CJK character in statistics (the share of a text that is CJK,
            character shingles for dedup).
"""

from __future__ import annotations

import functools
import logging

import regex

UNSPACED = r"\p{Han}\p{Hiragana}\p{Katakana}"
CJK = UNSPACED + r"\p{Hangul}"
CJK_CHAR = regex.compile(f"[{CJK}]")
UNSPACED_CHAR = regex.compile(f"[{UNSPACED}]")
UNSPACED_RUN = regex.compile(f"[{UNSPACED}]+")
HAN_RUN = regex.compile(r"\p{Han}+")
# a word of letters or digits (marks, apostrophes, hyphens and underscores inside it); CJK runs are one "word" here,
# split_words segments them
WORD = regex.compile(r"[\p{L}\p{N}][\p{L}\p{N}\p{M}'’_-]*")

# where sentences end: . ! ? before a space (or the end), or Chinese/Japanese 。！？；… anywhere; closing quotes
# and brackets after the mark belong to the sentence
LATIN_SENTENCE_ENDS = ".!?"
CJK_SENTENCE_ENDS = "。！？；…"
CLOSERS = "\"')\\]”’」』）"
SENTENCE_END = regex.compile(f"[{regex.escape(LATIN_SENTENCE_ENDS)}]+[{CLOSERS}]*(?=\\s|$)"
                             f"|[{CJK_SENTENCE_ENDS}]+[{CLOSERS}]*")
# the same rule as a cut point between sentences (the space after a Latin sentence stays with it), for chunking
SENTENCE_BREAK = regex.compile(f"(?<=[{regex.escape(LATIN_SENTENCE_ENDS)}][{CLOSERS}]*)\\s+"
                               f"|(?<=[{CJK_SENTENCE_ENDS}]+[{CLOSERS}]*)")
# a line that ends in one of these ends a sentence (C4's line rule, with the Chinese marks)
TERMINAL_PUNCT = (".", "!", "?", '"', "'", "”", "’", "。", "！", "？", "…", "」", "』", "）", ")", "；")


def is_mostly_cjk(text: str, sample: int = 4000) -> bool:
    """True when the first `sample` characters hold at least as many CJK characters as other words."""
    head = text[:sample]
    words = sum(1 for _ in WORD.finditer(head))
    cjk = len(CJK_CHAR.findall(head))
    return cjk > 0 and cjk >= words


@functools.lru_cache(maxsize=1)
def jieba():
    """The jieba module, its dictionary loaded once, its logging quiet."""
    import jieba as _jieba

    _jieba.setLogLevel(logging.WARNING)
    _jieba.initialize()
    return _jieba


def split_words(text: str, lang: str = "en") -> list[str]:
    """Words without punctuation or spaces. Text with CJK characters (or lang zh/ja) is segmented with jieba
    (which also splits the Latin words in it); other text splits on non-letters."""
    if lang in ("zh", "ja") or CJK_CHAR.search(text):
        return [w for w in jieba().lcut(text) if WORD.match(w) or CJK_CHAR.match(w)]
    return WORD.findall(text)


def split_sentences(text: str) -> list[str]:
    """Sentences in English and Chinese (SENTENCE_END), stripped; text after the last end is one more."""
    out, start = [], 0
    for m in SENTENCE_END.finditer(text):
        piece = text[start:m.end()].strip()
        if piece:
            out.append(piece)
        start = m.end()
    tail = text[start:].strip()
    if tail:
        out.append(tail)
    return out


# --- language names (finetune --task translate's instructions, augmentation's back-translation prompts) -------------
# language codes -> (English name, Chinese name)
LANGUAGES = {"en": ("English", "英文"), "zh": ("Chinese", "中文"), "ja": ("Japanese", "日文"), "ko": ("Korean", "韩文"),
             "fr": ("French", "法文"), "de": ("German", "德文"), "es": ("Spanish", "西班牙文"),
             "ru": ("Russian", "俄文"), "pt": ("Portuguese", "葡萄牙文"), "it": ("Italian", "意大利文"),
             "ar": ("Arabic", "阿拉伯文"), "vi": ("Vietnamese", "越南文")}
