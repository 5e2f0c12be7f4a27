"""The CLI as a user runs it (in-process, through main())."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer as RustTokenizer

from lmforge.cli import main
from lmforge.tokenizer import load_tokenizer


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
    assert main(["quickstart", "--out", str(tmp_path / "qs"), "--max-steps", "60", "--finetune-steps", "12"]) == 0
    summary = json.loads((tmp_path / "qs" / "summary.json").read_text())
    assert summary["pretrain"]["steps"] == 60  # the step count ends the run, not the clock
    assert all(summary["checks"].values())
    assert summary["pretrain"]["val_ppl_after"] < summary["pretrain"]["val_ppl_before"] / 4
    assert (tmp_path / "qs" / "pretrain" / "best" / "model.safetensors").exists()
    report = (tmp_path / "qs" / "report.md").read_text()
    assert "bytes/token" in report and (tmp_path / "qs" / "tokenizer" / "tokenizer.json").exists()
    # the data stage ran first and its accounting is in the report; RAG ran last and beat chance
    assert "clean/report.md" in report and (tmp_path / "qs" / "clean" / "stats.json").exists()
    assert summary["corpus"]["documents"] + summary["corpus"]["documents_removed"] == summary["corpus"]["documents_read"]
    assert summary["rag"]["dense"]["ndcg@10"] > 0.5 and summary["rag"]["sparse"]["ndcg@10"] > 0.4
    assert "## Retrieval (RAG)" in report and "## Fine-tuning (LoRA)" in report
    # the fine-tuning step learned the held-out answers, and its adapter is a PEFT directory
    assert summary["finetune"]["val_loss_after"] < summary["finetune"]["val_loss_before"]
    assert (tmp_path / "qs" / "finetune" / "best" / "adapter_config.json").exists()
    # the report's commands are filled in, and each of its next steps runs on what the quickstart wrote
    assert "{model_dir}" not in report and "{next_steps" not in report
    assert report.rstrip().endswith(summary["next_steps"][-1])  # nothing stale after them
    import shlex

    capsys.readouterr()
    for command in summary["next_steps"]:
        assert f"    {command}" in report
        argv = shlex.split(command)[1:]
        if argv[0] in ("pretrain", "finetune"):  # the same command, a few steps long
            argv[argv.index("--max-steps") + 1] = "2"
        assert main(argv) == 0, command
    assert capsys.readouterr().err.count("error") == 0


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, trained):
    import torch

    from lmforge.model import Transformer, preset, save_hf_model

    d = tmp_path_factory.mktemp("runs") / "pt" / "best"
    torch.manual_seed(0)
    save_hf_model(Transformer(preset("tiny-llama", vocab_size=trained.vocab_size)), d)
    trained.save(d)
    return d


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lmforge: error: ") and "Traceback" not in err, err
    return err


def test_bad_models_and_values_are_one_line_errors(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import shutil
    import time

    def run(*argv) -> str:
        assert main(list(argv)) == 2
        return _error(capsys)

    bad = tmp_path / "bad"
    shutil.copytree(tiny_model_dir, bad)
    (bad / "config.json").write_text('{"model_type": "llama", "hidden_size": ')
    assert "config.json: not valid JSON" in run("generate", "--model", str(bad), "--prompt", "x")
    (bad / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 10}))
    assert "config.json: missing field 'num_hidden_layers'" in run("generate", "--model", str(bad), "--prompt", "x")
    shutil.copy(tiny_model_dir / "config.json", bad / "config.json")
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert "model.safetensors: cannot be read as safetensors" in run("generate", "--model", str(bad), "--prompt", "x")
    assert "top_p" in run("generate", "--model", str(tiny_model_dir), "--prompt", "x", "--top-p", "0")
    assert "val_fraction: 1.5 is out of range" in run("data", "tokenize", "--tokenizer", str(tiny_model_dir),
                                                      "--input", "builtin:python-docs", "--val-fraction", "1.5",
                                                      "--out", str(tmp_path / "t"))
    # a run directory where a model is expected: where its models are
    assert f"its models are {tiny_model_dir}" in run("generate", "--model", str(tiny_model_dir.parent), "--prompt", "x")
    # a mistyped local path is an immediate error, never a wait on the network
    start = time.perf_counter()
    runz = str(tiny_model_dir.parent.parent.parent / "runz" / "pt")
    err = run("generate", "--model", runz, "--prompt", "x")
    assert "no such" in err and time.perf_counter() - start < 5
    (tmp_path / "runs" / "pt").mkdir(parents=True)  # a relative typo next to runs/: local, with a suggestion
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    start = time.perf_counter()
    err = run("generate", "--model", "runz/pt", "--prompt", "x")
    assert "runz/pt: no such model directory; did you mean runs/pt?" in err and time.perf_counter() - start < 5


def test_mistyped_and_planned_commands(capsys):
    with pytest.raises(SystemExit):
        main(["pretrian"])
    assert "did you mean 'pretrain'" in capsys.readouterr().err
    assert main(["finetune", "--data", "x.jsonl"]) == 2  # a stage that exists: its own one-line error
    assert "model: give the base model" in capsys.readouterr().err


def test_a_closed_pipe_is_not_a_traceback(tmp_path, trained_dir):
    import subprocess
    import sys

    text = "\n".join(["hello 世界 " * 20] * 2000)
    proc = subprocess.run(f"{sys.executable} -m lmforge tokenizer encode --tokenizer {trained_dir} | head -c 20",
                          shell=True, input=text, capture_output=True, text=True, timeout=120)
    assert len(proc.stdout) == 20 and proc.stderr == ""


def test_commands_that_need_no_model_do_not_import_torch(trained_dir):
    import subprocess
    import sys

    code = ("import sys; from lmforge.cli import main; main(['tokenizer', 'encode', '--tokenizer', sys.argv[1], "
            "'--text', 'hi']); assert 'torch' not in sys.modules, 'torch imported'")
    proc = subprocess.run([sys.executable, "-c", code, str(trained_dir)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run([sys.executable, "-c", "import sys; from lmforge.cli import build_parser; build_parser(); "
                           "assert 'torch' not in sys.modules"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_pgvector_urls_are_shown_without_their_password():
    from lmforge.rag.pgvector import redact_dsn

    assert redact_dsn("postgresql://me:s3cr:t@db:5432/x#chunks") == "postgresql://me:***@db:5432/x#chunks"
    assert redact_dsn("host=db password='a b' user=me") == "host=db password=*** user=me"


def test_a_bad_option_value_names_the_allowed_ones_not_the_commands(capsys):
    with pytest.raises(SystemExit):
        main(["finetune", "--objective", "ppo"])
    err = capsys.readouterr().err
    assert "argument --objective: invalid choice: 'ppo' (choose from 'sft'" in err and "commands:" not in err


def test_decoded_text_ends_with_a_newline_on_a_terminal_only(trained_dir, monkeypatch, capsys):
    ids = json.dumps(load_tokenizer(trained_dir).encode("你好"))
    assert main(["tokenizer", "encode", "--tokenizer", str(trained_dir), "--decode", "--text", ids]) == 0
    assert capsys.readouterr().out == "你好"  # piped: the exact text
    monkeypatch.setattr("sys.stdout.isatty", lambda: True)
    assert main(["tokenizer", "encode", "--tokenizer", str(trained_dir), "--decode", "--text", ids]) == 0
    assert capsys.readouterr().out == "你好\n"
