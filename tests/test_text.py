"""The shared script rules (lmforge/text.py) on real English and Chinese text."""

from __future__ import annotations

import regex

from lmforge import text as T
from tests.corpora import chinese_news, english


def test_sentences_of_real_chinese_and_english():
    zh = chinese_news(20_000)
    for paragraph in zh.split("\n")[:50]:
        sentences = T.split_sentences(paragraph)
        assert "".join(sentences) == regex.sub(r"\s", "", paragraph) or "".join(sentences).replace(" ", "") == \
            paragraph.replace(" ", "")
        ends = len(regex.findall(r"[。！？；…]+[”’」』）]*", paragraph))
        assert len(sentences) in (ends, ends + 1)  # text after the last mark is one more sentence
    en = "The for statement iterates. It stops at the end! Does it? Yes (mostly). Then: done"
    assert T.split_sentences(en) == ["The for statement iterates.", "It stops at the end!", "Does it?",
                                     "Yes (mostly).", "Then: done"]
    assert T.split_sentences("他说：“好。”然后走了。") == ["他说：“好。”", "然后走了。"]


def test_chunk_breaks_follow_the_same_sentence_rule():
    sample = chinese_news(3000) + "\n" + english(3000)
    ends = {m.end() for m in T.SENTENCE_END.finditer(sample)}
    for m in T.SENTENCE_BREAK.finditer(sample):
        # a break is at a sentence end (Chinese) or right after the space that follows one (English)
        assert m.start() in ends or m.end() in ends, sample[max(0, m.start() - 20):m.end() + 5]


def test_scripts_and_words():
    assert T.is_mostly_cjk(chinese_news(2000)) and not T.is_mostly_cjk(english(2000))
    assert T.CJK_CHAR.match("한") and not T.UNSPACED_CHAR.match("한")  # Korean is spaced: not segmented
    words = T.split_words("北京是中国的首都，Python 3.11 很好用。")
    assert words == [w for w in T.jieba().lcut("北京是中国的首都，Python 3.11 很好用。")
                     if T.WORD.match(w) or T.CJK_CHAR.match(w)]
    assert "北京" in words and "Python" in words and "，" not in words
    assert T.split_words("don't stop-words, ok") == ["don't", "stop-words", "ok"]
