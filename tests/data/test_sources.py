from __future__ import annotations

import gzip
import json

import pytest

from lmforge.data import CorpusError, iter_documents, iter_text_chunks, resolve_inputs
from tests import corpora


def test_builtin_corpus_is_the_python_reference():
    from pydoc_data.topics import topics

    docs = list(iter_documents("builtin:python-docs"))
    assert len(docs) == len(topics)
    assert sum(len(d.text) for d in docs) == sum(len(t) for t in topics.values())
    with pytest.raises(CorpusError, match="unknown built-in corpus 'builtin:nope'"):
        resolve_inputs(["builtin:nope"])


def test_directories_globs_and_formats(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("alpha\n", encoding="utf-8")
    (tmp_path / "sub" / "b.md").write_text("# 标题\n正文\n", encoding="utf-8")
    (tmp_path / "sub" / "skip.bin").write_bytes(b"\x00\x01")
    with gzip.open(tmp_path / "c.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"id": "d1", "content": "压缩的文本", "lang": "zh"}, ensure_ascii=False) + "\n\n")
    found = resolve_inputs([str(tmp_path)])
    assert [p.rsplit("/", 1)[-1] for p in found] == ["a.txt", "c.jsonl.gz", "b.md"]
    assert resolve_inputs([str(tmp_path / "**" / "*.md")]) == [str(tmp_path / "sub" / "b.md")]
    docs = list(iter_documents([str(tmp_path)], text_field="content"))
    assert [d.text for d in docs] == ["alpha\n", "压缩的文本", "# 标题\n正文\n"]
    assert docs[1].id == "d1" and docs[1].meta["lang"] == "zh" and docs[1].meta["line"] == 1


def test_missing_inputs_are_named(tmp_path):
    with pytest.raises(CorpusError, match="nope.txt: no such file or directory"):
        resolve_inputs([str(tmp_path / "nope.txt")])
    with pytest.raises(CorpusError, match="glob matches no files"):
        resolve_inputs([str(tmp_path / "*.zzz")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="directory has no text files"):
        resolve_inputs([str(tmp_path / "empty")])


def test_invalid_utf8_reports_file_line_and_byte(tmp_path):
    p = tmp_path / "bad.txt"
    # line 1 is 6 bytes; line 2 has 2 Chinese characters (6 bytes) and then the bad byte: offset 12
    p.write_bytes("hello\n中文".encode() + b"\xff rest\n")
    with pytest.raises(CorpusError, match=r"bad.txt: invalid UTF-8 at byte offset 12 \(line 2\)"):
        list(iter_text_chunks([str(p)]))
    assert "".join(iter_text_chunks([str(p)], errors="replace")) == "hello\n中文\ufffd rest\n"


def test_invalid_utf8_offset_in_later_block(tmp_path):
    p = tmp_path / "big.txt"
    good = ("line of text\n" * 1000).encode()
    p.write_bytes(good + b"ok \xc3\x28\n")
    with pytest.raises(CorpusError, match=rf"byte offset {len(good) + 3} \(line 1001\)"):
        list(iter_text_chunks([str(p)], block_bytes=1024))


def test_bom_is_dropped_and_chunks_reassemble(tmp_path):
    text = corpora.english(50_000) + corpora.chinese_news(20_000)
    p = tmp_path / "t.txt"
    p.write_bytes(b"\xef\xbb\xbf" + text.encode())
    chunks = list(iter_text_chunks([str(p)], block_bytes=2048))
    assert len(chunks) > 10
    assert "".join(chunks) == text


@pytest.mark.parametrize("content,match", [
    ('{"text": "ok"}\n{"text": \n', r"bad.jsonl:2: malformed JSON"),
    ('{"text": "ok"}\n[1, 2]\n', r"bad.jsonl:2: expected a JSON object"),
    ('{"body": "no text"}\n', r"bad.jsonl:1: field 'text' is missing"),
    ('{"text": 5}\n', r"bad.jsonl:1: field 'text' is not a string \(int\)"),
])
def test_malformed_jsonl_names_file_and_line(tmp_path, content, match):
    (tmp_path / "bad.jsonl").write_text(content, encoding="utf-8")
    with pytest.raises(CorpusError, match=match):
        list(iter_documents([str(tmp_path / "bad.jsonl")]))


def test_truncated_gzip_is_named(tmp_path):
    data = gzip.compress(("x" * 100_000).encode())
    (tmp_path / "cut.txt.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorpusError, match="cut.txt.gz: read failed"):
        list(iter_text_chunks([str(tmp_path / "cut.txt.gz")]))


def test_auto_encoding_decides_at_the_first_non_ascii_line(tmp_path):
    """A GBK CSV or JSONL whose first lines are ASCII (a header): `auto` used to decide UTF-8 from the header alone
    and then fail on the first Chinese row."""
    from lmforge.data.sources import iter_documents

    (tmp_path / "zh.csv").write_bytes("id,text\n1,长城全长两万多公里。\n".encode("gb18030"))
    (tmp_path / "zh.jsonl").write_bytes(('{"text": "ascii first"}\n' + '{"text": "然后是中文"}\n').encode("gb18030"))
    texts = [d.text for d in iter_documents([str(tmp_path / "zh.csv"), str(tmp_path / "zh.jsonl")], encoding="auto")]
    assert texts == ["长城全长两万多公里。", "ascii first", "然后是中文"]
