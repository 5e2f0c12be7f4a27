"""The portable path's cost: lmforge's scheduler over transformers' modules (model/portable.py) vs transformers'
own `generate`, the same Granite weights (random, a smollm2-135m-like shape), the same prompts, CPU, float32.

Both run transformers' modeling code; what differs is around it: lmforge's scheduler, its preallocated KV cache
written through `SlotCache`, its head call and its sampler, against `generate`'s DynamicCache and loop. Also
checks that both give the same greedy tokens.

Decode rate = batch x new_tokens / (time(1 + new_tokens) - time(1)), so prefill cancels out; greedy with
min_new_tokens = max_new_tokens on both sides. The runs take turns round by round; each reports its best round.
Prints JSON.
    .venv/bin/python benchmarks/portable.py [--layers 30] [--prompt-len 64] [--new-tokens 32] [--batches 1 8]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402
import transformers  # noqa: E402

from lmforge.infer import SamplingConfig, generate_ids  # noqa: E402
from lmforge.model import load_hf_model  # noqa: E402


def elapsed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    # SmolLM2-135M's shape as a Granite model (a family lmforge runs on the portable path only)
    config = transformers.GraniteConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                        num_hidden_layers=args.layers, num_attention_heads=9, num_key_value_heads=3,
                                        max_position_embeddings=2048, tie_word_embeddings=True, pad_token_id=None,
                                        bos_token_id=None, eos_token_id=None)
    with tempfile.TemporaryDirectory() as tmp:
        transformers.GraniteForCausalLM(config).save_pretrained(tmp)
        with contextlib.redirect_stderr(io.StringIO()):  # (the portable path's one line)
            ours = load_hf_model(tmp)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp).eval()
    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "torch": torch.__version__, "transformers": transformers.__version__,
                          "load_avg_1min_at_start": round(os.getloadavg()[0], 2)},
              "date": time.strftime("%Y-%m-%d"), "model": f"granite, smollm2-135m shape, {args.layers} layers",
              "params_M": round(sum(p.numel() for p in hf.parameters()) / 1e6, 1),
              "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "runs": []}
    for batch in args.batches:
        prompts = torch.randint(0, config.vocab_size, (batch, args.prompt_len),
                                generator=torch.Generator().manual_seed(batch))
        lists = prompts.tolist()

        def run_ours(n, lists=lists):
            return generate_ids(ours, lists, SamplingConfig(max_new_tokens=n, temperature=0))

        def run_hf(n, prompts=prompts):
            with torch.no_grad():
                out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=n,
                                  min_new_tokens=n, do_sample=False)
            return out[:, prompts.shape[1]:].tolist()

        same = run_ours(args.new_tokens) == run_hf(args.new_tokens)
        best = {"lmforge_portable": float("inf"), "transformers": float("inf")}
        for _ in range(args.repeats):
            for name, fn in (("lmforge_portable", run_ours), ("transformers", run_hf)):
                fn(1)  # warm-up right before the timed calls
                best[name] = min(best[name], elapsed(lambda fn=fn: fn(1 + args.new_tokens)) - elapsed(lambda fn=fn: fn(1)))
        rates = {name: round(batch * args.new_tokens / t, 1) for name, t in best.items()}
        result["runs"].append({"batch": batch, "same_greedy_tokens": same,
                               **{f"{k}_decode_tok_s": v for k, v in rates.items()},
                               "ratio": round(rates["lmforge_portable"] / rates["transformers"], 2)})
    result["machine"]["load_avg_1min_at_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
