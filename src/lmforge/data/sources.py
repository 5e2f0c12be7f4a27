"""Corpus sources: turn paths, directories, globs and `builtin:` names into text, streaming.

Wherever lmforge accepts a corpus it accepts a list of these specs:
  - a file: .txt .md .rst (any other name is read as plain text too); .jsonl (one JSON
    object per line with a text field) plain, .gz or .zst; .csv/.tsv (a header row naming a
    text column); .parquet (a text column); .html/.htm (main text extracted with
    trafilatura: navigation, menus and footers dropped); .pdf (the text layer, by pypdf);
    .txt/.md may be gzip-compressed (.gz);
  - a directory: every file with one of those suffixes below it, in sorted order;
  - a glob such as `data/**/*.jsonl.gz`;
  - a built-in corpus such as `builtin:python-docs`.

Text is never loaded whole: large files are read in blocks and cut only at a lone line
break between two non-space characters, a point where the GPT-2, cl100k and o200k
pre-tokenizer patterns always split, so training on the pieces gives the same counts as
training on the whole file (a test checks this for all three).

Invalid UTF-8 is reported with the file, line and byte offset (`errors="strict"`, the
default) or replaced with U+FFFD and counted (`errors="replace"`).

A bad record (malformed JSON line, CSV row with the wrong number of columns, missing or
empty text field, unreadable PDF) raises CorpusError naming file and line, unless the
caller passes `on_bad(where, reason, raw)`: then the record is handed to it (the data
pipeline writes it to the rejects file) and reading goes on.
"""

from __future__ import annotations

import codecs
import csv
import glob
import gzip
import io
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from lmforge.data.builtin import builtin_documents, is_builtin
from lmforge.data.document import Document

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text", ".jsonl", ".txt.gz", ".md.gz", ".jsonl.gz", ".jsonl.zst",
                 ".csv", ".tsv", ".parquet", ".html", ".htm", ".pdf")
OnBad = Callable[[str, str, str], None]  # (where: "file:line", reason, raw record)
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
        if _is_dataset_source(spec):  # a datasets directory, split or hub id: read as one input
            out.append(spec)
        elif is_builtin(spec):
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


def _is_dataset_source(spec: str) -> bool:
    from lmforge.data.hf_datasets import is_dataset_source

    return is_dataset_source(spec)


def _optional(module: str, path: str):
    """Import a reader's optional dependency, or say how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise CorpusError(f"{path}: reading this format needs the '{module.split('.')[0]}' package: "
                          "pip install 'lmforge[data]'") from None


def _open_binary(path: str) -> BinaryIO:
    try:
        if path.endswith(".zst"):
            raw = _optional("zstandard", path).ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)  # noqa: SIM115
            return io.BufferedReader(raw)  # line iteration needs a buffered reader
        return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")  # noqa: SIM115
    except OSError as e:
        raise CorpusError(f"{path}: cannot open: {e.strerror or e}") from None


ENCODING_HINT = ("read it with another encoding (pipeline key `encoding: gb18030` or `encoding: auto`, flag "
                 "`--encoding`) or replace bad bytes with U+FFFD (key `errors: replace`, flag `--errors replace`)")
# tried in order by encoding "auto" when a file has no byte-order mark: UTF-8, then GB18030 (a superset of GBK
# and GB2312, what Chinese Windows software writes), then Latin-1 (every byte is a character). Big5 and other
# legacy encodings are not guessed: name them.
AUTO_ENCODINGS = ("utf-8", "gb18030", "latin-1")
_BOMS = ((b"\xef\xbb\xbf", "utf-8"), (b"\xff\xfe", "utf-16-le"), (b"\xfe\xff", "utf-16-be"))


def encoding_field():
    """The `encoding` setting of a stage that reads corpora (a dataclass field)."""
    from dataclasses import field

    return field(default="utf-8", metadata={
        "help": "text encoding of the inputs: utf-8, gb18030/gbk, big5, utf-16, latin-1, ..., or auto (a byte-order "
                "mark, else UTF-8, else GB18030, else Latin-1; reported per file)"})


def on_error_field():
    """The `on_error` setting of a stage that reads corpora outside the pipeline (a dataclass field)."""
    from dataclasses import field

    return field(default="fail", metadata={
        "help": "bad input (malformed record, undecodable file): stop naming file and line, or skip it and list it "
                "in rejects.jsonl beside the output", "choices": ["fail", "skip"]})


def check_encoding(encoding: str) -> str:
    """The codec's canonical name (or "auto"); an unknown name is a CorpusError."""
    if encoding == "auto":
        return encoding
    try:
        return codecs.lookup(encoding).name
    except LookupError:
        raise CorpusError(f"unknown encoding {encoding!r} (e.g. utf-8, gb18030, gbk, big5, utf-16, latin-1, auto)") \
            from None


