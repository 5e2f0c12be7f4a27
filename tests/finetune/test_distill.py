"""`lmforge finetune --objective distill`: the objective on lmforge's models equals TRL's generalized_jsd_loss and
the cross entropy on transformers' logits; a run brings the student's KL to the teacher down with the teacher
unchanged; resume equals an uninterrupted run; a tokenizer mismatch is a one-line error."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import transformers

from lmforge.finetune.run import FinetuneConfig, run_finetune
from lmforge.model import load_hf_model
from lmforge.train.distill import Distill

QA = [("北京是哪个国家的首都？", "北京是中国的首都。"), ("What is two plus two?", "Two plus two is four."),
      ("上海在哪里？", "上海在中国东部的长江口。"), ("Name a primary colour.", "Red is a primary colour."),
      ("水的化学式是什么？", "水的化学式是H2O。"), ("What does CPU stand for?", "Central processing unit.")]


@pytest.fixture(scope="module")
def student(trained_dir, tmp_path_factory):
    from tests.models import tiny_llama

    return tiny_llama(tmp_path_factory.mktemp("student"), trained_dir, hidden=32)


@pytest.fixture(scope="module")
def teacher(trained_dir, tmp_path_factory):
    from tests.models import tiny_llama

    return tiny_llama(tmp_path_factory.mktemp("teacher"), trained_dir, hidden=64, tie=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("kd_data") / "qa.jsonl"
    rows = [{"instruction": q, "input": "", "output": a} for q, a in QA * 4]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _cfg(student, teacher, data, out, **kw) -> FinetuneConfig:
    return FinetuneConfig(model=str(student), teacher=str(teacher), objective="distill", data=str(data), out=str(out),
                          max_steps=kw.pop("max_steps", 8), batch_size=4, max_length=64, lr=kw.pop("lr", 5e-3),
                          warmup_steps=2, eval_every=kw.pop("eval_every", 4), progress=False, samples=0, **kw)


@pytest.mark.parametrize("kind,beta", [("forward_kl", 0.5), ("jsd", 0.3), ("reverse_kl", 0.5)])
def test_objective_on_lmforge_models_equals_trl_on_transformers_logits(student, teacher, kind, beta):
    trl = pytest.importorskip("trl.experimental.gkd.gkd_trainer")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 3000, (2, 10), generator=g)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0  # a left-padded row
    labels = torch.randint(0, 3000, (2, 10), generator=g)
    labels[:, :4] = -100  # the prompt
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    T, ratio = 2.0, 0.3
    ours, count = Distill(load_hf_model(teacher), kind, beta, T, ratio).loss(load_hf_model(student).eval(), batch)
    hs = transformers.AutoModelForCausalLM.from_pretrained(student).eval()
    ht = transformers.AutoModelForCausalLM.from_pretrained(teacher).eval()
    with torch.no_grad():
        s, t = hs(ids, attention_mask=mask).logits, ht(ids, attention_mask=mask).logits
    trl_beta = {"forward_kl": 0.0, "reverse_kl": 1.0}.get(kind, beta)
    kd = trl.GKDTrainer.generalized_jsd_loss(s, t, labels=labels, beta=trl_beta, temperature=T) * T**2
    ce = F.cross_entropy(s[labels != -100], labels[labels != -100])
    assert count == int((labels != -100).sum())
    assert abs(ours.item() - ((1 - ratio) * ce + ratio * kd).item()) <= 1e-5


def test_distill_run_brings_the_kl_down_and_keeps_the_teacher(student, teacher, data, tmp_path):
    before = {k: v.clone() for k, v in load_hf_model(teacher).state_dict().items()}
    summary = run_finetune(_cfg(student, teacher, data, tmp_path / "run", method="full", kd_ratio=1.0, max_steps=12,
                                eval_every=12, lr=3e-3))
    assert summary["final"]["val_kd"] < 0.7 * summary["initial"]["val_kd"]
    after = load_hf_model(teacher).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"val_kd", "val_ce", "val_loss"} <= set(records[0])


def test_lora_student_and_a_bf16_teacher(student, teacher, data, tmp_path):
    summary = run_finetune(_cfg(student, teacher, data, tmp_path / "run", kd_loss="jsd", kd_beta=0.5,
                                teacher_dtype="bfloat16", kd_temperature=2.0, max_steps=6, eval_every=6, lr=1e-2))
    assert summary["final"]["val_loss"] < summary["initial"]["val_loss"]
    assert (tmp_path / "run" / "best" / "adapter_config.json").exists()


def test_resume_equals_an_uninterrupted_run(student, teacher, data, tmp_path):
    import lmforge.train.trainer as T

    straight = tmp_path / "straight"
    run_finetune(_cfg(student, teacher, data, straight, method="full"))
    split = tmp_path / "split"
    cfg = _cfg(student, teacher, data, split, method="full", save_every=4)
    original = T.Trainer.fit
    T.Trainer.fit = lambda self, until_step=None, time_budget_s=None: original(self, until_step=4)
    try:
        run_finetune(cfg)
    finally:
        T.Trainer.fit = original
    assert json.loads((split / "latest.json").read_text())["step"] == 4
    cfg.resume = True
    run_finetune(cfg)
    from safetensors.torch import load_file

    a = load_file(str(straight / "last" / "model.safetensors"))
    b = load_file(str(split / "last" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    cfg.kd_temperature = 3.0  # another loss is another trajectory: refused
    from lmforge.train.config import RunDirectoryError

    with pytest.raises(RunDirectoryError, match="kd_temperature"):
        run_finetune(cfg)


def test_a_teacher_with_another_tokenizer_is_a_one_line_error(student, data, real_tokenizers, tmp_path, capsys):
    from lmforge.cli import main

    code = main(["finetune", "--objective", "distill", "--model", str(student), "--teacher",
                 str(real_tokenizers["qwen2.5-instruct"]), "--data", str(data), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "151,665 tokens" in err and "3,000 tokens" in err and str(student) in err
    assert main(["finetune", "--objective", "distill", "--model", str(student), "--data", str(data), "--out",
                 str(tmp_path / "run")]) == 2
    assert "--teacher" in capsys.readouterr().err


@pytest.mark.slow
def test_an_int8_teacher_gives_the_float_teachers_targets_within_rounding(student, teacher, data, tmp_path):
    """--teacher-dtype int8 (lmforge's weight-only int8, a quarter of float32's memory): the initial held-out KL is
    the float teacher's up to int8 rounding, and the student learns from it."""
    from lmforge.finetune.distill.teacher import frozen_teacher

    ids = torch.randint(5, 500, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exact, rounded = frozen_teacher(teacher), frozen_teacher(teacher, "int8")
        p, q = exact.logits(exact(ids)).log_softmax(-1), rounded.logits(rounded(ids)).log_softmax(-1)
    kl = (p.exp() * (p - q)).sum(-1).mean().item()
    assert 0 < kl < 1e-3  # int8 weights change the teacher a little, not its distribution
    runs = {dtype: run_finetune(_cfg(student, teacher, data, tmp_path / dtype, method="full", kd_ratio=1.0,
                                     teacher_dtype=dtype, max_steps=6, eval_every=6, lr=3e-3))
            for dtype in ("float32", "int8")}
    assert runs["int8"]["initial"]["val_kd"] == pytest.approx(runs["float32"]["initial"]["val_kd"], rel=0.02)
    assert runs["int8"]["final"]["val_kd"] < runs["int8"]["initial"]["val_kd"]
