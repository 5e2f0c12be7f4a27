"""Float32 CPU kernels: packed matmul equals F.linear for every row count, decode attention equals SDPA,
checkpoints' logits (full and step by step) match transformers, generation intact."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.infer import SamplingConfig, generate_ids
from lmforge.model import (
    CheckpointError,
    ModelConfig,
    PackedLinear,
    Transformer,
    load_hf_model,
    pack_for_cpu,
    preset,
    save_hf_model,
)
from lmforge.model.packed import PackedEmbedding, kernel_available, kernel_error
from lmforge.model.transformer import Attention, KVCache
from tests.model.test_hf_interop import TOL, _hf_tiny, _ids, _save


def test_kernel_builds():
    # CI and every supported machine have a C++ compiler; a failed build would silently cost the speed-up
    assert kernel_available(), kernel_error()


@pytest.fixture(autouse=True)
def _kernels_loaded():
    """The torch.ops.lmforge calls below need the extension loaded, whichever test runs first."""
    kernel_available()


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


@pytest.mark.parametrize("out_f,in_f", [(70, 33), (960, 576), (1, 5)])
def test_packed_int8_linear_equals_the_dequantized_matmul(out_f, in_f):
    """int8 panels: y = (x @ q.T) * scale + b with lmforge's int8 integers and row scales, float32 throughout, for
    the one-row loop, the 2-8 row blocks and longer inputs (prefill)."""
    from lmforge.model import Int8Linear, PackedInt8Linear

    torch.manual_seed(0)
    linear = nn.Linear(in_f, out_f)
    for bias in (linear.bias, None):
        int8 = Int8Linear(linear.weight, bias)
        packed = PackedInt8Linear(int8)
        for rows in (*range(1, 11), 17, 64):
            x = torch.randn(rows, in_f)
            want = F.linear(x, int8.qweight.float()) * int8.scale + (0 if bias is None else bias)
            assert torch.allclose(packed(x), want, rtol=1e-5, atol=1e-5), rows
    with pytest.raises(RuntimeError, match="scales"):
        torch.ops.lmforge.packed_linear(torch.randn(1, in_f), packed.panels, None, out_f)


def test_kernel_names_bad_shapes():
    packed = PackedLinear(torch.randn(40, 16))
    with pytest.raises(RuntimeError, match="do not fit"):
        torch.ops.lmforge.packed_linear(torch.randn(3, 17), packed.panels, None, 40)
    with pytest.raises(RuntimeError, match="out_features"):
        torch.ops.lmforge.packed_linear(torch.randn(3, 16), packed.panels, None, 90)


@pytest.mark.parametrize("shape", [(1, 1, 576), (3, 37, 100), (2, 7)])
def test_norm_kernels_equal_torch(shape):
    """rms_norm and add_rms_norm (the residual add fused in) against torch's RMSNorm as the model computes it:
    Llama's w x normed and Gemma's normed x (1 + w); vectorised widths and a scalar tail; float32 rounding only."""
    from lmforge.model.transformer import RMSNorm

    torch.manual_seed(0)
    D = shape[-1]
    x, branch = torch.randn(shape) * 3, torch.randn(shape)
    for offset in (0.0, 1.0):
        norm = RMSNorm(D, 1e-6, offset=offset)
        nn.init.normal_(norm.weight)
        with torch.no_grad():
            want = norm(x)  # torch's ops (the kernel flag is off)
            got = torch.ops.lmforge.rms_norm(x, norm.weight, norm.eps, offset)
            total, normed = torch.ops.lmforge.add_rms_norm(x, branch, norm.weight, norm.eps, offset)
            assert got.shape == x.shape and torch.allclose(got, want, rtol=1e-5, atol=1e-5)
            assert torch.equal(total, x + branch)
            assert torch.allclose(normed, norm(x + branch), rtol=1e-5, atol=1e-5)
            strided = torch.randn(D, *shape[:-1]).movedim(0, -1)  # the module's kernel path on a strided input
            want = norm(strided)
            norm.kernel = True
            assert torch.allclose(norm(strided), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("width", [3072, 38, 6])
def test_gated_activation_kernel_equals_torch(width):
    """SwiGLU's silu(gate) x up and GeGLU's tanh-GELU(gate) x up over [gate | up] rows, against torch's ops; values
    from -12 to 12 (both tails of the sigmoid)."""
    from lmforge.model.transformer import _gated

    torch.manual_seed(0)
    x = torch.randn(5, width) * 4
    for geglu in (False, True):
        want = _gated(x, geglu)
        got = torch.ops.lmforge.gated(x, geglu)
        assert got.shape == want.shape
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item()), geglu


@pytest.mark.parametrize("rotary", [16, 8])
def test_rope_kernel_equals_apply_rope(rotary):
    """RoPE in place on the q and k heads of a fused projection's rows, v untouched; whole and partial rotary
    (Phi-4-mini rotates the first dims only); cos / sin broadcast over the batch."""
    from lmforge.model.transformer import apply_rope

    torch.manual_seed(0)
    B, T, H, Hkv, D = 2, 5, 4, 2, 16
    qkv = torch.randn(B, T, (H + 2 * Hkv) * D)
    cos, sin = torch.randn(1, T, rotary), torch.randn(1, T, rotary)
    want = apply_rope(qkv[..., :(H + Hkv) * D].view(B, T, H + Hkv, D), cos.unsqueeze(2), sin.unsqueeze(2))
    got = qkv.clone()
    torch.ops.lmforge.rope_(got, cos, sin, H + Hkv, D)
    assert torch.allclose(got[..., :(H + Hkv) * D].view(B, T, H + Hkv, D), want, atol=1e-6)
    assert torch.equal(got[..., (H + Hkv) * D:], qkv[..., (H + Hkv) * D:])
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.lmforge.rope_(qkv.transpose(0, 1), cos, sin, H + Hkv, D)


def test_pack_for_cpu_turns_on_the_small_op_kernels():
    from lmforge.model.transformer import MLP, RMSNorm

    model = pack_for_cpu(Transformer(preset("tiny-llama")).eval())
    assert all(m.kernel for m in model.modules() if isinstance(m, (MLP, RMSNorm)))
    assert not any(m.kernel for m in Transformer(preset("tiny-llama")).modules() if isinstance(m, (MLP, RMSNorm)))


@pytest.mark.parametrize("B,H,Hkv,D", [(2, 4, 4, 64), (3, 9, 3, 64), (1, 8, 2, 128), (2, 6, 3, 32), (2, 4, 2, 24),
                                        (1, 2, 1, 16), (2, 4, 1, 256)])
def test_decode_attention_equals_sdpa(B, H, Hkv, D):
    """Vectorised head sizes (32, 64, 128) and the plain loop (others); multi-head and grouped-query; a
    strided q (as sliced from the fused projection); n filled slots given as a tensor or as k's length."""
    torch.manual_seed(0)
    S = 70
    q = torch.randn(B, 1, H + 3, D).transpose(1, 2)[:, :H]  # not contiguous
    k, v = torch.randn(B, Hkv, S, D), torch.randn(B, Hkv, S, D)
    for n in (1, 15, 16, 17, 70):
        mask = torch.rand(B, S) > 0.4
        mask[:, n - 1] = True  # a query always sees its own slot
        for m in (None, mask, mask[:1].expand(B, S)):
            got = torch.ops.lmforge.decode_attention(q, k, v, m, torch.tensor(n), D ** -0.5)
            want = F.scaled_dot_product_attention(q, k[:, :, :n], v[:, :, :n], enable_gqa=True,
                                                  attn_mask=None if m is None else m[:, None, None, :n])
            assert (got - want).abs().max().item() <= 1e-5, (n, m is None)
        got = torch.ops.lmforge.decode_attention(q, k[:, :, :n], v[:, :, :n], None, None, 0.3)  # a view of the cache
        assert (got - F.scaled_dot_product_attention(q, k[:, :, :n], v[:, :, :n], scale=0.3, enable_gqa=True)).abs().max() <= 1e-5


