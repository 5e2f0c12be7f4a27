"""Where a decode step's time goes: lmforge at `lmforge generate`'s default flags against llama-cpp-python, one
stream, the same model and precision (float32 weights; llama.cpp's KV cache in f32 too).

An lmforge preset with random weights (over Qwen2.5's 151k vocabulary, whose real tokenizer the GGUF file needs) is
saved once, loaded by lmforge as `lmforge generate` loads it
(infer/load.py `load_for_inference`, default flags: the packed CPU kernels on float32) and exported to GGUF (f32) by
`lmforge export gguf` for llama-cpp-python. Both decode the same prompt ids greedily:

    python benchmarks/decode_profile.py [--preset smollm2-135m] [--prompt-len 64] [--new-tokens 64] [--int8]

--int8: lmforge's weight-only int8 (`--quantize int8`) against llama.cpp's q8_0 file (`export gguf --type q8_0`):
both 8-bit weights with a scale (lmforge per output row, q8_0 per 32 weights), so greedy tokens may differ.

Prints JSON: each side's decode tokens/s by the wall clock and by the process's CPU time (best of --repeats; on a
machine shared with other jobs the CPU time at --threads 1 is the steadier comparison; llama.cpp's as `Llama.eval`
one token at a time with an argmax over its logits, its own decode loop without sampling's Python), whether the
greedy tokens agree, and
lmforge's per-op breakdown of the decode steps (torch.profiler: self CPU time per op, summed over the steps, grouped
into matmuls, attention, norms, elementwise and the rest) with the step time outside every op (Python: the
scheduler, sampling's host work, the modules' calls).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.corpora: the real tokenizer files

import torch  # noqa: E402

from lmforge.infer import SamplingConfig, generate_ids  # noqa: E402
from lmforge.infer.load import load_for_inference  # noqa: E402
from lmforge.infer.scheduler import Scheduler  # noqa: E402
from lmforge.model import Transformer, preset, save_hf_model  # noqa: E402

GROUPS = (  # (group, substrings of the op names it takes), first match wins
    # a plain pre-norm layer's whole one-token step (its 4 matmuls, attention, norms) as one op
    ("lmforge decode_layer (a whole layer)", ("decode_layer",)),
    ("matmul: lmforge packed kernel", ("packed_linear",)),
    ("matmul: torch", ("aten::mm", "aten::addmm", "aten::linear", "aten::matmul", "aten::bmm")),
    ("attention", ("decode_attention", "scaled_dot_product", "attention")),
    ("norms", ("rms_norm", "layer_norm")),
    ("sampling and logits", ("argmax", "topk", "sort", "softmax", "multinomial", "where", "max")),
    ("copies and indexing", ("copy_", "index", "cat", "slice", "select", "view", "reshape", "transpose", "expand",
                             "clone", "contiguous", "as_strided", "empty", "zeros", "fill_", "scatter", "to",
                             "_to_copy", "unsqueeze", "split", "narrow", "item", "_local_scalar")),
    ("elementwise", ("add", "mul", "sub", "div", "neg", "silu", "gelu", "tanh", "cos", "sin", "pow", "rsqrt", "exp")),
)


def group_of(name: str) -> str:
    for group, keys in GROUPS:
        if any(k in name for k in keys):
            return group
    return "other"


def clocks() -> tuple[float, float]:
    """Wall seconds and this process's CPU seconds (every thread's, llama.cpp's own threads included)."""
    return time.perf_counter(), time.process_time()


def rates(new: int, start: tuple[float, float], end: tuple[float, float], less=(0.0, 0.0)) -> tuple[float, float]:
    """Tokens/s by the wall clock and by CPU time, over end - start less `less` (seconds of each clock)."""
    return tuple(new / max(b - a - c, 1e-9) for a, b, c in zip(start, end, less))


def lmforge_decode(model, prompt: list[int], new: int) -> tuple[tuple[float, float], list[int]]:
    """Decode tokens/s (time for 1 + new tokens less the time for 1; wall, CPU) and the greedy tokens."""
    t = clocks()
    generate_ids(model, [prompt], SamplingConfig(max_new_tokens=1, temperature=0))
    first = tuple(b - a for a, b in zip(t, clocks()))
    t = clocks()
    tokens = generate_ids(model, [prompt], SamplingConfig(max_new_tokens=1 + new, temperature=0))[0]
    return rates(new, t, clocks(), first), tokens[1:]


def llama_decode(llm, prompt: list[int], new: int) -> tuple[tuple[float, float], list[int]]:
    """Decode tokens/s of llama.cpp's own loop: eval one token, argmax of its logits, as a greedy sampler does."""
    import numpy as np

    def last_logits():  # llama.cpp's logits of the last token fed (Llama.scores is only filled with logits_all)
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))

    llm.reset()
    llm.eval(prompt)
    token = int(np.argmax(last_logits()))
    tokens = []
    t = clocks()
    for _ in range(new):
        llm.eval([token])
        token = int(np.argmax(last_logits()))
        tokens.append(token)
    return rates(new, t, clocks()), tokens


