"""Packed float32 CPU kernel: the math of F.linear for every row count, checkpoints' logits, generation intact."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.infer import SamplingConfig, generate_ids
from lmforge.model import CheckpointError, PackedLinear, Transformer, load_hf_model, pack_for_cpu, preset, save_hf_model
from lmforge.model.packed import PackedEmbedding, kernel_available, kernel_error
from tests.model.test_hf_interop import TOL, _hf_tiny, _ids, _save


def test_kernel_builds():
    # CI and every supported machine have a C++ compiler; a failed build would silently cost the speed-up
    assert kernel_available(), kernel_error()


@pytest.mark.parametrize("out_f,in_f", [(70, 33), (960, 576), (1, 5), (64, 64)])
def test_packed_linear_equals_f_linear(out_f, in_f):
    torch.manual_seed(0)
    linear = nn.Linear(in_f, out_f)
    for bias in (linear.bias, None):
        packed = PackedLinear(linear.weight, bias)
        assert torch.equal(packed.unpacked_weight(), linear.weight)
        # 1-8 rows are one block, 9+ several blocks with a tail; float32 sums in another order: ~1e-6 relative
        for rows in (*range(1, 11), 17, 64):
            x = torch.randn(rows, in_f)
            want = F.linear(x, linear.weight, bias)
            assert torch.allclose(packed(x), want, rtol=1e-5, atol=1e-5 * want.abs().max().item()), (rows, bias)
    x = torch.randn(2, 3, in_f)  # any leading shape
    assert torch.allclose(packed(x), F.linear(x, linear.weight), atol=1e-5)


def test_kernel_names_bad_shapes():
    packed = PackedLinear(torch.randn(40, 16))
    with pytest.raises(RuntimeError, match="do not fit"):
        torch.ops.lmforge.packed_linear(torch.randn(3, 17), packed.panels, None, 40)
    with pytest.raises(RuntimeError, match="out_features"):
        torch.ops.lmforge.packed_linear(torch.randn(3, 16), packed.panels, None, 90)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2"])
def test_packed_checkpoints_match_transformers(tmp_path, kind):
    """GPT-2 (biases, learned positions, tied head), Llama (untied), Qwen2 (q/k/v biases, tied)."""
    hf = _save(_hf_tiny(kind), tmp_path)
    ours = pack_for_cpu(load_hf_model(tmp_path))
    assert not any(type(m) is nn.Linear for m in ours.modules())
    if ours.cfg.tie_embeddings:  # one packed matrix serves the lookup and the output head
        assert isinstance(ours.embed, PackedEmbedding) and ours.embed.head is ours.lm_head
    ids = _ids()
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() <= TOL
        assert (ours(ids[:, :1]) - hf(ids[:, :1]).logits).abs().max().item() <= TOL  # 2 rows: the decode shape
    with pytest.raises(CheckpointError, match="inference-only"):
        save_hf_model(ours, tmp_path / "out")


def test_packed_generation_equals_torch_matmul():
    torch.manual_seed(0)
    model = Transformer(preset("tiny-llama")).eval()
    torch.manual_seed(0)
    packed = pack_for_cpu(Transformer(preset("tiny-llama")).eval())
    prompts = [[5, 17, 42, 8], [7, 7, 1], [250, 12, 33, 44, 55, 66], [9]]
    cfg = SamplingConfig(max_new_tokens=12, temperature=0)
    want = generate_ids(model, prompts, cfg)
    assert generate_ids(packed, prompts, cfg) == want  # padded batch of 4: the 4-row kernel
    assert [generate_ids(packed, [p], cfg)[0] for p in prompts] == want