@pytest.mark.parametrize("D", [64, 24])
def test_decode_attention_soft_caps_scores_as_gemma_2(D):
    """softcap c: scores become c * tanh(scores / c) before the softmax (the vectorised and the plain loop)."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 1, D) * 3, torch.randn(2, 2, 40, D) * 3, torch.randn(2, 2, 40, D)
    mask = torch.rand(2, 40) > 0.3
    mask[:, -1] = True
    scores = q @ k.repeat_interleave(2, dim=1).transpose(-1, -2) * D ** -0.5
    capped = (torch.tanh(scores / 5.0) * 5.0).masked_fill(~mask[:, None, None], float("-inf"))
    want = capped.softmax(-1) @ v.repeat_interleave(2, dim=1)
    got = torch.ops.lmforge.decode_attention(q, k, v, mask, None, D ** -0.5, 5.0)
    assert (got - want).abs().max().item() <= 1e-5
    assert (got - torch.ops.lmforge.decode_attention(q, k, v, mask, None, D ** -0.5, 0.0)).abs().max() > 1e-3


@pytest.mark.parametrize("H,Hkv,D", [(4, 1, 64), (2, 2, 24)])
def test_decode_attention_long_cache_split_across_threads(H, Hkv, D):
    """One sequence, few kv heads, a long cache: the keys are split into chunks that are merged afterwards
    (any thread count splits 1000 keys of a single unit); one chunk's keys all masked weighs nothing."""
    torch.manual_seed(0)
    q, k, v = torch.randn(1, H, 1, D), torch.randn(1, Hkv, 1024, D) * 3, torch.randn(1, Hkv, 1024, D)
    mask = torch.rand(1, 1024) > 0.5
    mask[:, :400] = False
    for n, m in ((1000, None), (1000, mask), (600, mask)):
        got = torch.ops.lmforge.decode_attention(q, k, v, m, torch.tensor(n), D ** -0.5)
        want = F.scaled_dot_product_attention(q, k[:, :, :n], v[:, :, :n], enable_gqa=True,
                                              attn_mask=None if m is None else m[:, None, None, :n])
        assert (got - want).abs().max().item() <= 1e-5, n


