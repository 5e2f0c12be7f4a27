"""Weight-only int8 and int4 quantization for inference, and the quantized model directory.

int8: the weights take a quarter of float32's bytes, activations stay in floating point. Decoding one token reads
every weight once, so on a CPU it is bound by memory bandwidth, not by arithmetic: a model in float32 reads 4 bytes
per parameter per token. Storing the matrices as int8 with one scale per output channel (symmetric, scale =
max|w| / 127.5, as torchao's Int8WeightOnlyConfig and gpt-fast do; the same idea as llama.cpp's Q8_0 with per-row
blocks) reads a quarter of that. The rounding error is at most half a step (max|w| / 255) per weight; greedy
continuations usually stay the same for many tokens and drift only where two candidates were nearly tied.

A float32 model on a CPU packs these integers for lmforge's own kernel (model/packed.py PackedInt8Linear, through
pack_for_cpu: float32 activations, what `--quantize int8` loads by default). Unpacked, small batches (decode) use
ATen's int8 GEMV kernel `_weight_int8pack_mm` with bfloat16 activations; large ones (prefill) dequantize to the
activation dtype and run a dense matmul. Elsewhere (CUDA) the matrix is dequantized
per call: the memory saving stays, the speed-up does not. int4 is llama.cpp's Q4_0 (below). Quantized models are for
generation; training and saving need the float model.

`lmforge export int8 | int4` writes a model directory that holds what `quantize_int8` / `quantize_int4` compute
(`save_quantized`), so loading it (`load_quantized`, through `load_hf_model`) skips the quantization and reads the
quantized bytes only. Layout: config.json (the HF config plus `"lmforge_quantization": {"method": ...}`),
model.int8.safetensors (lmforge's parameter names: `*.qweight` and `*.scale(s)` for each quantized matrix, the
embedding and norms in float32), the tokenizer and generation_config.json. Other libraries cannot read it: for
llama.cpp use `export gguf --type q8_0 | q4_0` (an int4 directory holds the same rounded numbers as a q4_0 GGUF).
Speeds: docs/benchmarks.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# rows (tokens) per call up to which the int8 GEMV kernel beats dequantize + dense matmul (measured:
# docs/benchmarks.md, "int8 GEMV against dequantize + matmul")
_GEMV_MAX_ROWS = 8
_HAS_INT8_GEMV = hasattr(torch.ops.aten, "_weight_int8pack_mm")


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float weight -> int8 values and float32 scales (out,), with weight ~= q * scale[:, None]."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127.5).clamp(min=torch.finfo(torch.float32).eps)
    # times the reciprocal, as torchao does: the integers then equal torchao's exactly (w / scale rounds a few differently)
    q = torch.round(w * (1.0 / scale[:, None])).clamp(-128, 127).to(torch.int8)
    return q, scale


class Int8Linear(nn.Module):
    """y = x @ (q * scale).T + bias, with q int8 (out, in) and one float scale per output channel."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        q, scale = quantize_per_channel(weight)
        self.out_features, self.in_features = q.shape
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)
        self.register_buffer("scale_bf16", scale.to(torch.bfloat16))  # the GEMV kernel wants scales in x's dtype
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.device.type == "cpu" and _HAS_INT8_GEMV and x2.shape[0] <= _GEMV_MAX_ROWS:
            # the kernel's float32 path is slow; bfloat16 activations keep the error below the int8 weights'
            y = torch.ops.aten._weight_int8pack_mm(x2.to(torch.bfloat16).contiguous(), self.qweight,
                                                   self.scale_bf16).to(x.dtype)
        else:  # x @ (q * s).T == (x @ q.T) * s: dequantize the integers only
            y = F.linear(x2, self.qweight.to(x.dtype)) * self.scale.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight-only"


def replace_linears(model: nn.Module, keep, build, kind: type = nn.Linear) -> int:
    """Swap each module of exactly type `kind` (nn.Linear unless given) named `name` for which keep(name, module) is
    true with build(module), in place; the inference formats (int8 here, packed float32 and int8 panels in packed.py)
    share it. Returns how many were replaced."""
    targets = [(name, m) for name, m in model.named_modules() if type(m) is kind and keep(name, m)]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, build(linear))
    return len(targets)


def quantize_int8(model: nn.Module, skip: tuple[str, ...] = ()) -> nn.Module:
    """Replace every nn.Linear of a decoder (and the output head, tied or not) with Int8Linear, in place.

    `skip`: module names to keep in float, e.g. ("lm_head",). Embedding lookups and MoE routers stay in
    float (a lookup reads one row per token, not the whole table). Returns the model, in eval mode.
    """
    from lmforge.model.transformer import Transformer

    # MoE routers stay float: a small error there can flip which expert a token goes to
    replace_linears(model, lambda name, _: name not in skip and not name.endswith("router"),
                    lambda linear: Int8Linear(linear.weight, linear.bias))
    if isinstance(model, Transformer) and model.lm_head is None and "lm_head" not in skip:
        # tied head: quantize a copy of the embedding matrix for the output projection (the biggest matrix
        # of a small model); the embedding itself stays float for lookups
        model.lm_head = Int8Linear(model.embed.weight)
    model.inference_only = "int8"
    return model.eval()


# --- int4 -----------------------------------------------------------------------------------------------------------
# llama.cpp's Q4_0 scheme: blocks of 32 weights along the input, one float16 scale d = (the weight of largest
# magnitude) / -8 per block, codes q = trunc(w / d + 8.5) clipped to 0..15, w ~= d * (q - 8). The same numbers as a
# q4_0 GGUF, so lmforge and llama.cpp run the same rounded model.
INT4_BLOCK = 32


