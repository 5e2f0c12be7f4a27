"""`lmforge finetune` end to end on a tiny random Llama with a real lmforge tokenizer: the PEFT adapter loads in
peft with lmforge's logits, resume = uninterrupted, packed = unpacked loss, export merge = base + adapter."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

from lmforge.chat.templates import BUILTIN_TEMPLATES
from lmforge.cli import main
from lmforge.data.sources import CorpusError
from lmforge.finetune.conversations import Conversation
from lmforge.finetune.run import FinetuneConfig, run_finetune
from lmforge.finetune.sft import SFTBatches, build_examples, collate_padded
from lmforge.model import load_hf_model
from lmforge.peft import load_adapter
from lmforge.tokenizer import load_tokenizer
from lmforge.train.objectives import CausalLM

peft = pytest.importorskip("peft")

QA = [("北京是哪个国家的首都？", "北京是中国的首都。"), ("What is two plus two?", "Two plus two is four."),
      ("上海在哪里？", "上海在中国东部的长江口。"), ("Name a primary colour.", "Red is a primary colour."),
      ("水的化学式是什么？", "水的化学式是H2O。"), ("What does CPU stand for?", "Central processing unit."),
      ("一年有几个月？", "一年有十二个月。"), ("Which planet is largest?", "Jupiter is the largest planet.")]


@pytest.fixture(scope="module")
def base_model(trained_dir, tmp_path_factory):
    """A tiny random Llama sized to a real lmforge tokenizer (ChatML tokens and template included)."""
    from tests.models import tiny_llama

    return tiny_llama(tmp_path_factory.mktemp("base"), trained_dir, max_positions=512)


@pytest.fixture(scope="module")
def alpaca_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("sft_data")
    path = d / "qa.jsonl"
    rows = [{"instruction": q, "input": "", "output": a} for q, a in QA * 5]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _cfg(base_model, data, out, **kw) -> FinetuneConfig:
    return FinetuneConfig(model=str(base_model), data=str(data), out=str(out), max_steps=kw.pop("max_steps", 12),
                          batch_size=4, max_length=64, lr=kw.pop("lr", 5e-3), warmup_steps=2, eval_every=6,
                          progress=False, samples=2, sample_tokens=8, **kw)


def test_lora_finetune_learns_and_its_adapter_loads_in_peft(base_model, alpaca_file, tmp_path):
    out = tmp_path / "run"
    summary = run_finetune(_cfg(base_model, alpaca_file, out, max_steps=40, lr=1e-2))
    assert summary["final"]["val_loss"] < summary["initial"]["val_loss"] - 0.3  # it learned the answers
    best = out / "best"
    cfg = json.loads((best / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(base_model.resolve())
    template = json.loads((out / "template.json").read_text())
    assert template["template"] == (best / "chat_template.jinja").read_text()  # the checkpoint carries it
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} >= {0, 40} and all("reply" in s for s in samples)
    assert summary["parameters"]["trainable"] < summary["parameters"]["total"] / 10
    # peft on the transformers model gives lmforge's logits
    hf = transformers.AutoModelForCausalLM.from_pretrained(base_model).eval()
    pm = peft.PeftModel.from_pretrained(hf, best).eval()
    ours = load_adapter(load_hf_model(base_model).eval(), best)
    ids = torch.randint(0, hf.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours.logits(ours(ids)) - pm(ids).logits).abs().max() < 1e-4
    # export merge: a full model transformers loads, equal to peft's base + adapter
    r = subprocess.run([sys.executable, "-m", "lmforge", "export", "merge", "--model", str(best), "--out",
                        str(tmp_path / "merged")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert (merged(ids).logits - pm(ids).logits).abs().max() < 1e-4
    gen = json.loads((tmp_path / "merged" / "generation_config.json").read_text())
    tok = load_tokenizer(tmp_path / "merged")
    assert tok.special_tokens["<|im_end|>"] in gen["eos_token_id"]  # the template's end of turn stops generation
    assert (tmp_path / "merged" / "chat_template.jinja").exists()


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit"])
def test_resume_equals_an_uninterrupted_run(base_model, alpaca_file, tmp_path, optimizer):
    if optimizer != "adamw":
        pytest.importorskip("bitsandbytes", reason="bitsandbytes does not import here")
    straight = tmp_path / "straight"
    run_finetune(_cfg(base_model, alpaca_file, straight, max_steps=8, optimizer=optimizer))
    split = tmp_path / "split"
    from lmforge.train.trainer import Trainer  # noqa: F401  (the loop both runs share)

    cfg = _cfg(base_model, alpaca_file, split, max_steps=8, save_every=4, optimizer=optimizer)
    # stop after step 4 as a crash would (the last/ checkpoint of step 4 stays), then resume
    import lmforge.train.trainer as T

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

    a = load_file(str(straight / "last" / "adapter_model.safetensors"))
    b = load_file(str(split / "last" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    steps = [json.loads(line)["step"] for line in (split / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))  # no duplicated steps after the resume


def test_packed_rows_give_each_example_its_unpacked_loss(base_model):
    tok = load_tokenizer(base_model)
    model = load_hf_model(base_model).eval()
    convs = [Conversation([{"role": "user", "content": q}, {"role": "assistant", "content": a}]) for q, a in QA]
    ex = build_examples(tok, BUILTIN_TEMPLATES["chatml"], convs, max_length=128)
    packed = SFTBatches(ex, 2, 128, packing=True, seed=1)
    objective = CausalLM()
    with torch.no_grad():
        for _ in range(2):
            batch = packed.next_batch()
            assert batch["segment_ids"].max() > 1  # several examples share a row
            loss, count = objective.loss(model, batch)
            # the same examples one by one, token-weighted
            total, n = 0.0, 0
            for row in range(batch["input_ids"].shape[0]):
                seg = batch["segment_ids"][row]
                for s in seg.unique().tolist():
                    if s == 0:
                        continue
                    keep = seg == s
                    single = {"input_ids": batch["input_ids"][row][keep][None], "labels": batch["labels"][row][keep][None]}
                    l1, c1 = objective.loss(model, single)
                    total, n = total + l1.item() * c1, n + c1
            assert count == n and abs(loss.item() - total / n) < 1e-5
    # padded batches give the same per-example loss too
    padded = collate_padded(ex, [0, 1, 2], pad_id=0)
    with torch.no_grad():
        loss, count = objective.loss(model, padded)
        singles = [objective.loss(model, collate_padded(ex, [i], 0)) for i in range(3)]
    assert abs(loss.item() - sum(part.item() * c for part, c in singles) / count) < 1e-5


def test_best_fit_decreasing_packs_every_example_once_and_fills_rows():
    """pack(): each example in exactly one row, no row over max_length, as few rows as best-fit decreasing's
    hand-worked answer, and fuller rows than filling in order (next-fit) on long-tailed lengths."""
    from lmforge.finetune.sft import pack

    # hand-worked: 10 tokens a row; sorted 7 6 5 4 3 2 2 1 -> [7 3] [6 4] [5 2 2 1]
    lengths = np.array([2, 7, 4, 1, 6, 3, 5, 2])
    rows = pack(lengths, np.arange(8), 10)
    assert [[int(lengths[i]) for i in r] for r in rows] == [[7, 3], [6, 4], [5, 2, 2, 1]]
    rng = np.random.default_rng(0)
    lengths = np.minimum(rng.lognormal(5.0, 0.7, 2000).astype(int) + 8, 512)  # alpaca-like: median ~160
    order = rng.permutation(len(lengths))
    rows = pack(lengths, order, 512)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert max(lengths[r].sum() for r in rows) <= 512
    assert len(rows) <= np.ceil(lengths.sum() / 512) * 1.02  # within 2% of the bound no packing can beat
    next_fit, used = 1, 0
    for i in order:
        next_fit, used = (next_fit + 1, lengths[i]) if used + lengths[i] > 512 else (next_fit, used + lengths[i])
    assert len(rows) < 0.85 * next_fit
    assert pack(lengths, order, 512) == rows  # deterministic


def test_a_set_with_no_trained_token_fails_before_training(base_model, tmp_path):
    rows = [{"instruction": "很长的问题" * 60, "input": "", "output": "答"}] * 4
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    with pytest.raises(CorpusError, match="none of the 4 examples has a trained token"):
        run_finetune(_cfg(base_model, data, tmp_path / "run", val_fraction=0.0))
    assert not (tmp_path / "run").exists()  # nothing was written


def test_cli_refuses_an_occupied_run_dir_and_unknown_methods(base_model, alpaca_file, tmp_path, capsys):
    args = ["finetune", "--model", str(base_model), "--data", str(alpaca_file), "--max-steps", "2", "--batch-size", "2",
            "--max-length", "64", "--eval-every", "0", "--samples", "0"]
    r = subprocess.run([sys.executable, "-m", "lmforge", *args, "--out", str(tmp_path / "r"), "--method", "freeze",
                        "--train-layers", "1"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "one training example, the trained part in [[ ]]" in r.stderr
    assert r.stderr.count("would not stop") == 1  # ChatML's <|im_end|> is not this model's EOS: said once
    assert (tmp_path / "r" / "best" / "model.safetensors").exists()  # freeze: full HF checkpoints
    # the refusals in this process (each a one-line error and exit status 2, before any work)
    assert main([*args, "--out", str(tmp_path / "r")]) == 2
    assert "already holds a training run" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "q"), "--method", "ia3"]) == 2
    assert "not in this version yet" in capsys.readouterr().err


@pytest.mark.slow
def test_ddp_and_fsdp_two_processes_equal_one(base_model, alpaca_file, tmp_path):
    """LoRA fine-tuning under torchrun (2 gloo processes, DDP and FSDP2) follows the single-process run with the same
    global batch (dropout off: each process draws its own masks), and writes the same PEFT adapter; an FSDP run
    resumes from its gathered adapter checkpoint."""
    import os

    from safetensors.torch import load_file

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["finetune", "--model", str(base_model), "--data", str(alpaca_file), "--max-length", "64", "--batch-size",
              "4", "--max-steps", "4", "--eval-every", "0", "--samples", "0", "--lora-dropout", "0", "--seed", "3",
              "--warmup-steps", "1", "--lr", "5e-3", "--no-progress"]
    one = subprocess.run([sys.executable, "-m", "lmforge", *common, "--micro-batch-size", "2", "--out",
                          str(tmp_path / "one")], env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-3000:]

    def losses(out):
        return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "lmforge"]
    a = load_file(str(tmp_path / "one" / "last" / "adapter_model.safetensors"))
    partial = tmp_path / "partial.py"  # the CLI, stopped after step 2 as a crash would (its checkpoint stays)
    partial.write_text("import sys\nimport lmforge.train.trainer as T\nfrom lmforge.cli import main\n"
                       "fit = T.Trainer.fit\nT.Trainer.fit = lambda self, **kw: fit(self, until_step=2)\n"
                       "sys.exit(main(sys.argv[1:]))\n")
    for distributed in ("ddp", "fsdp"):
        out = tmp_path / distributed
        args = [*common, "--micro-batch-size", "1", "--distributed", distributed, "--out", str(out)]
        if distributed == "fsdp":  # 2 steps, then resumed to 4
            two = subprocess.run([*torchrun[:-2], str(partial), *args, "--save-every", "2"], env=env,
                                 capture_output=True, text=True)
        else:
            two = subprocess.run([*torchrun, *args], env=env, capture_output=True, text=True)
        assert two.returncode == 0, two.stderr[-3000:]
        if distributed == "fsdp":
            assert (out / "last" / "adapter_config.json").exists() and not (out / "last" / "shards").exists()
            two = subprocess.run([*torchrun, *args, "--save-every", "2", "--resume"], env=env, capture_output=True,
                                 text=True)
            assert two.returncode == 0, two.stderr[-3000:]
        assert losses(tmp_path / "one") == pytest.approx(losses(out), rel=1e-4), distributed
        b = load_file(str(out / "last" / "adapter_model.safetensors"))
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a), distributed


def test_bottleneck_adapters_train_and_refuse_to_merge(base_model, alpaca_file, tmp_path):
    """`finetune --method adapter` (tests/peft/test_bottleneck.py checks the adapters themselves)."""
    from lmforge.config import ConfigError
    from lmforge.export.merge import merge_adapter

    summary = run_finetune(_cfg(base_model, alpaca_file, tmp_path / "run", method="adapter", adapter_size=16,
                                max_steps=20, lr=1e-2))
    assert summary["final"]["val_loss"] < summary["initial"]["val_loss"]
    best = tmp_path / "run" / "best"
    assert json.loads((best / "adapter_config.json").read_text())["peft_type"] == "LMFORGE_BOTTLENECK"
    with pytest.raises(ConfigError, match="cannot be merged"):
        merge_adapter(best, tmp_path / "merged")


def test_prompt_and_prefix_tuning_train(base_model, alpaca_file, tmp_path):
    """`finetune --method prompt / prefix` (tests/peft/test_prompt.py checks them against peft)."""
    from lmforge.config import ConfigError

    summary = run_finetune(_cfg(base_model, alpaca_file, tmp_path / "run", method="prompt", num_virtual_tokens=8,
                                max_steps=20, lr=3e-2))
    assert summary["final"]["val_loss"] < summary["initial"]["val_loss"]
    assert json.loads((tmp_path / "run" / "best" / "adapter_config.json").read_text())["peft_type"] == "PROMPT_TUNING"
    assert (tmp_path / "run" / "samples.jsonl").exists()  # held-out answers, generated at each evaluation
    with pytest.raises(ConfigError, match="no-packing"):
        run_finetune(_cfg(base_model, alpaca_file, tmp_path / "run2", method="prompt", packing=True))
    # prefix tuning through the same command: learns, saves peft's PREFIX_TUNING format
    summary = run_finetune(_cfg(base_model, alpaca_file, tmp_path / "run3", method="prefix", num_virtual_tokens=8,
                                max_steps=20, lr=3e-2))
    assert summary["final"]["val_loss"] < summary["initial"]["val_loss"]
    assert json.loads((tmp_path / "run3" / "best" / "adapter_config.json").read_text())["peft_type"] == "PREFIX_TUNING"


def test_gpt2_family_finetune_and_merge_through_the_cli(trained_dir, alpaca_file, tmp_path):
    """GPT-2 (learned positions, fused c_attn stored as Conv1D) with a template that has no control tokens of its
    own (plain: EOS ends a reply): LoRA on c_attn, merged export equal to peft's base + adapter."""
    tok = load_tokenizer(trained_dir)
    d = tmp_path / "gpt2"
    cfg = transformers.GPT2Config(vocab_size=tok.vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                                  eos_token_id=tok.special_tokens["<|endoftext|>"])
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(d)
    for f in trained_dir.iterdir():
        shutil.copy(f, d / f.name)
    r = subprocess.run([sys.executable, "-m", "lmforge", "finetune", "--model", str(d), "--data", str(alpaca_file),
                        "--out", str(tmp_path / "run"), "--template", "plain", "--lora-targets", "c_attn", "--max-steps",
                        "6", "--batch-size", "4", "--max-length", "64", "--eval-every", "3", "--samples", "1",
                        "--sample-tokens", "4", "--lr", "1e-2", "--no-progress"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "would not stop" not in r.stderr  # plain ends a reply with <|endoftext|>, the model's EOS
    best = tmp_path / "run" / "best"
    r = subprocess.run([sys.executable, "-m", "lmforge", "export", "merge", "--model", str(best), "--out",
                        str(tmp_path / "merged")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    hf = transformers.AutoModelForCausalLM.from_pretrained(d).eval()
    pm = peft.PeftModel.from_pretrained(hf, best).eval()
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = torch.randint(0, tok.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (merged(ids).logits - pm(ids).logits).abs().max() < 1e-4


def test_best_checkpoint_by_rouge_of_held_out_replies(base_model, alpaca_file, tmp_path):
    from lmforge.config import ConfigError
    from lmforge.metrics import rouge

    out = tmp_path / "run"
    summary = run_finetune(_cfg(base_model, alpaca_file, out, max_steps=6, best_metric="val_rougeL"))
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evals if "val_loss" in e]
    assert evals and all("val_rougeL" in e and "val_exact_match" in e for e in evals)
    assert summary["best_val_rougeL"] == max(e["val_rougeL"] for e in evals)
    # the logged figure is lmforge.metrics' ROUGE-L of that evaluation's replies
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    last = [s for s in samples if s["step"] == evals[-1]["step"]]
    assert evals[-1]["val_rougeL"] == pytest.approx(rouge([s["reply"].strip() for s in last],
                                                          [s["reference"] for s in last], types=("rougeL",))["rougeL"])
    with pytest.raises(ConfigError, match="best_metric: val_rougeL scores replies"):
        import dataclasses

        run_finetune(dataclasses.replace(_cfg(base_model, alpaca_file, tmp_path / "r2", best_metric="val_rougeL"),
                                         samples=0))


def test_fsdp_refuses_what_it_cannot_checkpoint_before_training(base_model, alpaca_file, tmp_path):
    """FSDP trains full / freeze / LoRA / DoRA; other adapter methods, and sharded checkpoints of a LoRA run (which
    would hold no PEFT adapter), are refused up front."""
    import dataclasses

    from lmforge.config import ConfigError

    cfg = dataclasses.replace(_cfg(base_model, alpaca_file, tmp_path / "r"), distributed="fsdp", method="prefix")
    with pytest.raises(ConfigError, match="fsdp with --method prefix is not supported yet"):
        run_finetune(cfg)
    with pytest.raises(ConfigError, match="sharded checkpoints hold the whole model"):
        run_finetune(dataclasses.replace(cfg, method="lora", checkpoint_format="sharded"))
    assert not (tmp_path / "r").exists()



@pytest.mark.parametrize("recipe", ["finetune-qwen2.5-0.5b-lora-gpu", "finetune-qwen2.5-1.5b-qlora-gpu",
                                    "finetune-llama3.2-1b-lora-gpu"])
def test_gpu_recipes_run_their_settings_on_a_tiny_model_of_their_architecture(recipe, trained_dir, alpaca_file,
                                                                               tmp_path):
    """Each GPU recipe's own method, targets, rank and bf16 autocast, on a tiny random model of the recipe's
    architecture (Qwen2 with q/k/v biases, or Llama) on CPU: what can be checked without a GPU."""
    from lmforge.config import load_config
    from tests.models import tiny_llama

    if "qwen" in recipe:
        from lmforge.tokenizer import load_tokenizer

        tok = load_tokenizer(trained_dir)
        torch.manual_seed(0)
        transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
            vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
            eos_token_id=tok.special_tokens["<|endoftext|>"])).save_pretrained(tmp_path / "model")
        for f in trained_dir.iterdir():
            shutil.copy(f, tmp_path / "model" / f.name)
        model = tmp_path / "model"
    else:
        model = tiny_llama(tmp_path / "model", trained_dir, max_positions=512)
    cfg = load_config(FinetuneConfig, f"recipe:{recipe}", {
        "model": str(model), "data": str(alpaca_file), "out": str(tmp_path / "run"), "max_steps": 2,
        "batch_size": 4, "micro_batch_size": 2, "max_length": 64, "eval_every": 0, "samples": 0,
        "warmup_steps": 1, "progress": False})
    assert cfg.precision == "bf16"
    summary = run_finetune(cfg)
    if cfg.method == "qlora":  # the base weights became NF4 codes (buffers), so fewer parameters remain
        full = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_pretrained(model).parameters())
        assert summary["parameters"]["total"] < full
    adapter = json.loads((tmp_path / "run" / "last" / "adapter_config.json").read_text())
    assert adapter["r"] == cfg.lora_r == 16 and adapter["lora_alpha"] == 32
    assert {"q_proj", "v_proj", "down_proj"} <= set(adapter["target_modules"])
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert len(losses) == 2 and all(0 < x < 20 for x in losses)
