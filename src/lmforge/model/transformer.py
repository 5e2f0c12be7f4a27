"""The decoder: one transformer whose family (GPT-2, Llama, Qwen2/3, Mistral, Gemma 2/3, Phi-3, SmolLM3, OLMo 2,
Mixtral, Qwen3-MoE) comes from ModelConfig.

Reads top to bottom: norms, rotary embeddings, KV cache, attention, MLP and mixture of experts, block, model.
Numerics follow the reference implementations (HF transformers) so that published checkpoints
give the same logits: RMSNorm in float32 (Gemma's 1 + w too), rotate-half RoPE, GPT-2's tanh GELU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.model.config import ModelConfig

# grouped-query attention inside SDPA needs torch 2.5; older versions repeat K/V heads instead
_SDPA_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)


class LinearCrossEntropy(torch.autograd.Function):
    """Mean cross entropy of `hidden @ weight.T` against `targets`, without the (N, vocab) logits in memory.

    The logits are built a chunk of rows at a time, and each chunk's gradient (softmax - one-hot) is turned into the
    gradients for `hidden` and `weight` at once, in the forward pass, as Liger Kernel's fused linear cross entropy
    does. Backward only scales them. Against logits + F.cross_entropy this keeps ~chunk x vocab floats instead of
    three (N, vocab) tensors (logits, log-softmax, their gradient: 1.2 GB at 2,048 tokens x 49,152 ids) and runs the
    same two matmuls. Targets of -100 are ignored, as F.cross_entropy's default does.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                chunk: int) -> torch.Tensor:
        keep = targets != -100
        n = int(keep.sum())
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for s in range(0, hidden.shape[0], chunk):
            h, t = hidden[s:s + chunk], targets[s:s + chunk]
            k = t != -100
            logits = (h @ weight.t()).float()
            rows = torch.arange(len(t), device=t.device)
            safe = t.clamp(min=0)
            top = logits.amax(dim=-1, keepdim=True)
            picked = logits[rows, safe] - top[:, 0]
            g = logits.sub_(top).exp_()  # in place of the logits: exp(z - max), then the softmax
            norm = g.sum(dim=-1, keepdim=True)
            total += ((norm[:, 0].log() - picked) * k).sum()
            if need_h or need_w:
                g.div_(norm)
                g[rows, safe] -= 1.0
                g.mul_((k.float() / max(n, 1))[:, None])  # d(mean loss) / d(logits); ignored rows give nothing
                if need_h:
                    grad_h[s:s + chunk] = (g.to(weight.dtype) @ weight).to(hidden.dtype)
                if need_w:
                    grad_w.addmm_(g.t(), h.float())
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total / max(n, 1)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        return (None if grad_h is None else grad_h * grad_out.to(grad_h.dtype),
                None if grad_w is None else (grad_w * grad_out).to(ctx.weight_dtype), None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_bytes: int = 64 * 2**20) -> torch.Tensor:
    """Mean cross entropy of `hidden` (N, d) through the output matrix `weight` (vocab, d) against `targets` (N,):
    F.cross_entropy(hidden @ weight.T, targets) in chunks of about `chunk_bytes` of float32 logits."""
    chunk = max(1, chunk_bytes // (4 * weight.shape[0]))
    return LinearCrossEntropy.apply(hidden, weight, targets, chunk)


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019), computed in float32 as Llama does.

    `offset`: the scale is offset + w (Gemma's 1 + w, its weights stored around 0). `scale_float32`: the scale
    multiplies in float32 before the cast back to x's dtype (Gemma, OLMo 2), where Llama casts first."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0, scale_float32: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim))
        self.eps, self.offset, self.scale_float32 = eps, offset, scale_float32
        # pack_for_cpu: float32 inference through lmforge's one-pass kernel (model/cpu_kernels.cpp) instead of the
        # ~12 torch ops eager RMSNorm dispatches; torch.compile traces the torch ops and fuses them itself
        self.kernel = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel and x.dtype == torch.float32 and not torch.compiler.is_compiling():
            return torch.ops.lmforge.rms_norm(x, self.weight, self.eps, self.offset)
        normed = F.rms_norm(x.float(), self.weight.shape, eps=self.eps)
        if self.offset or self.scale_float32:
            return (normed * (self.weight.float() + self.offset)).to(x.dtype)
        return self.weight * normed.to(x.dtype)


def add_norm(x: torch.Tensor, branch: torch.Tensor, norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """A residual branch's output added to the stream, and the stream's next norm: (x + branch, norm(x + branch)),
    in one kernel where the norm has it (RMSNorm after pack_for_cpu)."""
    if getattr(norm, "kernel", False) and x.dtype == torch.float32 and not torch.compiler.is_compiling():
        return torch.ops.lmforge.add_rms_norm(x, branch, norm.weight, norm.eps, norm.offset)
    x = x + branch
    return x, norm(x)


def make_norm(cfg: ModelConfig, dim: int | None = None) -> nn.Module:
    dim = dim or cfg.d_model
    if cfg.norm == "layernorm":
        return nn.LayerNorm(dim, eps=cfg.norm_eps)
    return RMSNorm(dim, cfg.norm_eps, cfg.norm_offset, cfg.norm_scale_float32)


ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "longrope")


def rope_frequencies(cfg: ModelConfig, seq_len: int | None = None, local: bool = False) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and attention scale for RoPE (Su et al. 2021) and its scaled variants, over the
    rotated dims (cfg.rotary_dim). `local`: the sliding-window layers' RoPE (base rope_local_theta, unscaled).

    linear: position interpolation (Chen et al. 2023); dynamic: NTK-aware base growth once the
    sequence passes max_seq_len; yarn (Peng et al. 2023); llama3: wavelength-dependent smoothing;
    longrope (Phi-3's "su"; Ding et al. 2024): per-frequency factors, the long set once the sequence
    passes original_max_position_embeddings. Formulas as in transformers' modeling_rope_utils, so checkpoints match.
    """
    dim = cfg.rotary_dim
    base = cfg.rope_local_theta if local else cfg.rope_theta
    s = {} if local else dict(cfg.rope_scaling or {})
    kind = s.get("rope_type", s.get("type", "default"))
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    inv_freq = 1.0 / (base ** exponents)
    scale = 1.0
    if kind in ("default", None):
        pass
    elif kind == "linear":
        inv_freq = inv_freq / s["factor"]
    elif kind == "dynamic":
        factor, max_len = s["factor"], s.get("original_max_position_embeddings", cfg.max_seq_len)
        if seq_len is not None and seq_len > max_len:
            base = base * ((factor * seq_len / max_len) - (factor - 1)) ** (dim / (dim - 2))
            inv_freq = 1.0 / (base ** exponents)
    elif kind == "yarn":
        factor = s["factor"]
        orig = s.get("original_max_position_embeddings") or cfg.max_seq_len
        beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

        def correction_dim(rotations: float) -> float:
            return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if s.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
        extrapolation = 1 - ramp
        inv_freq = (inv_freq / factor) * (1 - extrapolation) + inv_freq * extrapolation
        attention_factor = s.get("attention_factor")
        if attention_factor is None:
            mscale, mscale_all = s.get("mscale"), s.get("mscale_all_dim")

            def get_mscale(sc: float, m: float = 1.0) -> float:
                return 1.0 if sc <= 1 else 0.1 * m * math.log(sc) + 1.0

            attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all) if mscale and mscale_all \
                else get_mscale(factor)
        scale = float(attention_factor)
    elif kind == "llama3":
        factor, low_f, high_f = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_len = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low_f, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low_f) / (high_f - low_f)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high_f) * ~(wavelen > old_len / low_f)
        inv_freq = torch.where(medium, smoothed, scaled)
    elif kind == "longrope":
        orig = s["original_max_position_embeddings"]
        # without a stated factor, the context's growth over the original (Phi-3 states none)
        factor = s.get("factor") or cfg.max_seq_len / orig
        long = seq_len is not None and seq_len > orig
        inv_freq = 1.0 / (torch.tensor(s["long_factor" if long else "short_factor"], dtype=torch.float32)
                          * base ** exponents)
        attention_factor = s.get("attention_factor")
        if attention_factor is None:
            attention_factor = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(orig))
        scale = float(attention_factor)
    else:
        raise ValueError(f"unsupported rope_scaling type '{kind}' (supported: {', '.join(ROPE_TYPES[1:])})")
    return inv_freq, scale


class Rotary(nn.Module):
    """cos and sin of each position for RoPE; `local` is the sliding layers' own RoPE (Gemma 3)."""

    def __init__(self, cfg: ModelConfig, local: bool = False):
        super().__init__()
        self.cfg, self.local = cfg, local
        # a plain tensor, not a buffer: model.to(bfloat16) must not round the frequencies (the reference keeps fp32)
        self.inv_freq, self.scale = rope_frequencies(cfg, local=local)
        scaling = {} if local else cfg.rope_scaling or {}
        kind = scaling.get("rope_type", scaling.get("type"))
        self.dynamic = kind == "dynamic"
        # LongRoPE switches to its long factors for every position once a forward's positions pass the original
        # context (as transformers does); both sets are kept so a compiled step can pick one without a Python branch
        self.long_after = cfg.rope_scaling["original_max_position_embeddings"] if kind == "longrope" else None
        if self.long_after is not None:
            self.long_inv_freq = rope_frequencies(cfg, self.long_after + 1)[0]

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
            if self.long_after is not None:
                self.long_inv_freq = self.long_inv_freq.to(positions.device)
        inv_freq = self.inv_freq
        if self.dynamic:
            inv_freq = rope_frequencies(self.cfg, int(positions.max()) + 1)[0].to(positions.device)
        elif self.long_after is not None:
            inv_freq = torch.where(positions.max() + 1 > self.long_after, self.long_inv_freq, inv_freq)
        freqs = positions[..., None].float() * inv_freq  # (B, T, rotary_dim/2), float32 as in the reference
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if self.scale != 1.0:  # x 1.0 changes nothing but costs two ops per forward
            cos, sin = cos * self.scale, sin * self.scale
        return cos.to(dtype), sin.to(dtype)


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """ALiBi head slopes (Press et al. 2021): a geometric sequence from 2^(-8/n); for a head count that
    is not a power of two, the closest power's slopes plus every other slope of the next power."""
    def power_of_two(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start ** (i + 1) for i in range(n)]

    closest = 2 ** math.floor(math.log2(n_heads))
    slopes = power_of_two(closest)
    if closest < n_heads:
        slopes += power_of_two(2 * closest)[0::2][: n_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on the last dim of x; cos/sin broadcast against x (e.g. (B, 1, T, D) for (B, heads, T, D)).
    cos/sin narrower than x (partial rotary, Phi-4-mini): the first dims rotate, the rest pass through."""
    d = cos.shape[-1]
    if d < x.shape[-1]:
        return torch.cat((apply_rope(x[..., :d], cos, sin), x[..., d:]), dim=-1)
    half = d // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class KVCache:
    """Preallocated keys and values: per layer, (batch, kv_heads, slots, head_dim).

    A full layer has `max_len` slots, indexed by column: a row's tokens fill them left to right (left padding keeps
    rows aligned). `sliding=True` gives each sliding-window layer a ring of `window` slots instead, indexed by
    position: position p lives in slot p % window, so the layer keeps only its last `window` positions' keys and
    values whatever the length (Gemma 3's 5 local layers in 6 then hold 512 positions, not the whole chat). Keys
    are stored after RoPE with their absolute positions, so the order of the slots does not matter to attention;
    `ring_mask` says which slots a query may see.

    `static=True` is the layout torch.compile needs: the fill position is a tensor (`pos`), writes go through
    index_copy_ (a ring's through scatter_), and attention reads the whole cache under a mask, so every decode step
    has the same shapes and one compiled graph serves them all (a Python-int position would recompile at every step).
    """

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device=None, dtype=torch.float32,
                 static: bool = False, sliding: bool = False):
        # per layer: its ring's size (a sliding layer's window), or None for a full layer
        self.rings: list[int | None] = [cfg.window(i) if sliding else None for i in range(cfg.n_layers)]
        shapes = [(batch, cfg.n_kv_heads, ring or max_len, cfg.head_dim) for ring in self.rings]
        # one tensor per layer: a compiled step that writes a layer's slots then copies back that layer only
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for shape in shapes]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for shape in shapes]
        self._length = 0  # slots filled so far (the same for every row; left padding keeps rows aligned)
        self.max_len, self.static = max_len, static
        self.pos = torch.zeros((), dtype=torch.long, device=device)  # the static cache's fill position
        self._ring_writes: tuple | None = None  # where this forward's new keys go in the rings (`place`)

    @property
    def length(self) -> int:
        return int(self.pos) if self.static else self._length

    @property
    def nbytes(self) -> int:
        """Bytes the keys and values take."""
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    @property
    def has_rings(self) -> bool:
        return any(ring is not None for ring in self.rings)

    def advance(self, n: int) -> None:
        if self.static:
            self.pos.add_(n)  # in place: a compiled graph mutates its input instead of guarding on a Python int
        else:
            self._length += n

    def truncate(self, length: int) -> None:
        """Forget the slots from `length` on: the next tokens are written there (a chat reusing a shared prefix)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a KV cache of {self.length} tokens to {length}")
        if self.has_rings and length < self.length:
            # a ring has overwritten the positions before its window: they cannot come back
            raise ValueError("a KV cache with sliding-window rings cannot be truncated")
        if self.static:
            self.pos.fill_(length)
        else:
            self._length = length

    def place(self, positions: torch.Tensor, real: torch.Tensor | None) -> None:
        """Before a forward of T new tokens at `positions` (B, T): which of them the rings keep. `real` (B, T) bool
        marks real tokens (left padding is not; None: all are). A row's real tokens are its last ones and their
        positions are consecutive, so its last `ring` real tokens go to distinct slots."""
        if not self.has_rings:
            return
        if positions.shape[1] == 1:  # one token per row: every row writes its slot (a graph-friendly scatter)
            self._ring_writes = (positions,)
            return
        last = positions[:, -1:]
        keep = torch.ones_like(positions, dtype=torch.bool) if real is None else real.bool()
        self._ring_writes = (positions, keep, last)

    def ring_mask(self, ring: int, positions: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
        """The boolean mask (B, 1, T, S) of a ring layer's attention for queries at `positions` (B, T): over the
        ring's `ring` slots (after this token's write, T = 1) or over the ring's slots before the write followed by
        the T new keys (T > 1, `update` returns them so). A slot holds the latest position p <= the row's last
        cached one with p = slot (mod ring), valid if p >= 0; a query at q sees p when q - p < ring."""
        B, T = positions.shape
        slots = torch.arange(ring, device=positions.device)
        if T == 1:  # after the write the slots hold q - ((q - j) mod ring): all within the window, valid if >= 0
            return (slots <= positions[:, :, None])[:, None]
        keep = torch.ones_like(positions, dtype=torch.bool) if real is None else real.bool()
        cached = positions[:, -1:] - keep.sum(1, keepdim=True)  # (B, 1): the last position already in the ring
        held = cached - torch.remainder(cached - slots, ring)  # (B, ring): the position each slot holds
        q = positions[:, :, None]
        old = (held[:, None, :] >= 0) & (q - held[:, None, :] < ring)
        t = torch.arange(T, device=positions.device)
        new = (t[None, :] <= t[:, None]) & (t[:, None] - t[None, :] < ring)  # chunk columns: causal, in the window
        new = new[None] & keep[:, None, :]
        new = new | torch.eye(T, dtype=torch.bool, device=positions.device)[None]  # padding sees itself (no NaN)
        return torch.cat([old, new], dim=-1)[:, None]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ring = self.rings[layer]
        if ring is not None:
            return self._update_ring(layer, ring, k, v)
        if self.static:  # the caller keeps pos + T <= max_len (a data-dependent check would break the graph)
            slots = self.pos + torch.arange(k.shape[2], device=k.device)
            self.k[layer].index_copy_(2, slots, k)
            self.v[layer].index_copy_(2, slots, v)
            return self.k[layer], self.v[layer]
        end = self._length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache is full: {end} > {self.max_len} positions")
        self.k[layer][:, :, self._length:end] = k
        self.v[layer][:, :, self._length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def _update_ring(self, layer: int, ring: int, k: torch.Tensor, v: torch.Tensor):
        if self._ring_writes is None:
            raise RuntimeError("a ring KV cache needs place(positions, real) before the forward")
        ck, cv = self.k[layer], self.v[layer]
        if len(self._ring_writes) == 1:  # one token: write, then attend over the ring
            index = torch.remainder(self._ring_writes[0], ring)[:, None, :, None].expand_as(k)
            ck.scatter_(2, index, k)
            cv.scatter_(2, index, v)
            return ck, cv
        positions, keep, last = self._ring_writes
        out_k, out_v = torch.cat([ck, k], dim=2), torch.cat([cv, v], dim=2)  # read before the write overwrites
        rows, cols = torch.nonzero(keep & (last - positions < ring), as_tuple=True)
        slots = torch.remainder(positions[rows, cols], ring)
        ck[rows, :, slots] = k[rows, :, cols]
        cv[rows, :, slots] = v[rows, :, cols]
        return out_k, out_v


@dataclass(frozen=True)
class Segments:
    """Packed training rows as (start, end) spans per row: attention runs causally inside each span, one SDPA call
    per span, instead of over the whole row with a (T x T) mask (which takes SDPA's slow masked path and computes
    every cross-segment score only to discard it)."""

    spans: tuple[tuple[tuple[int, int], ...], ...]

    @classmethod
    def of(cls, segment_ids: torch.Tensor) -> Segments:
        ids = segment_ids.detach().cpu()
        change = torch.ones_like(ids, dtype=torch.bool)
        change[:, 1:] = ids[:, 1:] != ids[:, :-1]
        rows = []
        for row in change:
            starts = torch.nonzero(row).flatten().tolist() + [len(row)]
            rows.append(tuple(zip(starts[:-1], starts[1:])))
        return cls(tuple(rows))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool,
           scale: float, softcap: float | None = None) -> torch.Tensor:
    """Attention of q (B, H, T, D) over k, v (B, Hkv, S, D): SDPA, or with soft-capped scores (Gemma 2:
    c * tanh(scores / c) before the softmax, which SDPA has no place for) written out as transformers' eager
    attention computes it (softmax in float32). `mask`: bool (True = attend) or float bias, broadcast to
    (B, H, T, S); `causal`: the last T keys are the queries' own positions, earlier keys are all visible."""
    groups = q.shape[1] // k.shape[1]
    if softcap is None:
        if groups > 1 and not _SDPA_GQA:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        extra = {"enable_gqa": True} if groups > 1 and _SDPA_GQA else {}
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, **extra)
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.tanh((q @ k.transpose(-1, -2)) * (scale / softcap)) * softcap
    T, S = q.shape[2], k.shape[2]
    if causal:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return scores.softmax(-1, dtype=torch.float32).to(q.dtype) @ v


class Attention(nn.Module):
    """Self-attention of layer `layer`: fused q/k/v projection, optional q/k norms (per head or over the whole
    projection), RoPE (this layer's kind, partial or none), the layer's sliding window, scale and soft-capping."""

    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        self.cfg = cfg
        q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        self.split = [q, kv, kv]
        # one fused projection for q, k, v: one matmul instead of three (checkpoints split it, see hf.py)
        self.qkv_proj = nn.Linear(cfg.d_model, q + 2 * kv, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(q, cfg.d_model, bias=cfg.proj_bias)
        if cfg.qk_norm:
            per_head = cfg.qk_norm_scope == "head"
            self.q_norm = make_norm(cfg, cfg.head_dim if per_head else q)
            self.k_norm = make_norm(cfg, cfg.head_dim if per_head else kv)
        self.decode_kernel = False  # pack_for_cpu turns on lmforge's CPU decode attention (model/cpu_kernels.cpp)

    def forward(self, x, rope, mask, cache: KVCache | None, layer: int) -> torch.Tensor:
        B, T, _ = x.shape
        cfg = self.cfg  # read at each call: a loaded model's config may change where no weight depends on it
        window, softcap = cfg.window(layer), cfg.attn_softcap
        scale = cfg.attn_scale if cfg.attn_scale is not None else cfg.head_dim ** -0.5
        qkv = self.qkv_proj(x)
        if (rope is not None and not cfg.qk_norm and self.decode_kernel and qkv.dtype == torch.float32
                and qkv.is_contiguous() and not torch.compiler.is_compiling()):
            # q's and k's heads rotated in place in one kernel (the torch ops below are ~15 dispatches)
            torch.ops.lmforge.rope_(qkv, rope[0], rope[1], cfg.n_heads + cfg.n_kv_heads, cfg.head_dim)
            q, k, v = (t.view(B, T, -1, cfg.head_dim).transpose(1, 2) for t in qkv.split(self.split, dim=-1))
        elif rope is not None and not cfg.qk_norm:
            # rotate q and k in one pass over their heads, (B, T, heads, head_dim): half the RoPE kernels
            qk = apply_rope(qkv[..., :-self.split[2]].view(B, T, cfg.n_heads + cfg.n_kv_heads, cfg.head_dim),
                            rope[0].unsqueeze(2), rope[1].unsqueeze(2))
            q, k = qk.transpose(1, 2).split([cfg.n_heads, cfg.n_kv_heads], dim=1)
            v = qkv[..., -self.split[2]:].view(B, T, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        else:
            q, k, v = qkv.split(self.split, dim=-1)
            if cfg.qk_norm and cfg.qk_norm_scope == "projection":  # OLMo 2: over all heads at once
                q, k = self.q_norm(q), self.k_norm(k)
            q = q.view(B, T, cfg.n_heads, cfg.head_dim).transpose(1, 2)
            k = k.view(B, T, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
            v = v.view(B, T, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
            if cfg.qk_norm and cfg.qk_norm_scope == "head":  # Qwen3, Gemma 3: each head, after projection
                q, k = self.q_norm(q), self.k_norm(k)
            if rope is not None:
                cos, sin = rope[0].unsqueeze(1), rope[1].unsqueeze(1)
                q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)
            # a sliding layer reads only the slots its window can reach (the mask rules out the earlier ones anyway);
            # rows are left-padded into the same slot columns, so the window is the same slots for every row
            ring = cache.rings[layer] is not None  # a ring holds only the window already (KVCache)
            first = k.shape[2] - T - window + 1 if window is not None and not ring else 0
            if first > 0 and not cache.static and isinstance(mask, torch.Tensor):
                k, v, mask = k[:, :, first:], v[:, :, first:], mask[..., first:]
        if self.decode_kernel and cache is not None and T == 1 and (mask is None or mask.dtype == torch.bool):
            # one new token: read only the cache's filled slots (SDPA reads a static cache's every slot)
            y = torch.ops.lmforge.decode_attention(q, k, v, None if mask is None else mask[:, 0, 0],
                                                   cache.pos + 1 if cache.static and not ring else None, scale,
                                                   softcap or 0.0)
            return self.o_proj(y.view(B, 1, cfg.n_heads * cfg.head_dim))  # (B, H, 1, D) contiguous: (B, 1, H x D)
        elif isinstance(mask, Segments):  # packed rows: causal attention inside each segment
            y = torch.cat([torch.cat([attend(q[b:b + 1, :, s:e], k[b:b + 1, :, s:e], v[b:b + 1, :, s:e], None,
                                             e - s > 1, scale, softcap)
                                      for s, e in spans], dim=2) for b, spans in enumerate(mask.spans)], dim=0)
        else:
            # mask None means plain causal attention: SDPA can then use its flash / memory-efficient kernels
            y = attend(q, k, v, mask, mask is None and T > 1, scale, softcap)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, cfg.n_heads * cfg.head_dim))


def _gated(gate_up: torch.Tensor, geglu: bool) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    # GeGLU uses the tanh GELU (Gemma's gelu_pytorch_tanh); SwiGLU silu (Shazeer 2020)
    return (F.gelu(gate, approximate="tanh") if geglu else F.silu(gate)) * up


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, d_ff: int | None = None):
        super().__init__()
        d_ff = d_ff or cfg.d_ff
        self.gated, self.geglu = cfg.mlp != "gelu", cfg.mlp == "geglu"
        if self.gated:  # gate and up fused into one matmul
            self.gate_up_proj = nn.Linear(cfg.d_model, 2 * d_ff, bias=cfg.proj_bias)
        else:
            self.up_proj = nn.Linear(cfg.d_model, d_ff, bias=cfg.proj_bias)
        self.down_proj = nn.Linear(d_ff, cfg.d_model, bias=cfg.proj_bias)
        self.kernel = False  # pack_for_cpu: the gate's activation x up in one kernel (model/cpu_kernels.cpp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            gate_up = self.gate_up_proj(x)
            if self.kernel and gate_up.dtype == torch.float32 and not torch.compiler.is_compiling():
                return self.down_proj(torch.ops.lmforge.gated(gate_up, self.geglu))
            return self.down_proj(_gated(gate_up, self.geglu))
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))  # GPT-2's "gelu_new"


# torch's grouped GEMM (one call for every expert's rows); CUDA's kernel takes bfloat16 only
_GROUPED_MM = getattr(F, "grouped_mm", None)


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Rows of x sorted by group, through their group's matrix: rows offsets[g-1]:offsets[g] times weight[g].T,
    weight (groups, out, in) as nn.Linear stores it. One grouped GEMM where torch has it for x's device and dtype,
    else one matmul per group."""
    if _GROUPED_MM is not None and (x.device.type == "cpu" or x.dtype == torch.bfloat16):
        return _GROUPED_MM(x, weight.transpose(1, 2), offs=offsets)
    bounds = [0] + offsets.tolist()
    return torch.cat([x[a:b] @ weight[g].t() for g, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))])


class Experts(nn.Module):
    """The experts' weights stacked, as transformers keeps them: gate_up_proj (experts, 2 x width, d_model) and
    down_proj (experts, d_model, width), each expert's slice laid out like nn.Linear's weight."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        n, d, ff = cfg.n_experts, cfg.d_model, cfg.moe_d_ff or cfg.d_ff
        self.gate_up_proj = nn.Parameter(torch.empty(n, 2 * ff, d).normal_(std=cfg.init_std))
        self.down_proj = nn.Parameter(torch.empty(n, d, ff).normal_(std=cfg.init_std))
        self.geglu = cfg.mlp == "geglu"

    # rows per expert (on average) from which a no-grad forward runs expert by expert: each expert's gather and
    # scatter then stay in cache, where the sorted dispatch streams every (token, expert) row out and back, and one
    # mm per expert beats CPU's grouped GEMM by ~12%. Measured on the Qwen3-30B-A3B shape scaled down
    # (docs/benchmarks.md): at 64 rows the two tie, at 96 and above the loop is 1.2-1.6x faster.
    LOOP_ROWS = 96

    def forward(self, h: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token h (N, d_model) through each of its experts `chosen` (N, k), the outputs mixed by `weights`
        (N, k): (N, d_model), and the number of rows each expert got. The pairs are sorted by expert once (a stable
        sort); each expert's rows run as one slice of a grouped GEMM and a gather puts them back, or, for a large
        batch without autograd, as one mm per expert with its outputs added into place."""
        n, k = chosen.shape
        experts = chosen.flatten()
        order = experts.argsort(stable=True)
        counts = torch.bincount(experts, minlength=self.gate_up_proj.shape[0])
        if not torch.is_grad_enabled() and n * k >= self.LOOP_ROWS * len(counts):
            return self._by_expert(h, order // k, weights.flatten()[order], counts), counts
        offsets = counts.cumsum(0).to(torch.int32)
        # index_select, not h[...]: advanced indexing's gather was 5x slower here on CPU (measured)
        rows = grouped_linear(_gated(grouped_linear(h.index_select(0, order // k), self.gate_up_proj, offsets),
                                     self.geglu), self.down_proj, offsets)
        rows = rows.index_select(0, order.argsort()).view(n, k, -1)
        # each token's k outputs weighted and summed: a reduction, not a scatter-add of N x k rows into N
        return (rows * weights[..., None].to(rows.dtype)).sum(1).to(h.dtype), counts

    def _by_expert(self, h: torch.Tensor, tokens: torch.Tensor, weights: torch.Tensor,
                   counts: torch.Tensor) -> torch.Tensor:
        """The experts one by one over their rows of the sorted pairs (`tokens`, `weights` in expert order),
        each expert's weighted outputs added into its tokens' rows (transformers' eager loop, without its masks)."""
        gate_up, down = self.gate_up_proj, self.down_proj  # once: a LoRA parametrization recomputes on each read
        acc = torch.float64 if h.dtype == torch.float64 else torch.float32  # bfloat16 outputs summed in float32
        out, weights = torch.zeros(h.shape, dtype=acc, device=h.device), weights.to(acc)
        start = 0
        for e, c in enumerate(counts.tolist()):
            if c:
                t = tokens[start:start + c]
                y = _gated(h.index_select(0, t) @ gate_up[e].t(), self.geglu) @ down[e].t()
                out.index_add_(0, t, y.to(acc).mul_(weights[start:start + c, None]))
                start += c
        return out.to(h.dtype)


class MoE(nn.Module):
    """Mixture-of-experts MLP: a linear router sends each token to its top-k experts, whose outputs are mixed by
    the router probabilities, renormalised over the chosen k where the family does (Shazeer et al. 2017; Mixtral;
    Qwen3-MoE's norm_topk_prob).

    Grouped dispatch: the (token, expert) pairs are sorted by expert once, every expert's rows then run as one
    slice of a grouped GEMM (Experts.forward), and each token's k outputs come back as one weighted sum; a large
    batch without autograd (prefill, evaluation) runs the sorted rows expert by expert instead. No Python loop over
    tokens or over experts' masks. Each forward keeps the routing statistics of the
    Switch Transformer load-balancing loss (Fedus et al. 2021) as transformers' load_balancing_loss_func computes
    it: `Transformer.aux_loss` combines every MoE layer's; `aux_loss` here is this layer's alone."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.top_k, self.norm_topk, self.n_experts = cfg.experts_top_k, cfg.moe_norm_topk, cfg.n_experts
        self.router = nn.Linear(cfg.d_model, cfg.n_experts, bias=False)
        self.experts = Experts(cfg)
        zero = torch.zeros(cfg.n_experts)
        # the last forward's top-k choices per expert, router probabilities summed per expert, and tokens
        self.expert_counts, self.prob_sums, self.tokens = zero, zero, 0

    # a compiled decode step runs the dispatch eagerly: its sizes depend on the routing, and inductor has no CPU
    # float32 grouped GEMM
    @torch.compiler.disable
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        h = x.reshape(-1, shape[-1])
        probs = self.router(h).float().softmax(-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        if self.norm_topk:
            weights = weights / weights.sum(-1, keepdim=True)
        out, counts = self.experts(h, chosen, weights)
        self.expert_counts, self.prob_sums, self.tokens = counts.detach().float(), probs.sum(0), h.shape[0]
        return out.view(shape)

    @property
    def aux_loss(self) -> torch.Tensor:
        """n_experts * sum_e f_e * P_e for this layer's last forward: f_e the top-k choices of expert e per token,
        P_e its mean router probability (1 for even top-1 routing, top_k for even top-k routing)."""
        if not self.tokens:
            return torch.zeros(())
        return self.n_experts * ((self.expert_counts / self.tokens) * (self.prob_sums / self.tokens)).sum()


class Block(nn.Module):
    """One layer: attention and MLP (or MoE), each as a residual branch with the family's norm placement."""

    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        self.placement = cfg.norm_placement
        self.attn = Attention(cfg, layer)
        self.mlp = MoE(cfg) if cfg.is_moe(layer) else MLP(cfg)
        if self.placement in ("pre", "sandwich"):
            self.attn_norm, self.mlp_norm = make_norm(cfg), make_norm(cfg)
        if self.placement in ("post", "sandwich"):
            self.post_attn_norm, self.post_mlp_norm = make_norm(cfg), make_norm(cfg)

    def forward(self, x, rope, mask, cache, layer):
        if self.placement == "pre":
            x, h = add_norm(x, self.attn(self.attn_norm(x), rope, mask, cache, layer), self.mlp_norm)
            return x + self.mlp(h)
        if self.placement == "post":  # OLMo 2: the branch's output is normed, its input is not
            x = x + self.post_attn_norm(self.attn(x, rope, mask, cache, layer))
            return x + self.post_mlp_norm(self.mlp(x))
        x = x + self.post_attn_norm(self.attn(self.attn_norm(x), rope, mask, cache, layer))
        return x + self.post_mlp_norm(self.mlp(self.mlp_norm(x)))


class Transformer(nn.Module):
    """Decoder-only language model: `forward` returns the final-norm hidden states (B, T, d_model), `logits` and
    `loss` apply the output head to them."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.pos == "learned" else None
        self.rotary = Rotary(cfg) if cfg.pos == "rope" else None
        # the sliding layers' own RoPE base (Gemma 3's local layers)
        self.local_rotary = Rotary(cfg, local=True) if cfg.pos == "rope" and cfg.rope_local_theta else None
        self.alibi = alibi_slopes(cfg.n_heads) if cfg.pos == "alibi" else None
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = make_norm(cfg)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.inference_only: str | None = None  # "int8" (quantize_int8) or "packed float32" (pack_for_cpu)
        # pack_for_cpu: one-token steps run each dense RMSNorm layer as one kernel call (`_decode_fused`)
        self.fused_decode = False
        self.apply(self._init_weights)
        # GPT-2's scaled init: residual projections shrink with depth so the residual stream's variance stays bounded
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight", "experts.down_proj")):
                nn.init.normal_(p, mean=0.0, std=cfg.init_std / math.sqrt(2 * cfg.n_layers))

    def reset_rotary(self) -> None:
        """Recompute the RoPE tables from the config (after building on the meta device, or a changed rope_theta)."""
        cfg = self.cfg
        self.rotary = Rotary(cfg) if cfg.pos == "rope" else None
        self.local_rotary = Rotary(cfg, local=True) if cfg.pos == "rope" and cfg.rope_local_theta else None

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def output_weight(self) -> torch.Tensor:
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def _mask(self, B: int, T: int, start, attention_mask: torch.Tensor | None, device,
              keys: int | None = None, segment_ids: torch.Tensor | None = None,
              window: int | None = None) -> torch.Tensor | None:
        """Boolean (B, 1, T, S) mask (True = attend), or None when plain causal attention suffices.

        `start` is the first query's slot (an int, or a 0-d tensor for a static cache, whose S = `keys` is the
        whole cache). `segment_ids` (B, T) keep packed sequences apart: a token sees only its own segment.
        `window`: a sliding layer's, each query sees itself and the window - 1 positions before it.
        With ALiBi it is a float (B, heads, T, S) bias: -slope * distance where allowed, -inf elsewhere.
        """
        S = keys if keys is not None else start + T
        plain = (keys is None and attention_mask is None and segment_ids is None and self.alibi is None
                 and (window is None or window >= S))
        if plain and (start == 0 or T == 1):  # causal from scratch, or one new token that may see every key
            return None
        q = (start + torch.arange(T, device=device))[:, None]
        k = torch.arange(S, device=device)[None, :]
        allowed = k <= q
        if window is not None:
            allowed = allowed & (q - k < window)
        allowed = allowed[None, None].expand(B, 1, T, S)
        if segment_ids is not None:
            allowed = allowed & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
        if attention_mask is not None:
            allowed = allowed & attention_mask[:, None, None, :S].bool()
            # a padding query sees no key; let it see itself so no row is all -inf (NaN in softmax)
            allowed = allowed | (k == q)[None, None]
        if self.alibi is not None:
            distance = (q - k).clamp(min=0).float()  # slots: left padding keeps each row's slots contiguous
            bias = -self.alibi.to(device)[:, None, None] * distance  # (heads, T, S)
            return bias[None].masked_fill(~allowed, float("-inf"))
        return allowed

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, cache: KVCache | None = None,
                segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Final-norm hidden states (B, T, d_model) of input_ids (B, T): what `logits` and `loss` take, and what
        task heads and embeddings read.

        positions (B, T) default start..start+T-1 (start: the tokens `cache` holds); attention_mask (B, cache+T),
        1 = real token (with a static cache: (B, max_len), later slots are never attended anyway). `segment_ids`
        (B, T): several sequences packed in one row (training); a token attends only to earlier tokens of its own
        segment and positions restart at each segment, so the packed row gives each sequence the hidden states it
        has alone. Select the positions that need logits before the head (generation: `hidden[:, -1]`), which
        skips most of the output-head matmul and its (B, T, vocab) tensor.
        """
        return self.forward_embeddings(self.embed(input_ids), positions, attention_mask, cache, segment_ids)

    def forward_embeddings(self, x: torch.Tensor, positions: torch.Tensor | None = None,
                           attention_mask: torch.Tensor | None = None, cache: KVCache | None = None,
                           segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        """`forward` over input embeddings x (B, T, d_model) instead of token ids (prompt tuning's virtual tokens)."""
        B, T, _ = x.shape
        device = x.device
        if self.cfg.scale_embeddings:  # Gemma: times sqrt(d_model), rounded to the embedding's dtype as transformers does
            x = x * torch.tensor(self.cfg.d_model ** 0.5, dtype=x.dtype)
        static = cache is not None and cache.static
        if segment_ids is not None and cache is not None:
            raise ValueError("segment_ids are for packed training sequences, not for decoding with a KV cache")
        # a static cache's position stays a tensor: reading it as an int would specialise a compiled graph
        start = (cache.pos if static else cache.length) if cache is not None else 0
        if positions is None:
            slots = (start + torch.arange(T, device=device)).expand(B, T)
            if segment_ids is not None:  # each segment counts from 0
                first = torch.ones_like(segment_ids, dtype=torch.bool)
                first[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
                positions = slots - torch.cummax(torch.where(first, slots, torch.zeros_like(slots)), dim=1).values
            elif attention_mask is not None:  # left padding: count only real tokens
                positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0).gather(1, slots)
            else:
                positions = slots
        if self.pos_embed is not None:
            if not static and int(positions.max()) >= self.cfg.max_seq_len:  # static: generation checked it
                raise ValueError(f"position {int(positions.max())} is beyond max_seq_len {self.cfg.max_seq_len}")
            x = x + self.pos_embed(positions)
        # each layer's RoPE (global, the sliding layers' local one, or none) and mask (full, or its window)
        kinds, windows = self._layer_plan()
        ropes = {None: None}
        for kind, rotary in (("global", self.rotary), ("local", self.local_rotary)):
            if rotary is not None and kind in kinds:
                ropes[kind] = rotary(positions, x.dtype)
        masks, segments = {}, None
        rings = set(cache.rings) - {None} if cache is not None else set()
        if rings:
            # a row's new tokens: the columns this forward writes (left padding is not real)
            real = attention_mask[:, start:start + T] if attention_mask is not None and not static else None
            cache.place(positions, real)
        for window in sorted(set(windows), key=lambda w: (w is not None, w or 0)):
            if window in rings:
                mask = cache.ring_mask(window, positions, real)
                # one token per row, every row past its first `window` positions: each slot is in the window
                plain = T == 1 and not static and bool((positions >= window - 1).all())
                masks[window] = None if plain else mask
            elif (segment_ids is not None and attention_mask is None and self.alibi is None
                    and (window is None or window >= T)):
                masks[window] = segments = segments or Segments.of(segment_ids)
            else:
                mask = self._mask(B, T, start, attention_mask, device,
                                  keys=cache.max_len if static else None, segment_ids=segment_ids, window=window)
                masks[window] = mask.to(x.dtype) if isinstance(mask, torch.Tensor) and mask.dtype != torch.bool \
                    else mask
        # (a sliding window that still holds every key, as Phi-3's 2047 or Mistral's 4096 do in a shorter cache,
        # masks nothing: those layers' step is the plain one; a ring holds only its window)
        plan = self._fused_decode_plan() if (T == 1 and cache is not None and not static
                                             and self.alibi is None and x.dtype == torch.float32
                                             and all(w is None or w > start or w in rings for w in windows)
                                             and not torch.compiler.is_compiling()) else None
        if plan is not None:
            # each ring's write slot per row: position mod window (KVCache)
            slots = {w: torch.remainder(positions[:, 0], w).contiguous() for w in rings}
            x = self._decode_fused(x, plan, [ropes[kind] for kind in kinds], [masks[w] for w in windows], cache,
                                   [slots.get(w) for w in cache.rings])
        else:
            for i, layer in enumerate(self.layers):
                x = layer(x, ropes[kinds[i]], masks[windows[i]], cache, i)
        if cache is not None:
            cache.advance(T)
        return self.norm(x)

    def _fused_decode_plan(self) -> list[tuple] | None:
        """Each layer's arguments to `lmforge::decode_layer` (model/cpu_kernels.cpp: a whole one-token layer step in
        one call), or None unless every layer is a kind it runs: its norms before the branches (pre), after them
        (OLMo 2) or both (Gemma's sandwich), packed linears (pack_for_cpu), the RMSNorm kernels (one eps and
        offset per layer), a gated MLP, q/k norms per head (Qwen3, Gemma 3), over the projection (OLMo 2) or none.
        Kept while the layers' modules stay the same objects."""
        if not self.fused_decode:
            return None
        # the modules' own dicts: nn.Module.__getattr__ on 150 names costs ~0.3 ms a step
        modules = []
        for b in self.layers._modules.values():
            attn, mlp = b._modules["attn"]._modules, b._modules["mlp"]._modules
            modules.append((b, attn["qkv_proj"], attn["o_proj"], mlp.get("gate_up_proj"), mlp.get("down_proj")))
        # the config fields the plan copies are read at each call by the module path: a changed one rebuilds it
        cfg = self.cfg
        key = (*(id(m) for group in modules for m in group), id(cfg), cfg.attn_scale, cfg.attn_softcap)
        cached = self.__dict__.get("_fused_plan")
        if cached is not None and cached[0] == key:
            return cached[1]
        plan = []
        for block, qkv, o, gate_up, down in modules:
            attn, mlp, norms = block.attn, block.mlp, (getattr(block, "attn_norm", None), getattr(block, "mlp_norm", None))
            post = (block.post_attn_norm, block.post_mlp_norm) if block.placement != "pre" else ()
            qk = (attn.q_norm, attn.k_norm) if attn.cfg.qk_norm else (None, None)
            # every norm of the layer through the RMSNorm kernel with one eps and offset (the call takes one pair)
            every = [n for n in (*norms, *post, *qk) if n is not None]
            if (not attn.decode_kernel or not isinstance(mlp, MLP)
                    or not (mlp.gated and mlp.kernel) or not all(hasattr(m, "panels") for m in (qkv, o, gate_up, down))
                    or not all(isinstance(n, RMSNorm) and n.kernel for n in every)
                    or any((n.eps, n.offset) != (every[0].eps, every[0].offset) for n in every)):
                plan = None
                break
            cfg = attn.cfg
            plan.append((*(None if n is None else n.weight for n in norms), every[0].eps, every[0].offset,
                         qkv.panels, qkv.bias,
                         o.panels, o.bias, gate_up.panels, gate_up.bias, down.panels, down.bias, cfg.n_heads,
                         cfg.head_dim, cfg.attn_scale if cfg.attn_scale is not None else cfg.head_dim ** -0.5,
                         cfg.attn_softcap or 0.0, mlp.geglu, gate_up.out_features // 2,
                         None if qk[0] is None else qk[0].weight, None if qk[1] is None else qk[1].weight,
                         # int8 panels' row scales (PackedInt8Linear); None for float32 panels
                         *(getattr(m, "scale", None) for m in (qkv, o, gate_up, down)),
                         *((post[0].weight, post[1].weight) if post else (None, None))))
        self.__dict__["_fused_plan"] = (key, plan)
        return plan

    def _decode_fused(self, x: torch.Tensor, plan: list[tuple], ropes: list, masks: list, cache: KVCache,
                      ring_slots: list) -> torch.Tensor:
        """The layers of a one-token step, one `lmforge::decode_layer` call each (the same kernels as the modules,
        bit-identical results, without the modules' Python and dispatch: docs/benchmarks.md). Per layer: its RoPE
        tables, its mask (B, 1, 1, slots) or None, and for a ring layer each row's write slot."""
        slot = cache.length
        if slot + 1 > cache.max_len:
            raise ValueError(f"KV cache is full: {slot + 1} > {cache.max_len} positions")
        x = x.contiguous()
        for i, (an, mn, eps, offset, qkv, qkv_b, o, o_b, gu, gu_b, down, down_b, heads, head_dim, scale, softcap,
                geglu, d_ff, q_norm, k_norm, qkv_s, o_s, gu_s, down_s, post_attn, post_mlp) in enumerate(plan):
            rope, mask, row_slots = ropes[i], masks[i], ring_slots[i]
            x = torch.ops.lmforge.decode_layer(x, an, mn, eps, offset, qkv, qkv_b, o, o_b, gu, gu_b, down, down_b,
                                               None if rope is None else rope[0], None if rope is None else rope[1],
                                               cache.k[i], cache.v[i], 0 if row_slots is not None else slot,
                                               None if mask is None else mask[:, 0, 0], heads, head_dim, scale,
                                               softcap, geglu, d_ff, q_norm, k_norm, qkv_s, o_s, gu_s, down_s,
                                               post_attn, post_mlp, row_slots)
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The output head over hidden states (..., d_model) -> (..., vocab), soft-capped where the family does."""
        # lm_head: untied, or a quantized / packed copy of the tied matrix (model/quantize.py, model/packed.py)
        logits = self.lm_head(hidden) if self.lm_head is not None else F.linear(hidden, self.embed.weight)
        if self.cfg.final_softcap is not None:  # Gemma 2: c * tanh(logits / c)
            logits = torch.tanh(logits / self.cfg.final_softcap) * self.cfg.final_softcap
        return logits

    def loss(self, hidden: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Mean next-token cross entropy of hidden states (..., d_model) against `targets` (...) (-100: no loss);
        `mask` (...) bool keeps only the positions where it is True (SFT trains on the replies only: the head then
        skips the prompt tokens). A plain output matrix goes through `linear_cross_entropy`: the head and the loss
        in chunks, no logits tensor (training's memory peak at large vocabularies)."""
        if mask is not None:
            hidden, targets = hidden[mask], targets[mask]
        head = self.lm_head
        plain = head is None or (type(head) is nn.Linear and head.bias is None)  # a plain matrix (not LoRA / int8)
        if plain and self.cfg.final_softcap is None:
            return linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), self.output_weight(), targets.reshape(-1))
        logits = self.logits(hidden)
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))

    def _layer_plan(self) -> tuple[tuple[str | None, ...], tuple[int | None, ...]]:
        """Each layer's RoPE kind and sliding window, worked out once per config (a decode step would otherwise ask
        the config 90 times): kept with the config fields they come from, so a changed config is read again."""
        cfg = self.cfg
        key = (cfg.n_layers, cfg.pos, cfg.no_rope_layers, cfg.rope_local_theta, cfg.sliding_window, cfg.layer_types)
        plan = self.__dict__.get("_plan")
        if plan is None or plan[0] != key:
            plan = self.__dict__["_plan"] = (key, tuple(cfg.rope_kind(i) for i in range(cfg.n_layers)),
                                             tuple(cfg.window(i) for i in range(cfg.n_layers)))
        return plan[1], plan[2]

    def aux_loss(self) -> torch.Tensor:
        """The MoE load-balancing loss of the last forward (0 for a dense model), as transformers'
        load_balancing_loss_func computes it over every MoE layer's router: n_experts * sum_e f_e * P_e, with f_e the
        top-k choices of expert e and P_e its router probability, each summed over the layers and divided by
        (layers x tokens)."""
        moe = [layer.mlp for layer in self.layers if isinstance(layer.mlp, MoE) and layer.mlp.tokens]
        if not moe:
            return torch.zeros((), device=self.embed.weight.device)
        rows = sum(m.tokens for m in moe)
        counts = torch.stack([m.expert_counts for m in moe]).sum(0) / rows
        probs = torch.stack([m.prob_sums for m in moe]).sum(0) / rows
        return moe[0].n_experts * (counts * probs).sum()

    def router_balance(self) -> dict[str, float]:
        """How evenly the last forward's tokens were routed, for training logs: per MoE layer's choices, the
        busiest expert's share over an even share (1.0 = perfectly even) and the fraction of experts no token
        chose."""
        moe = [layer.mlp for layer in self.layers if isinstance(layer.mlp, MoE) and layer.mlp.tokens]
        if not moe:
            return {}
        counts = torch.stack([m.expert_counts for m in moe])  # (layers, experts)
        even = counts.sum(1, keepdim=True) / counts.shape[1]
        return {"router_max_load": float((counts / even).amax(1).mean()),
                "router_unused_experts": float((counts == 0).float().mean())}
