"""`lmforge finetune` on the new families with their real chat templates: Qwen3's thinking switch
(`--chat-template-kwargs '{enable_thinking: false}'`), Gemma 3's system turn folded into the first user turn, a
Qwen3-MoE run that takes the checkpoint's load-balancing weight and logs its routing, and DPO on Qwen3. Tiny random
models from transformers' config classes (tests/model/test_families.py) over real tokenizers; the ids and masks
are checked against transformers' `apply_chat_template` and hand-worked trained text."""

from __future__ import annotations

import json

import pytest
import transformers

from lmforge.chat.masks import IGNORE, encode_example
from lmforge.chat.render import TemplateError, render_chat
from lmforge.finetune.conversations import Conversation
from lmforge.finetune.run import FinetuneConfig, run_finetune
from lmforge.model import load_hf_model
from lmforge.tokenizer import load_tokenizer
from tests import corpora
from tests.model.test_families import _hf_model

QA = [("北京是哪个国家的首都？", "北京是中国的首都。"), ("What is two plus two?", "Two plus two is four."),
      ("上海在哪里？", "上海在中国东部。"), ("Name a primary colour.", "Red is a primary colour.")]
SYSTEM = "You are a terse assistant. 请简短回答。"


def _family_dir(family: str, tokenizer: str, dest, **config):
    d = corpora.real_tokenizer(tokenizer, dest)
    model = _hf_model(family, len(transformers.AutoTokenizer.from_pretrained(d)))
    for k, v in config.items():
        setattr(model.config, k, v)
    model.save_pretrained(d)
    return d