def test_decode_attention_edges_and_errors():
    q, k = torch.randn(2, 4, 1, 64), torch.randn(2, 2, 10, 64)
    none_allowed = torch.zeros(2, 10, dtype=torch.bool)
    none_allowed[1, 3] = True
    out = torch.ops.lmforge.decode_attention(q, k, k, none_allowed, None, 0.125)
    assert torch.equal(out[0], torch.zeros_like(out[0]))  # a row that sees no key gives zeros (SDPA: NaN)
    assert torch.allclose(out[1], k[1, :, 3:4].repeat_interleave(2, 0), atol=1e-6)  # one key: its value
    with pytest.raises(RuntimeError, match="filled slots"):
        torch.ops.lmforge.decode_attention(q, k, k, None, torch.tensor(11), 0.125)
    with pytest.raises(RuntimeError, match="multiple of Hkv"):
        torch.ops.lmforge.decode_attention(torch.randn(2, 3, 1, 64), k, k, None, None, 0.125)
    with pytest.raises(RuntimeError, match="mask must be bool"):
        torch.ops.lmforge.decode_attention(q, k, k, torch.ones(2, 10), None, 0.125)
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.lmforge.decode_attention(q.bfloat16(), k, k, None, None, 0.125)


@pytest.mark.parametrize("kind,extra", [("llama", {"hidden_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1}),
                                        ("mistral", {}), ("gpt2", {}), ("qwen2", {})])
def test_packed_decode_steps_match_transformers(tmp_path, kind, extra):
    """Token by token through the KV cache (decode attention): head size 64, a sliding window shorter than the
    context (Mistral's 8), learned positions, q/k/v biases (Qwen2, through the fused layer step as Llama); each
    step's logits against transformers' full forward."""
    hf = _save(_hf_tiny(kind, **extra), tmp_path)
    ours = pack_for_cpu(load_hf_model(tmp_path))
    assert all(m.decode_kernel for m in ours.modules() if isinstance(m, Attention))
    ids = _ids()
    cache = KVCache(ours.cfg, ids.shape[0], ids.shape[1])
    with torch.no_grad():
        want = hf(ids).logits
        ours(ids[:, :28], cache=cache)
        for t in range(28, ids.shape[1]):
            assert (ours.logits(ours(ids[:, t:t + 1], cache=cache)[:, -1]) - want[:, t]).abs().max().item() <= TOL, t


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
        assert (ours.logits(ours(ids)) - hf(ids).logits).abs().max().item() <= TOL
        assert (ours.logits(ours(ids[:, :1])) - hf(ids[:, :1]).logits).abs().max().item() <= TOL  # 2 rows: the decode shape
    with pytest.raises(CheckpointError, match="inference-only"):
        save_hf_model(ours, tmp_path / "out")


@pytest.mark.parametrize("fields", [dict(qkv_bias=True), dict(no_rope_layers=(1,), mlp="geglu", norm_offset=1.0),
                                    dict(attn_softcap=20.0, n_kv_heads=4), dict(qk_norm=True),
                                    dict(qkv_bias=True, int8=True), dict(sliding_window=10),
                                    # Gemma 3: sandwich norms with 1 + w, q/k norms per head, GeGLU, a window
                                    dict(norm_placement="sandwich", norm_offset=1.0, qk_norm=True, mlp="geglu",
                                         sliding_window=12, attn_scale=0.3),
                                    # Gemma 2: sandwich norms, soft-capped scores
                                    dict(norm_placement="sandwich", norm_offset=1.0, attn_softcap=30.0),
                                    # OLMo 2: norms after the branches, q/k norms over the whole projection
                                    dict(norm_placement="post", qk_norm=True, qk_norm_scope="projection"),
                                    # windows of 5 kept as rings (a server's cache): every layer, or Gemma 3's mix
                                    dict(sliding_window=5, ring=True),
                                    dict(norm_placement="sandwich", norm_offset=1.0, qk_norm=True, sliding_window=5,
                                         layer_types=("sliding_attention", "full_attention", "sliding_attention"),
                                         ring=True)])
def test_fused_decode_layers_equal_the_module_path(fields):
    """A one-token step runs each pre-norm layer as one `decode_layer` call: the same kernels in the same order as
    the modules, so its logits and KV cache equal the module path's bit for bit; here with q/k/v biases (Qwen2), a
    NoPE layer, GeGLU and Gemma's 1 + w norm scale, soft-capped scores, GQA, a left-padded batch, Gemma 2 / 3's
    sandwich norms (each branch's output normed before it joins the stream), OLMo 2's norms after the branches
    with q/k norms over the projection; a sliding
    window of 10 runs fused while it holds every key (8 to 10 here) and through the modules once it masks (11 on);
    windows kept as rings (each row writing its position's slot) run fused throughout.
    With per-head q/k norms (Qwen3, Gemma 3) the module path rotates q and k with torch's ops instead of the RoPE
    kernel: equal to float32 rounding (1e-5 relative)."""
    from lmforge.model import PackedInt8Linear, quantize_int8

    torch.manual_seed(0)
    fields = dict(fields)
    int8 = fields.pop("int8", False)  # int8 weights as int8 panels (`--quantize int8` at float32)
    ring = fields.pop("ring", False)  # sliding layers' caches as rings of their window's slots
    cfg = ModelConfig(**{"d_model": 64, "n_layers": 3, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 300, "d_ff": 96,
                         **fields})
    model = pack_for_cpu(quantize_int8(Transformer(cfg)) if int8 else Transformer(cfg))
    assert any(isinstance(m, PackedInt8Linear) for m in model.modules()) == int8
    ids = torch.randint(0, 300, (2, 7))
    mask = torch.ones(2, 13, dtype=torch.long)
    mask[0, :3] = 0  # row 0 is left-padded

    calls = []
    decode_fused = model._decode_fused
    model._decode_fused = lambda *a: calls.append(a[4].length) or decode_fused(*a)

    def steps(fused: bool):
        model.fused_decode = fused
        cache, out = KVCache(model.cfg, 2, 16, sliding=ring), []
        with torch.no_grad():
            model(ids, attention_mask=mask[:, :7], cache=cache)
            token = ids[:, -1:]
            for t in range(6):
                out.append(model.logits(model(token, attention_mask=mask[:, :8 + t], cache=cache)[:, -1]))
                token = out[-1].argmax(-1, keepdim=True)
        return torch.stack(out), cache

    (fused, fused_cache), (modules, module_cache) = steps(True), steps(False)
    # the fused path ran: every step, or with a window while it held every key (window 10: 7, 8, 9 keys before the
    # step)
    assert calls == [n for n in range(7, 13) if cfg.sliding_window is None or cfg.sliding_window > n or ring]
    assert fused_cache.has_rings == ring
    pairs = [(fused, modules), *zip(fused_cache.k + fused_cache.v, module_cache.k + module_cache.v)]
    if fields.get("qk_norm"):
        assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in pairs)
    else:
        assert all(torch.equal(a, b) for a, b in pairs)


def test_fused_decode_only_where_every_layer_is_the_plain_kind():
    """A layer whose norms differ in eps, MoE, LayerNorm (GPT-2), sliding windows that mask, or an unpacked model
    take the module path; Qwen3's per-head q/k norms, Gemma's sandwich norms and OLMo 2's norms after the branches
    with q/k norms over the projection are fused."""
    small = dict(d_model=64, n_layers=2, n_heads=4, vocab_size=50)
    for cfg, fused in ((preset("tiny-llama"), True), (ModelConfig(**small, qk_norm=True), True),
                       (ModelConfig(**small, qk_norm=True, qk_norm_scope="projection", norm_placement="post"), True),
                       (preset("tiny-gpt2"), False),
                       (ModelConfig(**small, norm_placement="sandwich"), True),
                       (ModelConfig(**small, n_experts=4, experts_top_k=2), False)):
        model = pack_for_cpu(Transformer(cfg))
        assert (model._fused_decode_plan() is not None) is fused, cfg
    model = pack_for_cpu(Transformer(ModelConfig(**small, norm_placement="sandwich")))
    model.layers[1].post_mlp_norm.eps = 1e-3  # one eps per layer is what the call takes
    assert model._fused_decode_plan() is None
    assert Transformer(preset("tiny-llama"))._fused_decode_plan() is None  # not packed
    # a sliding window shorter than the cache: the module path slices the cache for it, the plan is not asked for
    model = pack_for_cpu(Transformer(ModelConfig(d_model=64, n_layers=2, n_heads=4, vocab_size=50, sliding_window=4)))
    cache = KVCache(model.cfg, 1, 12)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3, 4, 5, 6]]), cache=cache)
        model(torch.tensor([[7]]), cache=cache)
    assert "_fused_plan" not in model.__dict__  # the plan was not even asked for


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


def test_a_build_lock_left_by_a_killed_build_does_not_hang_the_next_one(tmp_path):
    """torch's cpp_extension guards a build with a `lock` file; a build killed mid-way (Ctrl-C on the first run)
    leaves it, and torch alone then waits on it forever in every later process. A copy of this machine's built
    kernels with such a lock in place must still load, in seconds."""
    import hashlib
    import shutil
    import subprocess
    import sys

    from torch.utils import cpp_extension

    from lmforge.model import packed

    assert kernel_available(), kernel_error()
    name = f"lmforge_cpu_kernels_{hashlib.sha256(packed._SOURCE.read_bytes()).hexdigest()[:12]}"
    built = Path(cpp_extension._get_build_directory(name, verbose=False))
    root = tmp_path / "torch_extensions"
    copy = root / name  # with TORCH_EXTENSIONS_DIR set, torch builds in <it>/<name>
    shutil.copytree(built, copy, ignore=shutil.ignore_patterns("lock", "*.flock"))
    (copy / "lock").write_text("")
    code = "from lmforge.model.packed import kernel_available, kernel_error; assert kernel_available(), kernel_error()"
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(root)}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not (copy / "lock").exists()
