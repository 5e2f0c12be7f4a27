"""The training loop: loss goes down, resume == uninterrupted, accumulation == large batch, schedules."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers

from lmforge.model import Transformer, preset
from lmforge.tokenizer.shards import TokenizeConfig, tokenize_corpus
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


def _steps(out):
    with open(out / "metrics.jsonl") as f:
        return [r["step"] for r in map(json.loads, f) if "loss" in r]


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
        assert (hf(ids).logits - ours.logits(ours(ids))).abs().max() < 1e-4
    assert (tmp_path / "last" / "tokenizer.json").exists() and (tmp_path / "best" / "config.json").exists()
    # the export names the tokenizer's end of text, so transformers' generate stops there
    eos = json.loads((shards / "manifest.json").read_text())["eos_id"]
    assert hf.config.eos_token_id == eos and hf.generation_config.eos_token_id == eos
    assert eos == hf.config.vocab_size - 3  # <|endoftext|>, the first of lmforge's three special tokens


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


def test_custom_objective_and_nan_stop(shards, tmp_path):
    from lmforge.train.objectives import CausalLM

    calls = []

    class Broken(CausalLM):
        def loss(self, forward, batch):
            calls.append(batch["input_ids"].shape)
            loss, count = super().loss(forward, batch)
            return loss * float("nan"), count

    with pytest.raises(TrainingStopped, match="loss is nan at step 0"):
        Trainer(_cfg(shards, tmp_path), objective=Broken()).fit()
    assert (8, 32) in calls  # training micro-batches (evaluation reads 4 windows at a time)


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
    a, b = load_hf_model(tmp_path / "a" / "last" / "ema"), load_hf_model(tmp_path / "b" / "last" / "ema")
    with torch.no_grad():
        assert torch.allclose(a.logits(a(ids)), b.logits(b(ids)), atol=1e-6)


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


def test_pretraining_losses_equal_a_plain_reference_loop(shards, tmp_path):
    """The Trainer on the quickstart's recipe against a loop written out by hand (nanoGPT style): the same init,
    batches, AdamW groups, warmup + cosine, clipping and accumulation give the same losses."""
    from lmforge.config import load_config
    from lmforge.model import Transformer, preset
    from lmforge.train import BatchLoader, SlidingWindowDataset, TokenStream

    cfg = load_config(TrainConfig, "recipe:pretrain-tiny-cpu", {
        "data": str(shards), "out": str(tmp_path), "max_steps": 6, "warmup_steps": 2, "micro_batch_size": 8,
        "eval_every": 0, "progress": False, "seed": 5})
    ours = _losses_of(Trainer(cfg))
    torch.manual_seed(cfg.seed)
    vocab = json.loads((shards / "manifest.json").read_text())["vocab_size"]
    model = Transformer(preset("tiny-llama", vocab_size=vocab, max_seq_len=128, **cfg.model_overrides))
    loader = BatchLoader(SlidingWindowDataset(TokenStream.open(shards, "train"), cfg.max_length), 8, seed=cfg.seed)
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": matrices, "weight_decay": 0.1}, {"params": vectors, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.95))
    reference = []
    for step in range(6):
        lr = cfg.lr * (step + 1) / 2 if step < 2 else \
            0.1 * cfg.lr + 0.5 * 0.9 * cfg.lr * (1 + math.cos(math.pi * (step - 2) / 4))
        for g in opt.param_groups:
            g["lr"] = lr
        total = 0.0
        for _ in range(2):
            x, y = loader.next_batch()
            loss = torch.nn.functional.cross_entropy(model.logits(model(x)).reshape(-1, vocab), y.reshape(-1))
            (loss / 2).backward()
            total += loss.item() / 2
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        reference.append(total)
    assert ours == pytest.approx(reference, rel=1e-5)


def _losses_of(trainer):
    trainer.fit()
    return _losses(trainer.out)


class _DictBatches:
    """Dict batches with a label mask: each example's loss covers only its second half."""

    def __init__(self, shards, batch_size, length=24, seed=0):
        from lmforge.train import TokenStream

        self.stream, self.batch_size, self.length = TokenStream.open(shards, "train"), batch_size, length
        self.g, self.i = torch.Generator().manual_seed(seed), 0

    def next_batch(self):
        rows, labels = [], []
        for _ in range(self.batch_size):
            w = torch.from_numpy(self.stream.slice(self.i * 97 % 10_000, self.length + 1).astype("int64"))
            self.i += 1
            cut = 4 + self.i % 13  # a different number of target tokens in every example
            y = w[1:].clone()
            y[:cut] = -100
            rows.append(w[:-1])
            labels.append(y)
        return {"input_ids": torch.stack(rows), "labels": torch.stack(labels)}

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, state):
        self.i = state["i"]


