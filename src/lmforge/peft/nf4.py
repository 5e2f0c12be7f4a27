"""NF4 base weights for QLoRA (Dettmers et al. 2023), written here, bit-compatible with bitsandbytes.

A weight is cut into blocks of 64 values; each block is scaled by its absolute maximum and every value becomes the
index of the nearest of the 16 NormalFloat-4 levels (the quantiles of a standard normal, rescaled to [-1, 1]),
two indices per byte (the first in the high nibble). With double quantization the float32 absmax of each block
is itself quantized: its mean is subtracted and the rest stored as 8-bit indices into bitsandbytes' signed
dynamic map, in blocks of 256 with an absmax of their own. That is 4.127 bits per weight instead of 32.

The 4-bit codes and the float32 absmax follow bitsandbytes' CPU kernel exactly (scale by the reciprocal absmax,
clamp to [-1, 1], bucketize on the midpoints between levels): they equal `bitsandbytes.functional.quantize_4bit
(w, blocksize=64, quant_type="nf4")` bit for bit (tested where bitsandbytes imports). The double-quantized absmax
takes the nearest level of the dynamic map; bitsandbytes' C kernel finds it with an approximate table search that
picks the farther of two levels when they are almost equally near (3 of 1,728 blocks of a 192 x 576 weight, each
one level apart), so there the 8-bit absmax codes may differ by one; the offset and the second-level absmax are
equal (tested).

`NF4Linear` keeps only the packed codes and statistics; its forward dequantizes the weight to the compute dtype
for the matmul and its backward dequantizes again for the input gradient, so no float copy of the weight is kept
between them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)


def dynamic_map(max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """bitsandbytes' signed dynamic 8-bit map (create_dynamic_map(signed=True)), 256 sorted levels in [-1, 1]."""
    data: list[float] = []
    non_sign_bits = total_bits - 1
    additional = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        items = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1)
        bounds = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    if additional > 0:
        bounds = torch.linspace(0.1, 1, additional + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (256 - len(data))
    return torch.tensor(sorted(data), dtype=torch.float32)


def _blockwise(flat: torch.Tensor, levels: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(level index per value, absmax per block), bitsandbytes' reference rounding."""
    n = flat.numel()
    rem = n % blocksize
    full = n - rem
    blocks = flat[:full].reshape(-1, blocksize)
    absmax = blocks.abs().max(dim=-1)[0]
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    if rem:
        tail_max = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max.unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / tail_max, -1, 1)])
    midpoints = (levels[:-1] + levels[1:]) / 2
    return torch.bucketize(scaled, midpoints, out_int32=True).to(torch.uint8), absmax