class _Decoder:
    """Decode the blocks of one file, reporting where invalid bytes are. `encoding` is a codec name or "auto"
    (a byte-order mark, else the first of AUTO_ENCODINGS that decodes the first block); `encoding` after the first
    block says which one was used."""

    def __init__(self, path: str, errors: str, encoding: str = "utf-8"):
        if errors not in ("strict", "replace"):
            raise ValueError(f"errors must be 'strict' or 'replace', got {errors!r}")
        self.path, self.errors = path, errors
        self.encoding = None if encoding == "auto" else check_encoding(encoding)
        self.offset = 0  # bytes of the file consumed so far
        self.line = 1  # line number at the start of the next block
        self.replaced = 0
        self._incremental = None

    def _detect(self, raw: bytes) -> str:
        for bom, name in _BOMS:
            if raw.startswith(bom):
                return name
        for name in AUTO_ENCODINGS:
            try:
                codecs.getincrementaldecoder(name)().decode(raw, final=False)
                return name
            except UnicodeDecodeError:
                continue
        return "latin-1"

    def __call__(self, raw: bytes) -> str:
        if self.encoding is None and raw.isascii() and b"\0" not in raw:
            # every candidate encoding reads ASCII alike: decide at the first block that is not (a CSV is read line by
            # line, and its header alone says nothing)
            self.offset += len(raw)
            self.line += raw.count(b"\n")
            return raw.decode("ascii")
        if self.encoding is None:
            self.encoding = self._detect(raw)
            if self.encoding != "utf-8":
                log.info("%s: read as %s", self.path, self.encoding)
        if self.offset == 0:  # a byte-order mark is not text ("utf-16" with its BOM: the codec reads it itself)
            bom = {name: mark for mark, name in _BOMS}.get(self.encoding)
            if bom and raw.startswith(bom):
                raw, self.offset = raw[len(bom):], len(bom)
        if self.encoding != "utf-8":
            return self._decode_other(raw)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            if self.errors == "strict":
                line = self.line + raw.count(b"\n", 0, e.start)
                raise CorpusError(
                    f"{self.path}: invalid UTF-8 at byte offset {self.offset + e.start} (line {line}): "
                    f"{raw[e.start:e.end]!r}; {ENCODING_HINT}") from None
            text = raw.decode("utf-8", errors="replace")
            self.replaced += text.count("\ufffd") - raw.count("\ufffd".encode())
        self.offset += len(raw)
        self.line += raw.count(b"\n")
        return text

    def _decode_other(self, raw: bytes) -> str:
        # an incremental decoder: a block may end inside a character of a multi-byte encoding (UTF-16's "\n\0")
        if self._incremental is None:
            self._incremental = codecs.getincrementaldecoder(self.encoding)(errors="strict")
        try:
            text = self._incremental.decode(raw)
        except UnicodeDecodeError as e:
            if self.errors == "strict":
                line = self.line + raw.count(b"\n", 0, e.start)
                raise CorpusError(f"{self.path}: invalid {self.encoding} at byte offset {self.offset + e.start} "
                                  f"(line {line}): {raw[e.start:e.end]!r}; {ENCODING_HINT}") from None
            self._incremental = codecs.getincrementaldecoder(self.encoding)(errors="replace")
            text = self._incremental.decode(raw)
            self.replaced += text.count("\ufffd")
        self.offset += len(raw)
        self.line += text.count("\n")
        return text

    def close(self) -> None:
        if self.replaced:
            log.warning("%s: replaced %d invalid %s sequences with U+FFFD", self.path, self.replaced, self.encoding)


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