def test_dict_batches_accumulate_by_target_tokens(shards, tmp_path):
    """Micro-batches with different numbers of target tokens: accumulation gives the gradient of the whole batch
    (token-weighted), not the mean of the micro-batches' means."""
    from lmforge.model import Transformer, preset

    def trainer(micro, out):
        torch.manual_seed(0)
        model = Transformer(preset("tiny-llama", vocab_size=3000))
        cfg = _cfg(shards, out, batch_size=8, micro_batch_size=micro, max_steps=1)
        return Trainer(cfg, model=model, train_data=_DictBatches(shards, micro))

    whole, parts = trainer(8, tmp_path / "a"), trainer(2, tmp_path / "b")
    assert parts.accum == 4
    assert whole.accumulate_gradients() == pytest.approx(parts.accumulate_gradients(), rel=1e-5)
    for p, q in zip(whole.model.parameters(), parts.model.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-7)
    # the same loss by hand: one cross entropy over every target token of the 8 examples
    batch = _DictBatches(shards, 8).next_batch()
    torch.manual_seed(0)
    model = Transformer(preset("tiny-llama", vocab_size=3000))
    with torch.no_grad():
        want = torch.nn.functional.cross_entropy(model.logits(model(batch["input_ids"])).reshape(-1, 3000),
                                                 batch["labels"].reshape(-1), ignore_index=-100)
    assert trainer(4, tmp_path / "c").accumulate_gradients() == pytest.approx(want.item(), rel=1e-5)


def test_frozen_parameters_stay_out_of_the_optimizer_and_the_average(shards, tmp_path):
    from lmforge.model import Transformer, preset

    torch.manual_seed(0)
    model = Transformer(preset("tiny-llama", vocab_size=3000))
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith("layers.1.")
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    t = Trainer(_cfg(shards, tmp_path, ema_decay=0.9, max_steps=3, eval_every=0), model=model)
    n_trainable = sum(1 for p in model.parameters() if p.requires_grad)
    assert sum(len(g["params"]) for g in t.optimizer.param_groups) == n_trainable == len(t.ema)
    assert all(n.startswith("layers.1.") for n in t.ema_names)
    t.fit()
    params = dict(t.model.named_parameters())
    assert all(torch.equal(params[n], w) for n, w in frozen.items())
    assert not torch.equal(params["layers.1.mlp.down_proj.weight"], torch.zeros(1))


def test_a_run_directory_holds_one_run(shards, tmp_path):
    from lmforge.train.trainer import RunDirectoryError

    out = tmp_path / "run"
    Trainer(_cfg(shards, out, max_steps=4, eval_every=2)).fit(until_step=2)
    config_yaml = (out / "config.yaml").read_text()
    with pytest.raises(RunDirectoryError, match="already holds a training run.*--resume.*--overwrite"):
        Trainer(_cfg(shards, out, max_steps=4)).fit()
    with pytest.raises(RunDirectoryError, match="batch_size: 8 in the checkpoint, 16 now"):
        Trainer(_cfg(shards, out, max_steps=4, batch_size=16, resume=True)).fit()
    with pytest.raises(RunDirectoryError, match="model_overrides"):
        Trainer(_cfg(shards, out, max_steps=4, resume=True, model_overrides={"n_layers": 3})).fit()
    with pytest.raises(RunDirectoryError, match="no checkpoint to continue from"):
        Trainer(_cfg(shards, tmp_path / "empty", resume=True)).fit()
    # a crash after step 3 (its metrics line written, its checkpoint not): the resumed run repeats no step
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "loss": 9.9}) + "\n" + '{"step": 4, "lo')
    Trainer(_cfg(shards, out, max_steps=4, eval_every=2, resume=True)).fit()
    assert _steps(out) == [1, 2, 3, 4] and 9.9 not in _losses(out)
    assert (out / "config.yaml").read_text() == config_yaml  # resuming keeps the run's own config
    # --overwrite starts over: the old metrics and checkpoints go
    Trainer(_cfg(shards, out, max_steps=2, eval_every=0, overwrite=True)).fit()
    assert _steps(out) == [1, 2]
    assert json.loads((out / "best" / "trainer_state.json").read_text())["step"] == 2


