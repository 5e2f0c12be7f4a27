"""RAG in the studio answers as `lmforge rag ask --json` does on the same index: the same sources (retrieval only)
and, with a checkpoint, the same answer and citations."""

from __future__ import annotations

import json
import shutil

import pytest

pytest.importorskip("fastapi")

DOCS = [{"id": "py", "text": "The yield statement makes a function a generator. Each yield hands one value to the "
                             "caller and pauses the function until the next value is asked for."},
        {"id": "zh", "text": "北京是中华人民共和国的首都，位于华北平原的北部。上海是中国最大的城市，位于长江入海口。"},
        {"id": "loop", "text": "The break statement leaves the innermost loop at once; continue skips to its next "
                               "iteration."}]


def _cli_json(capsys, argv) -> dict:
    from lmforge.cli import main

    capsys.readouterr()
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture()
def rag_studio(workspace, parsers, tmp_path):
    """A sparse index of three documents (English and Chinese) built by `lmforge rag index`, and a studio over it."""
    from fastapi.testclient import TestClient

    from lmforge.cli import main
    from lmforge.studio.app import Studio, create_studio_app

    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in DOCS),
                                         encoding="utf-8")
    assert main(["rag", "index", "--input", str(tmp_path / "docs.jsonl"), "--out", str(tmp_path / "idx"),
                 "--no-dense"]) == 0
    (tmp_path / "runs").mkdir()
    studio = Studio(tmp_path / "runs", parsers, cwd=tmp_path)
    with TestClient(create_studio_app(studio, port=7860, token="t"), base_url="http://127.0.0.1:7860") as c:
        def ask(**body):
            return c.post("/api/rag", json={"index": "idx", **body}, headers={"X-Lmforge-Token": "t"})

        c.ask = ask
        yield c, tmp_path


def test_rag_sources_are_the_clis(rag_studio, capsys):
    c, root = rag_studio
    for question in ("What does the yield statement do?", "北京在哪里？"):
        got = c.ask(question=question, k=2)
        assert got.status_code == 200, got.text
        want = _cli_json(capsys, ["rag", "ask", "--index", str(root / "idx"), question, "--k", "2", "--json"])
        assert got.json() == want
    assert got.json()["sources"][0]["doc_id"] == "zh"
    bad = c.ask(question="x", mode="dense")
    assert bad.status_code == 400 and "no vectors" in bad.json()["error"]
    assert c.post("/api/rag", json={"index": "../..", "question": "x"},
                  headers={"X-Lmforge-Token": "t"}).status_code == 400
    assert c.post("/api/rag", json={"index": "idx", "question": "x"}).status_code == 403  # no token


def test_rag_answer_of_a_checkpoint_is_the_clis(rag_studio, workspace, capsys):
    """With a checkpoint: the model's answer and citations, as `lmforge rag ask --model` gives them."""
    c, root = rag_studio
    shutil.copytree(workspace / "model", root / "model")
    got = c.ask(question="What does break do?", checkpoint="model", k=2, max_new_tokens=8)
    assert got.status_code == 200, got.text
    want = _cli_json(capsys, ["rag", "ask", "--index", str(root / "idx"), "What does break do?", "--k", "2",
                              "--max-new-tokens", "8", "--model", str(root / "model"), "--json"])
    assert got.json()["answer"] == want["answer"] and got.json()["sources"] == want["sources"]
    assert got.json()["citations"] == want["citations"] and got.json()["answered"]
