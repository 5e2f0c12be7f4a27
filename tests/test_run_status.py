"""run_status.py: the Trainer records running / finished / stopped / failed in status.json, and a run whose process
died without a word (SIGKILL) reads as failed, not as running for ever."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from lmforge.run_status import mark_ended, mark_running, pid_alive, read_status


@pytest.fixture(scope="module")
def shards(trained_dir, tmp_path_factory):
    from lmforge.tokenizer.shards import TokenizeConfig, tokenize_corpus

    out = tmp_path_factory.mktemp("shards")
    tokenize_corpus(TokenizeConfig(input=["builtin:python-docs"], tokenizer=str(trained_dir), out=str(out),
                                   val_fraction=0.1, progress=False))
    return out


def _trainer(shards, out, **kw):
    from lmforge.train.trainer import TrainConfig, Trainer

    return Trainer(TrainConfig(**{**dict(data=str(shards), out=str(out), model="tiny-llama", max_length=16,
                                         batch_size=2, max_steps=3, warmup_steps=1, eval_every=0, eval_batches=1,
                                         progress=False), **kw}))


def test_trainer_records_finished_stopped_and_failed(shards, tmp_path):
    _trainer(shards, tmp_path / "done").fit()
    done = read_status(tmp_path / "done")
    assert done["state"] == "finished" and done["step"] == 3 and done["pid"] == os.getpid()
    assert done["ended"] >= done["started"]
    assert (done["max_steps"], done["best_metric"], done["higher_is_better"]) == (3, "val_loss", False)

    _trainer(shards, tmp_path / "part").fit(until_step=2)  # what a Ctrl-C or a time budget leaves: resumable
    part = read_status(tmp_path / "part")
    assert part["state"] == "stopped" and part["step"] == 2
    _trainer(shards, tmp_path / "part", resume=True).fit()
    assert read_status(tmp_path / "part")["state"] == "finished"

    broken = _trainer(shards, tmp_path / "broken")

    def fail():
        raise RuntimeError("CUDA out of memory (simulated)")

    broken.train_step = fail
    with pytest.raises(RuntimeError):
        broken.fit()
    failed = read_status(tmp_path / "broken")
    assert failed["state"] == "failed" and "out of memory" in failed["reason"]


def test_a_killed_process_reads_as_failed(tmp_path):
    code = ("import sys, time; from lmforge.run_status import mark_running; mark_running(sys.argv[1]); "
            "print('up', flush=True); time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "up"
    running = read_status(tmp_path)
    assert running["state"] == "running" and running["pid"] == child.pid and pid_alive(child.pid)
    child.send_signal(signal.SIGKILL)
    child.wait()
    gone = read_status(tmp_path)
    assert gone["state"] == "failed" and "without recording an end" in gone["reason"]
    assert json.loads((tmp_path / "status.json").read_text())["state"] == "running"  # the reader's view only


def test_status_file_round_trip(tmp_path):
    assert read_status(tmp_path) is None
    mark_running(tmp_path, step=5)
    mark_ended(tmp_path, "stopped", step=7, reason="SIGINT")
    status = read_status(tmp_path)
    assert (status["state"], status["step"], status["reason"]) == ("stopped", 7, "SIGINT")
    with pytest.raises(ValueError):
        mark_ended(tmp_path, "running")
    assert not pid_alive(0) and not pid_alive(-1)