def quantize_int4_blocks(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float weight (in divisible by 32) -> packed uint8 codes (out, in / 2), two per byte (the low nibble
    holds weight j, the high one weight j + 16 of each block, as Q4_0 packs them), and float16 scales (out, in / 32)."""
    w = weight.detach().float()
    out, n_in = w.shape
    if n_in % INT4_BLOCK:
        raise ValueError(f"int4 blocks need an input width divisible by {INT4_BLOCK}, got {n_in}")
    blocks = w.reshape(out, n_in // INT4_BLOCK, INT4_BLOCK)
    imax = blocks.abs().argmax(dim=-1, keepdim=True)
    d = blocks.gather(-1, imax) / -8
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = torch.trunc(blocks * inv + 8.5).clamp(0, 15).to(torch.uint8)
    packed = q[..., :INT4_BLOCK // 2] | (q[..., INT4_BLOCK // 2:] << 4)
    return packed.reshape(out, n_in // 2), d.squeeze(-1).to(torch.float16)


def dequantize_int4_blocks(packed: torch.Tensor, scales: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    out = packed.shape[0]
    p = packed.reshape(out, -1, INT4_BLOCK // 2)
    q = torch.cat([p & 0x0F, p >> 4], dim=-1).to(torch.int8) - 8
    return (q.to(dtype) * scales.to(dtype)[..., None]).reshape(out, -1)


class Int4Linear(nn.Module):
    """y = x @ W.T + bias with W stored as Q4_0 blocks (4.5 bits a weight, against float32's 32). The matrix is
    dequantized per call, so it saves memory, not time."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        packed, scales = quantize_int4_blocks(weight)
        self.out_features, self.in_features = weight.shape
        self.register_buffer("qweight", packed)
        self.register_buffer("scales", scales)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, dequantize_int4_blocks(self.qweight, self.scales, x.dtype),
                        None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 (Q4_0 blocks)"


def quantize_int4(model: nn.Module, skip: tuple[str, ...] = ()) -> nn.Module:
    """Replace the decoder's nn.Linear layers (and the tied output head) with Int4Linear where the input width
    splits into 32-weight blocks; others stay float. Returns the model, in eval mode."""
    from lmforge.model.transformer import Transformer

    replace_linears(model, lambda name, m: name not in skip and not name.endswith("router")
                    and m.in_features % INT4_BLOCK == 0, lambda linear: Int4Linear(linear.weight, linear.bias))
    if isinstance(model, Transformer) and model.lm_head is None and "lm_head" not in skip \
            and model.embed.weight.shape[1] % INT4_BLOCK == 0:
        model.lm_head = Int4Linear(model.embed.weight)
    model.inference_only = "int4"
    return model.eval()



# --- the quantized model directory (`lmforge export int8 | int4`) ----------------------------------------------------
QUANT_KEY = "lmforge_quantization"  # config.json's key naming the method; load_hf_model looks for it
QUANTIZED_WEIGHTS = "model.int8.safetensors"
METHODS = {"int8": {"method": "int8_weight_only", "granularity": "per_output_channel"},
           "int4": {"method": "int4_weight_only", "granularity": "q4_0_blocks_of_32"}}
_FILES_KEPT = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
               "generation_config.json", "vocab.json", "merges.txt")


def save_quantized(model_dir, out, bits: str = "int8"):
    """Write the `bits` ("int8" | "int4") directory of an HF model directory (or Hub id) to `out`; returns its path."""
    import shutil
    from pathlib import Path

    from lmforge.files import StagedDirectory, save_tensors, write_json
    from lmforge.model.hf import load_hf_model, read_config, resolve_model_dir

    d = resolve_model_dir(model_dir)
    model = (quantize_int8 if bits == "int8" else quantize_int4)(load_hf_model(d, portable=False))
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not k.endswith("scale_bf16")}
    config = read_config(d) | {QUANT_KEY: METHODS[bits]}
    with StagedDirectory(out) as stage:
        save_tensors(state, stage.path(QUANTIZED_WEIGHTS), metadata={"format": f"lmforge-{bits}"})
        write_json(stage.path("config.json"), config)
        for name in _FILES_KEPT:
            if (d / name).exists():
                shutil.copy(d / name, stage.path(name))
    return Path(out)


def load_quantized(d, cfg, device: str = "cpu", method: str = "int8_weight_only"):
    """The Transformer of a `save_quantized` directory `d` (config `cfg`), its quantized layers filled from the file."""
    from safetensors.torch import load_file

    from lmforge.model.hf import CheckpointError
    from lmforge.model.transformer import Transformer

    tensors = load_file(str(d / QUANTIZED_WEIGHTS))
    with torch.device("meta"):
        model = Transformer(cfg)
    # the same modules, built on the meta device: the file gives them their values
    (quantize_int4 if method == "int4_weight_only" else quantize_int8)(model)
    for name, module in model.named_modules():
        if isinstance(module, Int8Linear):  # its bf16 scales (for the GEMV kernel) are derived
            if f"{name}.scale" not in tensors:
                raise CheckpointError(f"{d / QUANTIZED_WEIGHTS}: no int8 weights for {name}")
            tensors[f"{name}.scale_bf16"] = tensors[f"{name}.scale"].to(torch.bfloat16)
    missing = set(model.state_dict()) - set(tensors)
    if missing:
        raise CheckpointError(f"{d / QUANTIZED_WEIGHTS}: missing {sorted(missing)[:4]}")
    model.load_state_dict(tensors, strict=True, assign=True)
    model.reset_rotary()  # rebuilt off the meta device
    return model.to(device).eval()
