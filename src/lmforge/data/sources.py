"""Corpus sources: turn paths, directories, globs and `builtin:` names into text, streaming.

Wherever lmforge accepts a corpus it accepts a list of these specs:
  - a file: .txt .md .rst (any other name is read as plain text too), .jsonl (one JSON
    object per line with a text field), optionally gzip-compressed (.gz);
  - a directory: every .txt/.md/.rst/.jsonl(.gz) file below it, in sorted order;
  - a glob such as `data/**/*.jsonl.gz`;
  - a built-in corpus such as `builtin:python-docs`.

Text is never loaded whole: large files are read in blocks and cut only at a lone line
break between two non-space characters, a point where the GPT-2, cl100k and o200k
pre-tokenizer patterns always split, so training on the pieces gives the same counts as
training on the whole file (a test checks this for all three).

Invalid UTF-8 is reported with the file, line and byte offset (`errors="strict"`, the
default) or replaced with U+FFFD and counted (`errors="replace"`).
"""

from __future__ import annotations

import glob
import gzip
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from lmforge.data.builtin import builtin_documents, is_builtin
from lmforge.data.document import Document

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text", ".jsonl", ".txt.gz", ".md.gz", ".jsonl.gz")
BLOCK_BYTES = 1 << 20


class CorpusError(ValueError):
    """Input that cannot be read as a corpus; the message names the file (and line/byte)."""


def resolve_inputs(specs: list[str] | str) -> list[str]:
    """Expand specs into a sorted, de-duplicated list of files and `builtin:` names."""
    if isinstance(specs, str):
        specs = [specs]
    if not specs:
        raise CorpusError("no input given: pass files, directories, globs or builtin:python-docs")
    out: list[str] = []
    for spec in specs:
        spec = str(spec)
        if is_builtin(spec):
            try:
                builtin_documents(spec)
            except KeyError as e:
                raise CorpusError(str(e.args[0])) from None
            out.append(spec)
        elif os.path.isdir(spec):
            found = sorted(str(p) for p in Path(spec).rglob("*") if p.is_file() and p.name.endswith(TEXT_SUFFIXES))
            if not found:
                raise CorpusError(f"{spec}: directory has no text files ({', '.join(TEXT_SUFFIXES)})")
            out.extend(found)
        elif os.path.isfile(spec):
            out.append(spec)
        elif any(ch in spec for ch in "*?["):
            found = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
            if not found:
                raise CorpusError(f"{spec}: glob matches no files")
            out.extend(found)
        elif os.path.exists(spec):
            raise CorpusError(f"{spec}: not a regular file or directory")
        else:
            raise CorpusError(f"{spec}: no such file or directory")
    seen: set[str] = set()
    return [p for p in out if not (p in seen or seen.add(p))]


def _open_binary(path: str) -> BinaryIO:
    try:
        return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")  # noqa: SIM115
    except OSError as e:
        raise CorpusError(f"{path}: cannot open: {e.strerror or e}") from None


class _Decoder:
    """Decode UTF-8 blocks of one file, reporting where invalid bytes are."""

    def __init__(self, path: str, errors: str):
        if errors not in ("strict", "replace"):
            raise ValueError(f"errors must be 'strict' or 'replace', got {errors!r}")
        self.path, self.errors = path, errors
        self.offset = 0  # bytes of the file consumed so far
        self.line = 1  # line number at the start of the next block
        self.replaced = 0

    def __call__(self, raw: bytes) -> str:
        if self.offset == 0 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark is not text
            raw, self.offset = raw[3:], 3
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            if self.errors == "strict":
                line = self.line + raw.count(b"\n", 0, e.start)
                raise CorpusError(
                    f"{self.path}: invalid UTF-8 at byte offset {self.offset + e.start} (line {line}): "
                    f"{raw[e.start:e.end]!r}; fix the file or pass --errors replace") from None
            text = raw.decode("utf-8", errors="replace")
            self.replaced += text.count("\ufffd") - raw.count("\ufffd".encode())
        self.offset += len(raw)
        self.line += raw.count(b"\n")
        return text

    def close(self) -> None:
        if self.replaced:
            log.warning("%s: replaced %d invalid UTF-8 sequences with U+FFFD", self.path, self.replaced)


