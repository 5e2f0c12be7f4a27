"""Per-step overhead of the one step loop (infer/scheduler.py), in process, no HTTP: decode tokens/s of
`generate_ids` at batch 1 and 8 (time(1 + N tokens) - time(1 token): prefill cancels out), and the continuous
batcher's generated tokens/s with 1, 8 and 16 requests at once (its ratio to one request is what per-row Python
work in the step would eat). A small model (4 layers x 128, Qwen2.5's 151k vocabulary: benchmarks/serve.py's), greedy,
no stop ids, best of --rounds, one torch thread (a shared machine's load hits every run alike). JSON out.

    python benchmarks/scheduler.py [--rounds 3] [--new-tokens 32]
Run it from two checkouts (PYTHONPATH=CHECKOUT/src) in turns to compare them.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()
    import torch
    from serve import build_model

    import lmforge
    from lmforge.infer import SamplingConfig, generate_ids
    from lmforge.infer.batching import ContinuousBatcher
    from lmforge.model import load_hf_model
    from lmforge.tokenizer import load_tokenizer

    torch.set_num_threads(1)
    new = args.new_tokens
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(Path(tmp) / "m", 4, 128)
        model, tok = load_hf_model(model_dir).eval(), load_tokenizer(model_dir)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, 5000, (64,), generator=g).tolist() for _ in range(16)]

    def decode(batch: int, n: int) -> float:
        t = time.perf_counter()
        out = generate_ids(model, prompts[:batch], SamplingConfig(max_new_tokens=n, temperature=0))
        assert all(len(o) == n for o in out)
        return time.perf_counter() - t

    def batcher(clients: int) -> float:
        b = ContinuousBatcher(model, tok, max_batch=16, prefix_cache_tokens=0).start()
        done, count = threading.Semaphore(0), [0]

        def emit(e):
            count[0] += e.token_id is not None
            if e.finish_reason:
                done.release()

        t = time.perf_counter()
        for i in range(clients):
            b.submit(prompts[i], SamplingConfig(max_new_tokens=new, temperature=0), emit)
        for _ in range(clients):
            done.acquire()
        seconds = time.perf_counter() - t
        b.stop()
        return count[0] / seconds

    out = {"lmforge": lmforge.__file__}
    with torch.no_grad():
        decode(1, 2), decode(8, 2)  # warm-up
        for batch in (1, 8):
            best = min(decode(batch, new + 1) - decode(batch, 1) for _ in range(args.rounds))
            out[f"decode_batch{batch}_tok_s"] = round(batch * new / best, 1)
        for clients in (1, 8, 16):
            out[f"batcher_{clients}_requests_tok_s"] = round(max(batcher(clients) for _ in range(args.rounds)), 1)
    for clients in (8, 16):
        out[f"batcher_{clients}_over_1"] = round(out[f"batcher_{clients}_requests_tok_s"]
                                                 / out["batcher_1_requests_tok_s"], 2)
    out |= {"new_tokens": new, "date": time.strftime("%Y-%m-%d")}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
