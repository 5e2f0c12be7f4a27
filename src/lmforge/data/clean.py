"""Cleaners: steps that repair or redact text (and may reject what ends up empty).

  fix_encoding        mojibake repair with ftfy ("doesnâ€™t" -> "doesn’t", "æµ‹è¯•" -> "测试"); text that is not
                      mojibake is left as written: full-width and CJK punctuation (，！（）“”), curly quotes,
                      half-width kana and ligatures stay
  normalize           Unicode normalisation, NFC by default (NFKC folds full-width forms)
  whitespace          control characters out, runs of spaces (not indentation) and blank lines collapsed
  boilerplate_lines   C4's line rules: drop lines without end punctuation, too few words,
                      "javascript" notices and policy/cookie lines
  pii                 e-mails, phone numbers (incl. Chinese mobiles), IPv4/IPv6 and Chinese
                      resident ID numbers (checksum-validated) replaced with placeholders
  language            offline language id (py3langid, model shipped in the package): sets
                      meta language/language_score and keeps only the listed languages
"""

from __future__ import annotations

import ipaddress
import unicodedata
from dataclasses import dataclass, field
from functools import lru_cache

import regex

from lmforge.data.document import Document
from lmforge.data.step import Step, language_of, register
from lmforge.text import TERMINAL_PUNCT, split_sentences, split_words


def _replace_text(doc: Document, text: str) -> Document:
    return Document(doc.id, text, doc.meta) if text != doc.text else doc


@register("fix_encoding")
@dataclass
class FixEncoding(Step):
    kind = "cleaner"
    normalization: str = field(default="NFC", metadata={"choices": ["NFC", "NFKC", "none"]})

    def apply(self, doc: Document) -> Document | str:
        import ftfy

        norm = None if self.normalization == "none" else self.normalization
        # repair only: ftfy's defaults also rewrite what is legitimate text (full-width ，！（） to ASCII, “” to "",
        # ﬁ to fi, half-width kana to full-width), which changed every Chinese document without a stat showing it
        fixed = ftfy.fix_text(doc.text, normalization=norm, unescape_html=False, fix_line_breaks=False,
                              fix_character_width=False, uncurl_quotes=False, fix_latin_ligatures=False)
        return _replace_text(doc, fixed)


@register("normalize")
@dataclass
class Normalize(Step):
    kind = "cleaner"
    form: str = field(default="NFC", metadata={"choices": ["NFC", "NFKC", "NFD", "NFKD"]})

    def apply(self, doc: Document) -> Document | str:
        if doc.text.isascii():
            return doc
        return _replace_text(doc, unicodedata.normalize(self.form, doc.text))


_CONTROL = regex.compile(r"(?V1)[[\p{Cc}\p{Cf}]--[\n\t\u200d]]")  # keep newline, tab, zero-width joiner (emoji)
_SPACES = regex.compile(r"[^\S\n]+")
_BLANK_LINES = regex.compile(r"\n\s*\n(\s*\n)+")


@register("whitespace")
@dataclass
class Whitespace(Step):
    kind = "cleaner"
    max_blank_lines: int = 1
    keep_indentation: bool = True  # code and nested lists keep their leading spaces

    def apply(self, doc: Document) -> Document | str:
        text = _CONTROL.sub("", doc.text.replace("\r\n", "\n").replace("\r", "\n"))
        text = "\n".join(self._line(line) for line in text.split("\n"))
        text = _BLANK_LINES.sub("\n" * (self.max_blank_lines + 1), text).strip("\n")
        return _replace_text(doc, text) if text.strip() else "empty after whitespace cleanup"

    def _line(self, line: str) -> str:
        body = line.lstrip()
        indent = line[: len(line) - len(body)] if self.keep_indentation and body else ""
        return indent + _SPACES.sub(" ", body).rstrip()


_POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies",
           "隐私政策", "使用条款", "使用cookie", "本网站使用")


