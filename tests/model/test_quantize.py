"""Weight-only int8: the same integers and scales as torchao, the math of a dequantized matmul, generation intact."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lmforge.infer import SamplingConfig, generate_ids
from lmforge.model import CheckpointError, Int8Linear, Transformer, preset, quantize_int8, save_hf_model
from lmforge.model.quantize import quantize_per_channel


def _dequantized(linear: Int8Linear) -> torch.Tensor:
    return linear.qweight.float() * linear.scale[:, None]


def test_integers_and_scales_equal_torchao():
    torchao_quant = pytest.importorskip("torchao.quantization")
    torch.manual_seed(0)
    for out_f, in_f in [(32, 64), (960, 576), (7, 3)]:
        linear = nn.Linear(in_f, out_f)
        weight = linear.weight.detach().clone()
        torchao_quant.quantize_(linear, torchao_quant.Int8WeightOnlyConfig())
        q, scale = quantize_per_channel(weight)
        assert torch.equal(linear.weight.qdata, q)
        assert torch.equal(linear.weight.scale.flatten(), scale)


def test_int8_linear_is_a_dequantized_matmul():
    torch.manual_seed(0)
    linear = nn.Linear(96, 40)
    q8 = Int8Linear(linear.weight, linear.bias)
    w = _dequantized(q8)
    assert (w - linear.weight).abs().max() <= linear.weight.abs().amax(1).max() / 127.5 / 2 + 1e-7  # half a step
    for rows in (1, 3, 8, 9, 64):  # the GEMV kernel (bf16 activations) up to 8 rows, dense dequantized above
        x = torch.randn(rows, 96)
        reference = x @ w.T + linear.bias
        tolerance = 2e-2 if rows <= 8 else 1e-5
        assert torch.allclose(q8(x), reference, atol=tolerance * reference.abs().max().item()), rows


@pytest.mark.parametrize("family", ["tiny-llama", "tiny-gpt2"])
def test_quantized_model_matches_its_dequantized_weights(family):
    torch.manual_seed(0)
    model = Transformer(preset(family)).eval()
    quantized = quantize_int8(copy.deepcopy(model))
    assert not any(type(m) is nn.Linear for m in quantized.modules())
    assert isinstance(quantized.lm_head, Int8Linear)  # the tied head gets a quantized copy; the embedding stays
    # the float model with every matrix replaced by its dequantized int8 version computes the same function
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, Int8Linear) and name != "lm_head":
                reference.get_submodule(name).weight.copy_(_dequantized(module))
        reference.lm_head = nn.Linear(model.cfg.d_model, model.cfg.vocab_size, bias=False)
        reference.lm_head.weight.copy_(_dequantized(quantized.lm_head))
        ids = torch.randint(0, model.cfg.vocab_size, (2, 24))
        # 48 rows: the dense path
        assert torch.allclose(quantized.logits(quantized(ids)), reference.logits(reference(ids)), atol=1e-4)
        last = ids[:1, -1:]  # one row: the GEMV kernel with bf16 activations
        want = reference.logits(reference(last))
        assert torch.allclose(quantized.logits(quantized(last)), want, atol=3e-2 * want.abs().max().item())
        # and the quantization error itself is small against the float model
        full = model.logits(model(ids))
        assert ((quantized.logits(quantized(ids)) - full).norm() / full.norm()) < 0.05


def test_quantized_generation_batches_and_refuses_to_save(tmp_path):
    torch.manual_seed(0)
    model = quantize_int8(Transformer(preset("tiny-llama")))
    prompts = [[5, 17, 42, 8], [7, 7, 1], [250, 12, 33, 44, 55, 66]]
    cfg = SamplingConfig(max_new_tokens=8, temperature=0)
    one_by_one = [generate_ids(model, [p], cfg)[0] for p in prompts]
    assert all(len(out) == 8 for out in one_by_one)
    assert generate_ids(model, prompts, cfg) == one_by_one
    with pytest.raises(CheckpointError, match="inference-only"):
        save_hf_model(model, tmp_path)
