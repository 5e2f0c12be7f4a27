"""DDP: two CPU processes (gloo) under torchrun give the losses of one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lmforge.data.tokenize import TokenizeConfig, tokenize_corpus


def _losses(out):
    with open(out / "metrics.jsonl") as f:
        return [r["loss"] for r in map(json.loads, f) if "loss" in r]


@pytest.mark.slow
def test_ddp_two_processes_equal_one(trained_dir, tmp_path):
    tokenize_corpus(TokenizeConfig(input=["builtin:python-docs"], tokenizer=str(trained_dir), out=str(tmp_path / "tok"),
                                   val_fraction=0.1, progress=False))
    common = ["pretrain", "--data", str(tmp_path / "tok"), "--model", "tiny-llama", "--max-length", "32",
              "--batch-size", "8", "--max-steps", "4", "--eval-every", "0", "--eval-batches", "2", "--no-progress",
              "--seed", "3", "--warmup-steps", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # one process: micro-batches of 4, accumulated twice
    subprocess.run([sys.executable, "-m", "lmforge", *common, "--micro-batch-size", "4", "--out", str(tmp_path / "one")],
                   check=True, env=env, capture_output=True)
    # two processes: micro-batches of 2 each = the same 4 examples per micro-step, accumulated twice
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "lmforge", *common, "--micro-batch-size", "2", "--out", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(one) == len(two) == 4
    assert one == pytest.approx(two, rel=1e-4)
    assert (tmp_path / "two" / "last" / "model.safetensors").exists()
