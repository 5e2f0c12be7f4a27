"""Every family lmforge loads natively, against transformers' own modeling code: tiny random models built with
transformers' config classes (2-4 layers, width 64) over real tokenizers, float32 logits on English, Chinese and
emoji text (<= 1e-4), lmforge's saved directories loaded back by AutoModelForCausalLM, greedy generation (KV
cache, left-padded batches, past the sliding windows) equal to transformers' generate, the packed CPU kernels and
int8, the MoE balancing loss, and a one-line error naming the field for what lmforge does not implement."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers
from torch import nn

from lmforge.infer import SamplingConfig, generate_ids
from lmforge.model import CheckpointError, Int8Linear, Transformer, load_hf_model, pack_for_cpu, quantize_int8
from lmforge.model.hf import config_from_hf, save_hf_model
from lmforge.tokenizer import load_tokenizer
from tests import corpora

TOL = 1e-4
TEXTS = ["The quick brown fox jumps over the lazy dog, twice; then it sleeps for 12345 seconds in the sun.",
         "北京是中华人民共和国的首都，也是全国的政治、文化中心，历史悠久。",
         "emoji 🙂🚀🎉 and naïve café — “quotes” 👍🏽"]
WINDOW = 8  # a sliding window far shorter than the texts and the generations

# family -> (config class, model class, tokenizer fixture, config fields beyond the common tiny shape)
FAMILIES = {
    # layer 0 full, layer 1 sliding (max_window_layers), as Qwen3's long-context variants configure it
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", "qwen3",
              dict(head_dim=32, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", "qwen3",
                  dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=False,
                       mlp_only_layers=[1])),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", "qwen2.5-instruct",
                dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", "qwen2.5-instruct",
               dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=WINDOW, attn_logit_softcapping=5.0,
                    final_logit_softcapping=3.0)),
    # Gemma 3 4B+'s RoPE: linear scaling on the global layers, the local layers' own base
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", "qwen2.5-instruct",
                    dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=WINDOW,
                         layer_types=["sliding_attention", "full_attention"],
                         rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                                          "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})),
    # Phi-4-mini's partial rotary and LongRoPE (short factors up to 32 positions, long ones after)
    "phi3": ("Phi3Config", "Phi3ForCausalLM", "phi-3-mini-instruct",
             dict(partial_rotary_factor=0.75, original_max_position_embeddings=32,
                  rope_scaling={"type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(6)],
                                "long_factor": [2.0 + i for i in range(6)]})),
    # 4 layers: layer 3 is a NoPE layer, and the sliding one
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", "qwen2.5-instruct",
                dict(num_hidden_layers=4, use_sliding_window=True, sliding_window=WINDOW)),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", "qwen2.5-instruct", {}),
}


def _hf_model(family: str, vocab: int):
    config_cls, model_cls, _, extra = FAMILIES[family]
    cfg = getattr(transformers, config_cls)(**{
        "vocab_size": vocab, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256, "pad_token_id": None,
        "bos_token_id": None, "eos_token_id": None, **extra})
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(cfg)
    with torch.no_grad():  # random init leaves norms at exactly 0 or 1: perturb so every tensor matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(name, transformers model, lmforge model loaded from its directory, tokenizer, directory)."""
    name = request.param
    d = corpora.real_tokenizer(FAMILIES[name][2], tmp_path_factory.mktemp(name))
    tok = load_tokenizer(d)
    hf = _hf_model(name, len(transformers.AutoTokenizer.from_pretrained(d)))
    hf.save_pretrained(d)
    return name, hf, load_hf_model(d), tok, d


def _logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        out = model(torch.tensor([ids]))
    return (out.logits if hasattr(out, "logits") else model.logits(out))[0]  # transformers' or lmforge's head


def test_logits_equal_transformers(family):
    name, hf, ours, tok, _ = family
    texts = TEXTS + [" ".join(TEXTS)]  # the last: past Phi-3's 32 positions, where LongRoPE takes its long factors
    for text in texts:
        ids = tok.encode(text)
        assert len(ids) > WINDOW
        assert (_logits(ours, ids) - _logits(hf, ids)).abs().max().item() <= TOL, text