def _iter_plain_text(path: str, errors: str, block_bytes: int, encoding: str = "utf-8",
                     decoder: _Decoder | None = None) -> Iterator[str]:
    decode = decoder or _Decoder(path, errors, encoding)
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


def _reject_or_raise(on_bad: OnBad | None, where: str, reason: str, raw: str = "") -> None:
    if on_bad is None:
        raise CorpusError(f"{where}: {reason}")
    on_bad(where, reason, raw)


def _record_document(obj: dict, text_field: str, where: str, path: str, lineno: int,
                     on_bad: OnBad | None, raw: str) -> Document | None:
    text = obj.get(text_field)
    if not isinstance(text, str) or not text.strip():
        what = ("missing" if text is None else f"not a string ({type(text).__name__})" if not isinstance(text, str)
                else "empty")
        _reject_or_raise(on_bad, where, f"field '{text_field}' is {what}", raw)
        return None
    doc_id = str(obj.get("id", obj.get("_id", where)))
    meta = {k: v for k, v in obj.items() if k not in (text_field, "id", "_id")}
    return Document(id=doc_id, text=text, meta={**meta, "source": path, "line": lineno})


def _jsonl_records(path: str, errors: str, on_bad: OnBad | None = None, encoding: str = "utf-8",
                   byte_range: tuple[int, int] | None = None) -> Iterator[tuple[str, int, dict, str]]:
    """(where, line number, object, line) of every JSON-object line; bad lines go to on_bad (or raise)."""
    decode = _Decoder(path, errors, encoding)
    f = _open_binary(path)
    with f:
        lineno = 0
        end = None
        if byte_range is not None:  # one piece of a large file: its lines, numbered as in the whole file
            start, end = byte_range
            while f.tell() < start:
                lineno += f.read(min(1 << 24, start - f.tell())).count(b"\n")
            decode.offset, decode.line = start, lineno + 1
        while True:
            if end is not None and f.tell() >= end:
                break
            try:
                raw = f.readline()
            except (OSError, EOFError) as e:  # a truncated .gz/.zst file
                _reject_or_raise(on_bad, f"{path}:{lineno + 1}", f"read failed: {e}")
                break
            if not raw:
                break
            lineno += 1
            try:
                line = decode(raw)
            except CorpusError as e:
                _reject_or_raise(on_bad, f"{path}:{lineno}", str(e).split(": ", 1)[1], raw.decode("utf-8", "replace"))
                continue
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                _reject_or_raise(on_bad, where, f"malformed JSON: {e.msg} (column {e.colno})", line)
                continue
            if not isinstance(obj, dict):
                _reject_or_raise(on_bad, where, f"expected a JSON object, got {type(obj).__name__}", line)
                continue
            yield where, lineno, obj, line
    decode.close()


def _iter_jsonl(path: str, errors: str, text_field: str, on_bad: OnBad | None = None,
                encoding: str = "utf-8", byte_range: tuple[int, int] | None = None) -> Iterator[Document]:
    for where, lineno, obj, line in _jsonl_records(path, errors, on_bad, encoding, byte_range):
        doc = _record_document(obj, text_field, where, path, lineno, on_bad, line)
        if doc is not None:
            yield doc


def _csv_records(path: str, errors: str, on_bad: OnBad | None = None, encoding: str = "utf-8",
                 required: str | None = None) -> Iterator[tuple[str, int, dict, str]]:
    """(where, line number, row as a dict, raw row) of a CSV/TSV file with a header; `required`: a column the
    header must have (a one-line error otherwise)."""
    delimiter = "\t" if path.endswith((".tsv", ".tsv.gz")) else ","
    decode = _Decoder(path, errors, encoding)
    with _open_binary(path) as f:  # streamed line by line: csv pulls more lines for quoted newlines
        reader = csv.reader((decode(raw) for raw in f), delimiter=delimiter)
        try:
            header = next(reader)
        except StopIteration:
            _reject_or_raise(on_bad, f"{path}:1", "empty file (expected a header row)")
            return
        if required is not None and required not in header:
            raise CorpusError(f"{path}:1: no column '{required}' in the header ({', '.join(header)}); "
                              "pass --text-field to name the text column")
        lineno = reader.line_num
        for row in reader:
            where = f"{path}:{lineno + 1}"
            lineno = reader.line_num
            if not row:
                continue
            if len(row) != len(header):
                _reject_or_raise(on_bad, where, f"row has {len(row)} columns, the header has {len(header)}",
                                 delimiter.join(row))
                continue
            yield where, lineno, dict(zip(header, row)), delimiter.join(row)
    decode.close()


