"""lmforge's decode attention kernel (torch.ops.lmforge.decode_attention, model/cpu_kernels.cpp) vs torch SDPA.

One decode step's attention for every layer of a model shape (default smollm2-135m: 30 layers, 9 query
heads, 3 kv heads, head size 64): one new query per sequence against a KV cache holding `filled` slots.
Each layer has its own cache, so, as in a real step, keys and values come from memory, not from cache.
Three runs take turns round by round, best round each:
  lmforge        the kernel, given the cache and its fill count (what a packed model runs, eager or compiled)
  sdpa_filled    SDPA on exactly the filled slots (the dynamic cache of an eager step)
  sdpa_static    SDPA on the whole static cache under a mask (what a compiled step ran before the kernel)
Prints JSON: µs per layer and the ratios, for each batch and fill.
    .venv/bin/python benchmarks/decode_attention.py [--batches 1 8] [--filled 96 512 2000] [--static 256]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lmforge.model import preset  # noqa: E402
from lmforge.model.packed import kernel_available, kernel_error  # noqa: E402


def measure(cfg, B: int, n: int, static: int, rounds: int) -> dict:
    """µs per layer of each run for batch B with n filled slots (a static cache holds n rounded up to `static`)."""
    H, Hkv, D, L = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.n_layers
    S = -(-n // static) * static
    q = torch.randn(B, H, 1, D)
    ks = [torch.randn(B, Hkv, S, D) for _ in range(L)]
    vs = [torch.randn(B, Hkv, S, D) for _ in range(L)]
    mask = torch.zeros(B, 1, 1, S, dtype=torch.bool)
    mask[..., :n] = True
    length, scale = torch.tensor(n), D ** -0.5
    runs = {
        "lmforge": lambda k, v: torch.ops.lmforge.decode_attention(q, k, v, None, length, scale),
        "sdpa_filled": lambda k, v: F.scaled_dot_product_attention(q, k[:, :, :n], v[:, :, :n], enable_gqa=True),
        "sdpa_static": lambda k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True),
    }
    want = runs["sdpa_filled"](ks[0], vs[0])
    for fn in runs.values():  # the same attention, up to float32 summation order
        assert (fn(ks[0], vs[0]) - want).abs().max().item() < 1e-5
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(rounds):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            for k, v in zip(ks, vs):
                fn(k, v)
            best[name] = min(best[name], (time.perf_counter() - t0) / L)
    return {"batch": B, "filled": n, "static_slots": S, "kv_MB_filled_per_layer": round(2 * B * Hkv * n * D * 4 / 2**20, 2),
            **{f"{name}_us": round(t * 1e6, 1) for name, t in best.items()},
            "speedup_vs_sdpa_filled": round(best["sdpa_filled"] / best["lmforge"], 2),
            "speedup_vs_sdpa_static": round(best["sdpa_static"] / best["lmforge"], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="smollm2-135m")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--filled", type=int, nargs="+", default=[96, 512, 2000])
    ap.add_argument("--static", type=int, default=256, help="static caches round their length up to a multiple of this")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    if not kernel_available():
        sys.exit(f"the lmforge CPU kernels could not be built: {kernel_error()}")
    cfg = preset(args.preset)
    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "torch": torch.__version__},
              "date": time.strftime("%Y-%m-%d"), "model": args.preset, "heads": cfg.n_heads, "kv_heads": cfg.n_kv_heads,
              "head_dim": cfg.head_dim, "layers": cfg.n_layers, "runs": []}
    torch.manual_seed(0)
    for B in args.batches:
        for n in args.filled:
            row = measure(cfg, B, n, args.static, args.rounds)
            print(json.dumps(row), file=sys.stderr)
            result["runs"].append(row)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
