"""GGUF export of every family lmforge loads, read by llama.cpp's own architectures (qwen3, qwen3moe, gemma2,
gemma3, phi3, smollm3, olmo2, and llama with experts for Mixtral): the same token ids, logits (f32 weights, f32 KV
cache) and greedy tokens as lmforge (whose logits equal transformers', tests/model/test_families.py); and
`export hf` reads each file back into a directory transformers loads with the original's logits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.export.gguf import ExportError, export_gguf, import_gguf
from lmforge.infer.engine import generate_ids
from lmforge.infer.sampling import SamplingConfig
from lmforge.model import load_hf_model
from lmforge.tokenizer import load_tokenizer
from tests import corpora
from tests.export.test_gguf import TEXTS, _llama

transformers = pytest.importorskip("transformers")
pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")

pytestmark = pytest.mark.slow

# family -> (config class, model class, tokenizer, config fields, llama.cpp architecture); shapes llama.cpp runs as
# transformers does: Gemma's query_pre_attn_scalar = head_dim (llama.cpp scales by 1/sqrt(head_dim)), Phi-3's LongRoPE
# with an original context beyond the test's 512 (llama.cpp picks short or long factors by its context size)
FAMILIES = {
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", "qwen3", dict(head_dim=32), "qwen3"),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", "qwen3",
                  dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True),
                  "qwen3moe"),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", "qwen2.5-instruct",
                dict(num_local_experts=4, num_experts_per_tok=2), "llama"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", "qwen2.5-instruct",
               dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=8, attn_logit_softcapping=20.0,
                    final_logit_softcapping=15.0), "gemma2"),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", "qwen2.5-instruct",
                    dict(num_hidden_layers=3, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                         layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                         rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                                          "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
                    "gemma3"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", "phi-3-mini-instruct",
             dict(partial_rotary_factor=0.75, max_position_embeddings=16384, original_max_position_embeddings=4096,
                  rope_scaling={"type": "longrope", "short_factor": [1.0 + 0.2 * i for i in range(6)],
                                "long_factor": [4.0 + i for i in range(6)]}), "phi3"),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", "qwen2.5-instruct", dict(num_hidden_layers=4), "smollm3"),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", "qwen2.5-instruct", {}, "olmo2"),
}


def _model_dir(d: Path, family: str, tokenizer: str | None = None) -> Path:
    config_cls, model_cls, default_tokenizer, extra, _ = FAMILIES[family]
    corpora.real_tokenizer(tokenizer or default_tokenizer, d)
    vocab = len(transformers.AutoTokenizer.from_pretrained(d))
    cfg = getattr(transformers, config_cls)(**{
        "vocab_size": vocab, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512, "rms_norm_eps": 1e-6,
        "initializer_range": 0.3,  # confident logits: greedy choices far from ties
        "pad_token_id": None, "bos_token_id": None, "eos_token_id": None, **extra})
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(cfg)
    with torch.no_grad():  # norms start at exactly 0 or 1: perturb so that every tensor (and Gemma's 1 + w) matters
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(d)
    return d


@pytest.fixture(scope="module", params=list(FAMILIES))
def exported(request, tmp_path_factory):
    """(family, model directory, its f32 GGUF file)."""
    family = request.param
    d = _model_dir(tmp_path_factory.mktemp(family), family)
    return family, d, export_gguf(d, d.parent / f"{family}.gguf", dtype="f32")


def test_llama_cpp_reads_the_same_tokens_logits_and_greedy_output(exported):
    family, d, path = exported
    tok, model = load_tokenizer(d), load_hf_model(d)
    with _llama(path) as llm:
        assert llm.metadata["general.architecture"] == FAMILIES[family][4]
        texts = [t for t in TEXTS if "  " not in t] if family == "phi3" else TEXTS  # (see test_gguf.py)
        for text in texts:
            assert llm.tokenize(text) == tok.encode(text), text
        ids = tok.encode(TEXTS[0] + TEXTS[1])
        theirs = llm.logits(ids)
        with torch.no_grad():
            ours = model.logits(model(torch.tensor([ids])))[0].numpy()
        assert np.abs(theirs - ours).max() < 1e-3 * np.abs(ours).max()
        prompt = tok.encode(TEXTS[1])
        greedy = generate_ids(model, [prompt], SamplingConfig(max_new_tokens=16, temperature=0))[0]
        assert llm.greedy(prompt, len(greedy), stop_at_eos=False) == greedy


def test_export_hf_reads_the_file_back(exported, tmp_path):
    """GGUF -> HF directory: transformers loads it (the family's own class) with the original's logits."""
    family, d, path = exported
    back = import_gguf(path, tmp_path / "back")
    assert json.loads((back / "config.json").read_text())["model_type"] == family
    ids = torch.tensor([load_tokenizer(d).encode(TEXTS[0] + TEXTS[1])[:40]])
    with torch.no_grad():
        want = transformers.AutoModelForCausalLM.from_pretrained(d).eval()(ids).logits
        got = transformers.AutoModelForCausalLM.from_pretrained(back).eval()(ids).logits
        mine = (lambda m: m.logits(m(ids)))(load_hf_model(back))
    assert (got - want).abs().max().item() < 1e-4 and (mine - want).abs().max().item() < 1e-4


def test_what_llama_cpp_would_compute_differently_is_refused(tmp_path):
    """A Gemma attention scale llama.cpp does not use, SmolLM3 NoPE layers off llama.cpp's every-4th pattern,
    Qwen3-MoE's dense layers: one-line errors naming the field, no file written."""
    d = _model_dir(tmp_path / "g", "gemma2")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "query_pre_attn_scalar": 24}))
    with pytest.raises(ExportError, match="query_pre_attn_scalar 24"):
        export_gguf(d, tmp_path / "x.gguf")
    s = _model_dir(tmp_path / "s", "smollm3")
    cfg = json.loads((s / "config.json").read_text())
    (s / "config.json").write_text(json.dumps({**cfg, "no_rope_layers": [1, 0, 1, 1]}))
    with pytest.raises(ExportError, match="no_rope_layers"):
        export_gguf(s, tmp_path / "x.gguf")
    q = _model_dir(tmp_path / "q", "qwen3_moe")
    cfg = json.loads((q / "config.json").read_text())
    (q / "config.json").write_text(json.dumps({**cfg, "mlp_only_layers": [0]}))
    with pytest.raises(ExportError, match="mlp_only_layers"):
        export_gguf(q, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()
