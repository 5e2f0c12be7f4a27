"""The packed float32 CPU kernel (lmforge/model/packed.py) vs torch's F.linear, one matrix stack, row by row count.

Every matrix of a model shape (default: smollm2-135m, 30 layers of fused qkv / o / gate_up / down plus
the tied output head, 540 MB) is applied once to an (M, K) input, as one decode step (M = batch) or
one prefill (M = batch x prompt) does. The two take turns round by round on the same inputs; best
round each. Prints JSON: ms per pass, weight GB/s, GFLOPS and the ratio, for each M.
    .venv/bin/python benchmarks/packed_linear.py [--preset smollm2-135m] [--rows 1 2 4 8 16 64 256]
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

from lmforge.model import PackedLinear, preset  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="smollm2-135m")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 64, 256])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    cfg = preset(args.preset)
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    shapes = [(q + 2 * kv, cfg.d_model), (cfg.d_model, q), (2 * cfg.d_ff, cfg.d_model), (cfg.d_model, cfg.d_ff)]
    torch.manual_seed(0)
    weights = [torch.randn(n, k) * 0.02 for _ in range(cfg.n_layers) for n, k in shapes]
    weights.append(torch.randn(cfg.vocab_size, cfg.d_model) * 0.02)
    packed = [PackedLinear(w) for w in weights]
    nbytes = sum(w.numel() * 4 for w in weights)
    flops_per_row = 2 * sum(w.numel() for w in weights)
    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "torch": torch.__version__},
              "date": time.strftime("%Y-%m-%d"), "model": args.preset, "weights_MB": round(nbytes / 2**20, 1), "rows": []}
    for m in args.rows:
        xs = {k: torch.randn(m, k) for k in {w.shape[1] for w in weights}}
        runs = {"torch_linear": lambda xs=xs: [F.linear(xs[w.shape[1]], w) for w in weights],
                "lmforge_packed": lambda xs=xs: [p(xs[p.in_features]) for p in packed]}
        for w, p in zip(weights[:4], packed[:4]):  # same results, up to float32 summation order
            want = F.linear(xs[w.shape[1]], w)
            assert torch.allclose(p(xs[w.shape[1]]), want, atol=1e-5 * want.abs().max().item())
        best = dict.fromkeys(runs, float("inf"))
        for fn in runs.values():
            fn()
        for _ in range(args.rounds):
            for name, fn in runs.items():
                t0 = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - t0)
        row = {"rows": m}
        for name, t in best.items():
            row[name] = {"ms": round(t * 1e3, 2), "weight_GB_s": round(nbytes / t / 1e9, 1),
                         "GFLOPS": round(flops_per_row * m / t / 1e9, 1)}
        row["speedup_packed_over_torch"] = round(best["torch_linear"] / best["lmforge_packed"], 2)
        print(json.dumps(row), file=sys.stderr)
        result["rows"].append(row)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