@dataclass
class C4Rules(Step):
    """C4 (Raffel et al. 2020, as in datatrove's C4QualityFilter), each rule switchable.
    Line rules change the document; document rules reject it."""

    end_punctuation: bool = True  # drop lines that do not end in terminal punctuation
    min_words_per_line: int = 3  # drop lines with fewer words (0: off); Chinese words via jieba
    javascript: bool = True  # drop lines mentioning javascript
    policy: bool = True  # drop terms-of-use / privacy / cookie lines
    max_word_length: int = 1000  # drop lines with a longer word (0: off)
    min_sentences: int = 5  # reject documents with fewer sentences (0: off)
    lorem_ipsum: bool = True  # reject documents containing "lorem ipsum"
    curly_bracket: bool = True  # reject documents containing "{" (code, templates)

    def apply(self, doc: Document) -> Document | str:
        text = doc.text
        lower = text.lower()
        if self.lorem_ipsum and "lorem ipsum" in lower:
            return "c4: lorem ipsum"
        if self.curly_bracket and "{" in text:
            return "c4: curly bracket"
        lang = language_of(doc)
        kept = []
        for line in text.split("\n"):
            stripped = line.strip()
            if not stripped:
                continue
            low = stripped.lower()
            if self.end_punctuation and not stripped.endswith(TERMINAL_PUNCT):
                continue
            if self.javascript and "javascript" in low:
                continue
            if self.policy and any(p in low for p in _POLICY):
                continue
            words = split_words(stripped, lang) if (self.min_words_per_line or self.max_word_length) else []
            if self.min_words_per_line and len(words) < self.min_words_per_line:
                continue
            if self.max_word_length and any(len(w) > self.max_word_length for w in words):
                continue
            kept.append(stripped)
        if not kept:
            return "c4: no line left"
        new_text = "\n".join(kept)
        if self.min_sentences and len(split_sentences(new_text)) < self.min_sentences:
            return f"c4: fewer than {self.min_sentences} sentences"
        return _replace_text(doc, new_text)


register("c4")(C4Rules)


@register("boilerplate_lines")
@dataclass
class BoilerplateLines(C4Rules):
    """C4's line rules only: a cleaner that never rejects for document-level reasons."""

    kind = "cleaner"
    min_sentences: int = 0
    lorem_ipsum: bool = False
    curly_bracket: bool = False


# ----- PII -------------------------------------------------------------------------------------

# Boundaries are ASCII letters and digits, not \w: Chinese has no spaces, so a number or address written between
# Han characters ("拨打13812345678联系") must still be found, and a Han character is never part of the match
_EMAIL = regex.compile(r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,24}"
                       r"(?![A-Za-z0-9-])")
# +CC (AREA) NNN-NNNN and friends: 7+ digits with common separators, or a Chinese mobile number
_PHONE = regex.compile(
    r"(?<![A-Za-z0-9_+.])(?:\+86[\s-]?)?1[3-9]\d[\s-]?\d{4}[\s-]?\d{4}(?!\d|\.\d)"  # Chinese mobile
    r"|(?<![A-Za-z0-9_+.])(?:\+\d{1,3}[\s-]?(?:\(\d{1,4}\)[\s-]?)?\d{2,4}[\s-]\d{3,4}(?:[\s-]\d{3,4})?"  # +CC
    r"|\(\d{2,4}\)[\s-]?\d{3,4}[\s.-]\d{4}"  # (area) NNN-NNNN
    r"|\d{3}[\s.-]\d{3,4}[\s.-]\d{4})(?![A-Za-z0-9_-]|\.\d)")  # NNN-NNN(N)-NNNN; not a decimal
_IPV4 = regex.compile(r"(?<![A-Za-z0-9_.])(?:\d{1,3}\.){3}\d{1,3}(?![A-Za-z0-9_.]|\.\d)")
_IPV6 = regex.compile(r"(?<![A-Za-z0-9_:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![A-Za-z0-9_:])")
_CN_ID = regex.compile(r"(?<![\dA-Za-z])[1-9]\d{5}(?:18|19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\d{3}[\dXx]"
                       r"(?![\dA-Za-z])")
