"""The training loop: loss goes down, resume == uninterrupted, accumulation == large batch, schedules."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers

from lmforge.data.tokenize import TokenizeConfig, tokenize_corpus
from lmforge.train.trainer import TrainConfig, Trainer, TrainingStopped, learning_rate


@pytest.fixture(scope="module")
def shards(trained_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    tokenize_corpus(TokenizeConfig(input=["builtin:python-docs"], tokenizer=str(trained_dir), out=str(out),
                                   val_fraction=0.1, progress=False))
    return out


def _cfg(shards, out, **kw):
    base = dict(data=str(shards), out=str(out), model="tiny-llama", max_length=32, batch_size=8, max_steps=6,
                lr=3e-3, warmup_steps=2, eval_every=3, eval_batches=2, progress=False, seed=1)
    return TrainConfig(**{**base, **kw})


def _losses(out):
    return [r["loss"] for r in map(json.loads, open(out / "metrics.jsonl")) if "loss" in r]


def test_loss_decreases_and_checkpoint_loads_in_transformers(shards, tmp_path):
    summary = Trainer(_cfg(shards, tmp_path, max_steps=40, eval_every=20)).fit()
    assert summary["final"]["val_loss"] < summary["initial"]["val_loss"] - 0.5
    losses = _losses(tmp_path)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "last").eval()
    from lmforge.model import load_hf_model

    ours = load_hf_model(tmp_path / "last")
    ids = torch.randint(0, 100, (1, 20))
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)).abs().max() < 1e-4
    assert (tmp_path / "last" / "tokenizer.json").exists() and (tmp_path / "best" / "config.json").exists()


def test_resume_continues_the_same_trajectory(shards, tmp_path):
    Trainer(_cfg(shards, tmp_path / "straight")).fit()
    Trainer(_cfg(shards, tmp_path / "split")).fit(until_step=3)
    Trainer(_cfg(shards, tmp_path / "split", resume=True)).fit()
    assert _losses(tmp_path / "split") == _losses(tmp_path / "straight")


def test_gradient_accumulation_equals_the_large_batch(shards, tmp_path):
    big = Trainer(_cfg(shards, tmp_path / "a", max_steps=1))
    acc = Trainer(_cfg(shards, tmp_path / "b", max_steps=1, micro_batch_size=2))
    assert acc.accum == 4
    assert big.accumulate_gradients() == pytest.approx(acc.accumulate_gradients(), rel=1e-5)
    for p, q in zip(big.model.parameters(), acc.model.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-7)


def test_schedules_hand_worked():
    cfg = TrainConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=10, max_steps=110)
    assert learning_rate(cfg, 0) == pytest.approx(0.1) and learning_rate(cfg, 9) == pytest.approx(1.0)
    assert learning_rate(cfg, 60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))  # halfway
    assert learning_rate(cfg, 110) == pytest.approx(0.1)
    lin = TrainConfig(lr=1.0, min_lr_ratio=0.0, warmup_steps=0, max_steps=100, schedule="linear")
    assert learning_rate(lin, 25) == pytest.approx(0.75)
    wsd = TrainConfig(lr=1.0, min_lr_ratio=0.0, warmup_steps=0, max_steps=100, schedule="wsd", decay_fraction=0.2)
    assert learning_rate(wsd, 79) == 1.0 and learning_rate(wsd, 90) == pytest.approx(0.5)


def test_weight_decay_on_matrices_only(shards, tmp_path):
    t = Trainer(_cfg(shards, tmp_path))
    decay, no_decay = t.optimizer.param_groups
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) > 0


def test_custom_loss_and_nan_stop(shards, tmp_path):
    calls = []

    def loss_fn(logits, targets, batch):
        calls.append(batch["input_ids"].shape)
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)) * float("nan")

    with pytest.raises(TrainingStopped, match="loss is nan at step 0"):
        Trainer(_cfg(shards, tmp_path), loss_fn=loss_fn).fit()
    assert calls and calls[0] == (8, 32)


def test_bf16_autocast_trains(shards, tmp_path):
    summary = Trainer(_cfg(shards, tmp_path, precision="bf16", max_steps=10, eval_every=10)).fit()
    assert summary["final"]["val_loss"] < summary["initial"]["val_loss"]


def test_ema_hand_worked_and_resumed(shards, tmp_path):
    t = Trainer(_cfg(shards, tmp_path / "ema", ema_decay=0.5, max_steps=4, eval_every=0))
    w0 = [p.detach().clone() for p in t.model.parameters()]
    t.train_step()
    w1 = [p.detach().clone() for p in t.model.parameters()]
    t.train_step()
    w2 = [p.detach().clone() for p in t.model.parameters()]
    for e, a, b, c in zip(t.ema, w0, w1, w2):  # ema = 0.5 * (0.5 * w0 + 0.5 * w1) + 0.5 * w2
        assert torch.allclose(e, 0.25 * a + 0.25 * b + 0.5 * c, atol=1e-6)
    # resume keeps the average, and the ema/ directory is a loadable model
    Trainer(_cfg(shards, tmp_path / "a", ema_decay=0.9, eval_every=0)).fit()
    Trainer(_cfg(shards, tmp_path / "b", ema_decay=0.9, eval_every=0)).fit(until_step=3)
    Trainer(_cfg(shards, tmp_path / "b", ema_decay=0.9, eval_every=0, resume=True)).fit()
    from lmforge.model import load_hf_model

    ids = torch.randint(0, 100, (1, 12))
    with torch.no_grad():
        assert torch.allclose(load_hf_model(tmp_path / "a" / "last" / "ema")(ids),
                              load_hf_model(tmp_path / "b" / "last" / "ema")(ids), atol=1e-6)


def test_tensorboard_logs_scalars(shards, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    Trainer(_cfg(shards, tmp_path, max_steps=3, eval_every=3, tensorboard=True)).fit()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"loss", "lr", "val_ppl", "mfu"} <= set(tags)
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3]
    assert events.Scalars("loss")[0].value == pytest.approx(_losses(tmp_path)[0], rel=1e-5)


def test_fp16_with_gradient_scaler_trains(shards, tmp_path):
    # fp16 matmuls are slow on CPU (no native kernels): a short run with small batches
    t = Trainer(_cfg(shards, tmp_path, precision="fp16", max_steps=4, eval_every=4, batch_size=4, max_length=16,
                     eval_batches=1))
    assert t.scaler is not None
    summary = t.fit()
    assert summary["final"]["val_loss"] < summary["initial"]["val_loss"]