def test_ctrl_c_saves_a_resumable_checkpoint(shards, tmp_path):
    import os
    import signal

    from lmforge.train.objectives import CausalLM

    class InterruptAtStep3(CausalLM):
        calls = 0

        def loss(self, forward, batch):
            InterruptAtStep3.calls += torch.is_grad_enabled()  # training steps, not evaluation
            if InterruptAtStep3.calls == 3 and torch.is_grad_enabled():
                os.kill(os.getpid(), signal.SIGINT)  # arrives in the middle of a step, as a real Ctrl-C does
            return super().loss(forward, batch)

    summary = Trainer(_cfg(shards, tmp_path / "cut", max_steps=6, eval_every=0), objective=InterruptAtStep3()).fit()
    assert summary["interrupted"] == "SIGINT" and summary["stopped_at"] == 3
    assert json.loads((tmp_path / "cut" / "latest.json").read_text()) == {"checkpoint": "last", "step": 3}
    Trainer(_cfg(shards, tmp_path / "cut", max_steps=6, eval_every=0, resume=True)).fit()
    Trainer(_cfg(shards, tmp_path / "straight", max_steps=6, eval_every=0)).fit()
    assert _losses(tmp_path / "cut") == _losses(tmp_path / "straight")


def test_a_crash_inside_the_checkpoint_swap_loses_nothing(shards, tmp_path):
    from lmforge.train.checkpoint import resolve_checkpoint

    out = tmp_path / "run"
    Trainer(_cfg(shards, out, max_steps=2, eval_every=0)).fit()
    # the moment between the swap's two renames: the previous checkpoint is under .last.old, last/ is gone
    (out / "last").rename(out / ".last.old")
    assert resolve_checkpoint(out) == out / "last" and (out / "last" / "model.safetensors").exists()
    assert not (out / ".last.old").exists()
    Trainer(_cfg(shards, out, max_steps=3, eval_every=0, resume=True)).fit()
    assert json.loads((out / "latest.json").read_text())["step"] == 3


def test_an_hf_model_directory_takes_only_overrides_its_weights_allow(shards, tmp_path):
    from lmforge.config import ConfigError

    Trainer(_cfg(shards, tmp_path / "base", max_steps=1, eval_every=0)).fit()
    base = str(tmp_path / "base" / "last")
    with pytest.raises(ConfigError, match="n_layers cannot change"):
        Trainer(_cfg(shards, tmp_path / "ft", model=base, model_overrides={"n_layers": 3}))
    t = Trainer(_cfg(shards, tmp_path / "ft", model=base, model_overrides={"rope_theta": 5e5}, max_steps=1))
    assert t.model.cfg.rope_theta == 5e5 and t.tokenizer_dir == tmp_path / "base" / "last"


def test_training_flops_count_what_trains():
    """Full training: 6N + attention over the matrices. LoRA: the frozen base's weight gradients are not computed, so 4
    FLOPs per frozen weight and 6 per adapter weight (hand count); QLoRA's NF4 base counts like the float one."""
    from lmforge.peft import lora
    from lmforge.peft.nf4 import quantize_model
    from lmforge.train.trainer import training_flops_per_token

    torch.manual_seed(0)
    model = Transformer(preset("tiny-llama"))
    cfg = model.cfg
    attention = 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * 64
    # the block matrices and the (tied) head; norms are not matmuls
    matmuls = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and n != "embed.weight") \
        + cfg.vocab_size * cfg.d_model
    assert model.lm_head is None and training_flops_per_token(model, 64) == 6 * matmuls + attention
    norms = sum(p.numel() for p in model.parameters() if p.dim() == 1)
    assert cfg.flops_per_token(64) == 6 * (matmuls + norms) + attention
    for p in model.parameters():
        p.requires_grad_(False)
    lora.apply_lora(model, lora.LoraConfig(r=4, targets="all-linear"))
    adapters = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert adapters > 0 and training_flops_per_token(model, 64) == 4 * matmuls + 6 * adapters + attention
    q = Transformer(preset("tiny-llama"))
    quantize_model(q, sorted({s.module for s in lora.adapter_sites(q.cfg)}))
    lora.apply_lora(q, lora.LoraConfig(r=4, targets="all-linear"))
    for n, p in q.named_parameters():
        p.requires_grad_("lora_" in n)
    assert training_flops_per_token(q, 64) == 4 * matmuls + 6 * adapters + attention


def test_mfu_never_reads_above_one_when_the_peak_was_measured_on_a_busy_machine(shards, tmp_path, monkeypatch):
    """The CPU peak is measured once per process; measured while another job held the cores it is too low and MFU
    read 243%. Once a step beats the measured peak, the peak is measured again (and is at least the rate reached)."""
    from lmforge.train import trainer as T

    calls = []

    def peak(device, dtype=torch.float32, n=None, seconds=0.3):
        calls.append(1)
        return 1e3 if len(calls) == 1 else 1e15  # a "busy" first measurement, then a quiet one

    peak.cache_clear = lambda: None
    monkeypatch.setattr(T, "measure_matmul_peak", peak)
    summary = T.Trainer(_cfg(shards, tmp_path / "run", max_steps=3)).fit()
    mfu = [r["mfu"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) if "mfu" in r]
    assert len(calls) == 2 and mfu and max(mfu) <= 1.0
    assert summary["peak_flops"] == 1e15 and "measured again" in summary["peak_source"]
