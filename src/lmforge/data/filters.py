"""Filters: published heuristic rule sets, each rule with its own threshold, plus a length
filter and the trained quality classifier. Thresholds are those of the papers (as set in
datatrove); a rule is switched off with 0 / null.

  gopher_quality     Rae et al. 2021 (MassiveText), quality rules
  gopher_repetition  Rae et al. 2021, repetition rules (lines, paragraphs, n-grams)
  c4                 Raffel et al. 2020 (in clean.py: it also removes lines)
  fineweb            Penedo et al. 2024, the FineWeb additions
  length             min/max characters or words
  quality_classifier keep documents the model from `lmforge data train-classifier` scores high

Words are counted with `split_words`, which segments Chinese with jieba. Rules whose
English thresholds make no sense for Chinese (mean word length, stop words, short lines)
have Chinese values in `per_language["zh"]`, which a pipeline file can override or extend
to other languages: `gopher_quality: {per_language: {zh: {min_avg_word_length: 1}}}`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import regex

from lmforge.data.document import Document
from lmforge.data.step import Step, language_of, ngram_counts, register
from lmforge.text import TERMINAL_PUNCT, split_words

STOP_WORDS = {
    "en": {"the", "be", "to", "of", "and", "that", "have", "with"},
    # the most frequent function words of modern written Chinese
    "zh": {"的", "了", "是", "在", "和", "有", "我", "不", "这", "也", "就", "都", "人", "他", "我们", "一个"},
}


class _PerLanguage:
    """Mixin: `per_language: {lang: {field: value}}` overrides fields for documents of that language;
    the rules themselves live in `_check(doc, lang)` (None = keep, else the reason)."""

    per_language: dict

    def apply(self, doc: Document) -> Document | str:
        lang = language_of(doc)
        return self.for_language(lang)._check(doc, lang) or doc

    def for_language(self, lang: str):
        overrides = self.per_language.get(lang)
        if not overrides:
            return self
        if not hasattr(self, "_variants"):
            self._variants = {}
        if lang not in self._variants:
            from lmforge.config import from_dict

            base = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "per_language"}
            self._variants[lang] = from_dict(type(self), {**base, **overrides, "per_language": {}},
                                             f"{self.name}.per_language.{lang}")
        return self._variants[lang]


def _duplicates(items: list[str]) -> tuple[int, int]:
    """(number of items that repeat an earlier one, characters in them)."""
    seen: set[str] = set()
    n = chars = 0
    for item in items:
        if item in seen:
            n += 1
            chars += len(item)
        else:
            seen.add(item)
    return n, chars


@register("gopher_quality")
@dataclass
class GopherQuality(_PerLanguage, Step):
    min_words: int | None = 50
    max_words: int | None = 100_000
    min_avg_word_length: float | None = 3
    max_avg_word_length: float | None = 10
    max_symbol_word_ratio: float | None = 0.1  # "#" and ellipses per word
    max_bullet_lines_ratio: float | None = 0.9
    max_ellipsis_lines_ratio: float | None = 0.3
    min_alpha_words_ratio: float | None = 0.8  # words with at least one letter
    min_stop_words: int | None = 2
    per_language: dict = field(default_factory=lambda: {
        "zh": {"min_avg_word_length": 1, "max_avg_word_length": 4}})

    def _check(self, doc: Document, lang: str) -> str | None:
        text = doc.text
        words = split_words(text, lang)
        n = len(words)
        if self.min_words is not None and n < self.min_words:
            return f"gopher_quality: {n} words < min_words {self.min_words}"
        if self.max_words is not None and n > self.max_words:
            return f"gopher_quality: {n} words > max_words {self.max_words}"
        avg = sum(map(len, words)) / n if n else 0.0
        if self.min_avg_word_length is not None and avg < self.min_avg_word_length:
            return f"gopher_quality: mean word length {avg:.2f} < min_avg_word_length {self.min_avg_word_length}"
        if self.max_avg_word_length is not None and avg > self.max_avg_word_length:
            return f"gopher_quality: mean word length {avg:.2f} > max_avg_word_length {self.max_avg_word_length}"
        if self.max_symbol_word_ratio is not None and n:
            if text.count("#") / n > self.max_symbol_word_ratio:
                return "gopher_quality: too many '#' per word"
            if (text.count("...") + text.count("…")) / n > self.max_symbol_word_ratio:
                return "gopher_quality: too many ellipses per word"
        lines = [line for line in text.splitlines() if line.strip()]
        if lines and self.max_bullet_lines_ratio is not None:
            bullets = sum(1 for line in lines if line.lstrip().startswith(("•", "-", "*", "·", "●")))
            if bullets / len(lines) > self.max_bullet_lines_ratio:
                return "gopher_quality: too many bullet lines"
        if lines and self.max_ellipsis_lines_ratio is not None:
            ell = sum(1 for line in lines if line.rstrip().endswith(("...", "…")))
            if ell / len(lines) > self.max_ellipsis_lines_ratio:
                return "gopher_quality: too many lines end in an ellipsis"
        if self.min_alpha_words_ratio is not None and n:
            alpha = sum(1 for w in words if any(c.isalpha() for c in w))
            if alpha / n < self.min_alpha_words_ratio:
                return (f"gopher_quality: {alpha / n:.2f} of words have a letter < min_alpha_words_ratio "
                        f"{self.min_alpha_words_ratio}")
        if self.min_stop_words:
            stop = STOP_WORDS.get(lang)
            if stop is not None:
                found = sum(1 for w in words if w.lower() in stop)
                if found < self.min_stop_words:
                    return f"gopher_quality: {found} stop words < min_stop_words {self.min_stop_words}"
        return None


@register("gopher_repetition")
@dataclass
class GopherRepetition(_PerLanguage, Step):
    max_dup_line_frac: float | None = 0.3
    max_dup_para_frac: float | None = 0.3
    max_dup_line_char_frac: float | None = 0.2
    max_dup_para_char_frac: float | None = 0.2
    # [n, max fraction of characters in the most frequent n-gram]
    top_ngrams: list[list[float]] = field(default_factory=lambda: [[2, 0.2], [3, 0.18], [4, 0.16]])
    # [n, max fraction of characters in n-grams that occur more than once]
    dup_ngrams: list[list[float]] = field(default_factory=lambda: [[5, 0.15], [6, 0.14], [7, 0.13], [8, 0.12],
                                                                 [9, 0.11], [10, 0.10]])
    per_language: dict = field(default_factory=dict)

    def _check(self, doc: Document, lang: str) -> str | None:
        text = doc.text.strip()
        if not text:
            return "gopher_repetition: empty"
        paragraphs = [p for p in regex.split(r"\n{2,}", text) if p.strip()]
        n_dup, chars = _duplicates(paragraphs)
        if self.max_dup_para_frac is not None and n_dup / len(paragraphs) > self.max_dup_para_frac:
            return "gopher_repetition: duplicated paragraphs"
        if self.max_dup_para_char_frac is not None and chars / len(text) > self.max_dup_para_char_frac:
            return "gopher_repetition: characters in duplicated paragraphs"
        lines = [line for line in regex.split(r"\n+", text) if line.strip()]
        n_dup, chars = _duplicates(lines)
        if self.max_dup_line_frac is not None and n_dup / len(lines) > self.max_dup_line_frac:
            return "gopher_repetition: duplicated lines"
        if self.max_dup_line_char_frac is not None and chars / len(text) > self.max_dup_line_char_frac:
            return "gopher_repetition: characters in duplicated lines"
        words = split_words(text, lang)
        sep = 0 if lang in ("zh", "ja") else 1  # characters between words when joined
        for n, frac in self.top_ngrams:
            n = int(n)
            counts = ngram_counts(words, n)
            if not counts:
                continue
            gram, count = counts.most_common(1)[0]
            if count > 1 and (sum(map(len, gram)) + sep * (n - 1)) * count / len(text) > frac:
                return f"gopher_repetition: top {n}-gram covers > {frac} of characters"
        for n, frac in self.dup_ngrams:
            n = int(n)
            dup_chars = _duplicate_ngram_chars(words, n, sep)
            if dup_chars / len(text) > frac:
                return f"gopher_repetition: duplicated {n}-grams cover > {frac} of characters"
        return None


def _duplicate_ngram_chars(words: list[str], n: int, sep: int) -> int:
    """Characters of the words covered by n-grams seen earlier in the text (each word counted once)."""
    seen: set[tuple[str, ...]] = set()
    covered = [False] * len(words)
    for i in range(len(words) - n + 1):
        gram = tuple(words[i:i + n])
        if gram in seen:
            for j in range(i, i + n):
                covered[j] = True
        else:
            seen.add(gram)
    return sum(len(w) + sep for w, c in zip(words, covered) if c)


@register("fineweb")
@dataclass
class FineWeb(_PerLanguage, Step):
    min_line_punct_ratio: float | None = 0.12  # lines ending in terminal punctuation
    line_punct_exclude_zero: bool = False  # do not reject documents with no such line at all
    max_short_line_ratio: float | None = 0.67
    short_line_length: int = 30
    max_char_dup_ratio: float | None = 0.01  # characters in duplicated lines
    max_newline_word_ratio: float | None = 0.3  # line breaks per word (lists)
    per_language: dict = field(default_factory=lambda: {"zh": {"short_line_length": 10}})

    def _check(self, doc: Document, lang: str) -> str | None:
        text = doc.text
        lines = [line.strip() for line in text.split("\n") if line.strip()]
        if not lines:
            return "fineweb: empty"
        if self.min_line_punct_ratio is not None:
            ratio = sum(1 for line in lines if line.endswith(TERMINAL_PUNCT)) / len(lines)
            if ratio < self.min_line_punct_ratio and not (ratio == 0 and self.line_punct_exclude_zero):
                return f"fineweb: {ratio:.2f} of lines end in punctuation < min_line_punct_ratio {self.min_line_punct_ratio}"
        if self.max_short_line_ratio is not None:
            ratio = sum(1 for line in lines if len(line) <= self.short_line_length) / len(lines)
            if ratio > self.max_short_line_ratio:
                return f"fineweb: {ratio:.2f} of lines are short > max_short_line_ratio {self.max_short_line_ratio}"
        if self.max_char_dup_ratio is not None:
            _, chars = _duplicates(lines)
            ratio = chars / max(1, len(text.replace("\n", "")))
            if ratio > self.max_char_dup_ratio:
                return f"fineweb: {ratio:.3f} of characters in duplicated lines > max_char_dup_ratio {self.max_char_dup_ratio}"
        if self.max_newline_word_ratio is not None:
            words = split_words(text, lang)
            ratio = text.count("\n") / max(1, len(words))
            if ratio > self.max_newline_word_ratio:
                return f"fineweb: {ratio:.2f} line breaks per word > max_newline_word_ratio {self.max_newline_word_ratio}"
        return None


@register("length")
@dataclass
class Length(Step):
    min_chars: int | None = None
    max_chars: int | None = None
    min_words: int | None = None
    max_words: int | None = None

    def apply(self, doc: Document) -> Document | str:
        n = len(doc.text)
        if self.min_chars is not None and n < self.min_chars:
            return f"length: {n} characters < min_chars {self.min_chars}"
        if self.max_chars is not None and n > self.max_chars:
            return f"length: {n} characters > max_chars {self.max_chars}"
        if self.min_words is not None or self.max_words is not None:
            w = len(split_words(doc.text, language_of(doc)))
            if self.min_words is not None and w < self.min_words:
                return f"length: {w} words < min_words {self.min_words}"
            if self.max_words is not None and w > self.max_words:
                return f"length: {w} words > max_words {self.max_words}"
        return doc


@register("quality_classifier")
@dataclass
class QualityClassifier(Step):
    """Scores every document with a model from `lmforge data train-classifier` (meta
    quality_score, the probability of the positive class); rejects those below threshold."""

    model: str = ""
    threshold: float = 0.5

    def setup(self) -> None:
        from lmforge.data.classifier import HashedLinearClassifier

        if not self.model:
            from lmforge.config import ConfigError

            raise ConfigError("quality_classifier.model: give the directory written by `lmforge data train-classifier`")
        self._clf = HashedLinearClassifier.load(self.model)

    def apply(self, doc: Document) -> Document | str:
        if not hasattr(self, "_clf"):
            self.setup()
        score = float(self._clf.predict_proba([doc.text])[0])
        if score < self.threshold:
            return f"quality_classifier: score {score:.3f} < threshold {self.threshold}"
        return Document(doc.id, doc.text, {**doc.meta, "quality_score": round(score, 4)})

