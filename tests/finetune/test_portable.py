"""`lmforge finetune` and evaluation's scoring on the portable path (model/portable.py): a tiny random Granite
(outside lmforge's native families) with the real Qwen2.5 tokenizer and chat template. Full and LoRA runs learn;
the LoRA run's adapter loads in peft on the transformers model with lmforge's logits, the full run's model in
transformers; multiple-choice and perplexity scores equal transformers' log-probabilities; the options that need
lmforge's own decoder are refused in one line (tests/serve/test_portable.py: the server)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers

from lmforge.model import load_hf_model
from lmforge.peft import load_adapter
from lmforge.tokenizer import load_tokenizer
from tests.finetune.test_families import _openai_file, _train_cli
from tests.model.test_portable import PORTABLE, TEXTS, model_dir

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def granite(tmp_path_factory):
    return model_dir(tmp_path_factory.mktemp("granite"), *PORTABLE["granite"][:2], **PORTABLE["granite"][2])


def _final(out):
    """The run's last checkpoint: a model or adapter directory."""
    return out / "last"


def test_lora_finetune_through_the_cli_gives_an_adapter_peft_loads(granite, tmp_path, capsys):
    data = _openai_file(tmp_path / "qa.jsonl")
    _, err = _train_cli(granite, data, tmp_path / "lora", capsys, "--method", "lora", "--lora-r", "4")
    assert "portable path (transformers' GraniteForCausalLM)" in err
    adapter = _final(tmp_path / "lora")
    assert (adapter / "adapter_config.json").exists()
    assert json.loads((adapter / "config.json").read_text())["architectures"] == ["GraniteForCausalLM"]
    ids = torch.tensor([load_tokenizer(granite).encode(TEXTS[1])])
    ours = load_adapter(load_hf_model(granite), adapter).eval()
    theirs = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(granite),
                                            adapter).eval()
    with torch.no_grad():
        assert (ours.logits(ours(ids)) - theirs(ids).logits).abs().max() <= 1e-5


@pytest.mark.slow
def test_a_portable_mixture_of_experts_finetunes_with_its_balancing_loss(tmp_path, capsys):
    """A tiny GraniteMoe (experts outside lmforge's native families) through `lmforge finetune --method lora`: the
    balancing weight is the checkpoint's router_aux_loss_coef, routing is logged every step, it learns."""
    d = model_dir(tmp_path / "moe", "GraniteMoeConfig", "GraniteMoeForCausalLM", num_local_experts=4,
                  num_experts_per_tok=2, router_aux_loss_coef=0.02)
    summary, err = _train_cli(d, _openai_file(tmp_path / "qa.jsonl"), tmp_path / "out", capsys,
                              "--method", "lora", "--lora-r", "4")
    assert "portable path (transformers' GraniteMoeForCausalLM)" in err
    assert summary["moe_aux_weight"] == 0.02
    steps = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    loads = [r["router_max_load"] for r in steps if "router_max_load" in r]
    assert loads and all(1.0 <= x <= 4.0 for x in loads)


@pytest.mark.slow
def test_full_finetune_through_the_cli_saves_a_transformers_directory(granite, tmp_path, capsys):
    data = _openai_file(tmp_path / "qa.jsonl")
    _train_cli(granite, data, tmp_path / "full", capsys, "--method", "full", "--lr", "1e-3")
    final = _final(tmp_path / "full")
    ids = torch.tensor([load_tokenizer(granite).encode(TEXTS[1])])
    trained = transformers.AutoModelForCausalLM.from_pretrained(final).eval()
    ours = load_hf_model(final)
    with torch.no_grad():
        assert (ours.logits(ours(ids)) - trained(ids).logits).abs().max() <= 1e-5
        base = transformers.AutoModelForCausalLM.from_pretrained(granite).eval()
        assert (trained(ids).logits - base(ids).logits).abs().max() > 1e-3  # every weight trained


def test_methods_that_write_into_lmforges_own_decoder_are_refused(granite, tmp_path, capsys):
    from lmforge.cli import main

    data = _openai_file(tmp_path / "qa.jsonl")
    assert main(["finetune", "--model", str(granite), "--data", str(data), "--out", str(tmp_path / "p"),
                 "--method", "prefix", "--no-progress"]) == 2
    assert "method prefix: not on the portable path (GraniteForCausalLM runs transformers' modules)" in \
        capsys.readouterr().err


def _logprobs(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)


def test_multiple_choice_and_perplexity_equal_transformers(granite):
    from lmforge.eval.scoring import encode_pair, perplexity, score_choices, windows

    hf = transformers.AutoModelForCausalLM.from_pretrained(granite).eval()
    model, tok = load_hf_model(granite), load_tokenizer(granite)
    items = [("Question: Which gas do plants take in?\nAnswer:", [" oxygen", " carbon dioxide"]),
             ("问题：水在多少摄氏度时沸腾？\n答案：", ["50度", "100度", "0度"])]
    for (context, choices), got in zip(items, score_choices(model, tok, items)):
        for choice, s in zip(choices, got):
            ctx, cont = encode_pair(tok, context, choice)
            logp = _logprobs(hf, ctx + cont)[len(ctx) - 1:-1]
            assert s.logprob == pytest.approx(float(logp.gather(1, torch.tensor(cont)[:, None]).sum()), abs=1e-4)
            assert s.greedy == bool((logp.argmax(-1) == torch.tensor(cont)).all())
    texts = [" ".join(TEXTS) * 2]
    window, stride = 32, 12
    prefix = transformers.AutoTokenizer.from_pretrained(granite).eos_token_id
    nll, count = 0.0, 0
    for text in texts:
        ids = [prefix] + tok.encode(text)
        for start, end, first in windows(len(ids), window, stride):
            lp = _logprobs(hf, ids[start:end])[:-1].gather(1, torch.tensor(ids[start + 1:end])[:, None])[:, 0]
            nll -= float(lp[first - start - 1:].sum())
            count += end - first
    ours = perplexity(model, tok, texts, window=window, stride=stride)
    assert ours.tokens == count
    assert ours.perplexity == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_inference_options_that_need_lmforges_decoder_are_refused(granite):
    from lmforge.config import ConfigError
    from lmforge.infer.load import load_for_inference

    loaded = load_for_inference(granite)  # --pack's default (on for float32 CPU) quietly does not apply
    assert loaded.model.inference_only is None and "portable path (GraniteForCausalLM)" in loaded.description
    for kwargs, flag in ((dict(quantize="int8"), "--quantize"), (dict(pack=True), "--pack"),
                         (dict(compile=True), "--compile")):
        with pytest.raises(ConfigError, match=f"{flag}: not on the portable path"):
            load_for_inference(granite, **kwargs)
    from lmforge.export.gguf import ExportError, export_gguf

    with pytest.raises(ExportError, match="model_type 'granite' runs on lmforge's portable path, which does not "
                                          "export GGUF"):
        export_gguf(granite, granite / "m.gguf")