def _blockwise_8bit(flat: torch.Tensor, levels: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The absmax of double quantization as bitsandbytes' CPU kernel rounds it: value / absmax (a true division),
    the level at or below it by binary search, then the nearer of it and the next one (a tie keeps the lower)."""
    n = flat.numel()
    pad = (-n) % blocksize
    blocks = torch.cat([flat, flat.new_zeros(pad)]).reshape(-1, blocksize) if pad else flat.reshape(-1, blocksize)
    absmax = blocks.abs().max(dim=-1)[0]
    if pad:  # the last block's absmax covers only its real values
        absmax[-1] = flat[n - (blocksize - pad):].abs().max()
    normed = (blocks / absmax.view(-1, 1)).reshape(-1)[:n]
    idx = (torch.searchsorted(levels, normed, right=True) - 1).clamp(0, 255)
    upper = (idx + 1).clamp(max=255)
    closer = (normed - levels[upper]).abs() < (normed - levels[idx]).abs()
    idx = torch.where((idx < 255) & closer, upper, idx)
    idx = torch.where(normed.isnan(), 0, idx)  # a block of equal values (0 / 0): index 0, as bitsandbytes gives
    return idx.to(torch.uint8), absmax


def absmax_search_map() -> torch.Tensor:
    """The levels the absmax is rounded to: the dynamic map with its first level set to -1, as bitsandbytes' CPU
    kernel sets it for its search (on a copy: dequantization uses the map as it is)."""
    levels = dynamic_map()
    levels[0] = -1.0
    return levels


def _expand(values: torch.Tensor, scale: torch.Tensor, blocksize: int) -> torch.Tensor:
    n = values.numel()
    full = n - n % blocksize
    out = torch.empty(n, dtype=torch.float32, device=values.device)
    out[:full] = (values[:full].view(-1, blocksize) * scale[:full // blocksize].view(-1, 1)).reshape(-1)
    if full < n:
        out[full:] = values[full:] * scale[-1]
    return out


@dataclass
class NF4Weight:
    """A weight in NF4: packed codes, block statistics, and what is needed to rebuild it."""

    packed: torch.Tensor  # uint8 [ceil(n / 2)], two codes per byte, the first in the high nibble
    absmax: torch.Tensor  # float32 [blocks], or uint8 indices into dynamic_map() with double quantization
    shape: tuple[int, ...]
    blocksize: int = 64
    absmax_scale: torch.Tensor | None = None  # double quantization: float32 absmax of each 256-block of absmax
    absmax_offset: float = 0.0  # double quantization: the mean subtracted before quantizing the absmax

    @classmethod
    def quantize(cls, w: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
        levels = torch.tensor(NF4_LEVELS, dtype=torch.float32, device=w.device)
        codes, absmax = _blockwise(w.detach().reshape(-1).float(), levels, blocksize)
        if codes.numel() % 2:  # bitsandbytes pads the scaled values with 0.0, whose code is 7
            codes = torch.cat([codes, codes.new_full((1,), 7)])
        packed = (codes[::2] << 4) | codes[1::2]
        if not double_quant:
            return cls(packed, absmax, tuple(w.shape), blocksize)
        offset = absmax.mean()
        q_absmax, scale = _blockwise_8bit(absmax - offset, absmax_search_map().to(w.device), 256)
        return cls(packed, q_absmax, tuple(w.shape), blocksize, scale, float(offset))

    def block_absmax(self) -> torch.Tensor:
        if self.absmax_scale is None:
            return self.absmax
        levels = dynamic_map().to(self.absmax.device)
        return _expand(levels[self.absmax.long()], self.absmax_scale, 256) + self.absmax_offset

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        levels = torch.tensor(NF4_LEVELS, dtype=torch.float32, device=self.packed.device)
        codes = torch.empty(self.packed.numel() * 2, dtype=torch.long, device=self.packed.device)
        codes[::2] = (self.packed >> 4).long()
        codes[1::2] = (self.packed & 0xF).long()
        n = 1
        for d in self.shape:
            n *= d
        return _expand(levels[codes[:n]], self.block_absmax(), self.blocksize).reshape(self.shape).to(dtype)

    def nbytes(self) -> int:
        extra = self.absmax_scale.numel() * 4 if self.absmax_scale is not None else 0
        return self.packed.numel() + self.absmax.numel() * self.absmax.element_size() + extra


class _NF4Matmul(torch.autograd.Function):
    """x @ W^T with W rebuilt from NF4 in the forward and again in the backward (nothing float kept between)."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return F.linear(x, layer.weight_nf4.dequantize(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        return grad @ ctx.layer.weight_nf4.dequantize(grad.dtype), None


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is stored in NF4 (the bias, if any, stays in float)."""

    def __init__(self, base: nn.Linear, blocksize: int = 64, double_quant: bool = True):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight_nf4 = NF4Weight.quantize(base.weight, blocksize, double_quant)
        self.bias = None if base.bias is None else nn.Parameter(base.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _NF4Matmul.apply(x, self)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (float32): what merges and DoRA's norms use."""
        return self.weight_nf4.dequantize(torch.float32)

    def _apply(self, fn, recurse=True):  # .to(device) moves the codes and statistics too
        w = self.weight_nf4
        w.packed, w.absmax = fn(w.packed), fn(w.absmax)
        if w.absmax_scale is not None:
            w.absmax_scale = fn(w.absmax_scale)
        return super()._apply(fn, recurse)


def quantize_model(model: nn.Module, modules: list[str], blocksize: int = 64, double_quant: bool = True) -> int:
    """Replace the named nn.Linear modules by NF4Linear, in place; returns the bytes their weights now take."""
    total = 0
    for path in modules:
        parent, _, name = path.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        layer = NF4Linear(getattr(owner, name), blocksize, double_quant)
        setattr(owner, name, layer)
        total += layer.weight_nf4.nbytes()
    return total
