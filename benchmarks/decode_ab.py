"""Decode A/B: two checkouts of lmforge decoding the same model, taking turns round by round, best of N each.

    .venv/bin/python benchmarks/decode_ab.py --a src --b /tmp/old/src [--batches 1 8] [--rounds 7]

Each side runs in its own worker process (PYTHONPATH = its src folder), so two versions of the package never meet
in one interpreter; only one worker computes at a time. Both load the same saved random-weight model (the
`--preset` shape) at default flags (`pack_for_cpu(load_hf_model(dir))`, the packed float32 kernels) and decode
greedily through `generate_ids`. Decode rate = batch x new_tokens / (time(1 + new_tokens) - time(1)), so the
prefill cancels out, as in benchmarks/generate.py. Rounds alternate A B A B ... (which goes first alternates too),
because on a shared machine the speed drifts; the best and the median round of each side are reported with the
ratios A / B, and the per-round figures so a reader can see the spread. Greedy tokens of the two sides are checked equal.

Two clocks: "wall" (what a user waits) and "cpu" (the process's CPU time, every thread summed). On a machine shared
with other jobs the wall clock counts the time the OS gives the cores to others; with `--threads 1` the CPU time
counts only this decode's own work (cache and memory-bandwidth contention still show), so it compares two versions
of the code more steadily under load. With 2+ threads the CPU time also counts OpenMP's spin-waits.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORKER = r"""
import json, sys, time
import torch
from lmforge.infer import SamplingConfig, generate_ids
from lmforge.model import load_hf_model, pack_for_cpu
import lmforge

if int(sys.argv[2]):
    torch.set_num_threads(int(sys.argv[2]))
model = pack_for_cpu(load_hf_model(sys.argv[1]))
print(json.dumps({"ready": lmforge.__file__}), flush=True)
for line in sys.stdin:
    batch, n = map(int, line.split())
    prompts = torch.randint(0, model.cfg.vocab_size, (batch, 64), generator=torch.Generator().manual_seed(batch))
    run = lambda k: generate_ids(model, prompts.tolist(), SamplingConfig(max_new_tokens=k, temperature=0))
    run(2)  # warm-up: the first call after the other worker ran is slower (caches, thread pool)
    t0, c0 = time.perf_counter(), time.process_time(); run(1)
    prefill, prefill_cpu = time.perf_counter() - t0, time.process_time() - c0
    t0, c0 = time.perf_counter(), time.process_time(); tokens = run(1 + n)
    full, full_cpu = time.perf_counter() - t0, time.process_time() - c0
    print(json.dumps({"wall": full - prefill, "cpu": full_cpu - prefill_cpu, "tokens": tokens}), flush=True)
"""


def start(src: str, model_dir: str, threads: int) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(Path(src).resolve()))
    proc = subprocess.Popen([sys.executable, "-c", WORKER, model_dir, str(threads)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)
    ready = json.loads(proc.stdout.readline())
    print(f"worker {src}: {ready['ready']}", file=sys.stderr)
    return proc


def ask(proc: subprocess.Popen, batch: int, n: int) -> dict:
    proc.stdin.write(f"{batch} {n}\n")
    proc.stdin.flush()
    return json.loads(proc.stdout.readline())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", required=True, help="src folder of side A (e.g. this checkout's src)")
    ap.add_argument("--b", required=True, help="src folder of side B (e.g. an older commit's src)")
    ap.add_argument("--preset", default="smollm2-135m")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads in each worker (0: torch's default)")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(args.a).resolve()))
    import torch

    from lmforge.model import Transformer, preset, save_hf_model

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        save_hf_model(Transformer(preset(args.preset)), tmp)
        workers = {"A": start(args.a, tmp, args.threads), "B": start(args.b, tmp, args.threads)}
        result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "a": args.a, "b": args.b,
                  "preset": args.preset, "new_tokens": args.new_tokens, "threads": args.threads,
                  "load_before": os.getloadavg(), "runs": []}
        for batch in args.batches:
            rates = {clock: {"A": [], "B": []} for clock in ("wall", "cpu")}
            tokens = {}
            for r in range(args.rounds):
                for side in ("AB" if r % 2 == 0 else "BA"):
                    out = ask(workers[side], batch, args.new_tokens)
                    for clock in rates:
                        rates[clock][side].append(batch * args.new_tokens / max(out[clock], 1e-9))
                    tokens[side] = out["tokens"]
            row = {"batch": batch, "greedy_tokens_equal": tokens["A"] == tokens["B"], "load": os.getloadavg()}
            for clock, by_side in rates.items():
                best = {side: round(max(v), 1) for side, v in by_side.items()}
                median = {side: round(statistics.median(v), 1) for side, v in by_side.items()}
                row[clock] = {"best_tok_s": best, "ratio_a_over_b": round(best["A"] / best["B"], 3),
                              "median_tok_s": median, "median_ratio": round(median["A"] / median["B"], 3),
                              "rounds_tok_s": {side: [round(x, 1) for x in v] for side, v in by_side.items()}}
            print(json.dumps(row), file=sys.stderr)
            result["runs"].append(row)
        for proc in workers.values():
            proc.stdin.close()
            proc.wait()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
