"""Chunkers on hand-built English, Chinese and markdown documents: offsets reproduce the source."""

from __future__ import annotations

import numpy as np
import pytest

from lmforge.data.document import Document
from lmforge.rag.chunking import Chunker, ChunkerConfig, breakpoint_threshold, token_offsets
from tests.corpora import chinese_news, english

MARKDOWN = """# Guide

Intro paragraph about the tool.

## Install

Run the installer:

```bash
pip install lmforge


lmforge --help
```

Then check the version. It should print a number.

### 中文说明

这是一个中文段落。它有两个句子！

## Usage

Use it daily.
"""


def _docs():
    return [Document("en", english(30_000)), Document("zh", chinese_news(12_000)), Document("md", MARKDOWN)]


@pytest.mark.parametrize("kind", ["none", "fixed", "recursive", "markdown"])
def test_offsets_reproduce_the_source(kind):
    chunker = Chunker(ChunkerConfig(kind=kind, size=300, overlap=60))
    for doc in _docs():
        chunks = chunker(doc)
        assert chunks
        for c in chunks:
            assert doc.text[c.start:c.end] == c.text and c.doc_id == doc.id
            if kind != "none":
                assert len(c.text) <= 300
        covered = np.zeros(len(doc.text), bool)
        for c in chunks:
            covered[c.start:c.end] = True
        # nothing but whitespace is left out
        assert all(ch.isspace() for ch, cov in zip(doc.text, covered) if not cov)


def test_recursive_prefers_paragraph_and_sentence_boundaries():
    doc = Document("zh", chinese_news(6_000))
    for c in Chunker(ChunkerConfig(kind="recursive", size=200, overlap=0))(doc):
        assert c.text[-1] in "。！？；”」）\n" or c.end == len(doc.text.rstrip()) or len(c.text) > 150
    en = Document("en", "First sentence here. Second one is longer than the first. Third!\n\nNew paragraph.")
    chunks = Chunker(ChunkerConfig(kind="recursive", size=60, overlap=0))(en)
    # paragraphs first, then sentences; neighbours merged while they fit
    assert [c.text for c in chunks] == ["First sentence here. Second one is longer than the first.",
                                        "Third!\n\nNew paragraph."]


def test_fixed_windows_overlap():
    doc = Document("d", "abcdefghij" * 10)
    chunks = Chunker(ChunkerConfig(kind="fixed", size=30, overlap=10))(doc)
    assert [c.start for c in chunks] == [0, 20, 40, 60, 80]
    assert all(a.end - b.start == 10 for a, b in zip(chunks, chunks[1:]))


def test_fixed_by_tokens(trained):
    doc = Document("zh", chinese_news(3_000))
    chunks = Chunker(ChunkerConfig(kind="fixed", size=64, overlap=16), tokenizer=trained)(doc)
    spans = token_offsets(trained, doc.text)
    for c in chunks:
        assert doc.text[c.start:c.end] == c.text
        assert sum(1 for a, b in spans if c.start <= a and b <= c.end) <= 64  # tokens of the document's own encoding


def test_markdown_keeps_heading_paths_and_code_fences():
    chunks = Chunker(ChunkerConfig(kind="markdown", size=60, overlap=0))(Document("md", MARKDOWN))
    by_text = {c.text: c.heading for c in chunks}
    fence = next(c for c in chunks if c.text.startswith("```"))
    assert fence.text.endswith("```") and "lmforge --help" in fence.text  # never split, even above size
    assert fence.heading == ["Guide", "Install"]
    assert by_text["### 中文说明\n\n这是一个中文段落。它有两个句子！"] == ["Guide", "Install", "中文说明"]
    assert by_text["## Usage\n\nUse it daily."] == ["Guide", "Usage"]


def test_semantic_chunker_breaks_where_the_topic_changes():
    topics = {"cat": np.array([1.0, 0, 0]), "tax": np.array([0, 1.0, 0]), "sea": np.array([0, 0, 1.0])}

    def embed(texts):
        return np.stack([sum(v * t.count(k) for k, v in topics.items()) + 1e-3 for t in texts])

    text = ("The cat sleeps. A cat purrs. My cat eats. "
            "The tax is due. Tax forms are long. We pay tax. "
            "The sea is calm. Sea birds fly. The sea is blue.")
    cfg = ChunkerConfig(kind="semantic", window=0, breakpoint="percentile", breakpoint_amount=70, max_size=1000)
    chunks = Chunker(cfg, embed=embed)(Document("d", text))
    assert [c.text for c in chunks] == ["The cat sleeps. A cat purrs. My cat eats.",
                                        "The tax is due. Tax forms are long. We pay tax.",
                                        "The sea is calm. Sea birds fly. The sea is blue."]
    small = Chunker(ChunkerConfig(kind="semantic", window=0, max_size=25, overlap=0, size=25), embed=embed)
    assert all(len(c.text) <= 25 for c in small(Document("d", text)))


def test_breakpoint_rules():
    d = np.array([0.1, 0.1, 0.1, 0.9, 0.1, 0.1])
    assert breakpoint_threshold(d, "percentile", 50) == pytest.approx(0.1)
    assert breakpoint_threshold(d, "stddev", 1) == pytest.approx(d.mean() + d.std())
    q1, q3 = np.percentile(d, [25, 75])
    assert breakpoint_threshold(d, "iqr", 1.5) == pytest.approx(d.mean() + 1.5 * (q3 - q1))
