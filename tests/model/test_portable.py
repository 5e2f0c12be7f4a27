"""The portable path (model/portable.py): decoders outside lmforge's native families, and native families with a
feature the native decoder does not implement, run by transformers' own modeling code behind lmforge's interface.
Tiny random Granite and StableLM models (two families outside the native list, from their transformers config
classes) over the real Qwen2.5 tokenizer, against transformers itself: float32 logits, greedy tokens through the one
scheduler (left-padded batches, rows admitted and evicted mid-flight), saving, the routing line, the one-line
errors, and a known family (Llama) with an attention bias or a RoPE type lmforge does not implement."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from lmforge.infer import SamplingConfig, generate_ids
from lmforge.infer.scheduler import Scheduler
from lmforge.model import CheckpointError, load_hf_model, save_hf_model
from lmforge.model.portable import PortableModel
from lmforge.tokenizer import load_tokenizer
from tests import corpora
from tests.model.test_families import TEXTS

TOL = 1e-5
# model_type -> (config class, model class, config fields beyond the common tiny shape)
PORTABLE = {
    # Granite's multipliers: the embedding, the residual branches, the attention scale, and logits divided by
    # logits_scaling after the head (what `PortableModel.logits` must keep)
    "granite": ("GraniteConfig", "GraniteForCausalLM",
                dict(embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.3, logits_scaling=4.0)),
    # StableLM: LayerNorm, a quarter of each head rotated, q/k/v biases, per-head LayerNorm on q and k
    "stablelm": ("StableLmConfig", "StableLmForCausalLM",
                 dict(partial_rotary_factor=0.25, use_qkv_bias=True, qk_layernorm=True)),
}
# a native family (Llama) whose config.json says something lmforge's decoder does not implement
UNSUPPORTED = {
    "attention_bias": dict(attention_bias=True),
    "rope_parameters": dict(rope_parameters={"rope_type": "proportional", "rope_theta": 10000.0,
                                             "partial_rotary_factor": 0.5}),
}


# more families, each with what makes it differ, on a 300-token vocabulary (no tokenizer: random ids)
MORE = {
    "falcon": ("FalconConfig", "FalconForCausalLM", dict(new_decoder_architecture=True, num_kv_heads=2)),
    "falcon-alibi": ("FalconConfig", "FalconForCausalLM", dict(alibi=True, multi_query=True)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(rotary_pct=0.5, num_key_value_heads=4)),
    "phi": ("PhiConfig", "PhiForCausalLM", dict(partial_rotary_factor=0.5)),
    "cohere": ("CohereConfig", "CohereForCausalLM", dict(logit_scale=0.5)),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", dict(sliding_window=6)),  # shorter than the prompts
    "bloom": ("BloomConfig", "BloomForCausalLM", dict(n_layer=2, n_head=4)),
    "gpt_bigcode": ("GPTBigCodeConfig", "GPTBigCodeForCausalLM", dict(n_layer=2, n_head=4, n_embd=64,
                                                                      multi_query=True)),
}


def tiny(config_cls: str, model_cls: str, vocab: int, **extra):
    cfg = getattr(transformers, config_cls)(**{
        "vocab_size": vocab, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256, "pad_token_id": None,
        "bos_token_id": None, "eos_token_id": None, **extra})
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(cfg)
    with torch.no_grad():  # random init leaves norms at exactly 0 or 1 and logits near 0: spread every tensor
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def model_dir(dest, config_cls: str, model_cls: str, **extra):
    """A tiny random transformers model saved with the real Qwen2.5 tokenizer."""
    d = corpora.real_tokenizer("qwen2.5-instruct", dest)
    tiny(config_cls, model_cls, len(transformers.AutoTokenizer.from_pretrained(d)), **extra).save_pretrained(d)
    return d


@pytest.fixture(scope="module", params=list(PORTABLE))
def family(request, tmp_path_factory):
    """(model_type, its directory, transformers' model loaded from it, lmforge's)."""
    name = request.param
    config_cls, model_cls, extra = PORTABLE[name]
    d = model_dir(tmp_path_factory.mktemp(name), config_cls, model_cls, **extra)
    return name, d, transformers.AutoModelForCausalLM.from_pretrained(d).eval(), load_hf_model(d)


def _ids(d) -> list[list[int]]:
    tok = load_tokenizer(d)
    return [tok.encode(t) for t in TEXTS]


def test_logits_equal_transformers(family):
    name, d, hf, ours = family
    assert isinstance(ours, PortableModel) and ours.cfg.arch == name
    with torch.no_grad():
        for ids in _ids(d):  # English, Chinese, emoji
            x = torch.tensor([ids])
            assert (ours.logits(ours(x)) - hf(x).logits).abs().max() <= TOL
        # a left-padded batch: each row's real tokens as alone
        a, b = _ids(d)[:2]
        width = max(len(a), len(b))
        x = torch.tensor([[0] * (width - len(r)) + r for r in (a, b)])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in (a, b)])
        got = ours.logits(ours(x, attention_mask=mask))
        for row, r in enumerate((a, b)):
            want = hf(torch.tensor([r])).logits[0]
            assert (got[row, width - len(r):] - want).abs().max() <= TOL


def test_packed_rows_give_each_sequence_its_own_logits(family):
    """segment_ids (finetune --packing): each sequence of a packed row sees only itself, as transformers alone."""
    _, d, hf, ours = family
    a, b, c = (ids[:n] for ids, n in zip(_ids(d), (9, 13, 6)))
    row = torch.tensor([a + b + c])
    segments = torch.tensor([[0] * len(a) + [1] * len(b) + [2] * len(c)])
    with torch.no_grad():
        got = ours.logits(ours(row, segment_ids=segments))[0]
        start = 0
        for seq in (a, b, c):
            want = hf(torch.tensor([seq])).logits[0]
            assert (got[start:start + len(seq)] - want).abs().max() <= TOL
            start += len(seq)


def test_loss_is_transformers_loss(family):
    _, d, hf, ours = family
    x = torch.tensor([_ids(d)[1]])
    with torch.no_grad():
        want = hf(x, labels=x).loss
        got = ours.loss(ours(x)[:, :-1], x[:, 1:])
    assert abs(float(got) - float(want)) <= TOL


def _hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, min_new_tokens=n)
    return out[0, len(prompt):].tolist()


def test_greedy_tokens_equal_transformers_generate(family):
    """A static batch of prompts of different lengths (left padding) through lmforge's scheduler."""
    _, d, hf, ours = family
    prompts = [ids[:n] for ids, n in zip(_ids(d), (20, 7, 12))]
    got = generate_ids(ours, prompts, SamplingConfig(max_new_tokens=16, temperature=0))
    assert got == [_hf_greedy(hf, p, 16) for p in prompts]