def gemma3_tokenizer(dest):
    """Qwen2.5's real byte-level vocabulary with Gemma's control tokens added (<bos>, <eos>, <pad>,
    <start_of_turn>, <end_of_turn>, as added special tokens) and Gemma 3's real chat template: what Gemma 3's
    template needs from a tokenizer, without Gemma's 4 MB SentencePiece file."""
    d = corpora.real_tokenizer("qwen2.5-instruct", dest)
    gemma = corpora.REAL_TOKENIZERS / "gemma-3-it-template-only"
    tok = transformers.AutoTokenizer.from_pretrained(d)
    tok.add_special_tokens({"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
                            "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    tok.chat_template = json.loads((gemma / "chat_template.json").read_text())["chat_template"]
    tok.save_pretrained(d)
    return d, tok


def _messages(q, a, system=False, **assistant):
    return ([{"role": "system", "content": SYSTEM}] if system else []) + [
        {"role": "user", "content": q}, {"role": "assistant", "content": a, **assistant}]


def _trained_text(tok, enc) -> str:
    """The tokens the loss sees, decoded (labels are next tokens: the trained ids are the labels)."""
    return tok.decode([t for t in enc.labels if t != IGNORE])


def _openai_file(path, system=False):
    rows = [{"messages": _messages(q, a, system)} for q, a in QA * 6]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    return _family_dir("qwen3", "qwen3", tmp_path_factory.mktemp("qwen3"))


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    d, tok = gemma3_tokenizer(tmp_path_factory.mktemp("gemma3"))
    model = _hf_model("gemma3_text", len(tok))
    model.config.eos_token_id = tok.convert_tokens_to_ids("<end_of_turn>")  # as Gemma 3's generation_config
    model.save_pretrained(d)
    return d


def _train_cli(model, data, out, capsys, *extra):
    from lmforge.cli import main

    capsys.readouterr()
    rc = main(["finetune", "--model", str(model), "--data", str(data), "--out", str(out), "--max-steps", "16",
               "--batch-size", "4", "--max-length", "96", "--lr", "1e-2", "--warmup-steps", "2", "--eval-every", "8",
               "--samples", "1", "--sample-tokens", "4", "--no-progress", *extra])
    err = capsys.readouterr().err
    assert rc == 0, err[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final"]["val_loss"] < summary["initial"]["val_loss"]  # it learned
    return summary, err


def test_qwen3_thinking_switch_as_transformers_renders_it(qwen3):
    """enable_thinking false: the generation prompt holds the empty <think> block (transformers' ids), so the reply
    alone is trained; by default the reply's own block is trained; reasoning_content is trained as written;
    reasoning in a reply while thinking is off cannot be split by prefix: a clear error."""
    ours, hf = load_tokenizer(qwen3), transformers.AutoTokenizer.from_pretrained(qwen3)
    template = hf.chat_template
    q, a = QA[0]
    for thinking, want in ((False, f"{a}<|im_end|>"), (True, f"<think>\n\n</think>\n\n{a}<|im_end|>")):
        enc = encode_example(ours, template, Conversation(_messages(q, a)), variables={"enable_thinking": thinking})
        full = hf.apply_chat_template(_messages(q, a), tokenize=True, enable_thinking=thinking)
        full = full["input_ids"] if isinstance(full, dict) or hasattr(full, "keys") else full
        assert enc.input_ids == list(full)[:-1]  # (the last token is only a label)
        assert _trained_text(ours, enc) == want
        prompt = hf.apply_chat_template(_messages(q, a)[:1], tokenize=False, add_generation_prompt=True,
                                        enable_thinking=thinking)
        assert prompt.endswith("<think>\n\n</think>\n\n") != thinking
    enc = encode_example(ours, template, Conversation(_messages(q, a, reasoning_content="首都 → 北京")))
    assert _trained_text(ours, enc) == f"<think>\n首都 → 北京\n</think>\n\n{a}<|im_end|>"
    with pytest.raises(TemplateError, match="enable_thinking is false"):
        encode_example(ours, template, Conversation(_messages(q, a, reasoning_content="x")),
                       variables={"enable_thinking": False})


@pytest.mark.slow
def test_qwen3_finetune_without_thinking_through_the_cli(qwen3, tmp_path, capsys):
    data = _openai_file(tmp_path / "qa.jsonl")
    _, err = _train_cli(qwen3, data, tmp_path / "run", capsys, "--lora-r", "4", "--chat-template-kwargs",
                        "{enable_thinking: false}")
    assert "<|im_start|>assistant\n<think>\n\n</think>\n\n[[" in err  # the empty block is prompt, not trained
    assert json.loads((tmp_path / "run" / "template.json").read_text())["variables"] == {"enable_thinking": False}
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert samples  # replies to prompts rendered with the same switch
    from lmforge.cli import main

    assert main(["finetune", "--model", str(qwen3), "--data", str(data), "--out", str(tmp_path / "r2"),
                 "--chat-template-kwargs", "{enable_thinkng: false}"]) != 0
    assert "chat_template_kwargs: the chat template (the model's chat template) never reads 'enable_thinkng'" \
        in capsys.readouterr().err


def test_gemma3_folds_the_system_turn_into_the_first_user_turn_through_the_cli(gemma3, tmp_path, capsys):
    hf = transformers.AutoTokenizer.from_pretrained(gemma3)
    ours = load_tokenizer(gemma3)
    q, a = QA[1]
    text = render_chat(hf.chat_template, _messages(q, a, system=True), special_tokens_map=ours.special_tokens_map())
    assert text == hf.apply_chat_template(_messages(q, a, system=True), tokenize=False)
    assert text == f"<bos><start_of_turn>user\n{SYSTEM}\n\n{q}<end_of_turn>\n<start_of_turn>model\n{a}<end_of_turn>\n"
    enc = encode_example(ours, hf.chat_template, Conversation(_messages(q, a, system=True)))
    full = hf.apply_chat_template(_messages(q, a, system=True), tokenize=True)
    full = full["input_ids"] if hasattr(full, "keys") else full
    assert enc.input_ids == list(full)[:-1]
    assert _trained_text(ours, enc) == f"{a}<end_of_turn>"  # the newline after the end token is not the reply's
    data = _openai_file(tmp_path / "qa.jsonl", system=True)
    _, err = _train_cli(gemma3, data, tmp_path / "run", capsys, "--lora-r", "4")
    assert "would not stop" not in err  # <end_of_turn> is the model's EOS
    assert f"<start_of_turn>user\n{SYSTEM}\n\n" in err and "<start_of_turn>model\n[[" in err


@pytest.mark.slow
def test_moe_finetune_takes_the_checkpoints_balancing_weight_and_logs_routing(tmp_path):
    """Qwen3-MoE: LoRA on attention and experts learns; the balancing loss weight is the checkpoint's
    router_aux_loss_coef (0.001) unless set; every step logs how evenly tokens were routed."""
    d = _family_dir("qwen3_moe", "qwen3", tmp_path / "moe")
    assert json.loads((d / "config.json").read_text())["router_aux_loss_coef"] == 0.001  # transformers' default
    data = _openai_file(tmp_path / "qa.jsonl")
    cfg = FinetuneConfig(model=str(d), data=str(data), out=str(tmp_path / "run"), max_steps=16, batch_size=4,
                         max_length=64, lr=1e-2, warmup_steps=2, eval_every=8, progress=False, samples=0, lora_r=4)
    summary = run_finetune(cfg)
    assert summary["final"]["val_loss"] < summary["initial"]["val_loss"]
    assert summary["moe_aux_weight"] == 0.001
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if "loss" in s]
    assert len(steps) == 16 and all(s["router_max_load"] >= 1.0 and 0 <= s["router_unused_experts"] < 1
                                    for s in steps)
    adapter = json.loads((tmp_path / "run" / "best" / "adapter_config.json").read_text())
    assert adapter["target_parameters"] == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    import dataclasses

    summary = run_finetune(dataclasses.replace(cfg, out=str(tmp_path / "run2"), max_steps=1, eval_every=0,
                                               moe_aux_weight=0.05))
    assert summary["moe_aux_weight"] == 0.05  # the user's setting wins
    mixtral = _family_dir("mixtral", "qwen2.5-instruct", tmp_path / "mixtral", router_aux_loss_coef=0.02)
    model = load_hf_model(mixtral)
    assert model.cfg.router_aux_coef == 0.02
    from lmforge.model.hf import config_to_hf

    assert config_to_hf(model.cfg)["router_aux_loss_coef"] == 0.02  # a saved fine-tune keeps it


@pytest.mark.slow
def test_dpo_on_qwen3_with_its_template(qwen3, tmp_path):
    rows = [{"prompt": q, "chosen": a, "rejected": "我不知道。"} for q, a in QA] * 4
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    summary = run_finetune(FinetuneConfig(model=str(qwen3), data=str(data), val_data=str(data), out=str(tmp_path / "run"),
                                          objective="dpo", max_steps=12, batch_size=4, lr=1e-2, warmup_steps=2,
                                          eval_every=12, max_length=64, progress=False, samples=0, lora_r=4,
                                          chat_template_kwargs={"enable_thinking": False}))
    first, last = summary["initial"], summary["final"]
    assert last["val_loss"] < first["val_loss"] and last["val_reward_margin"] > first["val_reward_margin"]


@pytest.mark.parametrize("recipe,fixture", [("finetune-qwen3-0.6b-lora-gpu", "qwen3"),
                                            ("finetune-gemma-3-1b-qlora-gpu", "gemma3")])
def test_gpu_recipes_run_their_settings_on_a_tiny_model_of_their_architecture(recipe, fixture, request, tmp_path):
    """The Qwen3 and Gemma 3 GPU recipes' own method, targets, rank, template variables and bf16 autocast, on a tiny
    random model of the recipe's architecture with its real chat template, on CPU."""
    from lmforge.config import load_config

    model = request.getfixturevalue(fixture)
    data = _openai_file(tmp_path / "qa.jsonl", system=fixture == "gemma3")
    cfg = load_config(FinetuneConfig, f"recipe:{recipe}", {
        "model": str(model), "data": str(data), "out": str(tmp_path / "run"), "max_steps": 2, "batch_size": 4,
        "micro_batch_size": 2, "max_length": 64, "eval_every": 0, "samples": 0, "warmup_steps": 1,
        "progress": False})
    assert cfg.precision == "bf16"
    summary = run_finetune(cfg)
    if cfg.method == "qlora":  # the linear layers became NF4 codes (buffers), so fewer parameters remain
        full = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_pretrained(model).parameters())
        assert summary["parameters"]["total"] < full
    adapter = json.loads((tmp_path / "run" / "last" / "adapter_config.json").read_text())
    assert adapter["r"] == cfg.lora_r == 16 and adapter["lora_alpha"] == 32
    # Gemma's GeGLU is gated: gate_proj and up_proj, as in transformers' Gemma3MLP
    assert set(adapter["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                              "down_proj"}
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert len(losses) == 2 and all(0 < x < 20 for x in losses)
