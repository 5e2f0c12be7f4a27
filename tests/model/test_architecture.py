"""Architecture options without an HF twin, checked against independent references and hand-worked values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.infer import SamplingConfig, generate_ids
from lmforge.model import Transformer, preset
from lmforge.model.transformer import MLP, MoE, alibi_slopes


@pytest.mark.parametrize("n_heads", [8, 12, 16, 20])
def test_alibi_slopes_match_bloom(n_heads):
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    mask = torch.ones(1, 5)
    bloom = build_alibi_tensor(mask, n_heads, torch.float32)  # (heads, 1, 5): slope * position
    assert torch.allclose(bloom[:, 0, 1], alibi_slopes(n_heads))
    if n_heads == 8:
        assert alibi_slopes(8).tolist() == [2.0 ** -(i + 1) for i in range(8)]  # the paper's example


def test_alibi_attention_equals_explicit_softmax():
    torch.manual_seed(0)
    cfg = preset("tiny-llama", pos="alibi", vocab_size=100, n_kv_heads=4, n_layers=1)
    model = Transformer(cfg).eval()
    ids = torch.randint(0, 100, (2, 9))
    attn = model.layers[0].attn
    x = model.layers[0].attn_norm(model.embed(ids))
    B, T, _ = x.shape
    q, k, v = (t.view(B, T, cfg.n_heads, cfg.head_dim).transpose(1, 2) for t in attn.qkv_proj(x).chunk(3, dim=-1))
    scores = q @ k.transpose(-1, -2) / math.sqrt(cfg.head_dim)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    scores = scores - alibi_slopes(cfg.n_heads)[:, None, None] * (i - j)
    scores = scores.masked_fill(j > i, float("-inf"))
    y = attn.o_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, -1))
    expected = model.embed(ids) + y
    h = expected + model.layers[0].mlp(model.layers[0].mlp_norm(expected))
    with torch.no_grad():
        assert torch.allclose(model.logits(model(ids)), F.linear(model.norm(h), model.output_weight()), atol=1e-5)


def test_alibi_generation_cache_equals_no_cache():
    torch.manual_seed(0)
    model = Transformer(preset("tiny-llama", pos="alibi", vocab_size=100)).eval()
    cfg = SamplingConfig(max_new_tokens=10, temperature=0)
    prompts = [[1, 2, 3, 4, 5], [9, 8]]
    assert generate_ids(model, prompts, cfg) == generate_ids(model, prompts, cfg, use_cache=False)
    assert generate_ids(model, prompts, cfg) == [generate_ids(model, [p], cfg)[0] for p in prompts]


def _expert(moe: MoE, e: int) -> MLP:
    """Expert e of the stacked expert weights as a plain MLP (nn.Linear layers)."""
    mlp = MLP(moe.cfg, d_ff=moe.experts.down_proj.shape[2])
    with torch.no_grad():
        mlp.gate_up_proj.weight.copy_(moe.experts.gate_up_proj[e])
        mlp.down_proj.weight.copy_(moe.experts.down_proj[e])
    return mlp


def test_moe_with_one_expert_is_the_dense_mlp():
    torch.manual_seed(0)
    cfg = preset("tiny-llama", n_experts=1, experts_top_k=1)
    moe, dense = MoE(cfg), MLP(cfg)
    dense.load_state_dict(_expert(moe, 0).state_dict())
    x = torch.randn(2, 5, cfg.d_model)
    assert torch.allclose(moe(x), dense(x), atol=1e-6)
    assert moe.aux_loss.item() == pytest.approx(1.0)  # one expert: f = P = 1


def test_moe_equals_per_token_reference():
    torch.manual_seed(0)
    cfg = preset("tiny-llama", n_experts=4, experts_top_k=2)
    moe = MoE(cfg)
    x = torch.randn(3, 7, cfg.d_model)
    got = moe(x).reshape(-1, cfg.d_model)
    for t, h in enumerate(x.reshape(-1, cfg.d_model)):  # one token at a time, written out
        p = (moe.router.weight @ h).softmax(-1)
        w, e = p.topk(2)
        w = w / w.sum()
        expected = sum(w[i] * _expert(moe, int(e[i]))(h) for i in range(2))
        assert torch.allclose(got[t], expected, atol=1e-5)


def test_moe_aux_loss_hand_worked():
    cfg = preset("tiny-llama", n_experts=2, experts_top_k=1)
    moe = MoE(cfg)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0, 0] = 100.0  # every token with x[0] > 0 goes to expert 0 with probability ~1
    x = torch.zeros(4, cfg.d_model)
    x[:, 0] = torch.tensor([1.0, 1.0, 1.0, -1.0])  # 3 tokens -> expert 0, 1 token -> expert 1
    moe(x[None])
    # f = (3/4, 1/4); P ~ (3/4, 1/4) as probabilities are ~one-hot: loss = 2 * (9/16 + 1/16) = 1.25
    assert moe.aux_loss.item() == pytest.approx(1.25, abs=1e-4)


def test_moe_model_trains_and_reports_aux_loss():
    torch.manual_seed(0)
    cfg = preset("tiny-llama", vocab_size=50, n_experts=4, experts_top_k=2)
    model = Transformer(cfg)
    assert cfg.num_params() == sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, 50, (4, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        logits = model.logits(model(ids[:, :-1]))
        loss = F.cross_entropy(logits.reshape(-1, 50), ids[:, 1:].reshape(-1)) + 0.01 * model.aux_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    model.zero_grad()
    model(ids[:, :-1])
    aux = model.aux_loss()
    assert torch.isfinite(aux) and aux.item() > 0
    aux.backward()  # the balancing loss reaches the routers (through P_e)
    assert all(layer.mlp.router.weight.grad.abs().sum() > 0 for layer in model.layers)


@pytest.mark.parametrize("name,overrides", [("tiny-llama", {}), ("tiny-gpt2", {}), ("tiny-mistral", {"sliding_window": 4}),
                                            ("tiny-llama", {"pos": "alibi"})])
def test_packed_sequences_give_the_loss_of_separate_sequences(name, overrides):
    """Three sequences packed in one row with segment ids: the logits and the loss of each one alone."""
    torch.manual_seed(0)
    model = Transformer(preset(name, **overrides)).eval()
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 500, (n,), generator=g) for n in (5, 9, 7)]
    packed = torch.cat(seqs)[None]
    segments = torch.cat([torch.full((len(s),), i) for i, s in enumerate(seqs)])[None]
    with torch.no_grad():
        together = model.logits(model(packed, segment_ids=segments))[0]
        alone = torch.cat([model.logits(model(s[None]))[0] for s in seqs])
    assert (together - alone).abs().max() < 1e-5
    # the loss a packed SFT batch computes: next-token targets that never cross a boundary
    targets = torch.cat([torch.cat([s[1:], torch.tensor([-100])]) for s in seqs])
    packed_loss = torch.nn.functional.cross_entropy(together, targets, ignore_index=-100)
    separate = sum(torch.nn.functional.cross_entropy(model.logits(model(s[None]))[0, :-1], s[1:], reduction="sum") for s in seqs)
    assert packed_loss.item() == pytest.approx(separate.item() / (sum(len(s) for s in seqs) - 3), rel=1e-5)
    # hidden states are the final-norm activations the head reads
    with torch.no_grad():
        hidden = model(packed, segment_ids=segments)
    assert hidden.shape == (1, packed.shape[1], model.cfg.d_model)
    assert (torch.nn.functional.linear(hidden, model.output_weight())[0] - together).abs().max() < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_cross_entropy_equals_logits_then_cross_entropy(dtype):
    """The chunked head + loss (no logits tensor kept) gives F.cross_entropy's value and gradients, ignored targets
    included, whatever the chunk size (1 row, uneven, all rows at once)."""
    from lmforge.model.transformer import linear_cross_entropy

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=g).to(dtype).requires_grad_()
    weight = torch.randn(300, 16, generator=g).to(dtype).requires_grad_()
    targets = torch.randint(0, 300, (37,), generator=g)
    targets[::5] = -100
    want = F.cross_entropy((hidden @ weight.t()).float(), targets)
    (want * 3).backward()
    gh, gw = hidden.grad.clone(), weight.grad.clone()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for rows in (1, 10, 37):
        hidden.grad = weight.grad = None
        got = linear_cross_entropy(hidden, weight, targets, chunk_bytes=4 * 300 * rows)
        (got * 3).backward()
        assert abs(got.item() - want.item()) < tol
        assert (hidden.grad - gh).abs().max() <= tol * gh.abs().max()
        assert (weight.grad - gw).abs().max() <= tol * gw.abs().max()
    with torch.no_grad():  # evaluation: the loss alone
        assert abs(linear_cross_entropy(hidden, weight, targets).item() - want.item()) < tol


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_model_loss_with_targets_equals_the_logits_path(name):
    """`model.loss(hidden, targets, mask)` (what CausalLM trains with) equals cross entropy of the model's logits,
    with and without a mask, in value and in every parameter's gradient, tied or untied head."""
    from lmforge.train.objectives import CausalLM

    torch.manual_seed(0)
    model = Transformer(preset(name)).train()
    ids = torch.randint(0, 500, (2, 12), generator=torch.Generator().manual_seed(3))
    labels = ids.roll(-1, 1)
    labels[0, :5] = -100
    for lab in (labels, ids.roll(-1, 1)):
        model.zero_grad()
        loss, _ = CausalLM().loss(model, {"input_ids": ids, "labels": lab})
        loss.backward()
        got = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        ref = F.cross_entropy(model.logits(model(ids)).reshape(-1, model.cfg.vocab_size), lab.reshape(-1))
        ref.backward()
        assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
        for n, p in model.named_parameters():
            assert (got[n] - p.grad).abs().max() <= 1e-5 * max(p.grad.abs().max().item(), 1e-3), n