def _iter_csv(path: str, errors: str, text_field: str, on_bad: OnBad | None = None,
              encoding: str = "utf-8") -> Iterator[Document]:
    for where, lineno, obj, raw in _csv_records(path, errors, on_bad, encoding, required=text_field):
        doc = _record_document(obj, text_field, where, path, lineno, on_bad, raw)
        if doc is not None:
            yield doc


def _parquet_records(path: str, required: str | None = None) -> Iterator[tuple[str, int, dict, str]]:
    pq = _optional("pyarrow.parquet", path)
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise CorpusError(f"{path}: not a readable parquet file: {e}") from None
    if required is not None and required not in pf.schema_arrow.names:
        raise CorpusError(f"{path}: no column '{required}' (columns: {', '.join(pf.schema_arrow.names)}); "
                          "pass --text-field to name the text column")
    from lmforge.data.hf_datasets import label_names_decoder

    decode = label_names_decoder(pf.schema_arrow)  # ClassLabel columns of a parquet file that datasets wrote, as names
    row = 0
    for batch in pf.iter_batches(batch_size=1024):
        for obj in batch.to_pylist():
            row += 1
            yield f"{path}:row {row}", row, decode(obj) if decode else obj, ""


def _iter_parquet(path: str, text_field: str, on_bad: OnBad | None = None) -> Iterator[Document]:
    for where, row, obj, _ in _parquet_records(path, required=text_field):
        if isinstance(obj.get("meta"), str) and obj["meta"].startswith("{"):  # lmforge's own parquet output
            try:
                meta = json.loads(obj["meta"])
            except json.JSONDecodeError:
                meta = None
            if isinstance(meta, dict):
                obj = {**meta, **{k: v for k, v in obj.items() if k != "meta"}}
        doc = _record_document(obj, text_field, where, path, row, on_bad, "")
        if doc is not None:
            yield doc


RECORD_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".ndjson", ".json", ".json.gz", ".csv", ".tsv", ".csv.gz",
                   ".tsv.gz", ".parquet", ".arrow")


def iter_records(path: str, on_bad: OnBad | None = None, encoding: str = "utf-8",
                 errors: str = "strict") -> Iterator[tuple[str, dict]]:
    """(where, record) of every record of a structured file: JSON Lines, a JSON array of objects (or an object
    holding one under "data"), CSV/TSV with a header, parquet. `where` is "file:line" ("file:record N" in a JSON
    array, "file:row N" in parquet); bad records go to `on_bad` (or raise CorpusError naming them). A Hugging Face
    datasets source (a save_to_disk or Arrow/Parquet folder, DIR#SPLIT, a .arrow file, hf:REPO) gives its rows
    (lmforge.data.hf_datasets)."""
    if _is_dataset_source(path):
        from lmforge.data.hf_datasets import iter_dataset_records

        yield from iter_dataset_records(path)
    elif path.endswith((".json", ".json.gz")):
        yield from _json_array_records(path, on_bad, encoding, errors)
    elif _is_jsonl(path) or path.endswith(".ndjson"):
        for where, _, obj, _ in _jsonl_records(path, errors, on_bad, encoding):
            yield where, obj
    elif path.endswith((".csv", ".tsv", ".csv.gz", ".tsv.gz")):
        for where, _, obj, _ in _csv_records(path, errors, on_bad, encoding):
            yield where, obj
    elif path.endswith(".parquet"):
        for where, _, obj, _ in _parquet_records(path):
            yield where, obj
    else:
        raise CorpusError(f"{path}: not a structured data file (expected one of {', '.join(RECORD_SUFFIXES)})")


