"""LoRA, DoRA and QLoRA on every family lmforge loads natively, against peft on transformers' own model: tiny random
models from transformers' config classes over real tokenizers (tests/model/test_families.py), the adapters lmforge
saves loaded by peft with equal logits, peft's adapters loaded by lmforge, `lmforge export merge` read back by
transformers, and a QLoRA run. The module names are transformers' (Phi-3's fused qkv_proj / gate_up_proj, the MoE
experts as peft's target_parameters)."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file

from lmforge.config import ConfigError
from lmforge.model import load_hf_model
from lmforge.peft import load_adapter, save_adapter
from lmforge.peft import lora as L
from lmforge.tokenizer import load_tokenizer
from tests import corpora
from tests.model.test_families import FAMILIES, TEXTS, _hf_model

peft = pytest.importorskip("peft")
TOL = 1e-4
MOE = ("qwen3_moe", "mixtral")
# the default tier covers one family of each kind of site (GeGLU slices, Phi-3's fused modules, stacked experts);
# the others run in the slow tier
FAST = ("gemma3_text", "phi3", "qwen3_moe")


def _tiered(family, *values):
    """A parameter set for `family`, marked slow unless the family is in FAST."""
    return pytest.param(*values, marks=() if family in FAST else pytest.mark.slow, id="-".join(map(str, values)))


@pytest.fixture(scope="module", params=[_tiered(f, f) for f in FAMILIES])
def base(request, tmp_path_factory):  # (also parametrized indirectly by the tests that pair families with variants)
    """(family, its HF directory with a real tokenizer, token ids of English + Chinese + emoji text)."""
    name = request.param
    d = corpora.real_tokenizer(FAMILIES[name][2], tmp_path_factory.mktemp(name))
    _hf_model(name, len(transformers.AutoTokenizer.from_pretrained(d))).save_pretrained(d)
    ids = torch.tensor([load_tokenizer(d).encode(" ".join(TEXTS))[:48]])
    return name, d, ids


def _hf(d):
    return transformers.AutoModelForCausalLM.from_pretrained(d).eval()


def _randomise(model, seed=1):
    """Adapters that change the output: every B (and DoRA magnitude) drawn at random."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in L.lora_layers(model):
            for p in [*layer.lora_A, *layer.lora_B]:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            for p in layer.magnitude:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))
        for _, _, layer in L.expert_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.05)


def _logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else model.logits(out)


# (name, LoraConfig fields, families it applies to)
VARIANTS = [
    ("all-linear", dict(targets="all-linear"), None),
    ("dora", dict(targets="all-linear", dora=True), [f for f in FAMILIES if f not in MOE]),
    ("dora-attention", dict(targets=["q_proj", "k_proj", "v_proj", "o_proj"], dora=True, rslora=True), MOE),
    # the experts and the router alone, by their transformers 5 names
    ("experts-router", dict(targets=["gate_up_proj", "down_proj", "gate"]), MOE),
    # peft's names for transformers 4's per-expert modules: the fused experts with rank and alpha doubled
    ("per-expert-names", dict(targets=["q_proj", "gate_proj", "up_proj", "down_proj"]), ["qwen3_moe"]),
    ("mixtral-names", dict(targets=["w1", "w3", "w2"]), ["mixtral"]),
]


@pytest.mark.parametrize("base,variant", [_tiered(f, f, v) for f in FAMILIES for v, _, only in VARIANTS
                                          if only is None or f in only], indirect=["base"])
def test_lmforge_adapter_loads_in_peft_with_equal_logits(base, variant, tmp_path):
    name, d, ids = base
    fields = next(v[1] for v in VARIANTS if v[0] == variant)
    model = load_hf_model(d).eval()
    sites = L.apply_lora(model, L.LoraConfig(r=4, alpha=8, dropout=0.0, **fields))
    _randomise(model)
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(d))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    if name == "phi3":  # transformers' Phi-3 keeps q/k/v and gate/up fused: peft adapts the fused modules
        assert config["target_modules"] == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]
    if name in MOE and variant != "dora-attention":  # the experts are parameters for peft
        assert "mlp.experts.gate_up_proj" in config["target_parameters"]
        assert any(s.experts for s in sites)
    if variant == "per-expert-names":
        assert config["rank_pattern"] == {r".*\.gate_up_proj": 8} and config["alpha_pattern"] == {r".*\.gate_up_proj": 16}
    peft_model = peft.PeftModel.from_pretrained(_hf(d), tmp_path / "adapter").eval()
    ours = _logits(model, ids)
    assert (ours - _logits(peft_model, ids)).abs().max() < TOL
    assert (ours - _logits(_hf(d), ids)).abs().max() > 1e-2  # the adapters change the output
    # and lmforge reads its own directory back to the same model
    back = load_adapter(load_hf_model(d).eval(), tmp_path / "adapter")
    assert (_logits(back, ids) - ours).abs().max() < 1e-6