def test_rows_admitted_and_evicted_mid_flight(family):
    """Continuous batching on the portable model: two rows, five requests of different budgets, each joining when a
    row frees (shifting the running rows), a group of two completions sharing one prefill, and the prefix cache:
    every request gets transformers' greedy tokens."""
    _, d, hf, ours = family
    ids = _ids(d)
    prompts = [ids[0][:9], ids[1][:14], ids[2][:5], ids[0][:9] + ids[1][:3], ids[1][:20]]
    budgets = [6, 11, 9, 7, 5]
    sched = Scheduler(ours, capacity=2, prefix_cache_tokens=64, min_prefix=4)
    groups = [sched.add(p, SamplingConfig(max_new_tokens=n, temperature=0)) for p, n in zip(prompts, budgets)]
    pair = sched.add(prompts[2], [SamplingConfig(max_new_tokens=4, temperature=0)] * 2)
    sched.run()
    for g, p, n in zip(groups, prompts, budgets):
        assert g.tokens() == _hf_greedy(hf, p, n)
    assert [pair.tokens(0), pair.tokens(1)] == [_hf_greedy(hf, prompts[2], 4)] * 2
    assert sched.stats["prefix_hits"] >= 1


def test_saved_directory_loads_in_transformers(family, tmp_path):
    _, d, hf, ours = family
    save_hf_model(ours, tmp_path / "saved")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    x = torch.tensor([_ids(d)[0]])
    with torch.no_grad():
        assert torch.equal(back(x).logits, hf(x).logits)
    save_hf_model(ours, tmp_path / "bf16", dtype=torch.bfloat16)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    assert ours.embed.weight.dtype == torch.float32  # the model itself is unchanged


def test_the_routing_line_says_portable_path_and_why(family, capsys):
    name, d, _, _ = family
    load_hf_model(d)
    cls = PORTABLE[name][1]
    assert capsys.readouterr().err.strip() == (f"lmforge: portable path (transformers' {cls}): model_type '{name}' is "
                                               "not one of lmforge's native families")
    with pytest.raises(CheckpointError, match=f"model_type '{name}' is not supported"):
        load_hf_model(d, portable=False)  # a caller that needs lmforge's own decoder


@pytest.mark.parametrize("feature", list(UNSUPPORTED))
def test_a_native_family_with_an_unimplemented_feature_takes_the_portable_path(feature, tmp_path, capsys):
    d = model_dir(tmp_path, "LlamaConfig", "LlamaForCausalLM", **UNSUPPORTED[feature])
    hf = transformers.AutoModelForCausalLM.from_pretrained(d).eval()
    capsys.readouterr()
    ours = load_hf_model(d)
    err = capsys.readouterr().err
    assert isinstance(ours, PortableModel)
    assert err.startswith("lmforge: portable path (transformers' LlamaForCausalLM): ") and feature in err
    assert len(err.strip().splitlines()) == 1
    ids = _ids(d)[1]
    with torch.no_grad():
        assert (ours.logits(ours(torch.tensor([ids]))) - hf(torch.tensor([ids])).logits).abs().max() <= TOL
    assert generate_ids(ours, [ids[:10]], SamplingConfig(max_new_tokens=12, temperature=0)) == \
        [_hf_greedy(hf, ids[:10], 12)]
    with pytest.raises(CheckpointError, match=feature):
        load_hf_model(d, portable=False)