def _json_array_records(path: str, on_bad: OnBad | None, encoding: str, errors: str) -> Iterator[tuple[str, dict]]:
    decode = _Decoder(path, errors, encoding)
    with _open_binary(path) as f:
        text = decode(f.read())
    decode.close()
    if not text.strip():
        _reject_or_raise(on_bad, path, "empty file")
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if text.lstrip().startswith("{") and "\n{" in text:  # JSON Lines under a .json name
            for where, _, obj, _ in _jsonl_records(path, errors, on_bad, encoding):
                yield where, obj
            return
        raise CorpusError(f"{path}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise CorpusError(f"{path}: expected a JSON array of records, got {type(data).__name__}")
    for i, obj in enumerate(data, 1):
        where = f"{path}:record {i}"
        if not isinstance(obj, dict):
            _reject_or_raise(on_bad, where, f"expected a JSON object, got {type(obj).__name__}",
                             json.dumps(obj, ensure_ascii=False)[:1000])
            continue
        yield where, obj


def _iter_html(path: str, errors: str, on_bad: OnBad | None = None, encoding: str = "utf-8") -> Iterator[Document]:
    trafilatura = _optional("trafilatura", path)
    html = "".join(_iter_plain_text(path, errors, BLOCK_BYTES, encoding))
    text = trafilatura.extract(html, include_comments=False, include_tables=True, favor_recall=True) or ""
    if not text.strip():
        _reject_or_raise(on_bad, path, "no main text found in the HTML", html[:1000])
        return
    title = trafilatura.extract_metadata(html)
    meta = {"source": path}
    if title is not None and title.title:
        meta["title"] = title.title
    yield Document(id=path, text=text, meta=meta)


def _iter_pdf(path: str, on_bad: OnBad | None = None) -> Iterator[Document]:
    pypdf = _optional("pypdf", path)
    try:
        reader = pypdf.PdfReader(path)
        pages = [page.extract_text() or "" for page in reader.pages]
    except Exception as e:  # pypdf raises many types for damaged files
        _reject_or_raise(on_bad, path, f"not a readable PDF: {e}")
        return
    text = "\n\n".join(p.strip() for p in pages if p.strip())
    if not text:
        _reject_or_raise(on_bad, path, "the PDF has no text layer (scanned images need OCR first)")
        return
    yield Document(id=path, text=text, meta={"source": path, "pages": len(pages)})


def _is_jsonl(path: str) -> bool:
    return path.endswith((".jsonl", ".jsonl.gz", ".jsonl.zst"))


class RejectLog:
    """Bad input that a corpus-reading stage (tokenizer train, data tokenize, rag index) set aside under
    `on_error: skip`: pass it as `on_bad`; `write(dir)` saves DIR/rejects.jsonl (where, reason, text) when there
    is any, and says how many on stderr."""

    def __init__(self):
        self.items: list[dict] = []

    def __call__(self, where: str, reason: str, raw: str = "") -> None:
        self.items.append({"where": where, "reason": reason, "text": raw or None})

    def write(self, directory: str | os.PathLike) -> None:
        if not self.items:
            return
        from lmforge.files import atomic_write

        path = Path(directory) / "rejects.jsonl"
        with atomic_write(path) as f:
            for item in self.items:
                f.write(json.dumps(item, ensure_ascii=False) + "\n")
        log.warning("%d bad input record(s) skipped; each with its reason in %s", len(self.items), path)


def _read_file_documents(path: str, errors: str, text_field: str, on_bad: OnBad | None,
                         encoding: str, byte_range: tuple[int, int] | None = None) -> Iterator[Document]:
    if byte_range is not None and not splittable(path):
        raise ValueError(f"{path}: only plain .jsonl files are read in byte ranges")
    if is_builtin(path):
        yield from builtin_documents(path)
    elif _is_dataset_source(path):
        for row, (where, obj) in enumerate(iter_records(path), 1):
            if row == 1 and text_field not in obj:  # a column is missing from every row: say so once
                raise CorpusError(f"{path}: no column '{text_field}' (columns: {', '.join(map(str, obj))}); "
                                  "pass --text-field to name the text column")
            doc = _record_document(obj, text_field, where, path, row, on_bad, "")
            if doc is not None:
                yield doc
    elif _is_jsonl(path):
        yield from _iter_jsonl(path, errors, text_field, on_bad, encoding, byte_range)
    elif path.endswith((".csv", ".tsv", ".csv.gz", ".tsv.gz")):
        yield from _iter_csv(path, errors, text_field, on_bad, encoding)
    elif path.endswith(".parquet"):
        yield from _iter_parquet(path, text_field, on_bad)
    elif path.endswith((".html", ".htm")):
        yield from _iter_html(path, errors, on_bad, encoding)
    elif path.endswith(".pdf"):
        yield from _iter_pdf(path, on_bad)
    else:
        decoder = _Decoder(path, errors, encoding)
        text = "".join(_iter_plain_text(path, errors, BLOCK_BYTES, decoder=decoder))
        meta = {"source": path} if decoder.encoding in (None, "utf-8") else {"source": path, "encoding": decoder.encoding}
        if text.strip():
            yield Document(id=path, text=text, meta=meta)
        else:
            _reject_or_raise(on_bad, path, "empty file")


def splittable(path: str) -> bool:
    """Whether a file can be read in pieces cut at line ends (plain JSONL: one record per line)."""
    return path.endswith(".jsonl") and not is_builtin(path)


def split_points(path: str, piece_bytes: int) -> list[tuple[int, int]]:
    """Byte ranges of about `piece_bytes` that cut a plain JSONL file at line ends (one range for a small file)."""
    size = os.path.getsize(path)
    n = max(1, -(-size // piece_bytes))
    cuts = [0]
    with open(path, "rb") as f:
        for k in range(1, n):
            f.seek(k * size // n)
            f.readline()  # to the end of the line the cut falls in
            pos = f.tell()
            if cuts[-1] < pos < size:
                cuts.append(pos)
    cuts.append(size)
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a] or [(0, size)]


def iter_file_documents(path: str, errors: str = "strict", text_field: str = "text",
                        on_bad: OnBad | None = None, encoding: str = "utf-8",
                        byte_range: tuple[int, int] | None = None) -> Iterator[Document]:
    """Documents of one input (a file or a `builtin:` name), by its suffix, decoded with `encoding` (a codec name
    or "auto"). With `on_bad`, every bad input is reported to it and reading goes on, also what spoils a whole
    file (undecodable bytes in a text file, a corrupt parquet, a missing column); documents of the file read
    before the error stay. Without, the first bad input raises CorpusError naming the file and line."""
    if on_bad is None:
        yield from _read_file_documents(path, errors, text_field, None, encoding, byte_range)
        return
    try:
        yield from _read_file_documents(path, errors, text_field, on_bad, encoding, byte_range)
    except CorpusError as e:
        reason = str(e)
        on_bad(path, reason[len(path) + 2:] if reason.startswith(path + ": ") else reason, "")


def iter_documents(specs: list[str] | str, errors: str = "strict", text_field: str = "text",
                   on_bad: OnBad | None = None, encoding: str = "utf-8") -> Iterator[Document]:
    """Yield every Document of the inputs; a plain-text, HTML or PDF file is one Document."""
    for item in resolve_inputs(specs):
        yield from iter_file_documents(item, errors, text_field, on_bad, encoding)


def iter_text_chunks(specs: list[str] | str, errors: str = "strict", text_field: str = "text",
                     block_bytes: int = BLOCK_BYTES, encoding: str = "utf-8",
                     on_bad: OnBad | None = None) -> Iterator[str]:
    """Yield text in pieces of about `block_bytes` that can be pre-tokenized independently.

    Each document is yielded separately (documents never run into each other), and a
    large file is cut at safe line boundaries, so memory stays bounded by the block size.
    With `on_bad`, bad input is reported to it and skipped (a plain-text file that fails to decode is skipped
    whole: its text counts only when all of it was read).
    """
    for item in resolve_inputs(specs):
        if is_builtin(item):
            yield from (d.text for d in builtin_documents(item))
        elif item.endswith((".txt", ".md", ".rst", ".text", ".txt.gz", ".md.gz")) or not item.endswith(TEXT_SUFFIXES):
            if on_bad is None:
                yield from _iter_plain_text(item, errors, block_bytes, encoding)
                continue
            try:
                pieces = list(_iter_plain_text(item, errors, block_bytes, encoding))
            except CorpusError as e:
                on_bad(item, str(e)[len(item) + 2:] if str(e).startswith(item + ": ") else str(e), "")
                continue
            yield from pieces
        else:
            yield from (d.text for d in iter_file_documents(item, errors, text_field, on_bad, encoding))
