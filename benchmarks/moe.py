"""Mixture-of-experts layer: lmforge's grouped dispatch vs transformers' Qwen3-MoE block, same weights, CPU.

A Qwen3-30B-A3B-shaped layer scaled down (d_model 2048 -> 512, 128 -> 64 experts, expert width 768 -> 256, top-8 of
them, softmax router with renormalised top-k), run on a training-sized batch of tokens and on a decode step's few.
lmforge sorts the (token, expert) pairs by expert once and runs every expert's rows as one slice of a grouped GEMM
(model/transformer.py: MoE); transformers' eager implementation loops over the experts that got tokens, gathering
each one's rows with a mask. transformers 5 also ships a grouped_mm implementation (its default where torch has
grouped_mm): both are timed. Forward (no grad) and forward + backward; outputs checked equal first.

Prints JSON (machine, date, shape, seconds per call, ratios lmforge / transformers).
    .venv/bin/python benchmarks/moe.py [--tokens 2048 8] [--repeats 5] [--threads 1]
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
import transformers  # noqa: E402
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock  # noqa: E402

from lmforge.model import ModelConfig  # noqa: E402
from lmforge.model.transformer import MoE  # noqa: E402


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--expert-width", type=int, default=256)
    ap.add_argument("--tokens", type=int, nargs="+", default=[2048, 8])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    hf_cfg = transformers.Qwen3MoeConfig(hidden_size=args.d_model, num_experts=args.experts,
                                         num_experts_per_tok=args.top_k, moe_intermediate_size=args.expert_width,
                                         norm_topk_prob=True)
    theirs = Qwen3MoeSparseMoeBlock(hf_cfg)
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(std=0.02)
    ours = MoE(ModelConfig(d_model=args.d_model, n_heads=8, d_ff=args.expert_width, n_experts=args.experts,
                           experts_top_k=args.top_k, moe_norm_topk=True))
    with torch.no_grad():  # the same weights: transformers stacks them as lmforge does
        ours.router.weight.copy_(theirs.gate.weight)
        ours.experts.gate_up_proj.copy_(theirs.experts.gate_up_proj)
        ours.experts.down_proj.copy_(theirs.experts.down_proj)
    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                          "transformers": transformers.__version__},
              "date": time.strftime("%Y-%m-%d"),
              "shape": {"d_model": args.d_model, "experts": args.experts, "top_k": args.top_k,
                        "expert_width": args.expert_width}, "runs": []}
    for n in args.tokens:
        x = torch.randn(1, n, args.d_model, generator=torch.Generator().manual_seed(n))
        row = {"tokens": n}
        for impl in ("eager", "grouped_mm"):
            hf_cfg._experts_implementation = impl
            with torch.no_grad():
                err = (ours(x) - theirs(x)).abs().max().item()
            assert err < 1e-4, (impl, err)
            row[f"max_abs_difference_vs_{impl}"] = err

        def forward(model, x=x):
            with torch.no_grad():
                model(x)

        def step(model, x=x):
            xg = x.clone().requires_grad_()
            model.zero_grad(set_to_none=True)
            (model(xg) ** 2).mean().backward()

        for what, fn in (("forward", forward), ("forward_backward", step)):
            times = {"lmforge": best_time(lambda fn=fn: fn(ours), args.repeats)}
            for impl in ("eager", "grouped_mm"):
                hf_cfg._experts_implementation = impl
                times[f"transformers_{impl}"] = best_time(lambda fn=fn: fn(theirs), args.repeats)
            row[what] = {k: round(v * 1e3, 2) for k, v in times.items()} | {"unit": "ms"}
            row[what]["ratio_vs_transformers_eager"] = round(times["transformers_eager"] / times["lmforge"], 2)
            row[what]["ratio_vs_transformers_grouped_mm"] = round(times["transformers_grouped_mm"] / times["lmforge"], 2)
        print(json.dumps(row), file=sys.stderr)
        result["runs"].append(row)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
