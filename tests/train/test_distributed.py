"""DDP and FSDP: two CPU processes (gloo) under torchrun give the losses of one process with the same global batch;
checkpoints (gathered or sharded) resume at another world size on the same trajectory."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lmforge.tokenizer.shards import TokenizeConfig, tokenize_corpus


def _losses(out):
    with open(out / "metrics.jsonl") as f:
        return [r["loss"] for r in map(json.loads, f) if "loss" in r]


def _setup(trained_dir, tmp_path):
    """Token shards of the built-in corpus, and the pretrain arguments both runs share."""
    tokenize_corpus(TokenizeConfig(input=["builtin:python-docs"], tokenizer=str(trained_dir), out=str(tmp_path / "tok"),
                                   val_fraction=0.1, progress=False))
    common = ["pretrain", "--data", str(tmp_path / "tok"), "--model", "tiny-llama", "--max-length", "32",
              "--batch-size", "8", "--max-steps", "4", "--eval-every", "0", "--eval-batches", "2", "--no-progress",
              "--seed", "3", "--warmup-steps", "1"]
    return common, {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_ddp_two_processes_equal_one(trained_dir, tmp_path):
    common, env = _setup(trained_dir, tmp_path)
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


# stop a run part-way (Trainer.fit(until_step=...)) under torchrun, as a pre-empted job would
_PARTIAL_RUN = """
import json, sys
import torch.distributed as dist
from lmforge.config import from_dict
from lmforge.train.trainer import TrainConfig, Trainer
Trainer(from_dict(TrainConfig, json.loads(sys.argv[1]), "test")).fit(until_step=int(sys.argv[2]))
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_fsdp_sharded_checkpoint_resumes_at_another_world_size(trained_dir, tmp_path):
    common, env = _setup(trained_dir, tmp_path)
    common = [a if a != "4" else "6" for a in common]  # 6 steps
    subprocess.run([sys.executable, "-m", "lmforge", *common, "--micro-batch-size", "4", "--out", str(tmp_path / "one")],
                   check=True, env=env, capture_output=True)
    script = tmp_path / "partial.py"
    script.write_text(_PARTIAL_RUN)
    cfg = {"data": str(tmp_path / "tok"), "model": "tiny-llama", "max_length": 32, "batch_size": 8, "max_steps": 6,
           "eval_every": 0, "eval_batches": 2, "progress": False, "seed": 3, "warmup_steps": 1, "micro_batch_size": 2,
           "distributed": "fsdp", "out": str(tmp_path / "fsdp")}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script), json.dumps(cfg), "3"], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    last = tmp_path / "fsdp" / "last"
    # every process wrote its own shard; nothing was gathered to write them
    assert sorted(p.name for p in (last / "shards").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    one = _losses(tmp_path / "one")
    assert _losses(tmp_path / "fsdp") == pytest.approx(one[:3], rel=1e-4)
    # the end of the run wrote HF weights; a stopped run gets them from `lmforge export-checkpoint`
    from lmforge.model import CheckpointError, load_hf_model

    (last / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="export-checkpoint"):
        load_hf_model(last)
    subprocess.run([sys.executable, "-m", "lmforge", "export-checkpoint", str(last)], check=True, env=env,
                   capture_output=True)
    import torch
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(last).eval()
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        ours = load_hf_model(last)
        assert torch.allclose(hf(ids).logits, ours.logits(ours(ids)), atol=1e-4)
    # one process resumes the two processes' shards and continues the uninterrupted trajectory
    subprocess.run([sys.executable, "-m", "lmforge", *common, "--micro-batch-size", "4", "--resume",
                    "--out", str(tmp_path / "fsdp")], check=True, env=env, capture_output=True)
    assert _losses(tmp_path / "fsdp") == pytest.approx(one, rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("checkpoint_format", ["sharded", "full"])
def test_fsdp_keeps_the_same_weight_average_as_one_process(trained_dir, tmp_path, checkpoint_format):
    from safetensors.torch import load_file

    common, env = _setup(trained_dir, tmp_path)
    common += ["--ema-decay", "0.5", "--checkpoint-format", checkpoint_format]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "lmforge"]
    subprocess.run([sys.executable, "-m", "lmforge", *common, "--micro-batch-size", "4", "--out", str(tmp_path / "one")],
                   check=True, env=env, capture_output=True)
    run = subprocess.run([*torchrun, *common, "--micro-batch-size", "2", "--distributed", "fsdp",
                          "--out", str(tmp_path / "fsdp")], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "fsdp" / "last" / "shards").is_dir() == (checkpoint_format == "sharded")
    one = load_file(str(tmp_path / "one" / "last" / "ema" / "model.safetensors"))
    two = load_file(str(tmp_path / "fsdp" / "last" / "ema" / "model.safetensors"))
    live = load_file(str(tmp_path / "one" / "last" / "model.safetensors"))
    live_fsdp = load_file(str(tmp_path / "fsdp" / "last" / "model.safetensors"))
    assert one.keys() == two.keys()
    for k in one:  # as close as the live weights of the two runs are (float reduction order differs)
        assert (one[k] - two[k]).abs().max() <= 2 * (live[k] - live_fsdp[k]).abs().max() + 1e-6, k
    assert any((live[k] - one[k]).abs().max() > 1e-4 for k in one)  # the average is not the live weights
    # resume the FSDP run under FSDP: every rank takes its shard of the saved average
    more = [a if a != "4" else "6" for a in common]
    run = subprocess.run([*torchrun, *more, "--micro-batch-size", "2", "--distributed", "fsdp", "--resume",
                          "--out", str(tmp_path / "fsdp")], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert len(_losses(tmp_path / "fsdp")) == 6
