"""On-policy (--kd-lmbda) and sequence-level (--seq-kd) distillation: generated replies are laid out as the SFT
collator lays out the data's, the student's replies are what the engine samples from the student, and a resumed
run generates and trains as the uninterrupted one."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lmforge.chat.templates import resolve_template
from lmforge.distill.on_policy import OnPolicyBatches, collate_replies, prompt_of
from lmforge.finetune import sft
from lmforge.finetune.conversations import load_conversations
from lmforge.finetune.run import run_finetune
from lmforge.model import load_hf_model
from lmforge.tokenizer import load_tokenizer
from tests.finetune.test_distill import _cfg, data, student, teacher  # noqa: F401  (the same fixtures)


def _examples(student, data):  # noqa: F811
    tok = load_tokenizer(student)
    template, _ = resolve_template(tok, "model")
    return tok, sft.build_examples(tok, template, load_conversations(str(data)), "assistant", 64, None)


def test_replies_are_laid_out_as_the_sft_collator_lays_out_the_data(student, data):  # noqa: F811
    _, examples = _examples(student, data)
    members = [0, 3, 5]
    prompts = [prompt_of(examples.input_ids[i], examples.labels[i]) for i in members]
    # the data's own replies (single-turn examples: the trained tokens run to the end)
    replies = [examples.labels[i][examples.labels[i] != -100].tolist() for i in members]
    ours = collate_replies(prompts, replies, pad_id=0)
    want = sft.collate_padded(examples, members, pad_id=0)
    for r in range(len(members)):  # what the loss sees: each trained position, its target and its causal context
        trained = (want["labels"][r] != -100).nonzero()[:, 0]
        end = int(trained[-1]) + 1
        assert torch.equal(ours["labels"][r][:end], want["labels"][r][:end])
        assert (ours["labels"][r][end:] == -100).all()
        assert torch.equal(ours["input_ids"][r][:end], want["input_ids"][r][:end])
        assert ours["attention_mask"][r][:end].all()


def test_student_batches_hold_the_students_samples(student, teacher, data):  # noqa: F811
    tok, examples = _examples(student, data)
    model = load_hf_model(student)
    batches = sft.SFTBatches(examples, 4, 64, packing=False, pad_id=0, seed=0)
    on = OnPolicyBatches(batches, model, load_hf_model(teacher), lmbda=1.0, seq_kd=False, stop_ids=[2999],
                         pad_id=0, seed=0, max_new_tokens=6, temperature=1.0)
    batch = on.next_batch()
    from lmforge.infer.engine import generate_ids
    from lmforge.infer.sampling import SamplingConfig

    for r, i in enumerate(batches.last_members):
        prompt = prompt_of(examples.input_ids[i], examples.labels[i])
        trained = batch["labels"][r][batch["labels"][r] != -100].tolist()
        seed = int(np.random.SeedSequence([0, 0, r]).generate_state(1)[0])
        sample = generate_ids(model.eval(), [prompt], SamplingConfig(max_new_tokens=6, temperature=1.0,
                                                                      stop_token_ids=[2999], seed=seed))[0]
        assert trained == sample and len(sample) <= 6
        assert batch["input_ids"][r][:len(prompt)].tolist() == prompt
    assert on.generated == {"student": 1, "teacher": 0, "data": 0}


def test_on_policy_run_resumes_exactly(student, teacher, data, tmp_path):  # noqa: F811
    import lmforge.train.trainer as T

    kw = dict(method="full", kd_lmbda=0.5, seq_kd=True, kd_max_new_tokens=6, kd_loss="reverse_kl", max_steps=6,
              eval_every=3)
    straight = run_finetune(_cfg(student, teacher, data, tmp_path / "straight", **kw))
    assert straight["final"]["val_kd"] < straight["initial"]["val_kd"]
    cfg = _cfg(student, teacher, data, tmp_path / "split", save_every=3, **kw)
    original = T.Trainer.fit
    T.Trainer.fit = lambda self, until_step=None, time_budget_s=None: original(self, until_step=3)
    try:
        run_finetune(cfg)
    finally:
        T.Trainer.fit = original
    cfg.resume = True
    run_finetune(cfg)
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "straight" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "split" / "last" / "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    state = json.loads((tmp_path / "split" / "last" / "trainer_state.json").read_text())
    assert state["loader"]["on_policy_drawn"] == 6 * 1  # one micro-batch per step


def test_a_cache_cannot_score_generated_replies(student, data, tmp_path):  # noqa: F811
    from lmforge.config import ConfigError

    with pytest.raises(ConfigError, match="--teacher DIR"):
        run_finetune(_cfg(student, "", data, tmp_path / "r", teacher_cache=str(tmp_path), kd_lmbda=0.5))