_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)


def valid_cn_id(number: str) -> bool:
    """GB 11643-1999 checksum (ISO 7064 MOD 11-2) of an 18-character resident ID."""
    if len(number) != 18 or not number[:17].isdigit():
        return False
    total = sum(int(d) * w for d, w in zip(number[:17], _ID_WEIGHTS))
    return "10X98765432"[total % 11] == number[17].upper()


def _valid_ip(s: str) -> bool:
    if ":" in s and sum(1 for group in s.split(":") if group) < 3:
        return False  # "::", "a::b": slices and C++ scopes, not addresses worth redacting
    try:
        ipaddress.ip_address(s)
        return True
    except ValueError:
        return False


@register("pii")
@dataclass
class PII(Step):
    kind = "cleaner"
    email: str = "<EMAIL>"
    phone: str = "<PHONE>"
    ip_address: str = "<IP_ADDRESS>"
    id_number: str = "<ID_NUMBER>"
    kinds: list[str] = field(default_factory=lambda: ["email", "id_number", "ip_address", "phone"])

    def redact(self, text: str) -> tuple[str, dict[str, int]]:
        counts: dict[str, int] = {}

        def sub(pattern, placeholder: str, kind: str, valid=None):
            def repl(m):
                if valid is not None and not valid(m.group(0)):
                    return m.group(0)
                counts[kind] = counts.get(kind, 0) + 1
                return placeholder
            return lambda t: pattern.sub(repl, t)

        # IDs before phones (an ID contains phone-like digit runs); IPs before phones too
        rules = {"email": sub(_EMAIL, self.email, "email"),
                 "id_number": sub(_CN_ID, self.id_number, "id_number", valid_cn_id),
                 "ip_address": lambda t: sub(_IPV6, self.ip_address, "ip_address", _valid_ip)(
                     sub(_IPV4, self.ip_address, "ip_address", _valid_ip)(t)),
                 "phone": sub(_PHONE, self.phone, "phone")}
        for kind in ("email", "id_number", "ip_address", "phone"):
            if kind in self.kinds:
                text = rules[kind](text)
        return text, counts

    def apply(self, doc: Document) -> Document | str:
        text, counts = self.redact(doc.text)
        if not counts:
            return doc
        return Document(doc.id, text, {**doc.meta, "pii": counts})


# ----- language identification -----------------------------------------------------------------

@lru_cache(maxsize=1)
def _langid():
    from py3langid.langid import MODEL_DIR, MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_modelpath(MODEL_DIR / MODEL_FILE, norm_probs=True)


def detect_language(text: str, max_chars: int = 2000) -> tuple[str, float]:
    """(ISO 639-1 code, probability) by py3langid's shipped model (97 languages, offline)."""
    lang, prob = _langid().classify(text[:max_chars])
    return lang, float(prob)


@register("language")
@dataclass
class Language(Step):
    """Sets meta language and language_score; with `keep`, rejects other languages and
    documents whose score is below `min_score`. Route output by language with the pipeline's
    `split_by: language`."""

    keep: list[str] = field(default_factory=list)  # empty: keep every language
    min_score: float = 0.0
    max_chars: int = 2000  # identify on the first characters only (speed)

    def setup(self) -> None:
        _langid()

    def apply(self, doc: Document) -> Document | str:
        lang, score = detect_language(doc.text, self.max_chars)
        doc = Document(doc.id, doc.text, {**doc.meta, "language": lang, "language_score": round(score, 4)})
        if self.keep and lang not in self.keep:
            return f"language: {lang} not in {','.join(self.keep)}"
        if score < self.min_score:
            return f"language: score {score:.2f} < {self.min_score}"
        return doc
