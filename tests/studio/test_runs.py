"""studio/runs.py over run directories the real CLI wrote: kind, status, steps, best metric (against the Trainer's own
best/trainer_state.json), and a command line that the CLI parses back into the run's resolved config."""

from __future__ import annotations

import json
import shlex

import pytest
import yaml

from lmforge.studio.runs import read_metrics, scan_runs


def _config_of_command(command_line: str, cls, parsers, command: str):
    """What the CLI resolves the command line to (argparse + config_from_args), as a dict."""
    from dataclasses import asdict

    from lmforge.config import config_from_args

    argv = shlex.split(command_line)
    assert argv[:1 + len(command.split())] == ["lmforge", *command.split()]
    args = parsers[command].parse_args(argv[1 + len(command.split()):])
    return asdict(config_from_args(cls, args))


def test_finished_runs_read_as_the_cli_wrote_them(workspace, parsers):
    runs = {r.id: r for r in scan_runs(workspace / "runs", parsers)}
    assert set(runs) == {"pt-done", "sft/ft-done"}  # found at any depth; checkpoints inside runs are not runs
    pt, ft = runs["pt-done"], runs["sft/ft-done"]
    assert (pt.kind, pt.status, pt.step, pt.max_steps) == ("pretrain", "finished", 4, 4)
    assert (ft.kind, ft.status, ft.step) == ("finetune", "finished", 2)
    assert pt.model == "tiny-llama" and pt.data.endswith("tokens") and ft.data.endswith("qa.jsonl")
    # the best evaluation is the one the Trainer kept as best/
    state = json.loads((workspace / "runs" / "pt-done" / "best" / "trainer_state.json").read_text())
    assert pt.best["metric"] == "val_loss" and pt.best["value"] == pytest.approx(state["best_val"])
    assert pt.best["step"] == state["step"]
    assert pt.wall_s is not None and pt.wall_s > 0 and pt.checkpoints == ["best", "last"]
    assert {"loss", "lr", "val_loss"} <= set(pt.metrics)
    assert pt.config == yaml.safe_load((workspace / "runs" / "pt-done" / "config.yaml").read_text())


@pytest.mark.parametrize("run_id, command", [("pt-done", "pretrain"), ("sft/ft-done", "finetune")])
def test_the_command_line_reproduces_the_resolved_config(workspace, parsers, run_id, command):
    from lmforge.finetune.run import FinetuneConfig
    from lmforge.train.config import TrainConfig

    run = {r.id: r for r in scan_runs(workspace / "runs", parsers)}[run_id]
    saved = yaml.safe_load((workspace / "runs" / run_id / "config.yaml").read_text())
    again = _config_of_command(run.to_json()["command_line"], {"pretrain": TrainConfig, "finetune": FinetuneConfig}[
        command], parsers, command)
    for key in ("resume", "overwrite"):
        again.pop(key), saved.pop(key)
    assert again == saved
    assert len(run.command) < 2 * len(saved)  # only what differs from the defaults is spelled out


def test_metrics_are_read_incrementally_from_an_offset(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert read_metrics(path) == ([], 0, False)
    path.write_text('{"step": 1, "loss": 2.5}\n{"step": 2, "lo')  # the second line is still being written
    records, offset, reset = read_metrics(path)
    assert records == [{"step": 1, "loss": 2.5}] and offset == len('{"step": 1, "loss": 2.5}\n') and not reset
    with open(path, "a") as f:
        f.write('ss": 2.25}\n{broken\n{"step": 3, "loss": 2.0, "val_loss": 2.1}\n')
    records, offset2, _ = read_metrics(path, offset)
    assert records == [{"step": 2, "loss": 2.25}, {"step": 3, "loss": 2.0, "val_loss": 2.1}]  # a cut line skipped
    assert offset2 == path.stat().st_size and read_metrics(path, offset2) == ([], offset2, False)
    # a resumed run cuts the file back to its checkpoint's step: the reader starts over
    path.write_text('{"step": 1, "loss": 2.5}\n')
    records, offset3, reset = read_metrics(path, offset2)
    assert reset and records == [{"step": 1, "loss": 2.5}] and offset3 == path.stat().st_size


def test_the_tables_summary_follows_a_growing_and_a_replaced_file(tmp_path):
    """metrics_summary reads only what was appended, and equals a summary of the whole file computed by hand; a
    file replaced under the same name (an overwritten run) is read from its start."""
    from lmforge.studio.runs import metrics_summary

    path = tmp_path / "metrics.jsonl"
    lines = [{"step": 0, "val_loss": 5.0}, {"step": 1, "loss": 4.0, "step_s": 0.5},
             {"step": 2, "loss": 3.5, "step_s": 0.25, "val_loss": 3.9}, {"step": 3, "loss": 3.7, "step_s": 0.25},
             {"step": 4, "loss": 3.1, "step_s": 0.5, "val_loss": 3.9}]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines[:2]))
    assert metrics_summary(path).last_step == 1
    with open(path, "a") as f:
        f.write("".join(json.dumps(x) + "\n" for x in lines[2:]))
    s = metrics_summary(path)
    assert (s.last_step, s.step_seconds, list(s.keys)) == (4, 1.5, ["val_loss", "loss", "step_s"])
    assert s.lowest["val_loss"] == (3.9, 2)  # the first step that reached the best, as the Trainer keeps it
    assert s.highest["loss"] == (4.0, 1) and s.lowest["loss"] == (3.1, 4)
    replaced = tmp_path / "new.jsonl"  # --overwrite: a new file, longer than what was read of the old one
    replaced.write_text("".join(json.dumps({"step": i, "loss": 9.0 - i}) + "\n" for i in range(1, 9)))
    replaced.replace(path)
    s = metrics_summary(path)
    assert s.last_step == 8 and s.lowest["loss"] == (1.0, 8) and "val_loss" not in s.keys