def _safe_cut(text: str) -> int:
    """Index after the last lone newline between two non-space characters (0 if none).

    There the GPT-2, cl100k and o200k patterns always end a piece (the newline is a piece of its
    own, or ends a punctuation piece), whatever follows; "/" is excluded because o200k lets a
    punctuation piece run on through newlines into slashes.
    """
    pos = len(text)
    while (pos := text.rfind("\n", 0, pos)) > 0:
        if pos + 1 < len(text) and not text[pos - 1].isspace() and not text[pos + 1].isspace() and text[pos + 1] != "/":
            return pos + 1
    return 0


def _iter_plain_text(path: str, errors: str, block_bytes: int) -> Iterator[str]:
    decode = _Decoder(path, errors)
    pending = ""
    with _open_binary(path) as f:
        while True:
            try:
                raw = f.read(block_bytes)
                if raw and not raw.endswith(b"\n"):
                    raw += f.readline()  # end on a line break so no UTF-8 sequence is split
            except (OSError, EOFError) as e:  # e.g. a truncated .gz file
                raise CorpusError(f"{path}: read failed at byte {decode.offset}: {e}") from None
            if not raw:
                break
            text = pending + decode(raw)
            cut = _safe_cut(text)
            if cut == 0 and len(text) > 64 * block_bytes:
                cut = len(text)  # no safe boundary for very long: cut anyway rather than grow forever
            if cut:
                yield text[:cut]
            pending = text[cut:]
    decode.close()
    if pending:
        yield pending


def _iter_jsonl(path: str, errors: str, text_field: str) -> Iterator[Document]:
    decode = _Decoder(path, errors)
    with _open_binary(path) as f:
        for lineno, raw in enumerate(f, start=1):
            line = decode(raw)
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{path}:{lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
            if not isinstance(obj, dict):
                raise CorpusError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            text = obj.get(text_field)
            if not isinstance(text, str):
                what = "missing" if text is None else f"not a string ({type(text).__name__})"
                raise CorpusError(f"{path}:{lineno}: field '{text_field}' is {what}")
            doc_id = str(obj.get("id", obj.get("_id", f"{path}:{lineno}")))
            meta = {k: v for k, v in obj.items() if k not in (text_field, "id", "_id")}
            yield Document(id=doc_id, text=text, meta={**meta, "source": path, "line": lineno})
    decode.close()


def _is_jsonl(path: str) -> bool:
    return path.endswith((".jsonl", ".jsonl.gz"))


def iter_documents(specs: list[str] | str, errors: str = "strict", text_field: str = "text") -> Iterator[Document]:
    """Yield every Document of the inputs; a plain-text file is one Document."""
    for item in resolve_inputs(specs):
        if is_builtin(item):
            yield from builtin_documents(item)
        elif _is_jsonl(item):
            yield from _iter_jsonl(item, errors, text_field)
        else:
            text = "".join(_iter_plain_text(item, errors, BLOCK_BYTES))
            yield Document(id=item, text=text, meta={"source": item})


def iter_text_chunks(specs: list[str] | str, errors: str = "strict", text_field: str = "text",
                     block_bytes: int = BLOCK_BYTES) -> Iterator[str]:
    """Yield text in pieces of about `block_bytes` that can be pre-tokenized independently.

    Each document is yielded separately (documents never run into each other), and a
    large file is cut at safe line boundaries, so memory stays bounded by the block size.
    """
    for item in resolve_inputs(specs):
        if is_builtin(item):
            yield from (d.text for d in builtin_documents(item))
        elif _is_jsonl(item):
            yield from (d.text for d in _iter_jsonl(item, errors, text_field))
        else:
            yield from _iter_plain_text(item, errors, block_bytes)