def test_peft_adapter_loads_in_lmforge_with_equal_logits(base, tmp_path):
    """peft's own "all-linear" (on MoE models transformers 5's conversion: experts and router as target_parameters,
    gate_up_proj at rank 2r) loads in lmforge with the same logits."""
    name, d, ids = base
    torch.manual_seed(3)
    pm = peft.get_peft_model(_hf(d), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                                     init_lora_weights=False)).eval()
    pm.save_pretrained(tmp_path / "adapter")
    model = load_adapter(load_hf_model(d).eval(), tmp_path / "adapter")
    if name in MOE:
        assert {s.leaf for s in model.peft.sites} >= {"gate_up_proj", "down_proj", "gate"}
    ours = _logits(model, ids)
    assert (ours - _logits(pm, ids)).abs().max() < TOL
    # saved again by lmforge: the same tensors (a MoE model's dense layers too, where this peft adapts them), which
    # peft reads back to the same model
    save_adapter(model, tmp_path / "again", base_model_name_or_path=str(d))
    assert set(load_file(tmp_path / "again" / "adapter_model.safetensors")) == \
        set(load_file(tmp_path / "adapter" / "adapter_model.safetensors"))
    back = peft.PeftModel.from_pretrained(_hf(d), tmp_path / "again").eval()
    assert (_logits(back, ids) - ours).abs().max() < TOL


def test_export_merge_gives_a_directory_transformers_loads(base, tmp_path):
    """`lmforge export merge` of an lmforge adapter: transformers loads the merged directory with the adapted
    model's logits, and with peft's merge_and_unload's."""
    from lmforge.cli import main

    name, d, ids = base
    model = load_hf_model(d).eval()
    L.apply_lora(model, L.LoraConfig(r=4, alpha=8, dropout=0.0))
    _randomise(model)
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(d))
    assert main(["export", "merge", "--model", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")]) == 0
    merged = _hf(tmp_path / "merged")
    reference = peft.PeftModel.from_pretrained(_hf(d), tmp_path / "adapter").merge_and_unload().eval()
    theirs = _logits(merged, ids)
    assert (theirs - _logits(model, ids)).abs().max() < TOL
    assert (theirs - _logits(reference, ids)).abs().max() < TOL


def test_qlora_trains_on_nf4_linear_layers(base):
    """QLoRA: every linear layer of the blocks in NF4 (experts and routers stay float), LoRA on top, and a few
    steps on one batch lower its loss; the adapted NF4 model equals LoRA on the dequantized weights."""
    import copy

    from lmforge.peft.nf4 import NF4Linear, quantize_model

    name, d, ids = base
    model = load_hf_model(d)
    modules = L.linear_modules(model.cfg)
    reference = copy.deepcopy(model)
    quantize_model(model, modules)
    assert all(isinstance(model.get_submodule(m), NF4Linear) for m in modules)
    with torch.no_grad():
        for m in modules:
            reference.get_submodule(m).weight.copy_(model.get_submodule(m).weight)
    for m in (model, reference):
        torch.manual_seed(0)
        L.apply_lora(m, L.LoraConfig(r=4, alpha=8, dropout=0.0))
        _randomise(m)
    model.eval(), reference.eval()
    assert (_logits(model, ids) - _logits(reference, ids)).abs().max() < 1e-5
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model.loss(model(ids[:, :-1]), ids[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


def test_targets_name_the_familys_modules(tmp_path):
    """One-line errors: Phi-3 has no separate q_proj (its modules are listed), half of a fused expert pair, DoRA on
    experts."""
    cfgs = {}
    for family in ("phi3", "qwen3_moe"):
        _hf_model(family, 300).save_pretrained(tmp_path / family)
        cfgs[family] = load_hf_model(tmp_path / family).cfg
    with pytest.raises(ConfigError, match="q_proj is not a module of this model; its linear modules are down_proj, "
                                          "gate_up_proj, o_proj, qkv_proj"):
        L.select_sites(cfgs["phi3"], ["q_proj"])
    with pytest.raises(ConfigError, match="gate_proj without up_proj: the experts keep them fused in gate_up_proj"):
        L.apply_lora(load_hf_model(tmp_path / "qwen3_moe"), L.LoraConfig(targets=["gate_proj"]))
    with pytest.raises(ConfigError, match="DoRA on the experts"):
        L.apply_lora(load_hf_model(tmp_path / "qwen3_moe"), L.LoraConfig(dora=True))
    # a Qwen3-MoE with a dense layer (mlp_only_layers=[1]): its MLP gets no adapter, as peft on transformers 5 reads
    # the MLP names as the experts'; all-linear leaves the routers alone
    sites = L.select_sites(cfgs["qwen3_moe"], "all-linear")
    assert not [s for s in sites if s.module.startswith("layers.1.mlp")]
    assert not [s for s in sites if s.leaf == "gate"]
    assert L.linear_modules(cfgs["qwen3_moe"]) == sorted(f"layers.{i}.attn.{p}" for i in (0, 1)
                                                         for p in ("o_proj", "qkv_proj"))
