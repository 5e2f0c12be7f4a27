"""Tiny random-init models built with transformers, loaded into lmforge: same logits (float32, <= 1e-4)."""

from __future__ import annotations

import pytest
import torch
import transformers

from lmforge.model import CheckpointError, Transformer, load_hf_model, preset, save_hf_model

TOL = 1e-4


def _hf_tiny(kind: str, **extra):
    common = dict(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                  num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=300, n_embd=64, n_layer=3, n_head=4, n_positions=128, **extra)
        return transformers.GPT2LMHeadModel(cfg)
    if kind == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**common, "tie_word_embeddings": False, **extra}))
    if kind == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**{**common, "tie_word_embeddings": True, **extra}))
    if kind == "mistral":
        return transformers.MistralForCausalLM(transformers.MistralConfig(**{**common, "sliding_window": 8, **extra}))
    raise ValueError(kind)


def _ids(batch=2, length=40, vocab=300, seed=0):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def _save(hf_model, path, **kw):
    torch.manual_seed(0)
    # random init leaves some norms at exactly 1 / biases at 0; perturb so every tensor matters
    with torch.no_grad():
        for p in hf_model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    hf_model.save_pretrained(path, **kw)
    return hf_model.eval()


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2", "mistral"])
def test_logits_match_transformers(tmp_path, kind):
    hf = _save(_hf_tiny(kind), tmp_path)
    ours = load_hf_model(tmp_path)
    ids = _ids()
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours.logits(ours(ids))
    assert (got - expected).abs().max().item() <= TOL


@pytest.mark.parametrize("scaling", [
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 32},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    {"rope_type": "dynamic", "factor": 2.0},
])
def test_rope_scaling_variants_match(tmp_path, scaling):
    hf = _save(_hf_tiny("llama", max_position_embeddings=32, rope_parameters={"rope_theta": 10000.0, **scaling}), tmp_path)
    ours = load_hf_model(tmp_path)
    ids = _ids(length=60)  # beyond 32 positions, where the scalings differ
    with torch.no_grad():
        assert (ours.logits(ours(ids)) - hf(ids).logits).abs().max().item() <= TOL


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2", "mistral"])
def test_round_trip_through_hf_layout(tmp_path, kind):
    """lmforge -> HF layout -> transformers gives the same logits."""
    torch.manual_seed(1)
    cfg = preset(f"tiny-{kind}", vocab_size=300)
    ours = Transformer(cfg).eval()
    save_hf_model(ours, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = _ids()
    with torch.no_grad():
        assert (ours.logits(ours(ids)) - hf(ids).logits).abs().max().item() <= TOL
    again = load_hf_model(tmp_path)
    with torch.no_grad():
        assert torch.equal(again.logits(again(ids)), ours.logits(ours(ids)))


def test_sharded_and_bin_checkpoints(tmp_path):
    hf = _save(_hf_tiny("llama"), tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    ids = _ids()
    with torch.no_grad():
        ours = load_hf_model(tmp_path / "sharded")
        assert (ours.logits(ours(ids)) - hf(ids).logits).abs().max().item() <= TOL
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "sharded" / "config.json").read_text())
    torch.save(hf.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    with torch.no_grad():
        ours = load_hf_model(tmp_path / "bin")
        assert (ours.logits(ours(ids)) - hf(ids).logits).abs().max().item() <= TOL


def test_clear_errors(tmp_path):
    _save(_hf_tiny("llama"), tmp_path)
    import json

    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "falcon"}))
    with pytest.raises(CheckpointError, match="model_type 'falcon' is not supported"):
        load_hf_model(tmp_path, portable=False)
    # the portable path (transformers' Falcon) cannot read Llama's config and tensors as Falcon's either
    with pytest.raises(CheckpointError, match="model_type 'falcon'"):
        load_hf_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="'model.layers.1.mlp.up_proj.weight' is missing"):
        load_hf_model(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_hf_model(tmp_path / "empty")
    from lmforge.hub import SourceError

    with pytest.raises(SourceError, match="nowhere: no such model directory"):
        load_hf_model(tmp_path / "nowhere")


def test_param_count_matches_torch():
    for name in ("tiny-gpt2", "tiny-llama", "tiny-qwen2", "tiny-mistral"):
        cfg = preset(name)
        model = Transformer(cfg)
        assert cfg.num_params() == sum(p.numel() for p in model.parameters()), name