def test_left_padded_batch_equals_each_row_alone(family):
    name, _, ours, tok, _ = family
    # (within Phi-3's 32 short-factor positions: LongRoPE picks its factors by the batch's longest row, in
    # transformers too, so a longer batch changes a short row's positions)
    rows = [tok.encode(t)[:30] if name == "phi3" else tok.encode(t) for t in TEXTS]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    with torch.no_grad():
        batch = ours.logits(ours(ids, attention_mask=mask))
    for i, r in enumerate(rows):
        assert (batch[i, width - len(r):] - _logits(ours, r)).abs().max().item() <= TOL


# the config fields that decide the function (compared as transformers reads them back)
FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
          "rms_norm_eps", "tie_word_embeddings", "layer_types", "sliding_window", "use_sliding_window",
          "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping", "no_rope_layers",
          "num_experts", "num_local_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
          "mlp_only_layers", "decoder_sparse_step", "partial_rotary_factor", "original_max_position_embeddings",
          "hidden_act", "hidden_activation")


def test_saved_directory_loads_in_transformers(family, tmp_path):
    name, hf, ours, tok, _ = family
    save_hf_model(ours, tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(back) is type(hf)
    for field in FIELDS:
        assert getattr(back.config, field, None) == getattr(hf.config, field, None), field
    assert getattr(back.config, "head_dim", None) == (getattr(hf.config, "head_dim", None)
                                                      or hf.config.hidden_size // hf.config.num_attention_heads)
    theirs, mine = hf.config.rope_parameters, back.config.rope_parameters
    nested = {"full_attention", "sliding_attention"} & set(theirs)  # (Gemma 3: one dict per layer type)
    for a, b in [(theirs[t], mine[t]) for t in nested] or [(theirs, mine)]:
        assert {k: v for k, v in b.items() if k != "type"} == {k: v for k, v in a.items() if k != "type"}
    ids = tok.encode(" ".join(TEXTS))
    assert (_logits(back, ids) - _logits(ours, ids)).abs().max().item() <= TOL
    assert torch.equal(_logits(load_hf_model(tmp_path), ids), _logits(ours, ids))


@pytest.mark.slow
def test_greedy_generation_equals_transformers(family):
    """KV cache, one prompt at a time and as a left-padded batch, 24 tokens: every sliding layer decodes well past
    its 8-position window; the same tokens as transformers' generate (its own caches, sliding ones included)."""
    name, hf, ours, tok, _ = family
    prompts = [tok.encode(t)[:12] for t in TEXTS]
    cfg = SamplingConfig(max_new_tokens=24, temperature=0)
    one_by_one = [generate_ids(ours, [p], cfg)[0] for p in prompts]
    for prompt, got in zip(prompts, one_by_one):
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=24, min_new_tokens=24, do_sample=False,
                          pad_token_id=0, eos_token_id=None)
        assert got == out[0, len(prompt):].tolist()
    assert generate_ids(ours, prompts, cfg) == one_by_one
    assert generate_ids(ours, prompts, cfg, use_cache=False) == one_by_one


@pytest.mark.slow
def test_packed_cpu_kernels(family):
    """pack_for_cpu: transformers' logits within 1e-4, step by step through the decode attention kernel (Gemma 2's
    soft-capped scores included), and the unpacked model's greedy tokens."""
    name, hf, ours, tok, _ = family
    packed = pack_for_cpu(copy.deepcopy(ours))
    assert packed.inference_only == "packed float32"
    ids = tok.encode(TEXTS[1] + TEXTS[0])
    assert (_logits(packed, ids) - _logits(hf, ids)).abs().max().item() <= TOL
    from lmforge.infer.engine import new_cache

    # step by step within Phi-3's 32 short-factor positions (past them a full forward and cached steps differ, in
    # transformers as in lmforge: the cached keys keep the short factors)
    ids = ids[:30]

    cache = new_cache(packed, 1, len(ids))
    expected = _logits(hf, ids)
    with torch.no_grad():
        packed(torch.tensor([ids[:5]]), cache=cache)
        for t in range(5, len(ids)):  # one token at a time: the decode kernel reads the cache
            step = packed.logits(packed(torch.tensor([[ids[t]]]), cache=cache))[0, -1]
            assert (step - expected[t]).abs().max().item() <= TOL, t
    prompts = [tok.encode(t)[:12] for t in TEXTS]
    cfg = SamplingConfig(max_new_tokens=16, temperature=0)
    assert generate_ids(packed, prompts, cfg) == generate_ids(ours, prompts, cfg)


@pytest.mark.slow
def test_int8_is_the_model_with_its_dequantized_weights(family):
    """quantize_int8 computes the float model with every matrix replaced by its int8 values x scales (experts and
    routers stay float), and generates batched as one by one."""
    name, _, ours, tok, _ = family
    quantized = quantize_int8(copy.deepcopy(ours))
    reference = copy.deepcopy(ours)
    with torch.no_grad():
        for module_name, module in quantized.named_modules():
            if isinstance(module, Int8Linear) and module_name != "lm_head":
                reference.get_submodule(module_name).weight.copy_(module.qweight.float() * module.scale[:, None])
        reference.lm_head = nn.Linear(ours.cfg.d_model, ours.cfg.vocab_size, bias=False)
        reference.lm_head.weight.copy_(quantized.lm_head.qweight.float() * quantized.lm_head.scale[:, None])
    ids = tok.encode(TEXTS[0] + TEXTS[1])  # > 8 rows: the dequantize-and-matmul path
    assert (_logits(quantized, ids) - _logits(reference, ids)).abs().max().item() <= TOL
    prompts = [tok.encode(t)[:12] for t in TEXTS]
    cfg = SamplingConfig(max_new_tokens=10, temperature=0)
    assert generate_ids(quantized, prompts, cfg) == [generate_ids(quantized, [p], cfg)[0] for p in prompts]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gemma2", "gemma3_text", "qwen3_moe", "phi3"])
def test_compiled_decode_equals_eager(name, tmp_path):
    """torch.compile'd decode steps (static cache): soft-capping, two RoPE bases, the MoE (its dispatch runs
    eagerly inside the compiled step), LongRoPE's switch to its long factors (past 32 positions)."""
    d = corpora.real_tokenizer(FAMILIES[name][2], tmp_path)
    _hf_model(name, len(transformers.AutoTokenizer.from_pretrained(d))).save_pretrained(d)
    model, tok = load_hf_model(d), load_tokenizer(d)
    prompts = [tok.encode(t)[:12] for t in TEXTS]
    cfg = SamplingConfig(max_new_tokens=28, temperature=0)
    assert generate_ids(model, prompts, cfg, compile=True) == generate_ids(model, prompts, cfg)


def test_sliding_layer_sees_only_its_window():
    """One sliding layer (window 4): a change in a token more than 3 positions back changes nothing, in a full
    forward and when decoding from the KV cache; a change inside the window does."""
    from lmforge.model import ModelConfig

    torch.manual_seed(0)
    model = Transformer(ModelConfig(arch="qwen3", vocab_size=100, n_layers=1, d_model=64, n_heads=4, n_kv_heads=2,
                                    d_ff=96, qk_norm=True, sliding_window=4)).eval()
    a = torch.randint(0, 100, (1, 20), generator=torch.Generator().manual_seed(1))
    b = a.clone()
    b[0, 2] = (a[0, 2] + 1) % 100
    with torch.no_grad():
        la, lb = model.logits(model(a))[0], model.logits(model(b))[0]
    assert (la[6:] - lb[6:]).abs().max() == 0 and (la[2:6] - lb[2:6]).abs().max() > 1e-3
    cfg = SamplingConfig(max_new_tokens=12, temperature=0)
    assert generate_ids(model, [a[0].tolist()], cfg) == generate_ids(model, [b[0].tolist()], cfg)
    c = a.clone()
    c[0, -2] = (a[0, -2] + 1) % 100
    with torch.no_grad():
        assert (model.logits(model(c))[0, -1] - la[-1]).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral"])
def test_moe_balancing_loss_equals_transformers(name, tmp_path):
    """Transformer.aux_loss equals transformers' load_balancing_loss_func over the same router logits (all MoE
    layers together, as its model adds it to the loss)."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    hf = _hf_model(name, 300)
    hf.save_pretrained(tmp_path)
    ours = load_hf_model(tmp_path)
    ids = torch.randint(0, 300, (3, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = hf(ids, output_router_logits=True)
        ours(ids)
    cfg = hf.config
    experts = getattr(cfg, "num_experts", None) or cfg.num_local_experts
    want = load_balancing_loss_func(out.router_logits, experts, cfg.num_experts_per_tok)
    assert ours.aux_loss().item() == pytest.approx(want.item(), rel=1e-5)
    balance = ours.router_balance()
    assert balance["router_max_load"] >= 1.0 and 0 <= balance["router_unused_experts"] < 1


@pytest.mark.parametrize("grouped_mm", [True, False])
def test_moe_grouped_dispatch_gradients_equal_a_per_token_reference(grouped_mm, monkeypatch):
    """The sorted, grouped expert GEMMs (torch's grouped_mm, or one matmul per expert where a device has none)
    give the output and every gradient of the per-token sum written out."""
    from lmforge.model import ModelConfig, transformer
    from lmforge.model.transformer import MoE

    if not grouped_mm:
        monkeypatch.setattr(transformer, "_GROUPED_MM", None)
    torch.manual_seed(0)
    moe = MoE(ModelConfig(d_model=16, n_heads=2, d_ff=24, moe_d_ff=12, n_experts=5, experts_top_k=2,
                          moe_norm_topk=False, mlp="geglu"))
    x = torch.randn(2, 9, 16, requires_grad=True)
    y = moe(x)
    (y * torch.arange(16.0)).sum().backward()
    got = [t.grad.clone() for t in (x, moe.router.weight, moe.experts.gate_up_proj, moe.experts.down_proj)]
    for t in (x, moe.router.weight, moe.experts.gate_up_proj, moe.experts.down_proj):
        t.grad = None
    rows = []
    for h in x.reshape(-1, 16):
        p = (moe.router.weight @ h).softmax(-1)
        w, e = p.topk(2)
        out = 0
        for weight, expert in zip(w, e):
            gate, up = (moe.experts.gate_up_proj[expert] @ h).chunk(2)
            out = out + weight * (moe.experts.down_proj[expert] @ (torch.nn.functional.gelu(gate, approximate="tanh")
                                                                   * up))
        rows.append(out)
    want = torch.stack(rows).view(2, 9, 16)
    assert (y - want).abs().max() < 1e-5
    (want * torch.arange(16.0)).sum().backward()
    for g, t in zip(got, (x, moe.router.weight, moe.experts.gate_up_proj, moe.experts.down_proj)):
        assert (g - t.grad).abs().max() < 1e-4 * max(1.0, t.grad.abs().max().item())


def test_moe_large_batch_without_autograd_runs_expert_by_expert_equal_to_transformers(monkeypatch):
    """A no-grad batch of at least LOOP_ROWS rows per expert runs expert by expert: the same output as
    transformers' eager Qwen3-MoE block and as the grouped dispatch autograd takes (bfloat16: within its rounding),
    the same routing counts; a smaller batch keeps the grouped dispatch."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    from lmforge.model import ModelConfig
    from lmforge.model.transformer import Experts, MoE

    torch.manual_seed(0)
    hf_cfg = transformers.Qwen3MoeConfig(hidden_size=32, num_experts=6, num_experts_per_tok=2,
                                         moe_intermediate_size=24, norm_topk_prob=True)
    hf_cfg._experts_implementation = "eager"
    theirs = Qwen3MoeSparseMoeBlock(hf_cfg)
    ours = MoE(ModelConfig(d_model=32, n_heads=2, d_ff=24, n_experts=6, experts_top_k=2, moe_norm_topk=True))
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(std=0.2)
        ours.router.weight.copy_(theirs.gate.weight)
        ours.experts.gate_up_proj.copy_(theirs.experts.gate_up_proj)
        ours.experts.down_proj.copy_(theirs.experts.down_proj)
    loops = []
    by_expert = Experts._by_expert
    monkeypatch.setattr(Experts, "_by_expert", lambda self, *a: loops.append(1) or by_expert(self, *a))
    n = Experts.LOOP_ROWS * 6 // 2  # tokens x top-k = LOOP_ROWS x experts
    x = torch.randn(1, n, 32)
    with torch.no_grad():
        want = theirs(x)
        got = ours(x)
        counts = ours.expert_counts
    assert loops == [1]
    assert (got - want).abs().max() < 1e-6
    grouped = ours(x)  # autograd on: the grouped dispatch
    assert loops == [1] and (grouped - got).abs().max() < 1e-6 and torch.equal(ours.expert_counts, counts)
    with torch.no_grad():
        ours(x[:, : n // 2])
    assert loops == [1]  # half the rows per expert: grouped
    ours.bfloat16()
    with torch.no_grad():
        low = ours(x.bfloat16())
    assert loops == [1, 1]
    assert (low.float() - ours(x.bfloat16()).float()).abs().max() <= 2 ** -7 * want.abs().max()


def _config(family: str) -> dict:
    config_cls, _, _, extra = FAMILIES[family]
    cfg = getattr(transformers, config_cls)(**{"vocab_size": 300, "hidden_size": 64, "intermediate_size": 96,
                                               "num_hidden_layers": 2, "num_attention_heads": 4,
                                               "num_key_value_heads": 2, "pad_token_id": None, **extra})
    return json.loads(cfg.to_json_string())


@pytest.mark.parametrize("family,change,field", [
    ("qwen3", {"rope_parameters": {"rope_type": "mrope", "rope_theta": 1e6}}, "rope_parameters"),
    ("phi3", {"rope_scaling": {"type": "ntk-by-parts", "factor": 2.0}}, "rope_scaling"),
    ("gemma3_text", {"layer_types": ["chunked_attention", "full_attention"]}, "layer_types"),
    ("gemma3_text", {"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ("gemma3_text", {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                         "sliding_attention": {"rope_type": "linear", "factor": 2.0,
                                                               "rope_theta": 1e4}}}, "rope_parameters.sliding"),
    ("gemma2", {"hidden_activation": "relu"}, "hidden_activation"),
    ("qwen3", {"attention_bias": True}, "attention_bias"),
    ("smollm3", {"mlp_bias": True}, "mlp_bias"),
    ("mixtral", {"router_jitter_noise": 0.1}, "router_jitter_noise"),
    ("olmo2", {"hidden_act": "gelu"}, "hidden_act"),
])
def test_unimplemented_features_fail_naming_the_field(family, change, field):
    raw = {**_config(family), **change}
    with pytest.raises(CheckpointError, match=field) as e:
        config_from_hf(raw, "m/config.json")
    assert str(e.value).startswith("m/config.json: ") and "\n" not in str(e.value)


def test_multimodal_gemma3_is_named():
    with pytest.raises(CheckpointError, match="gemma3_text"):
        config_from_hf({"model_type": "gemma3", "text_config": {}}, "m/config.json")


@pytest.mark.parametrize("name", list(FAMILIES))
def test_param_count_matches_torch(name):
    cfg = config_from_hf(_config(name))
    with torch.device("meta"):
        model = Transformer(cfg)
    assert cfg.num_params() == sum(p.numel() for p in model.parameters())


def test_gemma3_cache_at_4k_tokens_holds_the_sliding_layers_window_only():
    """Gemma-3-270m's shape (18 layers, 5 of every 6 sliding over 512 positions, 1 kv head of 256 dims): at 4,096
    tokens the cache with rings holds 3 x 4,096 + 15 x 512 positions per row instead of 18 x 4,096, 27% of the
    bytes (float32 keys and values: 2 x 4 x 256 bytes per position and layer)."""
    from lmforge.model import KVCache, preset

    cfg = preset("gemma-3-270m")
    full = KVCache(cfg, 1, 4096, device="meta").nbytes
    ring = KVCache(cfg, 1, 4096, device="meta", sliding=True).nbytes
    assert full == 2 * 4 * 256 * 18 * 4096 == 150_994_944
    assert ring == 2 * 4 * 256 * (3 * 4096 + 15 * 512) == 40_894_464
