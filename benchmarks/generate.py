"""Generation benchmark: lmforge vs transformers `generate` (KV cache), same weights, same prompts, CPU.

Prints JSON: prefill and decode tokens/s at batch 1 and 8, and the peak resident memory each run adds
(KV cache, activations) on top of the loaded weights.
    .venv/bin/python benchmarks/generate.py [--preset smollm2-135m] [--prompt-len 64] [--new-tokens 32] [--int8]

--int8 adds weight-only int8 runs: lmforge's quantize_int8 vs transformers with torchao's
Int8WeightOnlyConfig (the same integers and scales, checked here), both with bfloat16 activations,
and the ratio of each to float32 transformers. --compile adds lmforge with compile=True (torch.compile of
the decode step, static KV cache; the warm-up call pays the compilation); transformers stays eager.

Float32 "lmforge" has its weights in the packed CPU kernel's layout (pack_for_cpu, model/packed.py;
`lmforge generate --pack`); "lmforge_torch_matmul" is the same model on torch's matmul, as transformers uses.

Decode rate = batch x new_tokens / (time(1 + new_tokens) - time(1)), so prefill cancels out; both
libraries run greedy decoding with min_new_tokens = max_new_tokens (no early stop). The runs take
turns round by round (the machine's speed drifts), each warms up right before its timed calls, and each
reports its best round.
"""

from __future__ import annotations

import argparse
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
from lmforge.model import Transformer, load_hf_model, pack_for_cpu, preset, quantize_int8, save_hf_model  # noqa: E402


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # Linux: "5" resets the peak RSS counter (VmHWM)
        f.write("5")


