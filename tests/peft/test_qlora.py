"""QLoRA: NF4 codes against bitsandbytes, the QLoRA forward and backward against float math on the dequantized
weights, merge quality, memory, and a QLoRA fine-tuning run."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from lmforge.model import load_hf_model
from lmforge.peft import lora as L
from lmforge.peft import merge
from lmforge.peft.nf4 import NF4Linear, NF4Weight, dynamic_map, quantize_model
from tests.model.test_hf_interop import _hf_tiny, _ids, _save

# bitsandbytes 0.50.2 runs on CPU; its 4-bit matmul fails under no_grad when the input width is not a multiple
# of 64, which these tests never call (only its quantize / dequantize functions)
bnb = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes does not import here")

SHAPES = [(128, 64), (192, 576), (130, 64), (7, 9), (576, 1536), (300, 128)]


@pytest.mark.parametrize("shape", SHAPES)
def test_nf4_codes_equal_bitsandbytes(shape):
    torch.manual_seed(sum(shape))
    w = torch.randn(shape) * 0.05
    w.view(-1)[3] = 0.4  # an outlier, as real weights have
    ours = NF4Weight.quantize(w, double_quant=False)
    packed, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    assert torch.equal(ours.packed, packed.reshape(-1))
    assert torch.equal(ours.absmax, state.absmax)
    assert torch.equal(ours.dequantize(), bnb.dequantize_4bit(packed, state))
    # double quantization: the codes, the offset and the second-level absmax are equal; the 8-bit absmax codes
    # differ by one level where bitsandbytes' approximate search picks the farther of two almost equal neighbours
    dq = NF4Weight.quantize(w, double_quant=True)
    packed, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(dq.packed, packed.reshape(-1))
    assert dq.absmax_offset == float(state.offset) and torch.equal(dq.absmax_scale, state.state2.absmax)
    diff = (dq.absmax.long() - state.absmax.long()).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 0.01
    assert torch.equal(dynamic_map(), state.state2.code)
    assert (dq.dequantize() - bnb.dequantize_4bit(packed, state)).abs().max() <= 0.002
    # NF4 itself: every value within half a level step of its block's absmax
    assert (dq.dequantize() - w).abs().max() < 0.17 * float(w.abs().max())


def test_nf4_linear_forward_and_backward_equal_float_math_on_the_dequantized_weight():
    torch.manual_seed(0)
    base = torch.nn.Linear(64, 96, bias=True)
    q = NF4Linear(base)
    ref = torch.nn.Linear(64, 96, bias=True)
    with torch.no_grad():
        ref.weight.copy_(q.weight)
        ref.bias.copy_(base.bias)
    x = torch.randn(3, 5, 64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    q(x).pow(2).sum().backward()
    ref(x2).pow(2).sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-5)
    assert q.weight_nf4.nbytes() / (64 * 96 * 4) < 0.14  # 4.127 bits of 32


@pytest.fixture
def llama(tmp_path):
    _save(_hf_tiny("llama", hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2),
          tmp_path / "base")
    return tmp_path / "base"


def _randomise(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in L.lora_layers(model):
            for p in layer.lora_B:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("dora", [False, True])
def test_qlora_equals_lora_on_the_dequantized_base_and_merges_into_it(llama, dora):
    model = load_hf_model(llama).eval()
    sites = sorted({s.module for s in L.adapter_sites(model.cfg)})
    reference = copy.deepcopy(model)
    quantize_model(model, sites)
    with torch.no_grad():  # the reference: the same model with the dequantized NF4 weights in float
        for path in sites:
            reference.get_submodule(path).weight.copy_(model.get_submodule(path).weight)
    cfg = L.LoraConfig(r=4, alpha=8, dropout=0.0, targets=["q_proj", "v_proj", "down_proj"], dora=dora)
    torch.manual_seed(5)
    L.apply_lora(model, cfg)
    torch.manual_seed(5)
    L.apply_lora(reference, cfg)
    _randomise(model)
    _randomise(reference)
    ids = _ids(vocab=300)
    with torch.no_grad():
        unmerged = model.logits(model(ids))
        assert (unmerged - reference.logits(reference(ids))).abs().max() < 1e-5
        # merging into the dequantized base (kept in float) keeps the model (the goal: <= 0.01)
        merge(model)
        merged = model.logits(model(ids))
    assert (merged - unmerged).abs().max() < 0.01
    assert (merged - unmerged).abs().max() < 1e-4  # in fact float rounding only
    # what peft's merge_and_unload into 4-bit weights does instead: re-quantize the merged weight
    requant = copy.deepcopy(model)
    quantize_model(requant, sites)
    with torch.no_grad():
        assert (requant.logits(requant(ids)) - unmerged).abs().max() > 10 * (merged - unmerged).abs().max()


def test_qlora_finetune_run(llama, tmp_path, trained_dir):
    """`finetune --method qlora` on the tiny Llama: trains, the adapter is PEFT's, merge gives a float model."""
    import shutil

    import transformers

    from lmforge.finetune.run import FinetuneConfig, run_finetune
    from lmforge.tokenizer import load_tokenizer

    tok = load_tokenizer(trained_dir)
    d = tmp_path / "tinyllama"
    cfg = transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   tie_word_embeddings=True)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    for f in trained_dir.iterdir():
        shutil.copy(f, d / f.name)
    data = tmp_path / "qa.jsonl"
    rows = [{"instruction": f"问题 {i}: 一加{i}等于几？", "output": f"答案是{i + 1}。"} for i in range(40)]
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    summary = run_finetune(FinetuneConfig(model=str(d), data=str(data), out=str(tmp_path / "run"), method="qlora",
                                          max_steps=20, batch_size=4, max_length=64, lr=1e-2, eval_every=10,
                                          warmup_steps=2, samples=1, sample_tokens=4, progress=False))
    assert summary["final"]["val_loss"] < summary["initial"]["val_loss"]
    best = tmp_path / "run" / "best"
    assert json.loads((best / "adapter_config.json").read_text())["peft_type"] == "LORA"
    from lmforge.export.merge import merge_adapter

    merged = merge_adapter(best, tmp_path / "merged")
    assert transformers.AutoModelForCausalLM.from_pretrained(merged) is not None
