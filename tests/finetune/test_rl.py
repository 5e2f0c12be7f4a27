"""RL from rewards end to end (finetune/rl.py, finetune/rollout.py): prompts from the formats finetune reads with
their records, the reference with LoRA adapters off equals the base model, and `lmforge finetune --objective grpo`
on a tiny model raises a format reward."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmforge.finetune.rollout import adapters_disabled, load_prompts

QUESTIONS = ["北京是哪个国家的首都？", "What is two plus two?", "上海在哪里？", "Name a primary colour.",
             "水的化学式是什么？", "What does CPU stand for?", "一年有几个月？", "Which planet is largest?"]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_prompts_from_every_format_keep_their_records(tmp_path):
    gsm8k = _jsonl(tmp_path / "gsm8k.jsonl", [{"question": "Natalia sold 48 clips ... altogether?",
                                              "answer": "48+24=72\n#### 72"}])
    p = load_prompts(str(gsm8k))[0]
    assert p.messages == [{"role": "user", "content": "Natalia sold 48 clips ... altogether?"}]
    assert p.record["answer"].endswith("#### 72") and p.where.endswith("gsm8k.jsonl:1")
    trl = _jsonl(tmp_path / "trl.jsonl", [{"prompt": "写一首诗", "tests": "assert True"},
                                          {"prompt": [{"role": "system", "content": "简短"},
                                                      {"role": "user", "content": "你好"}]}])
    a, b = load_prompts(str(trl))
    assert a.messages == [{"role": "user", "content": "写一首诗"}] and a.record["tests"] == "assert True"
    assert [m["role"] for m in b.messages] == ["system", "user"]
    sharegpt = _jsonl(tmp_path / "s.jsonl", [{"conversations": [{"from": "human", "value": "hi"},
                                                                {"from": "gpt", "value": "hello"},
                                                                {"from": "human", "value": "再见"},
                                                                {"from": "gpt", "value": "bye"}]}])
    (c,) = load_prompts(str(sharegpt))
    assert [m["content"] for m in c.messages] == ["hi", "hello", "再见"]  # the last reply is what RL samples
    alpaca = _jsonl(tmp_path / "a.jsonl", [{"instruction": "翻译", "input": "cat", "output": "猫", "level": 2}])
    (d,) = load_prompts(str(alpaca))
    assert d.messages == [{"role": "user", "content": "翻译\ncat"}] and d.record["level"] == 2


GSM8K = Path(__file__).resolve().parents[1] / "fixtures" / "gsm8k"  # openai/grade-school-math, as it ships


def test_gsm8k_files_as_they_ship_feed_rl_and_eval():
    """train.jsonl gives RL one prompt per record with its answer, and each reference solution (its calculator
    annotations removed, as the GSM8K README says) earns the math reward; eval's gsm8k task reads test.jsonl, and its
    targets are the numbers GSM8K's own dataset.py extracts (after "#### ", commas removed)."""
    import re

    from lmforge.eval.tasks import load_task
    from lmforge.finetune.rewards import parse_rewards, score

    lines = (GSM8K / "train.jsonl").read_text(encoding="utf-8").splitlines()
    prompts = load_prompts(str(GSM8K / "train.jsonl"))
    assert len(prompts) == len(lines) == 55
    assert prompts[0].messages == [{"role": "user", "content": json.loads(lines[0])["question"]}]
    solutions = [re.sub(r"<<.*?>>", "", p.record["answer"]) for p in prompts]
    rewards = score(parse_rewards(["math"]), [p.messages[-1]["content"] for p in prompts], solutions,
                    [p.record for p in prompts], [p.where for p in prompts])
    assert [r[0] for r in rewards] == [1.0] * 55
    wrong = score(parse_rewards(["math"]), ["q"], ["#### 73"], [prompts[0].record], ["x"])  # Natalia's is 72
    assert wrong == [[0.0]]
    task = load_task("gsm8k", GSM8K / "test.jsonl")
    test_lines = (GSM8K / "test.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(task.docs) == len(test_lines) == 58
    official = [re.search(r"#### (\-?[0-9\.\,]+)", json.loads(line)["answer"]).group(1).strip().replace(",", "")
                for line in test_lines]
    assert official[:3] == ["18", "3", "70000"]
    assert [d["answer"].split("#### ")[-1] for d in task.docs] == official


@pytest.fixture(scope="module")
def base_model(trained_dir, tmp_path_factory):
    from tests.models import tiny_llama

    return tiny_llama(tmp_path_factory.mktemp("rl_base"), trained_dir)


def test_reference_with_adapters_off_is_the_base_model(base_model):
    from lmforge.model import load_hf_model
    from lmforge.peft.lora import LoraConfig, apply_lora

    ids = torch.randint(5, 500, (2, 9), generator=torch.Generator().manual_seed(0))
    base = load_hf_model(base_model).eval()
    with torch.no_grad():
        expected = base.logits(base(ids))
    model = load_hf_model(base_model).eval()
    apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0, targets="all-linear"))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # trained adapters: the adapted model differs from the base
            torch.nn.init.normal_(p, std=0.5)
    with torch.no_grad():
        adapted = model.logits(model(ids))
        with adapters_disabled(model):
            off = model.logits(model(ids))
        again = model.logits(model(ids))
    assert not torch.allclose(adapted, expected, atol=1e-3)
    torch.testing.assert_close(off, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again, adapted)  # the adapters are back after the block


