"""Float32 CPU inference: weights in a packed-panel layout and a KV-cache decode attention (cpu_kernels.cpp).

Decoding B sequences multiplies a (B, K) activation by every (N, K) weight matrix. At B = 1 torch's
matmul (oneDNN) reads the weights at the machine's memory bandwidth, but at B = 4..16 it does not:
it takes about twice what the bandwidth allows (benchmarks/packed_linear.py; figures in docs/benchmarks.md).
The kernel stores each matrix as panels of 32 output rows, (K, 32) contiguous floats, and multiplies every
loaded weight vector with up to 8 rows of x before moving on: the weights stream once per 8 rows.

The panels replace the (N, K) matrix (no second copy) and serve every row count: decode shapes (1-16
rows) run at the memory bandwidth, prefill shapes (64+ rows) at about the speed of torch's GEMM. Results
equal F.linear up to float32 summation order (relative difference ~1e-6). A tied output head is packed
once and the token embedding reads its rows from the same panels.

pack_for_cpu also switches the model's one-token attention steps to `decode_attention`, which reads
only a KV cache's filled slots with one pass per (sequence, kv head) group. SDPA has to read a static
cache (torch.compile's) in full under a mask, 256 rounded-up slots at a time; with the kernel a compiled
batch-8 step is faster than eager instead of slower (docs/benchmarks.md). And it runs the step's small
float32 ops as one kernel each where eager torch dispatches several: RMSNorm (with the residual add before it),
RoPE on q and k in place, and a gated MLP's activation (`rms_norm`, `add_rms_norm`, `rope_`, `gated`).

The kernels are C++ compiled on first use by torch.utils.cpp_extension (a C++ compiler with OpenMP and
`ninja`; once per machine, cached under ~/.cache/torch_extensions). Without them
`pack_for_cpu` leaves the model as it is and warns once. Packed models are for inference only:
training and saving need the float model.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import warnings
from pathlib import Path

import torch
from torch import nn

PANEL = 32  # output rows per panel, as in cpu_kernels.cpp
_SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
_lock = threading.Lock()
_state: dict[str, object] = {}  # "ok": bool, "error": str once the build has been tried


def kernel_available() -> bool:
    """Build (first call on a machine) and load the kernel; False, with the reason in kernel_error(), if that fails."""
    with _lock:
        if "ok" not in _state:
            try:
                _build()
                _state["ok"] = True
            except Exception as e:  # no compiler, no OpenMP, no ninja, ...: the model keeps torch's matmul
                _state["ok"], _state["error"] = False, f"{type(e).__name__}: {e}".strip()[:500]
    return bool(_state["ok"])


def kernel_error() -> str | None:
    return _state.get("error")  # type: ignore[return-value]


def _build() -> None:
    if hasattr(torch.ops.lmforge, "decode_attention"):
        return
    from torch.utils import cpp_extension

    if shutil.which("ninja") is None:  # pip's ninja sits in the venv's bin/, which may not be on PATH
        try:
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            pass
    import hashlib

    # named after the source's hash: another version of lmforge on the machine keeps its own build instead of
    # rebuilding over this one (torch_extensions keys its cache directory by name)
    name = f"lmforge_cpu_kernels_{hashlib.sha256(_SOURCE.read_bytes()).hexdigest()[:12]}"
    build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
    import fcntl

    # torch guards a build with a plain `lock` file that a killed build (Ctrl-C during the first compile) leaves
    # behind, and every later process then waits on it forever. Our own flock is released by the kernel when its
    # holder dies, so while we hold it no other lmforge build can be running: a `lock` file found then is stale.
    with open(build_dir / "lmforge.flock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        (build_dir / "lock").unlink(missing_ok=True)
        if not (build_dir / f"{name}.so").exists():
            print("lmforge: compiling the float32 CPU kernels (once per machine)", file=sys.stderr)
        cpp_extension.load(name=name, sources=[str(_SOURCE)], is_python_module=False, verbose=False,
                           extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"])

    # shapes for torch.compile, which traces the op without running it
    @torch.library.register_fake("lmforge::pack")
    def _(weight):
        n, k = weight.shape
        return weight.new_empty((-(-n // PANEL), k, PANEL))

    @torch.library.register_fake("lmforge::packed_linear")
    def _(x, panels, bias, out_features, scales=None):
        return x.new_empty((*x.shape[:-1], out_features))

    @torch.library.register_fake("lmforge::decode_attention")
    def _(q, k, v, mask, length, scale, softcap=0.0):
        return q.new_empty(q.shape)

    @torch.library.register_fake("lmforge::rms_norm")
    def _(x, weight, eps, offset):
        return x.new_empty(x.shape)

    @torch.library.register_fake("lmforge::add_rms_norm")
    def _(x, branch, weight, eps, offset):
        return x.new_empty(x.shape), x.new_empty(x.shape)

    @torch.library.register_fake("lmforge::gated")
    def _(x, geglu):
        return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))

    @torch.library.register_fake("lmforge::rope_")
    def _(qkv, cos, sin, heads, head_dim):
        return None


class PackedLinear(nn.Module):
    """y = x @ W.T + b for float32 x on CPU, with W kept as (N/32, K, 32) panels (see cpu_kernels.cpp)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        if not kernel_available():
            raise RuntimeError(f"the packed CPU kernel is unavailable: {kernel_error()}")
        self.out_features, self.in_features = weight.shape
        self.register_buffer("panels", torch.ops.lmforge.pack(weight.detach().float().contiguous()))
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float32 in and out (the kernel says so otherwise); no conversions or reshapes here (the kernel flattens
        # the leading dims): a decode step makes ~120 of these calls
        return torch.ops.lmforge.packed_linear(x, self.panels, self.bias, self.out_features)

    def unpacked_weight(self) -> torch.Tensor:
        """The (N, K) matrix back, e.g. to check the packing."""
        return self.panels.transpose(1, 2).reshape(-1, self.in_features)[: self.out_features]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed float32"


class PackedInt8Linear(nn.Module):
    """lmforge's weight-only int8 (Int8Linear: int8 q (N, K), one float32 scale per output row) as (N/32, K, 32)
    int8 panels for the CPU kernel: y = (x @ q.T) * scale + b in float32, reading a quarter of float32's bytes."""

    def __init__(self, linear):
        super().__init__()
        if not kernel_available():
            raise RuntimeError(f"the packed CPU kernel is unavailable: {kernel_error()}")
        self.out_features, self.in_features = linear.out_features, linear.in_features
        self.register_buffer("panels", torch.ops.lmforge.pack(linear.qweight.contiguous()))
        self.register_buffer("scale", linear.scale.float().contiguous())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float().clone(),
                                                                  requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.lmforge.packed_linear(x, self.panels, self.bias, self.out_features, self.scale)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight-only, packed"


class PackedEmbedding(nn.Module):
    """Token lookup reading rows of a tied output head's panels: row t is panels[t // 32, :, t % 32]."""

    def __init__(self, head: PackedLinear):
        super().__init__()
        self.head = head
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features

    @property
    def weight(self) -> torch.Tensor:
        # callers ask the embedding for the model's device and dtype (generation); the matrix lives in the panels
        return self.head.panels

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head.panels[ids // PANEL, :, ids % PANEL]


def pack_for_cpu(model: nn.Module) -> nn.Module:
    """Replace every float32 CPU nn.Linear of `model` with PackedLinear and every Int8Linear with PackedInt8Linear
    (a float32 model's int8 weights), in place (a tied output head is
    packed once and shared with the token embedding), and turn on decode_attention for its one-token steps.
    Returns the model in eval mode; unchanged, with a warning, where the kernels cannot be built."""
    from lmforge.model.quantize import Int8Linear, replace_linears
    from lmforge.model.transformer import MLP, Attention, RMSNorm, Transformer

    if not kernel_available():
        warnings.warn(f"lmforge: packed CPU kernel unavailable, using torch's matmul ({kernel_error()})", stacklevel=2)
        return model.eval()
    replaced = replace_linears(model, lambda _, m: m.weight.dtype == torch.float32 and m.weight.device.type == "cpu",
                               lambda linear: PackedLinear(linear.weight, linear.bias))
    # int8 weights (quantize_int8, an `export int8` directory) of a float32 model: the same integers as int8 panels
    if not model.inference_only or model.inference_only == "int8":
        replaced += replace_linears(model, lambda _, m: m.qweight.device.type == "cpu"
                                    and (m.bias is None or m.bias.dtype == torch.float32), PackedInt8Linear, Int8Linear)
    if isinstance(model, Transformer) and model.lm_head is None and isinstance(model.embed, nn.Embedding) \
            and model.embed.weight.dtype == torch.float32 and model.embed.weight.device.type == "cpu":
        model.lm_head = PackedLinear(model.embed.weight)
        model.embed = PackedEmbedding(model.lm_head)
    if isinstance(model, Transformer) and (replaced or isinstance(model.embed, PackedEmbedding)):
        model.inference_only = "int8, packed" if model.inference_only == "int8" else (model.inference_only
                                                                                    or "packed float32")
        model.fused_decode = True
        for module in model.modules():
            if isinstance(module, Attention):
                module.decode_kernel = True
            elif isinstance(module, MLP) or (isinstance(module, RMSNorm) and module.weight.dtype == torch.float32
                                             and module.weight.device.type == "cpu"):
                module.kernel = True  # the one-pass kernels for the gated activation and RMSNorm
    return model.eval()
