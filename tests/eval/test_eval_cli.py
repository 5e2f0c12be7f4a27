"""`lmforge eval run | judge`'s settings from their config dataclasses (eval/config.py), the run directory rule, the
metrics files reader, and the judge's responses generated through infer/client.py's EngineClient, checked against
transformers' greedy generate on the same weights."""

from __future__ import annotations

import json

import pytest

from lmforge.cli import build_parser, main
from lmforge.config import config_from_args
from lmforge.eval.config import EvalRunConfig, JudgeConfig, eval_run_directory


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_eval_run_takes_repeated_tasks_and_its_defaults_from_the_config(capsys):
    args = build_parser().parse_args(["eval", "run", "--model", "m", "--task", "mmlu", "--data", "mmlu/data",
                                      "--task", "arc_easy", "--data", "arc.jsonl", "--limit", "20"])
    cfg = config_from_args(EvalRunConfig, args)
    assert cfg.task == ["mmlu", "arc_easy"] and cfg.data == ["mmlu/data", "arc.jsonl"] and cfg.limit == 20
    assert (cfg.batch_tokens, cfg.temperature, cfg.format, cfg.shots, cfg.overwrite) == (8192, 0.0, "plain", None,
                                                                                         False)
    # errors come before any model is loaded ("m" does not exist), as one line naming the flag
    assert main(["eval", "run", "--model", "m"]) == 2
    assert "--task is required" in _error(capsys)
    assert main(["eval", "run", "--model", "m", "--task", "mmlu", "--data", "a", "--data", "b"]) == 2
    assert "2 --data for 1 --task" in _error(capsys)
    assert main(["eval", "judge", "--data", "x.jsonl", "--out", "o"]) == 2
    assert "--endpoint is required" in _error(capsys)
    judge = config_from_args(JudgeConfig, build_parser().parse_args(
        ["eval", "judge", "--data", "a.jsonl", "--endpoint", "http://h/v1", "--out", "o", "--against-model", "b"]))
    assert judge.pairwise and judge.response_field == judge.against_field == "model_response"


def test_the_run_directory_rule(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "sft").mkdir(parents=True)
    path = eval_run_directory(None, "models/sft", "mmlu+arc_easy", overwrite=False)
    assert path.as_posix() == "runs/eval/sft-mmlu+arc_easy"
    path.mkdir(parents=True)
    (path / "results.json").write_text("{}")
    from lmforge.train.config import RunDirectoryError

    with pytest.raises(RunDirectoryError, match="already holds an evaluation"):
        eval_run_directory(None, "models/sft", "mmlu+arc_easy", overwrite=False)
    assert eval_run_directory(None, "models/sft", "mmlu+arc_easy", overwrite=True) == path
    assert eval_run_directory(str(tmp_path / "other"), "models/sft", "x", overwrite=False) == tmp_path / "other"


def test_metrics_files_are_read_line_by_line_or_by_field(tmp_path, capsys):
    (tmp_path / "pred.txt").write_text("the cat sat\n猫坐着\n", encoding="utf-8")
    (tmp_path / "ref.jsonl").write_text(json.dumps({"reference": "the cat sat"}) + "\n"
                                        + json.dumps({"reference": "猫坐着"}, ensure_ascii=False) + "\n",
                                        encoding="utf-8")
    assert main(["eval", "metrics", "--pred", str(tmp_path / "pred.txt"), "--ref", str(tmp_path / "ref.jsonl"),
                 "--metric", "exact_match", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"exact_match": 1.0}
    (tmp_path / "bad.jsonl").write_text('{"reference": "a"}\n{"other": 1}\n')
    assert main(["eval", "metrics", "--pred", str(tmp_path / "pred.txt"), "--ref", str(tmp_path / "bad.jsonl")]) == 2
    assert "bad.jsonl:2: no field" in _error(capsys)


@pytest.mark.parametrize("template", [None, "chatml"])
def test_judge_responses_through_the_engine_client_equal_transformers_greedy(trained_dir, tmp_path, template):
    import torch
    import transformers

    from lmforge.chat.render import encode_chat
    from lmforge.chat.templates import resolve_template
    from lmforge.eval.judge import format_input, generate_responses
    from lmforge.infer.client import EngineClient
    from lmforge.tokenizer import load_tokenizer
    from tests.models import tiny_llama

    model_dir = tiny_llama(tmp_path / "m", trained_dir)
    if template is None:  # a base model without a chat template
        config = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
        config.pop("chat_template", None)
        (model_dir / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
        for f in model_dir.glob("chat_template*"):
            f.unlink()
    entries = [{"instruction": "Name the capital of France.", "input": "", "output": "Paris"},
               {"instruction": "把这句话翻译成英文。", "input": "我喜欢读书。", "output": "I like reading."}]
    client = EngineClient(model_dir, template=template, pack=False)
    assert (client.template is None) == (template is None)
    got = generate_responses(client, entries, max_tokens=8)

    tok = load_tokenizer(model_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    eos = tok.special_tokens["<|endoftext|>"]
    for entry, response in zip(entries, got):
        if template is None:  # no chat template: the book's alpaca prompt as plain text
            ids = tok.encode(format_input(entry) + "\n\n### Response:\n", disallowed_special=())
        else:
            text, _ = resolve_template(tok, template)
            ids = encode_chat(tok, text, [{"role": "user", "content": format_input(entry)}],
                              add_generation_prompt=True).ids
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, eos_token_id=client.stop_ids,
                              pad_token_id=eos)
        new = [t for t in out[0, len(ids):].tolist() if t not in client.stop_ids]
        assert response == tok.decode(new).strip()


def test_the_metrics_help_names_every_metric_by_name():
    from lmforge.metrics import TEXT_METRICS

    parser = next(a for a in build_parser()._actions if a.dest == "command").choices["eval"]
    metrics = next(a for a in parser._actions if a.dest == "eval_command").choices["metrics"]
    (metric,) = [a for a in metrics._actions if a.dest == "metric"]
    assert metric.help == "comma-separated: " + ", ".join(TEXT_METRICS)
