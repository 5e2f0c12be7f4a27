"""LoRA / DoRA against peft on the same weights: forward, PEFT adapter round trips both ways, merge."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.config import ConfigError
from lmforge.model import load_hf_model, save_hf_model
from lmforge.peft import adapter_of, load_adapter, merge, parameter_counts, save_adapter, set_merged
from lmforge.peft import lora as L
from tests.model.test_hf_interop import _hf_tiny, _ids, _save

peft = pytest.importorskip("peft")
TOL = 1e-4


def _randomise_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in L.lora_layers(model):
            for p in [*layer.lora_A, *layer.lora_B]:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            for p in layer.magnitude:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))


CASES = [("llama", ["q_proj", "v_proj"], False, False), ("llama", "all-linear", True, False),
         ("qwen2", ["k_proj", "o_proj", "gate_proj", "down_proj"], False, True), ("llama", ["up_proj", "v_proj"], True, True),
         ("gpt2", ["c_attn", "c_proj", "c_fc"], False, False), ("gpt2", ["c_attn"], False, True)]


@pytest.mark.parametrize("kind,targets,dora,rslora", CASES)
def test_lmforge_adapter_loads_in_peft_with_equal_logits(tmp_path, kind, targets, dora, rslora):
    hf = _save(_hf_tiny(kind), tmp_path / "base")
    model = load_hf_model(tmp_path / "base").eval()
    L.apply_lora(model, L.LoraConfig(r=4, alpha=8, dropout=0.0, targets=targets, dora=dora, rslora=rslora))
    _randomise_adapters(model)
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tmp_path / "base")
    if kind != "gpt2":  # separate HF names, never the fused ones (vLLM and llama.cpp's converter need them)
        assert all(t in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
                   for t in cfg["target_modules"])
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    ids = _ids()
    with torch.no_grad():
        ours, theirs = model.logits(model(ids)), peft_model(ids).logits
    assert (ours - theirs).abs().max() < TOL
    # the adapters do change the output (so the comparison means something)
    with torch.no_grad():
        base = load_hf_model(tmp_path / "base").eval()
        plain = base.logits(base(ids))
    assert (ours - plain).abs().max() > 1e-3


@pytest.mark.parametrize("kind,targets,dora,rslora", CASES[:4])
def test_peft_adapter_loads_in_lmforge_with_equal_logits(tmp_path, kind, targets, dora, rslora):
    hf = _save(_hf_tiny(kind), tmp_path / "base")
    torch.manual_seed(3)
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets,
                                                 use_dora=dora, use_rslora=rslora, init_lora_weights=False)).eval()
    pm.save_pretrained(tmp_path / "adapter")
    model = load_adapter(load_hf_model(tmp_path / "base").eval(), tmp_path / "adapter")
    ids = _ids()
    with torch.no_grad():
        assert (model.logits(model(ids)) - pm(ids).logits).abs().max() < TOL


@pytest.mark.parametrize("dora", [False, True])
def test_merge_equals_unmerged_and_peft_merge(tmp_path, dora):
    hf = _save(_hf_tiny("llama"), tmp_path / "base")
    model = load_hf_model(tmp_path / "base").eval()
    L.apply_lora(model, L.LoraConfig(r=4, alpha=16, dropout=0.0, targets=["q_proj", "v_proj", "gate_proj"], dora=dora))
    _randomise_adapters(model)
    ids = _ids()
    with torch.no_grad():
        unmerged = model.logits(model(ids))
        set_merged(model, True)
        assert (model.logits(model(ids)) - unmerged).abs().max() < TOL
        set_merged(model, False)  # unmerge gives the adapted model back
        assert (model.logits(model(ids)) - unmerged).abs().max() < TOL
    save_adapter(model, tmp_path / "adapter")
    merge(model)
    assert adapter_of(model) is None and not L.lora_layers(model)
    save_hf_model(model, tmp_path / "merged")
    import transformers

    merged_hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    reference = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").merge_and_unload().eval()
    with torch.no_grad():
        assert (merged_hf(ids).logits - reference(ids).logits).abs().max() < TOL
        assert (merged_hf(ids).logits - unmerged).abs().max() < TOL


def test_only_adapters_train_and_lora_plus_groups(tmp_path):
    _save(_hf_tiny("llama"), tmp_path / "base")
    model = load_hf_model(tmp_path / "base")
    L.apply_lora(model, L.LoraConfig(r=2, targets=["q_proj", "v_proj"], lora_plus_ratio=16))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(".lora_" in n for n in names)
    counts = parameter_counts(model)
    # q (64 out) and v (16 out) of 64 inputs, rank 2, 3 layers: A 2x64 each, B 64x2 and 16x2
    assert counts["trainable"] == 3 * (2 * 64 + 64 * 2 + 2 * 64 + 16 * 2)
    from lmforge.train.config import TrainConfig
    from lmforge.train.schedule import build_optimizer

    opt = build_optimizer(model, TrainConfig())
    scales = sorted(g["lr_scale"] for g in opt.param_groups if g["params"])
    assert scales == [1.0, 16.0]
    # the loss reaches A and B and nothing else
    model.logits(model(_ids())).float().pow(2).mean().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if ".lora_" not in n)


def test_bad_targets_and_adapter_dirs_are_one_line_errors(tmp_path):
    _save(_hf_tiny("llama"), tmp_path / "base")
    model = load_hf_model(tmp_path / "base")
    with pytest.raises(ConfigError, match="c_attn is not a module of this model; its linear modules are down_proj"):
        L.apply_lora(model, L.LoraConfig(targets=["c_attn"]))
    with pytest.raises(ConfigError, match="matches no module"):
        L.apply_lora(load_hf_model(tmp_path / "base"), L.LoraConfig(targets=r".*\.attn\.q"))
    with pytest.raises(ConfigError, match="no adapter_config.json"):
        load_adapter(load_hf_model(tmp_path / "base"), tmp_path / "base")
    regex = L.select_sites(model.cfg, r"model\.layers\.[01]\.self_attn\.(q|v)_proj")
    assert [s.hf_name for s in regex] == [f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "qv"]


def test_mask_dropout_drops_at_rate_p_and_its_gradient_is_the_mask():
    """LoRA's dropout keeps a bool mask: outputs are 0 or x / (1 - p), about p of them dropped, and the gradient is
    the same mask scaled (as torch's dropout); off in eval mode and without grad it is torch's own."""
    torch.manual_seed(0)
    d = L.MaskDropout(0.25)
    x = (torch.rand(200, 300) + 0.5).requires_grad_()
    y = d(x)
    kept = y != 0
    assert abs(1 - kept.float().mean().item() - 0.25) < 0.01
    assert torch.allclose(y[kept], x[kept] / 0.75)
    y.sum().backward()
    assert torch.equal(x.grad, kept.float() / 0.75)
    d.eval()
    assert d(x) is x