def test_status_comes_from_the_run_not_from_file_times(workspace, parsers, tmp_path):
    import shutil

    from lmforge.run_status import mark_ended

    runs = tmp_path / "runs"
    shutil.copytree(workspace / "runs" / "pt-done", runs / "a")
    mark_ended(runs / "a", "stopped", step=3, reason="SIGINT")
    shutil.copytree(workspace / "runs" / "pt-done", runs / "b")
    status = json.loads((runs / "b" / "status.json").read_text())
    (runs / "b" / "status.json").write_text(json.dumps({**status, "state": "running", "pid": 2 ** 22 + 7}))
    shutil.copytree(workspace / "runs" / "pt-done", runs / "c")
    (runs / "c" / "status.json").unlink()  # a run from before status.json: finished when its steps reached max_steps
    got = {r.id: (r.status, r.reason) for r in scan_runs(runs, parsers)}
    assert got["a"] == ("stopped", "SIGINT")
    assert got["b"][0] == "failed" and "without recording an end" in got["b"][1]  # its process is gone
    assert got["c"] == ("finished", "")
    (runs / "d").mkdir()
    (runs / "d" / "notes.txt").write_text("not a run")
    assert "d" not in {r.id for r in scan_runs(runs, parsers)}


def test_a_data_pipeline_run_with_its_steps_and_rejects(tmp_path, parsers):
    """`lmforge data run` over five documents, two of them shorter than the length filter's minimum: the run reads
    as a finished data run, its steps as stats.json has them, and the two rejects with their step and reason."""
    from lmforge.cli import main
    from lmforge.studio.runs import read_rejects

    docs = [{"id": f"d{i}", "text": text} for i, text in enumerate([
        "A long enough document about generators and the yield statement in Python.",
        "too short", "另一篇足够长的文档：北京是中华人民共和国的首都，上海是中国最大的城市之一，位于长江入海口。",
        "tiny", "One more document that is long enough to pass the length filter of this pipeline."])]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs),
                                         encoding="utf-8")
    (tmp_path / "pipe.yaml").write_text(f"input: [{tmp_path / 'docs.jsonl'}]\noutput: {tmp_path / 'runs' / 'clean'}\n"
                                        "steps:\n  - length: {min_chars: 20}\n", encoding="utf-8")
    assert main(["data", "run", str(tmp_path / "pipe.yaml")]) == 0
    (run,) = scan_runs(tmp_path / "runs", parsers)
    assert (run.id, run.kind, run.status) == ("clean", "data run", "finished")
    stats = json.loads((tmp_path / "runs" / "clean" / "stats.json").read_text())
    assert run.results == stats and stats["documents_rejected"] == 2
    assert run.command[:3] == ["lmforge", "data", "run"] and run.command[3].endswith("pipeline.yaml")
    rejects = read_rejects(tmp_path / "runs" / "clean")
    assert sorted(r["id"] for r in rejects) == ["d1", "d3"]  # the two short ones, by hand
    assert {r["step"] for r in rejects} == {"length"} and all("min_chars" in r["reason"] for r in rejects)
    assert read_rejects(tmp_path / "runs" / "clean", start=1) == rejects[1:]
    assert read_rejects(tmp_path / "runs" / "clean", step="dedup") == []
    from fastapi.testclient import TestClient

    from lmforge.studio.app import Studio, create_studio_app

    app = create_studio_app(Studio(tmp_path / "runs", parsers, cwd=tmp_path), port=7860, token="t")
    with TestClient(app, base_url="http://127.0.0.1:7860") as c:
        assert c.get("/api/runs/clean/rejects", params={"limit": 1}).json()["rejects"] == rejects[:1]


def test_a_synthetic_data_run_is_its_own_kind_not_a_pipeline(tmp_path, parsers):
    """A `lmforge synth` run directory (written by synth/common.py's SynthRun, as the CLI writes it) also holds
    stats.json and rejects/: it reads as a synth run with its stats, not as a data pipeline."""
    from lmforge.synth.common import SynthRun

    run = SynthRun(tmp_path / "ws" / "synth-zh")
    run.save_state({"round": 1})
    kept = [{"instruction": "把这句话翻译成英文。", "input": "今天天气很好。", "output": "The weather is nice today."}]
    rejects = [{"instruction": "写", "reason": "too_short: 1 character"}]
    run.write(kept, rejects, {"method": "self-instruct"}, [0.2])
    found = {r.id: r for r in scan_runs(tmp_path / "ws", parsers)}
    synth = found["synth-zh"]
    assert (synth.kind, synth.status, synth.data) == ("synth", "finished", "data/alpaca.jsonl")
    assert synth.results["kept"] == 1 and synth.results["rejection_reasons"] == {"too_short": 1}
