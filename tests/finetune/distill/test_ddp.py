"""`lmforge finetune --objective distill` under torchrun (2 gloo processes, DDP): with a live teacher (each process
loads its own) and with a teacher cache (each process looks up its own rows), the first step's gradients and every
step's loss equal the single-process run on the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.finetune.test_distill import data, student, teacher  # noqa: F401  (the same fixtures)

# the CLI, with every process's gradients of the first optimizer step (after DDP's all-reduce, before clipping)
# written to $GRADS_DIR/rank{RANK}.safetensors
GRADS = """import os, sys
from safetensors.torch import save_file
import lmforge.train.trainer as T
from lmforge.cli import main

step = T.Trainer.optimizer_step

def optimizer_step(self):
    if self.step == 0:
        grads = {n: p.grad.detach().clone() for n, p in T.trainable_parameters(self.model) if p.grad is not None}
        save_file(grads, os.path.join(os.environ["GRADS_DIR"], "rank%s.safetensors" % os.environ.get("RANK", "0")))
    step(self)

T.Trainer.optimizer_step = optimizer_step
sys.exit(main(sys.argv[1:]))
"""


def _losses(out) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.slow
def test_ddp_two_processes_equal_one_with_a_live_teacher_and_a_cache(student, teacher, data, tmp_path):  # noqa: F811
    from safetensors.torch import load_file

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = tmp_path / "grads.py"
    script.write_text(GRADS)
    cache = tmp_path / "cache"
    r = subprocess.run([sys.executable, "-m", "lmforge", "distill", "cache", "--teacher", str(teacher), "--data",
                        str(data), "--max-length", "64", "--top-k", "64", "--kd-temperature", "2", "--out", str(cache),
                        "--no-progress"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    common = ["finetune", "--model", str(student), "--data", str(data), "--objective", "distill", "--method", "full",
              "--max-length", "64", "--batch-size", "4", "--max-steps", "2", "--eval-every", "0", "--samples", "0",
              "--val-fraction", "0", "--kd-loss", "jsd", "--kd-beta", "0.3", "--kd-temperature", "2", "--kd-ratio",
              "0.7", "--warmup-steps", "1", "--lr", "1e-3", "--seed", "3", "--no-progress"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    for teacher_args in (["--teacher", str(teacher)], ["--teacher-cache", str(cache)]):
        name = teacher_args[0].lstrip("-")
        runs = {}
        for world in (1, 2):
            out, grads = tmp_path / f"{name}-{world}", tmp_path / f"{name}-{world}-grads"
            grads.mkdir()
            args = [*common, *teacher_args, "--micro-batch-size", str(2 if world == 1 else 1), "--out", str(out)]
            launch = [sys.executable] if world == 1 else torchrun
            r = subprocess.run([*launch, str(script), *args], env={**env, "GRADS_DIR": str(grads)},
                               capture_output=True, text=True)
            assert r.returncode == 0, r.stderr[-3000:]
            runs[world] = (out, [load_file(str(grads / f"rank{rank}.safetensors")) for rank in range(world)])
        (one, [g1]), (two, g2) = runs[1], runs[2]
        assert _losses(one) == pytest.approx(_losses(two), rel=1e-5) and len(_losses(one)) == 2, name
        assert g1.keys() == g2[0].keys() == g2[1].keys() and len(g1) > 10, name
        for k in g1:  # DDP's averaged gradients: the one process's, on both ranks
            torch.testing.assert_close(g2[0][k], g1[k], atol=1e-6, rtol=1e-4, msg=lambda m, k=k, name=name: f"{name} {k}: {m}")
            torch.testing.assert_close(g2[1][k], g2[0][k], atol=0, rtol=0)
        assert any(g1[k].abs().sum() > 0 for k in g1)
