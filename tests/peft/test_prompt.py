"""Prompt and prefix tuning against peft on the same weights: logits both ways, and generation from a KV cache
that starts with the virtual tokens equal to decoding whole sequences."""

from __future__ import annotations

import pytest
import torch
import transformers

from lmforge.infer.engine import generate_ids
from lmforge.infer.sampling import SamplingConfig
from lmforge.model import load_hf_model
from lmforge.peft import adapter_of, load_adapter, save_adapter, virtual_tokens
from tests.model.test_hf_interop import _hf_tiny, _ids, _save

peft = pytest.importorskip("peft")
TOL = 1e-4


@pytest.fixture(scope="module")
def base_model(trained_dir, tmp_path_factory):
    """A tiny random Llama sized to a real lmforge tokenizer."""
    from tests.models import tiny_llama

    return tiny_llama(tmp_path_factory.mktemp("base"), trained_dir, max_positions=512)


def test_prompt_tuning_matches_peft_and_generates(base_model, tmp_path):
    from lmforge.peft.prompt import apply_prompt_tuning

    model = load_hf_model(base_model).eval()
    prompt_tuning = apply_prompt_tuning(model, 8, seed=1)
    assert adapter_of(model) is prompt_tuning and virtual_tokens(model) == 8
    with torch.no_grad():
        prompt_tuning.embeddings.add_(torch.randn_like(prompt_tuning.embeddings) * 0.1)
    save_adapter(model, tmp_path / "pt", str(base_model))
    hf = transformers.AutoModelForCausalLM.from_pretrained(base_model).eval()
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "pt").eval()
    ids = torch.randint(0, 2000, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # right padding, as lmforge's padded batches have
    with torch.no_grad():
        theirs = pm(input_ids=ids, attention_mask=mask).logits[:, 8:]
        ours = model.logits(model(ids, attention_mask=mask))
        assert ours.shape == (2, 12, hf.config.vocab_size)
        assert (ours - theirs)[mask.bool()].abs().max() < 1e-4
    again = load_adapter(load_hf_model(base_model).eval(), tmp_path / "pt")
    with torch.no_grad():
        assert torch.equal(again.logits(again(ids)), model.logits(model(ids)))
    # the engine generates with it (its KV cache holds the virtual tokens first): the tokens of a plain greedy
    # loop over whole sequences
    prompt = ids[0, :6].tolist()
    got = generate_ids(model, [prompt], SamplingConfig(max_new_tokens=5, temperature=0))[0]
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(5):
            seq.append(int(model.logits(model(torch.tensor([seq])))[0, -1].argmax()))
    assert got == seq[6:]
    batch = [prompt, ids[1, :11].tolist()]  # left padding; the KV cache starts with the virtual tokens
    cfg = SamplingConfig(max_new_tokens=6, temperature=0.8, seed=3)
    assert generate_ids(model, batch, cfg) == generate_ids(model, batch, cfg, use_cache=False)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "qwen2"])
def test_prefix_tuning_equals_peft_both_ways(tmp_path, kind):
    from lmforge.peft.prefix import apply_prefix_tuning

    hf = _save(_hf_tiny(kind), tmp_path / "base")
    model = load_hf_model(tmp_path / "base").eval()
    prefix = apply_prefix_tuning(model, 5, seed=1)
    with torch.no_grad():
        for p in [*prefix.keys, *prefix.values]:
            p.normal_(0, 1)
    save_adapter(model, tmp_path / "pf", str(tmp_path / "base"))
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "pf").eval()
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0  # right padding
    with torch.no_grad():
        base = load_hf_model(tmp_path / "base").eval()
        plain = base.logits(base(ids))
        ours = model.logits(model(ids))
        assert (ours - plain).abs().max() > 1e-2  # the prefixes matter
        assert (ours - pm(input_ids=ids).logits).abs().max() < TOL
        assert (model.logits(model(ids, attention_mask=mask)) - pm(input_ids=ids, attention_mask=mask).logits
                )[mask.bool()].abs().max() < TOL
        again = load_adapter(load_hf_model(tmp_path / "base").eval(), tmp_path / "pf")
        assert torch.equal(again.logits(again(ids)), ours)
    # generation from a KV cache that starts with the prefix: the tokens of a plain greedy loop over whole
    # sequences, and, in a batch with left padding, those of the engine without a cache
    prompt = ids[0, :6].tolist()
    got = generate_ids(model, [prompt], SamplingConfig(max_new_tokens=4, temperature=0))[0]
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(4):
            seq.append(int(model.logits(model(torch.tensor([seq])))[0, -1].argmax()))
    assert got == seq[6:]
    batch = [prompt, ids[1, :11].tolist()]
    cfg = SamplingConfig(max_new_tokens=6, temperature=0.8, seed=3)
    assert generate_ids(model, batch, cfg) == generate_ids(model, batch, cfg, use_cache=False)


def test_a_kv_cache_without_the_virtual_tokens_is_refused(base_model):
    """A cache the adapter did not start (a scorer's own) would decode the base model silently: the model refuses
    it. The engine's caches all start with the virtual tokens, the continuous batcher's too: it serves the tuned
    model's own tokens (those of a plain greedy loop over whole sequences)."""
    import threading

    from lmforge.infer.batching import ContinuousBatcher
    from lmforge.model import KVCache
    from lmforge.peft import prefill
    from lmforge.peft.prefix import apply_prefix_tuning
    from lmforge.tokenizer import load_tokenizer

    model = load_hf_model(base_model).eval()
    prefix = apply_prefix_tuning(model, 4)
    with torch.no_grad():
        for p in [*prefix.keys, *prefix.values]:
            p.normal_(0, 1)
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad(), pytest.raises(ValueError, match="starts with its 4 virtual tokens"):
        model(ids, cache=KVCache(model.cfg, 1, 16))
    cache = KVCache(model.cfg, 1, 16)
    prefill(model, cache)
    with torch.no_grad():
        cached = model.logits(model(ids, cache=cache))
        assert (cached - model.logits(model(ids))).abs().max() < 1e-5
    prompts = [[5, 6, 7, 8, 9], [11, 12]]
    want = []
    for prompt in prompts:
        seq = list(prompt)
        with torch.no_grad():
            for _ in range(6):
                seq.append(int(model.logits(model(torch.tensor([seq])))[0, -1].argmax()))
        want.append(seq[len(prompt):])
    # max_prefill_tokens=2: the 5-token prompt is prefilled in chunks after the virtual tokens, the other at once
    batcher = ContinuousBatcher(model, load_tokenizer(base_model), max_batch=2, max_prefill_tokens=2).start()
    got, done = [[], []], [threading.Event(), threading.Event()]
    try:
        for i, prompt in enumerate(prompts):
            def emit(e, i=i):
                got[i].append(e.token_id)
                if e.finish_reason:
                    done[i].set()
            batcher.submit(prompt, SamplingConfig(max_new_tokens=6, temperature=0), emit)
        assert all(d.wait(60) for d in done)
    finally:
        batcher.stop()
    assert got == want