def test_qlora_policy_reference_is_the_nf4_base_and_a_kl_run_trains(base_model, tmp_path):
    """RL with --method qlora: the reference (adapters off) is the NF4 base the adapters sit on, and a GRPO run with
    a KL to it trains and saves a PEFT adapter."""
    from lmforge.cli import main
    from lmforge.model import load_hf_model
    from lmforge.peft.lora import LoraConfig, apply_lora, linear_modules
    from lmforge.peft.nf4 import quantize_model

    ids = torch.randint(5, 500, (2, 9), generator=torch.Generator().manual_seed(0))
    model = load_hf_model(base_model).eval()
    quantize_model(model, linear_modules(model.cfg, model))
    with torch.no_grad():
        nf4_base = model.logits(model(ids))
        float_base = (lambda m: m.logits(m(ids)))(load_hf_model(base_model).eval())
    apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0, targets="all-linear"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    with torch.no_grad(), adapters_disabled(model):
        off = model.logits(model(ids))
    assert not torch.allclose(nf4_base, float_base, atol=1e-4)  # NF4 rounding shows in the logits
    torch.testing.assert_close(off, nf4_base, atol=1e-5, rtol=1e-5)
    data = _jsonl(tmp_path / "prompts.jsonl", [{"prompt": q} for q in QUESTIONS])
    out = tmp_path / "run"
    assert main(["finetune", "--model", str(base_model), "--data", str(data), "--out", str(out), "--objective", "grpo",
                 "--reward", "format:^[a-z]", "--template", "chatml", "--method", "qlora", "--lr", "1e-2",
                 "--num-generations", "4", "--batch-size", "8", "--max-completion-tokens", "3", "--max-steps", "2",
                 "--beta", "0.04", "--max-length", "64", "--no-progress", "--sample-every", "0"]) == 0
    rows = _reward_rows(out)
    assert len(rows) == 2 and all(r["kl"] >= 0 and r["loss"] == r["loss"] for r in rows)
    assert rows[0]["kl"] == 0.0  # the first step's policy is the reference (LoRA's B starts at zero)
    config = json.loads((out / "last" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and (out / "last" / "adapter_model.safetensors").exists()


def _reward_rows(out):
    return [r for r in (json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines())
            if r.get("reward") is not None]


@pytest.mark.slow
def test_cli_grpo_raises_a_format_reward(base_model, tmp_path):
    from lmforge.cli import main

    data = _jsonl(tmp_path / "prompts.jsonl", [{"prompt": q} for q in QUESTIONS])
    out = tmp_path / "run"
    # the reward: the completion starts with a letter a-z; a random tiny model does so for a minority of samples
    rc = main(["finetune", "--model", str(base_model), "--data", str(data), "--out", str(out), "--objective", "grpo",
               "--reward", "format:^[a-z]", "--template", "chatml", "--method", "full", "--lr", "2e-2",
               "--num-generations", "8", "--batch-size", "32", "--max-completion-tokens", "3", "--max-steps", "16",
               "--warmup-steps", "0", "--max-length", "64", "--no-progress", "--sample-every", "10",
               "--epsilon-high", "0.28"])
    assert rc == 0
    rows = _reward_rows(out)
    assert len(rows) == 16
    # measured: about 0.15 over the first three steps, 1.0 over the last three
    first, last = sum(r["reward"] for r in rows[:3]) / 3, sum(r["reward"] for r in rows[-3:]) / 3
    assert first < 0.4 and last > first + 0.4, (first, last)
    keys = {"reward", "reward_std", "reward/format:^[a-z]", "zero_std_groups", "completion_len", "completion_len_max",
            "truncated", "sample_tokens_per_s", "train_tokens_per_s", "clip_fraction", "entropy"}
    assert keys <= set(rows[0]), keys - set(rows[0])
    samples = [json.loads(line) for line in (out / "completions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert {s["rollout"] for s in samples} == {0, 10} and all("format:^[a-z]" in s["rewards"] for s in samples)
    assert (out / "last" / "config.json").exists() and (out / "loss.png").exists()


def test_rollouts_batches(base_model, tmp_path, monkeypatch):
    """One rollout: G completions per prompt from the engine (the same ids as generate_ids with each row's seed, on
    the packed copy the rollout samples from),
    rewards -> advantages as train/rl.py's group_advantages, old log-probabilities equal the model's at sampling
    time, truncated completions masked, the micro-batches served num_iterations times."""
    from dataclasses import replace

    from lmforge.chat.templates import BUILTIN_TEMPLATES
    from lmforge.finetune import rollout
    from lmforge.finetune.rewards import parse_rewards
    from lmforge.finetune.rollout import Prompt, Rollouts, sampling_copy
    from lmforge.infer.engine import generate_ids
    from lmforge.infer.sampling import SamplingConfig
    from lmforge.model import load_hf_model
    from lmforge.tokenizer import load_tokenizer
    from lmforge.train.rl import PolicyGradient, group_advantages, token_logps

    monkeypatch.setattr(rollout, "PACKED_SAMPLING_MIN_PARAMS", 0)  # the packed copy, as a large model samples
    tok = load_tokenizer(base_model)
    model = load_hf_model(base_model).eval()
    stops = list(range(0, tok.vocab_size, 3))  # a third of the vocabulary stops: some completions end, some are cut
    prompts = [Prompt([{"role": "user", "content": q}], {"q": q}, f"p:{i}") for i, q in enumerate(QUESTIONS[:2])]
    for p in prompts:
        p.ids = tok.encode(p.messages[0]["content"])
    sampling = SamplingConfig(max_new_tokens=4, temperature=1.0, stop_token_ids=stops)
    rewards = parse_rewards(["format:[a-z]"])
    roll = Rollouts(model, tok, BUILTIN_TEMPLATES["chatml"], prompts, rewards, PolicyGradient("grpo"), sampling,
                    batch_size=8, micro=4, group_size=4, num_iterations=2, mask_truncated=True, pad_id=0,
                    stop_ids=stops, seed=3)
    batches = [roll.next_batch() for _ in range(4)]
    assert batches[2] is batches[0] and batches[3] is batches[1] and not roll.buffer  # 2 micro-batches, twice
    order = roll.order[:2]
    seeds = [(3 * 1_000_003 + i) % 2**63 for i in range(8)]
    expected = generate_ids(sampling_copy(model), [prompts[order[k]].ids for k in range(2) for _ in range(4)],
                            [replace(sampling, seed=s) for s in seeds])
    rows = [(b, r) for b in batches[:2] for r in range(4)]
    texts, cuts = [], []
    for i, ((b, r), completion) in enumerate(zip(rows, expected)):
        n = int(b["attention_mask"][r].sum())
        assert b["input_ids"][r, :n].tolist() == prompts[order[i // 4]].ids + completion
        cut = completion[-1] not in stops
        trained = (b["labels"][r] != -100).sum().item()
        assert trained == (0 if cut else len(completion))  # --mask-truncated: a cut completion trains nothing
        texts.append(tok.decode(completion if cut else completion[:-1]))
        cuts.append((len(completion), cut))
    scores = torch.tensor([1.0 if any("a" <= ch <= "z" for ch in t) else 0.0 for t in texts])
    advantages, _ = group_advantages(scores, 4, "group")
    torch.testing.assert_close(torch.cat([batches[0]["advantages"], batches[1]["advantages"]]), advantages)
    with torch.no_grad():
        for b in batches[:2]:
            logps, _, _ = token_logps(model, b)
            torch.testing.assert_close(b["old_logps"], logps)
    assert 0 < sum(t[1] for t in cuts) < 8, cuts  # both kinds
    m = roll.step_metrics({"step_s": 1.0})
    assert m["reward"] == pytest.approx(scores.mean().item(), abs=1e-4) and m["completion_len_max"] <= 4


def test_rollouts_sample_through_a_packed_copy_with_the_training_models_logits(base_model, monkeypatch):
    """On a CPU in float32 a rollout samples from a copy with the adapter merged and the weights packed for lmforge's
    kernels: its logits are the training model's (a trained LoRA adapter included), and the training model is left
    as it was. A model the kernels do not take (bfloat16 here), or one too small to gain, samples itself."""
    from lmforge.finetune import rollout
    from lmforge.finetune.rollout import sampling_copy
    from lmforge.model import load_hf_model
    from lmforge.model.packed import PackedLinear
    from lmforge.peft import apply_adapter
    from lmforge.peft.lora import Lora, LoraConfig

    small = load_hf_model(base_model)
    assert sum(p.numel() for p in small.parameters()) < rollout.PACKED_SAMPLING_MIN_PARAMS
    assert sampling_copy(small) is small
    monkeypatch.setattr(rollout, "PACKED_SAMPLING_MIN_PARAMS", 0)  # the tiny model stands in for a large one
    for adapted in (False, True):
        model = load_hf_model(base_model).eval()
        ids = torch.arange(3, 40, 3)[None] % model.cfg.vocab_size
        if adapted:
            apply_adapter(model, Lora(LoraConfig(r=4, dropout=0.0)))
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "lora_B" in name:
                        p.normal_(0, 0.05)  # as after training (B starts at zero)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        twin = sampling_copy(model)
        assert twin is not model and any(isinstance(m, PackedLinear) for m in twin.modules())
        with torch.no_grad():
            torch.testing.assert_close(twin(ids), model(ids), atol=1e-4, rtol=1e-4)
        after = model.state_dict()
        assert before.keys() == after.keys() and all(torch.equal(v, after[k]) for k, v in before.items())
    half = load_hf_model(base_model).to(torch.bfloat16)
    assert sampling_copy(half) is half
    # a rollout's cache keeps the frozen tied head packed (LoRA never changes it) until the table changes or trains
    model, cache = load_hf_model(base_model).eval(), {}
    apply_adapter(model, Lora(LoraConfig(r=4, dropout=0.0)))
    first, again = sampling_copy(model, cache), sampling_copy(model, cache)
    assert again.lm_head is first.lm_head and len(cache) == 1
    with torch.no_grad():
        model.embed.weight.mul_(1.5)  # an in-place write: the cached head is stale
        changed = sampling_copy(model, cache)
        assert changed.lm_head is not first.lm_head
        torch.testing.assert_close(changed(ids), model(ids), atol=1e-4, rtol=1e-4)
    model.embed.weight.requires_grad_(True)  # a trained table is never cached
    trained_cache = {}
    sampling_copy(model, trained_cache)
    assert not trained_cache


QA = [("北京是哪个国家的首都？", "北京是中国的首都。", "我不知道。"),
      ("What is two plus two?", "Two plus two is four.", "I don't know."),
      ("上海在哪里？", "上海在中国东部的长江口。", "我不知道。"),
      ("Name a primary colour.", "Red is a primary colour.", "I don't know."),
      ("水的化学式是什么？", "水的化学式是H2O。", "我不知道。"),
      ("What does CPU stand for?", "Central processing unit.", "I don't know."),
      ("一年有几个月？", "一年有十二个月。", "我不知道。"),
      ("Which planet is largest?", "Jupiter is the largest planet.", "I don't know.")]


@pytest.mark.slow
def test_reward_model_trains_saves_for_transformers_and_scores_completions(base_model, tmp_path):
    import transformers

    from lmforge.cli import main
    from lmforge.finetune.rewards import parse_reward
    from lmforge.model.heads import load_classifier
    from lmforge.tokenizer import load_tokenizer

    data = _jsonl(tmp_path / "pairs.jsonl", [{"prompt": q, "chosen": a, "rejected": b} for q, a, b in QA * 2])
    out = tmp_path / "rm"
    rc = main(["finetune", "--model", str(base_model), "--data", str(data), "--out", str(out), "--objective", "reward",
               "--method", "full", "--template", "chatml", "--lr", "3e-3", "--batch-size", "8", "--max-steps", "12",
               "--warmup-steps", "0", "--val-fraction", "0.25", "--eval-every", "6", "--no-progress",
               "--best-metric", "val_reward_accuracy"])
    assert rc == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "val_reward_accuracy" in r]
    assert evals[-1]["val_reward_accuracy"] == 1.0 and evals[-1]["val_loss"] < evals[0]["val_loss"]
    # transformers loads the checkpoint as LlamaForSequenceClassification with one label and the same scores
    ckpt = out / "last"
    config = json.loads((ckpt / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(ckpt).eval()
    assert hf.config.num_labels == 1
    ours = load_classifier(ckpt)
    tok = load_tokenizer(ckpt)
    for text in ("北京是中国的首都。", "I don't know."):
        ids = torch.tensor([tok.encode(text)])
        with torch.no_grad():
            torch.testing.assert_close(ours(ids), hf(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    # --reward model:DIR scores the good replies above "I don't know" on the training prompts
    reward = parse_reward(f"model:{ckpt}")
    wins = [reward.fn(q, a, {}) > reward.fn(q, b, {}) for q, a, b in QA]
    assert sum(wins) >= 7, wins


def test_rollouts_reference_is_the_base_and_rloo_pays_the_kl_in_its_reward(base_model):
    from lmforge.chat.templates import BUILTIN_TEMPLATES
    from lmforge.finetune.rewards import parse_rewards
    from lmforge.finetune.rollout import Prompt, Rollouts
    from lmforge.infer.sampling import SamplingConfig
    from lmforge.model import load_hf_model
    from lmforge.peft.lora import LoraConfig, apply_lora
    from lmforge.tokenizer import load_tokenizer
    from lmforge.train.rl import PolicyGradient, rloo_advantages, token_logps

    tok = load_tokenizer(base_model)
    base = load_hf_model(base_model).eval()
    model = load_hf_model(base_model).eval()
    apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0, targets="all-linear"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.3)
    prompts = [Prompt([{"role": "user", "content": q}], {}, f"p:{i}", ids=tok.encode(q))
               for i, q in enumerate(QUESTIONS[:2])]
    sampling = SamplingConfig(max_new_tokens=3, temperature=1.0)
    for loss_type in ("grpo", "rloo"):
        roll = Rollouts(model, tok, BUILTIN_TEMPLATES["chatml"], prompts, parse_rewards(["length:1-3"]),
                        PolicyGradient(loss_type, beta=0.1), sampling, batch_size=4, micro=4, group_size=2, beta=0.1,
                        seed=1)
        batch = roll.next_batch()
        with torch.no_grad():
            ref, rows, _ = token_logps(base, batch)
            pol, _, _ = token_logps(model, batch)
        if loss_type == "grpo":  # the reference log-probabilities are the base model's: adapters off
            torch.testing.assert_close(batch["ref_logps"], ref, atol=1e-5, rtol=1e-5)
            assert not torch.allclose(pol, ref, atol=1e-3)
        else:  # RLOO: reward - beta x sum(log pi_old - log ref) per completion, then leave-one-out
            assert "ref_logps" not in batch
            # no stop ids: every completion is cut at 3 tokens, and its text is all of them
            reward = parse_rewards(["length:1-3"])[0].fn
            rewards = torch.tensor([reward("", tok.decode(batch["labels"][r][batch["labels"][r] != -100].tolist()), {})
                                    for r in range(4)])
            kl = torch.zeros(4).index_add(0, rows, pol - ref)
            torch.testing.assert_close(batch["advantages"], rloo_advantages(rewards - 0.1 * kl, 2), atol=1e-5,
                                       rtol=1e-5)


@pytest.mark.slow
def test_rl_resume_equals_an_uninterrupted_run(base_model, tmp_path):
    from safetensors.torch import load_file

    from lmforge.cli import main

    data = _jsonl(tmp_path / "prompts.jsonl", [{"prompt": q} for q in QUESTIONS])
    common = ["finetune", "--model", str(base_model), "--data", str(data), "--objective", "dapo", "--reward",
              "format:^[a-z]", "--template", "chatml", "--method", "lora", "--lr", "1e-2", "--num-generations", "4",
              "--batch-size", "8", "--max-completion-tokens", "3", "--warmup-steps", "0", "--min-lr-ratio", "1.0",
              "--max-length", "64", "--no-progress", "--sample-every", "0"]
    assert main([*common, "--out", str(tmp_path / "a"), "--max-steps", "4"]) == 0
    assert main([*common, "--out", str(tmp_path / "b"), "--max-steps", "2"]) == 0
    assert main([*common, "--out", str(tmp_path / "b"), "--max-steps", "4", "--resume"]) == 0
    a, b = ([json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in "ab")
    assert [r["reward"] for r in a] == [r["reward"] for r in b] and [r["loss"] for r in a] == [r["loss"] for r in b]
    wa, wb = (load_file(tmp_path / d / "last" / "adapter_model.safetensors") for d in "ab")
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name])


@pytest.mark.slow
def test_rl_under_torchrun_equals_one_process(base_model, tmp_path):
    """GRPO with LoRA under torchrun (2 gloo processes, DDP): each samples half of every step's prompts (whole
    groups), the advantages and logged figures are the whole batch's, and the run equals one process on the same
    prompts: the losses and rewards of every step, and the adapter after them (so each step's gradient)."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    data = _jsonl(tmp_path / "prompts.jsonl", [{"prompt": q} for q in QUESTIONS])
    common = ["finetune", "--model", str(base_model), "--data", str(data), "--objective", "grpo", "--reward",
              "format:^[a-z]", "--template", "chatml", "--method", "lora", "--lr", "1e-2", "--num-generations", "2",
              "--batch-size", "8", "--max-completion-tokens", "3", "--warmup-steps", "0", "--min-lr-ratio", "1.0",
              "--max-length", "64", "--no-progress", "--sample-every", "1", "--max-steps", "2",
              "--scale-rewards", "batch"]  # a batch-wide std: the advantages need every process's rewards
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "lmforge", *common, "--micro-batch-size", "2", "--out",
                          str(tmp_path / "one")], env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "lmforge", *common, "--micro-batch-size", "2", "--out", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = ([json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
            for d in ("one", "two"))
    assert len(a) == len(b) == 2
    for ra, rb in zip(a, b):
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-6)
        for key in ("reward", "reward_std", "zero_std_groups", "completion_len", "truncated"):
            assert ra[key] == rb[key], key
        assert ra["entropy"] == pytest.approx(rb["entropy"], abs=1e-4)
        assert ra["clip_fraction"] == pytest.approx(rb["clip_fraction"])
    assert any(r["reward_std"] > 0 for r in a)  # the steps had something to learn from: the gradients are not zero
    wa, wb = (load_file(tmp_path / d / "last" / "adapter_model.safetensors") for d in ("one", "two"))
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=1e-6, rtol=1e-5)
    # rank 0 alone writes the samples: the first prompt of each step's, as one process does
    samples = [(tmp_path / d / "completions.jsonl").read_text(encoding="utf-8") for d in ("one", "two")]
    assert samples[0] == samples[1]
    uneven = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "lmforge", *[a if a != "8" else "6" for a in common], "--out",
                             str(tmp_path / "three")], env=env, capture_output=True, text=True)
    assert uneven.returncode != 0 and "do not split evenly over 2 processes" in uneven.stderr


def test_prompts_must_fit_the_models_own_context(trained_dir, tmp_path, capsys):
    """--max-length above a small model's context: the context is the limit, and the error says so."""
    from lmforge.cli import main
    from tests.models import tiny_llama

    small = tiny_llama(tmp_path / "small", trained_dir, max_positions=32)
    data = _jsonl(tmp_path / "prompts.jsonl", [{"prompt": q} for q in QUESTIONS])
    rc = main(["finetune", "--model", str(small), "--data", str(data), "--out", str(tmp_path / "run"), "--objective",
               "grpo", "--reward", "format:^[a-z]", "--template", "chatml", "--max-completion-tokens", "30",
               "--max-length", "512", "--max-steps", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "the model's context of 32 tokens" in err and "Traceback" not in err, err


def test_reward_pairs_carry_a_margin_column_to_the_loss(trained, tmp_path):
    """A `margin` column reaches the Bradley–Terry batch (Llama 2's margin loss: -log σ(r_c - r_r - m)); a pair
    without one among pairs with one, or a margin that is not a number, is an error naming the record."""
    from lmforge.chat.templates import resolve_template
    from lmforge.finetune.conversations import DataFormatError
    from lmforge.finetune.preference import build_pairs, collate_pairs, load_pairs
    from lmforge.train.rl import BradleyTerry

    chatml, _ = resolve_template(trained, "chatml")

    rows = [{"prompt": q, "chosen": a, "rejected": b, "margin": m} for (q, a, b), m in zip(QA, [0.5, 1, 2, 3, 0, 1.5, 2.5, 4])]
    pairs = load_pairs(str(_jsonl(tmp_path / "m.jsonl", rows)))
    ex = build_pairs(trained, chatml, pairs, 128)
    batch = collate_pairs(ex, [1, 3], 0)
    assert batch["margin"].tolist() == [1.0, 3.0]
    scores = torch.tensor([2.0, 1.0, 0.5, 0.25])  # chosen of both pairs, then rejected
    losses, _, _ = BradleyTerry().terms(lambda ids, attention_mask: scores[:, None], batch)
    want = -torch.nn.functional.logsigmoid(torch.tensor([2.0 - 0.5 - 1.0, 1.0 - 0.25 - 3.0]))
    torch.testing.assert_close(losses, want)
    with pytest.raises(DataFormatError, match=r"bad.jsonl:2: field 'margin' is 'big', not a number"):
        load_pairs(str(_jsonl(tmp_path / "bad.jsonl", [rows[0], {**rows[1], "margin": "big"}])))
    mixed = load_pairs(str(_jsonl(tmp_path / "mixed.jsonl", [rows[0], {k: v for k, v in rows[1].items()
                                                                      if k != "margin"}])))
    with pytest.raises(DataFormatError, match=r"mixed.jsonl:2: no margin"):
        build_pairs(trained, chatml, mixed, 128)
    assert "margin" not in collate_pairs(build_pairs(trained, chatml, load_pairs(str(_jsonl(
        tmp_path / "plain.jsonl", [{k: v for k, v in r.items() if k != "margin"} for r in rows]))), 128), [0], 0)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_lora_reward_model_merges_into_a_classifier_transformers_loads(base_model, tmp_path, method):
    """--objective reward --method lora / qlora: adapters on the backbone (qlora: on its linear layers in NF4), the
    head in full; the checkpoint is the merged *ForSequenceClassification, scored equally by transformers; held-out
    loss falls with margins in the data."""
    import transformers

    from lmforge.cli import main
    from lmforge.model.heads import load_classifier
    from lmforge.tokenizer import load_tokenizer

    data = _jsonl(tmp_path / "pairs.jsonl", [{"prompt": q, "chosen": a, "rejected": b, "margin": 0.5}
                                             for q, a, b in QA * 2])
    out = tmp_path / "rm"
    assert main(["finetune", "--model", str(base_model), "--data", str(data), "--out", str(out), "--objective",
                 "reward", "--method", method, "--lora-r", "8", "--template", "chatml", "--lr", "1e-2",
                 "--batch-size", "8", "--max-steps", "12", "--warmup-steps", "0", "--val-fraction", "0.25",
                 "--eval-every", "6", "--no-progress"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "val_loss" in r]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    ckpt = out / "last"
    assert json.loads((ckpt / "config.json").read_text())["architectures"] == ["LlamaForSequenceClassification"]
    assert not (ckpt / "adapter_config.json").exists()
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(ckpt).eval()
    ours, tok = load_classifier(ckpt), load_tokenizer(ckpt)
    for text in ("北京是中国的首都。", "I don't know."):
        ids = torch.tensor([tok.encode(text)])
        with torch.no_grad():
            torch.testing.assert_close(ours(ids), hf(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    if method == "qlora":  # the merged weight is the NF4-rounded base plus a rank-8 update; the float base is not
        from lmforge.peft.nf4 import NF4Weight

        base = transformers.AutoModelForCausalLM.from_pretrained(base_model)
        name = "model.layers.0.mlp.down_proj.weight"
        before, after = base.state_dict()[name], hf.state_dict()[name]
        rounded = NF4Weight.quantize(before).dequantize()
        assert torch.linalg.matrix_rank(after - rounded, atol=1e-5) <= 8
        assert torch.linalg.matrix_rank(after - before, atol=1e-5) > 8