def test_a_model_type_transformers_cannot_build_either_is_one_line(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "no_such_decoder", "vocab_size": 10}))
    with pytest.raises(CheckpointError) as e:
        load_hf_model(d)
    message = str(e.value)
    assert "model_type 'no_such_decoder'" in message and "lmforge's native families: gpt2, llama" in message
    assert "\n" not in message
    (d / "config.json").write_text(json.dumps({"model_type": "no_such_decoder", "auto_map": {"AutoConfig": "x.C"}}))
    with pytest.raises(CheckpointError, match="needs the model's own Python code"):
        load_hf_model(d)
    # a tensor the checkpoint lacks: named, never left at transformers' random init
    from safetensors.torch import load_file, save_file

    g = model_dir(tmp_path / "granite", *PORTABLE["granite"][:2])
    tensors = load_file(str(g / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(g / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"lacks tensors .*\['model.layers.1.mlp.up_proj.weight'\]"):
        load_hf_model(g)
    t5 = transformers.T5Config(vocab_size=32, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)
    transformers.T5ForConditionalGeneration(t5).save_pretrained(tmp_path / "t5")
    with pytest.raises(CheckpointError, match="model_type 't5' is an encoder-decoder"):
        load_hf_model(tmp_path / "t5")


@pytest.mark.parametrize("name", list(MORE))
def test_more_families_logits_and_greedy_tokens(name, tmp_path):
    """Falcon (grouped and multi-query attention, ALiBi), GPT-NeoX (fused query_key_value, partial rotary), Phi,
    Cohere (logit_scale), Starcoder2 (a sliding window shorter than the prompts), BLOOM (ALiBi), GPT-BigCode
    (multi-query): logits and greedy tokens of a left-padded batch equal transformers'."""
    config_cls, model_cls, extra = MORE[name]
    hf = tiny(config_cls, model_cls, 300, **extra)
    hf.save_pretrained(tmp_path)
    ours = load_hf_model(tmp_path)
    ids = torch.randint(0, 300, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours.logits(ours(ids)) - hf(ids).logits).abs().max() <= TOL
    prompts = [ids[0, :12].tolist(), ids[0, 3:8].tolist()]
    assert generate_ids(ours, prompts, SamplingConfig(max_new_tokens=14, temperature=0)) == \
        [_hf_greedy(hf, p, 14) for p in prompts]


def test_a_model_without_a_key_value_cache_is_refused_by_name(tmp_path):
    """State-space layers (Mamba) cache something else than keys and values: one line, not wrong output."""
    torch.manual_seed(0)
    transformers.MambaForCausalLM(transformers.MambaConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2)) \
        .save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="model_type 'mamba': its modeling code does not take a plain decoder "
                                              "step with a key/value cache"):
        load_hf_model(tmp_path)


@pytest.mark.parametrize("config_cls,model_cls,extra", [
    ("GraniteMoeConfig", "GraniteMoeForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2,
                                                       router_aux_loss_coef=0.02)),
    ("OlmoeConfig", "OlmoeForCausalLM", dict(num_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.03)),
])
def test_a_portable_mixture_of_experts_trains_with_transformers_balancing_loss(config_cls, model_cls, extra, tmp_path):
    """Two MoE families outside the native list: the config carries the expert count, top-k and the checkpoint's
    router_aux_loss_coef (what the Trainer's weight defaults to); a training forward's `aux_loss` equals the
    aux_loss transformers' own causal-LM class returns with output_router_logits, left padding included, and its
    gradient reaches the routers; an eval forward records nothing (no cost when generating)."""
    hf = tiny(config_cls, model_cls, 300, **extra)
    hf.save_pretrained(tmp_path)
    ours = load_hf_model(tmp_path)
    assert (ours.cfg.n_experts, ours.cfg.experts_top_k, ours.cfg.router_aux_coef) == \
        (4, 2, extra["router_aux_loss_coef"])
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.no_grad():
        want = hf(ids, attention_mask=mask, output_router_logits=True).aux_loss
    ours.train()
    ours(ids, attention_mask=mask)
    got = ours.aux_loss()
    assert torch.allclose(got, want, atol=1e-6) and got.item() > 0
    got.backward()
    routers = [p.grad for n, p in ours.named_parameters() if n.endswith(("mlp.gate.weight", "moe.router.weight"))]
    assert routers and all(g is not None and g.abs().sum() > 0 for g in routers)
    balance = ours.router_balance()["router_max_load"]
    assert 1.0 <= balance <= 4.0
    ours.eval()
    with torch.no_grad():
        ours(ids)
    assert ours.aux_loss().item() == 0.0 and ours.router_balance() == {}
