"""The CLI as a user runs it (in-process, through main())."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer as RustTokenizer

from lmforge.cli import main


def test_help_lists_stages(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "tokenizer" in out and "quickstart" in out and "examples:" in out


def test_train_encode_decode_inspect(tmp_path, capsys, mixed_corpus_dir, monkeypatch):
    out = tmp_path / "tok"
    (tmp_path / "cfg.yaml").write_text("vocab_size: 700\npattern: cl100k\n")
    assert main(["tokenizer", "train", "--config", str(tmp_path / "cfg.yaml"), "--input", str(mixed_corpus_dir),
                 "--vocab-size", "800", "--out", str(out), "--no-progress"]) == 0
    assert {"tokenizer.json", "tokenizer_config.json", "config.yaml", "train_stats.json"} <= {p.name for p in out.iterdir()}
    stats = json.loads((out / "train_stats.json").read_text())
    assert stats["vocab_size"] == 800 and stats["compression"]["zh"]["tokens_per_cjk_char"] < 3
    assert "vocab_size: 800" in (out / "config.yaml").read_text()  # the flag beat the file
    capsys.readouterr()

    text = "你好, world"
    assert main(["tokenizer", "encode", "--tokenizer", str(out), "--text", text]) == 0
    ids = json.loads(capsys.readouterr().out)
    assert ids == RustTokenizer.from_file(str(out / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    assert main(["tokenizer", "encode", "--tokenizer", str(out), "--decode", "--text", json.dumps(ids)]) == 0
    assert capsys.readouterr().out == text

    import io
    monkeypatch.setattr("sys.stdin", io.StringIO("<|im_start|>hi"))
    assert main(["tokenizer", "encode", "--tokenizer", str(out), "--allowed-special", "all"]) == 0
    assert json.loads(capsys.readouterr().out)[0] == 798  # <|im_start|>: specials take ids 797-799

    assert main(["tokenizer", "inspect", "--tokenizer", str(out), "--text", "分词 test", "--color", "never", "--ids"]) == 0
    shown = capsys.readouterr().out
    assert "分" in shown and "bytes/token" in shown and "tokens per Chinese character" in shown


def test_user_errors_are_one_line(tmp_path, capsys):
    assert main(["tokenizer", "train", "--vocab-size", "100", "--out", str(tmp_path / "x")]) == 2
    assert "below the minimum" in capsys.readouterr().err
    assert main(["tokenizer", "encode", "--tokenizer", str(tmp_path / "none"), "--text", "x"]) == 2
    assert "no such tokenizer" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["tokenizer", "train", "--vocab-sise", "100"])
    assert "did you mean '--vocab-size'" in capsys.readouterr().err


@pytest.mark.slow
def test_quickstart_writes_a_run_directory(tmp_path, capsys):
    assert main(["quickstart", "--out", str(tmp_path / "qs"), "--max-steps", "60", "--train-seconds", "120"]) == 0
    summary = json.loads((tmp_path / "qs" / "summary.json").read_text())
    assert all(summary["checks"].values())
    assert summary["pretrain"]["val_ppl_after"] < summary["pretrain"]["val_ppl_before"] / 4
    assert (tmp_path / "qs" / "pretrain" / "best" / "model.safetensors").exists()
    report = (tmp_path / "qs" / "report.md").read_text()
    assert "bytes/token" in report and (tmp_path / "qs" / "tokenizer" / "tokenizer.json").exists()
    # the data stage ran first and its accounting is in the report; RAG ran last and beat chance
    assert "clean/report.md" in report and (tmp_path / "qs" / "clean" / "stats.json").exists()
    assert summary["corpus"]["documents"] + summary["corpus"]["documents_removed"] == summary["corpus"]["documents_read"]
    assert summary["rag"]["dense"]["ndcg@10"] > 0.5 and summary["rag"]["sparse"]["ndcg@10"] > 0.4
    assert "## Retrieval (RAG)" in report
