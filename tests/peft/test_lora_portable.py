"""LoRA and DoRA on the portable path (model/portable.py): adapters by module swap on the transformers model's
nn.Linear layers under their transformers names, against peft on the same transformers model: lmforge's adapter
directory loads in peft with equal logits, peft's own adapter loads in lmforge, `lmforge export merge` gives a
directory transformers loads with peft's merged logits, and QLoRA equals LoRA on the dequantized weights. Tiny
random Granite and StableLM models (tests/model/test_portable.py)."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from lmforge.config import ConfigError
from lmforge.model import load_hf_model
from lmforge.peft import load_adapter, save_adapter
from lmforge.peft import lora as L
from lmforge.tokenizer import load_tokenizer
from tests.model.test_portable import PORTABLE, TEXTS, model_dir

peft = pytest.importorskip("peft")
TOL = 1e-5


@pytest.fixture(scope="module", params=list(PORTABLE))
def base(request, tmp_path_factory):
    """(model_type, its directory, token ids of English + Chinese + emoji text)."""
    name = request.param
    d = model_dir(tmp_path_factory.mktemp(name), *PORTABLE[name][:2], **PORTABLE[name][2])
    return name, d, torch.tensor([load_tokenizer(d).encode(" ".join(TEXTS))[:48]])


def _hf(d):
    return transformers.AutoModelForCausalLM.from_pretrained(d).eval()


def _randomise(model, seed=1):
    """Adapters that change the output: every A and B (and DoRA magnitude) drawn at random."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in L.lora_layers(model):
            for p in [*layer.lora_A, *layer.lora_B]:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            for p in layer.magnitude:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))


def _logits(model, ids):
    with torch.no_grad():
        return model.logits(model(ids))


@pytest.mark.parametrize("variant", ["lora", "dora", "q_v"])
def test_lmforge_adapters_load_in_peft_with_equal_logits(base, variant, tmp_path):
    name, d, ids = base
    targets = ["q_proj", "v_proj"] if variant == "q_v" else L.ALL_LINEAR
    model = load_hf_model(d)
    L.apply_lora(model, L.LoraConfig(r=4, alpha=8, dropout=0.0, targets=targets, dora=variant == "dora"))
    _randomise(model)
    model.eval()
    ours = _logits(model, ids)
    save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    want_modules = {"q_proj", "v_proj"} if variant == "q_v" else {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                  "up_proj", "down_proj"}
    assert set(config["target_modules"]) == want_modules
    hf = peft.PeftModel.from_pretrained(_hf(d), tmp_path / "adapter").eval()
    with torch.no_grad():
        theirs = hf(ids).logits
    assert (ours - theirs).abs().max() <= TOL
    assert (ours - _logits(load_hf_model(d), ids)).abs().max() > 1e-2  # the adapter changes the output
    back = load_adapter(load_hf_model(d), tmp_path / "adapter").eval()  # lmforge reads its own directory back
    assert (_logits(back, ids) - theirs).abs().max() <= TOL


def test_peft_adapters_load_in_lmforge_and_export_merge_gives_a_transformers_directory(base, tmp_path):
    name, d, ids = base
    peft_model = peft.get_peft_model(_hf(d), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                             init_lora_weights=False))
    peft_model.eval()
    with torch.no_grad():
        theirs = peft_model(ids).logits
    peft_model.save_pretrained(tmp_path / "peft")
    ours = load_adapter(load_hf_model(d), tmp_path / "peft").eval()
    assert (_logits(ours, ids) - theirs).abs().max() <= TOL
    from lmforge.cli import main

    assert main(["export", "merge", "--model", str(tmp_path / "peft"), "--base", str(d),
                 "--out", str(tmp_path / "merged")]) == 0
    merged = _hf(tmp_path / "merged")
    with torch.no_grad():
        want = peft_model.merge_and_unload()(ids).logits
        assert (merged(ids).logits - want).abs().max() <= TOL


def test_qlora_is_lora_on_the_dequantized_weights(base):
    from lmforge.peft.nf4 import NF4Linear, quantize_model

    _, d, ids = base
    model = load_hf_model(d)
    quantize_model(model, L.linear_modules(model.cfg, model))
    assert isinstance(model.hf.model.layers[0].self_attn.q_proj, NF4Linear)
    reference = load_hf_model(d)
    with torch.no_grad():  # the same weights, dequantized, in plain linear layers
        for path in L.linear_modules(model.cfg, model):
            reference.get_submodule(path).weight.copy_(model.get_submodule(path).weight)
    for m in (model, reference):
        torch.manual_seed(0)
        L.apply_lora(m, L.LoraConfig(r=4, alpha=8, dropout=0.0))
        _randomise(m)
        m.eval()
    assert (_logits(model, ids) - _logits(reference, ids)).abs().max() <= TOL


def test_an_unknown_target_names_the_models_linear_modules(base):
    _, d, _ = base
    with pytest.raises(ConfigError, match="qkv_proj is not a module of this model; its linear modules are down_proj, "
                                          "gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"):
        L.apply_lora(load_hf_model(d), L.LoraConfig(targets=["qkv_proj"]))


@pytest.mark.parametrize("name", ["gpt_neox", "falcon"])
@pytest.mark.parametrize("targets", [["query_key_value"], L.ALL_LINEAR])
def test_fused_query_key_value_adapters_load_in_peft(name, targets, tmp_path):
    """GPT-NeoX and Falcon keep q, k and v in one `query_key_value` layer: one adapter there, under that name."""
    from tests.model.test_portable import MORE, tiny

    tiny(*MORE[name][:2], 300, **MORE[name][2]).save_pretrained(tmp_path / "base")
    ids = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(0))
    model = load_hf_model(tmp_path / "base")
    L.apply_lora(model, L.LoraConfig(r=4, alpha=8, dropout=0.0, targets=targets, dora=targets != L.ALL_LINEAR))
    _randomise(model)
    model.eval()
    save_adapter(model, tmp_path / "adapter")
    modules = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["target_modules"]
    assert "query_key_value" in modules and (targets != L.ALL_LINEAR or len(modules) > 1)
    theirs = peft.PeftModel.from_pretrained(_hf(tmp_path / "base"), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert (_logits(model, ids) - theirs(ids).logits).abs().max() <= TOL