def rss_mb(field: str = "VmHWM") -> float:
    """VmHWM: peak resident memory since the last reset; VmRSS: resident now."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def weights_mb(model: torch.nn.Module) -> float:
    """Bytes of every parameter and buffer, each storage counted once (a tied head is one matrix)."""
    def storages(t):
        if hasattr(t, "__tensor_flatten__"):  # torchao's quantized weights: a wrapper around plain tensors
            for name in t.__tensor_flatten__()[0]:
                yield from storages(getattr(t, name))
        else:
            yield t.untyped_storage()

    seen, total = set(), 0
    for s in (s for t in [*model.parameters(), *model.buffers()] for s in storages(t)):
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            total += s.nbytes()
    return round(total / 2**20, 1)


def elapsed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="smollm2-135m")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--int8", action="store_true", help="also compare weight-only int8 (needs torchao)")
    ap.add_argument("--compile", action="store_true",
                    help="also time lmforge with compile=True (static cache) against the same transformers runs")
    args = ap.parse_args()
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        save_hf_model(Transformer(preset(args.preset)), tmp)
        # lmforge with float32 weights in the packed CPU kernel's layout (pack_for_cpu, model/packed.py)
        plain = load_hf_model(tmp)
        variants = {"float32": (pack_for_cpu(load_hf_model(tmp)), transformers.AutoModelForCausalLM.from_pretrained(tmp).eval())}
        if args.int8:
            from torchao.quantization import Int8WeightOnlyConfig

            # both quantize the float32 weights (so the integers are the same), then compute in bfloat16;
            # transformers leaves the tied output head in float, so lmforge does too here (skip="lm_head")
            hf8 = transformers.AutoModelForCausalLM.from_pretrained(
                tmp, dtype=torch.float32, quantization_config=transformers.TorchAoConfig(Int8WeightOnlyConfig()))
            hf8 = hf8.to(torch.bfloat16).eval()
            ours8 = quantize_int8(load_hf_model(tmp), skip=("lm_head",)).to(torch.bfloat16)
            same = all(torch.equal(ours8.get_submodule(a).qweight, hf8.get_submodule(b).weight.qdata) for a, b in
                       [("layers.0.mlp.down_proj", "model.layers.0.mlp.down_proj"),
                        ("layers.3.attn.o_proj", "model.layers.3.self_attn.o_proj")])
            variants["int8"] = (ours8, hf8)
            # the output head too (lmforge's default): transformers never quantizes a tied head, so give it an
            # untied quantized copy with torchao, as quantize_int8 does
            from torchao.quantization import quantize_

            hf8h = transformers.AutoModelForCausalLM.from_pretrained(
                tmp, dtype=torch.float32, quantization_config=transformers.TorchAoConfig(Int8WeightOnlyConfig()))
            hf8h.lm_head = torch.nn.Linear(hf8h.config.hidden_size, hf8h.config.vocab_size, bias=False)
            hf8h.lm_head.weight = torch.nn.Parameter(hf8h.model.embed_tokens.weight.detach().clone())
            quantize_(hf8h.lm_head, Int8WeightOnlyConfig())
            hf8h = hf8h.to(torch.bfloat16).eval()
            variants["int8_with_head"] = (quantize_int8(load_hf_model(tmp)).to(torch.bfloat16), hf8h)
            same = same and torch.equal(variants["int8_with_head"][0].lm_head.qweight, hf8h.lm_head.weight.qdata)
    cfg = variants["float32"][0].cfg
    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": threads,
                          "torch": torch.__version__, "transformers": transformers.__version__},
              "date": time.strftime("%Y-%m-%d"), "model": args.preset, "params_M": round(cfg.num_params() / 1e6, 1),
              "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "runs": []}
    result["weights_MB"] = {variant: {"lmforge": weights_mb(ours), "transformers": weights_mb(hf)}
                            for variant, (ours, hf) in variants.items()}
    if args.int8:
        result["int8_same_integers_as_torchao"] = same
        result["int8_output_head"] = {"int8": "float in both", "int8_with_head": "int8 in both (untied copy)"}
    for batch in args.batches:
        prompts = torch.randint(0, cfg.vocab_size, (batch, args.prompt_len), generator=torch.Generator().manual_seed(batch))
        lists = prompts.tolist()
        for variant, (ours, hf) in variants.items():

            def run_ours(n, lists=lists, ours=ours, compile=False):
                return generate_ids(ours, lists, SamplingConfig(max_new_tokens=n, temperature=0), compile=compile)

            def run_hf(n, prompts=prompts, hf=hf):
                with torch.no_grad():
                    return hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=n,
                                       min_new_tokens=n, do_sample=False, pad_token_id=0)

            a, b = run_ours(args.new_tokens), run_hf(args.new_tokens)[:, args.prompt_len:].tolist()
            # int8 computes in bfloat16, where near-ties of a random-init model can flip: report the agreement
            agree = sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb)) / sum(map(len, a))
            row = {"variant": variant, "batch": batch, "greedy_tokens_identical": a == b,
                   "greedy_token_agreement": round(agree, 3)}
            runs = [("lmforge", run_ours), ("transformers", run_hf)]
            if variant == "float32":  # the same model on torch's matmul: what the packed kernel adds
                runs.append(("lmforge_torch_matmul", lambda n, lists=lists: generate_ids(
                    plain, lists, SamplingConfig(max_new_tokens=n, temperature=0))))
            if args.compile:
                runs.append(("lmforge_compiled", lambda n, run_ours=run_ours: run_ours(n, compile=True)))
            # the machine is shared and its speed drifts: the libraries take turns, best of the rounds for each
            best = {name: [float("inf"), float("inf")] for name, _ in runs}
            extra = {}
            for _name, fn in runs:
                fn(2)  # warm-up (and compilation)
            for _ in range(args.repeats):
                for name, fn in runs:
                    # a short untimed call first: the first call after another library's run was up to 30% slower
                    # for the compiled step (measured), a warm-up effect rather than the steady state being compared
                    fn(2)
                    reset_peak_rss()
                    baseline = rss_mb("VmRSS")  # every model stays loaded, so report what a run adds on top
                    best[name][0] = min(best[name][0], elapsed(lambda fn=fn: fn(1)))
                    best[name][1] = min(best[name][1], elapsed(lambda fn=fn: fn(1 + args.new_tokens)))
                    extra[name] = max(extra.get(name, 0.0), rss_mb() - baseline)
            for name, (prefill, full) in best.items():
                row[name] = {"prefill_tok_s": round(batch * args.prompt_len / prefill, 1),
                             "decode_tok_s": round(batch * args.new_tokens / max(full - prefill, 1e-9), 1),
                             "peak_extra_rss_MB": round(extra[name], 1)}
            for what in ("decode", "prefill"):
                key = f"{what}_tok_s"
                row[f"{what}_ratio_lmforge_over_transformers"] = round(row["lmforge"][key] / row["transformers"][key], 2)
            if variant == "float32":
                row["decode_ratio_lmforge_torch_matmul_over_transformers"] = round(
                    row["lmforge_torch_matmul"]["decode_tok_s"] / row["transformers"]["decode_tok_s"], 2)
            if args.compile:
                row["decode_ratio_lmforge_compiled_over_transformers"] = round(
                    row["lmforge_compiled"]["decode_tok_s"] / row["transformers"]["decode_tok_s"], 2)
            if variant != "float32":
                fp32 = next(r for r in result["runs"] if r["batch"] == batch and r["variant"] == "float32")
                for ours_name in ("lmforge", "lmforge_compiled") if args.compile else ("lmforge",):
                    row[f"decode_ratio_{ours_name}_over_transformers_float32"] = round(
                        row[ours_name]["decode_tok_s"] / fp32["transformers"]["decode_tok_s"], 2)
            print(json.dumps(row), file=sys.stderr)
            result["runs"].append(row)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