def profile_steps(model, prompt: list[int], new: int) -> dict:
    """torch.profiler over `new` decode steps of the scheduler (after the prefill): self CPU time per op group, per
    step, and the wall time per step with the profiler on."""
    from torch.profiler import ProfilerActivity, profile

    scheduler = Scheduler(model, capacity=1, width=len(prompt) + new + 2)
    scheduler.add(prompt, SamplingConfig(max_new_tokens=new + 1, temperature=0))
    scheduler.step()  # the prefill and the first token
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        steps = 0
        while scheduler.busy:
            scheduler.step()
            steps += 1
        wall = time.perf_counter() - t
    groups: dict[str, float] = {}
    ops = []
    for event in prof.key_averages():
        if event.key.startswith("ProfilerStep"):
            continue
        us = event.self_cpu_time_total
        groups[group_of(event.key)] = groups.get(group_of(event.key), 0.0) + us
        ops.append((us, event.key, event.count))
    per_step_us = {g: round(us / steps, 1) for g, us in sorted(groups.items(), key=lambda kv: -kv[1])}
    in_ops = sum(groups.values()) / steps
    return {"steps": steps, "wall_ms_per_step_profiled": round(1e3 * wall / steps, 3),
            "self_cpu_us_per_step": per_step_us,
            "outside_ops_us_per_step": round(1e6 * wall / steps - in_ops, 1),
            "top_ops": [{"op": k, "us_per_step": round(us / steps, 1), "calls_per_step": round(n / steps, 1)}
                        for us, k, n in sorted(ops, reverse=True)[:15]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="smollm2-135m")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="both libraries' threads")
    ap.add_argument("--int8", action="store_true",
                    help="lmforge `--quantize int8` (weight-only int8) against llama.cpp on `export gguf --type q8_0`")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from llama_cpp import Llama

    from lmforge.export.gguf import export_gguf

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        # Qwen2.5's real tokenizer (byte-level BPE, 151k ids): the model exports to GGUF with it
        import transformers

        from tests.corpora import real_tokenizer

        real_tokenizer("qwen2.5-instruct", model_dir)
        vocab = len(transformers.AutoTokenizer.from_pretrained(model_dir))
        save_hf_model(Transformer(preset(args.preset, vocab_size=vocab)), model_dir)
        # `lmforge generate`'s default flags, or with --quantize int8
        ours = load_for_inference(model_dir, quantize="int8" if args.int8 else None).model
        gguf = export_gguf(model_dir, Path(tmp) / "model.gguf", dtype="q8_0" if args.int8 else "f32")
        llm = Llama(str(gguf), n_ctx=args.prompt_len + args.new_tokens + 8, n_threads=args.threads,
                    n_threads_batch=args.threads, n_batch=512, verbose=False, type_k=0, type_v=0)  # 0: GGML f32
        prompt = torch.randint(0, ours.cfg.vocab_size, (args.prompt_len,),
                               generator=torch.Generator().manual_seed(0)).tolist()
        lmforge_decode(ours, prompt, 4)  # warm-up (the kernels' first call)
        llama_decode(llm, prompt, 4)
        best = {"lmforge": [0.0, 0.0], "llama_cpp_python": [0.0, 0.0]}  # (wall, CPU time) tokens/s
        tokens = {}
        for _ in range(args.repeats):  # the libraries take turns: the machine's speed drifts
            for side, decode, model in (("lmforge", lmforge_decode, ours), ("llama_cpp_python", llama_decode, llm)):
                rate, tokens[side] = decode(model, prompt, args.new_tokens)
                best[side] = [max(a, b) for a, b in zip(best[side], rate)]
        agree = sum(a == b for a, b in zip(tokens["lmforge"], tokens["llama_cpp_python"])) / args.new_tokens
        result = {"model": args.preset, "params_M": round(ours.cfg.num_params() / 1e6, 1),
                  "weights": "lmforge int8 vs llama.cpp q8_0" if args.int8 else "float32 both",
                  "inference_only": ours.inference_only, "threads": args.threads, "prompt_len": args.prompt_len,
                  "new_tokens": args.new_tokens, "decode_tok_s": {k: round(v[0], 1) for k, v in best.items()},
                  "ratio_lmforge_over_llama_cpp": round(best["lmforge"][0] / best["llama_cpp_python"][0], 2),
                  # by CPU time: on a loaded machine the wall clock counts the others' jobs too (with 2+ threads
                  # CPU time also counts each library's spin-waits)
                  "decode_tok_s_by_cpu_time": {k: round(v[1], 1) for k, v in best.items()},
                  "ratio_by_cpu_time": round(best["lmforge"][1] / best["llama_cpp_python"][1], 2),
                  "greedy_token_agreement": round(agree, 3),
                  "profile": profile_steps(ours, prompt, args.new_tokens),
                  "load": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M")}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
