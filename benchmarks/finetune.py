"""LoRA fine-tuning step time and peak memory: lmforge against peft + transformers on the same model and batch.

    python benchmarks/finetune.py [--layers 30] [--seq 512] [--batch 4] [--steps 4]

The model is SmolLM2-135M-shaped (d 576, 30 layers, 9 heads / 3 KV heads, SwiGLU 1536, vocab 49152, tied
embeddings), random weights saved with transformers. Both sides train LoRA r=8, alpha=16, dropout 0.05 on every
linear layer of the blocks (q, k, v, o, gate, up, down), AdamW, fp32, on the same random token batch, with the loss
on every token. Timing: the two sides alternate step by step in this process after warm-up steps (median of
`--steps`). Peak memory: each side again in a child process of its own (ru_maxrss, the whole process).
Last, `lmforge finetune` itself on the same model (the command a user types, default flags but steps and shapes),
seconds per step from its metrics.jsonl. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_model(directory: Path, layers: int) -> None:
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                                   num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                                   rope_theta=100000.0, tie_word_embeddings=True, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(directory)


WEIGHT_BYTES: dict[str, int] = {}


def lmforge_side(directory: Path, qlora: bool = False):
    from lmforge.model import load_hf_model
    from lmforge.peft import lora
    from lmforge.peft.nf4 import quantize_model
    from lmforge.train.objectives import CausalLM

    model = load_hf_model(directory).train()
    name = "lmforge QLoRA" if qlora else "lmforge"
    if qlora:  # every block linear layer in NF4 (double quantization), as `finetune --method qlora` does
        sites = sorted({s.module for s in lora.adapter_sites(model.cfg)})
        nf4 = quantize_model(model, sites)
        WEIGHT_BYTES[name] = nf4 + sum(p.numel() * p.element_size() for p in model.parameters())
    else:
        WEIGHT_BYTES[name] = sum(p.numel() * p.element_size() for p in model.parameters())
    lora.apply_lora(model, lora.LoraConfig(r=8, alpha=16, dropout=0.05, targets=TARGETS))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    objective = CausalLM()  # what the Trainer runs

    def step(ids, labels):
        loss, _ = objective.loss(model, {"input_ids": ids[:, :-1], "labels": labels[:, 1:]})
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()
    return step


def peft_side(directory: Path):
    import peft
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(directory, torch_dtype=torch.float32)
    model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=TARGETS))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(ids, labels):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()
    return step


def batch(args) -> torch.Tensor:
    return torch.randint(0, 49152, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(0))


def sft_labels(ids: torch.Tensor) -> torch.Tensor:
    """The batch's labels as SFT has them: the first half of each row (the prompt) masked with -100."""
    labels = ids.clone()
    labels[:, : ids.shape[1] // 2] = -100
    return labels


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss it is not inherited across exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def child(args) -> None:
    """One side alone: warm-up, a few steps, its peak RSS."""
    step = peft_side(Path(args.model)) if args.side == "peft" else lmforge_side(Path(args.model), args.side == "qlora")
    ids = batch(args)
    for _ in range(2):
        step(ids, ids)
    print(json.dumps({"peak_rss_mb": peak_rss_mb()}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--side", choices=["lmforge", "peft", "qlora"])
    ap.add_argument("--model")
    args = ap.parse_args()
    if args.side:
        child(args)
        return
    tmp = Path(tempfile.mkdtemp())
    build_model(tmp / "model", args.layers)
    ids = batch(args)
    # each side shifts the labels itself (lmforge's objective takes them shifted, transformers shifts inside)
    sides = {"lmforge": lmforge_side(tmp / "model"), "peft+transformers": peft_side(tmp / "model"),
             "lmforge QLoRA": lmforge_side(tmp / "model", qlora=True)}
    for step in sides.values():
        step(ids, ids)  # warm-up
    times = {(name, case): [] for name in sides for case in ("all_tokens", "sft_half_masked")}
    for _ in range(args.steps):
        for case, labels in (("all_tokens", ids), ("sft_half_masked", sft_labels(ids))):
            for name, step in sides.items():
                t0 = time.perf_counter()
                step(ids, labels)
                times[(name, case)].append(time.perf_counter() - t0)
    del sides
    memory = {}
    for name, side in (("lmforge", "lmforge"), ("peft+transformers", "peft"), ("lmforge QLoRA", "qlora")):
        r = subprocess.run([sys.executable, __file__, "--side", side, "--model", str(tmp / "model"), "--seq",
                            str(args.seq), "--batch", str(args.batch)], capture_output=True, text=True, check=True)
        memory[name] = json.loads(r.stdout.strip().splitlines()[-1])["peak_rss_mb"]
    # the command a user types: a real instruction file is not needed for step time; plain text rows of the same
    # length keep every token trained, as the two sides above do
    words = " ".join(f"w{i % 997}" for i in range(args.seq * 40))
    data = tmp / "text.jsonl"
    data.write_text("".join(json.dumps({"text": words}) + "\n" for _ in range(64)), encoding="utf-8")
    import shutil

    from lmforge.tokenizer import train_tokenizer

    tok = train_tokenizer([str(data)], vocab_size=2000, show_progress=False)
    tok.save(tmp / "model")  # a tokenizer for the CLI (ids stay below the model's vocabulary)
    out = tmp / "cli"
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "lmforge", "finetune", "--model", str(tmp / "model"), "--data", str(data),
                        "--format", "text", "--out", str(out), "--max-steps", str(args.steps + 1), "--batch-size",
                        str(args.batch), "--max-length", str(args.seq), "--eval-every", "0", "--val-fraction", "0",
                        "--samples", "0", "--lora-targets", *TARGETS, "--no-progress"], capture_output=True, text=True)
    cli_wall = time.perf_counter() - t0
    if r.returncode:
        raise SystemExit(r.stderr)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "loss" in line]
    cli_step = statistics.median(row["step_s"] for row in rows[1:])
    shutil.rmtree(tmp, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "model": f"SmolLM2-135M-shaped, {args.layers} layers", "batch": f"{args.batch} x {args.seq}", "dtype": "fp32",
        "lora": "r=8, alpha=16, dropout 0.05, q k v o gate up down",
        "step_s": {f"{name} {case}": round(v, 3) for (name, case), v in med.items()},
        "speed_ratio_lmforge_over_peft": {
            case: round(med[("peft+transformers", case)] / med[("lmforge", case)], 2)
            for case in ("all_tokens", "sft_half_masked")},
        "peak_rss_mb": memory, "memory_ratio_lmforge_over_peft": round(memory["lmforge"] / memory["peft+transformers"], 2),
        "base_weight_mb": {k: round(v / 2**20, 1) for k, v in WEIGHT_BYTES.items()},
        "base_weight_ratio_qlora_over_lora": round(WEIGHT_BYTES["lmforge QLoRA"] / WEIGHT_BYTES["lmforge"], 3),
        "qlora_step_over_lora_step": {case: round(med[("lmforge QLoRA", case)] / med[("lmforge", case)], 2)
                                      for case in ("all_tokens", "sft_half_masked")},
        "cli": {"command": "lmforge finetune --format text ... (default flags but steps and shapes; full rows)",
                "step_s": round(cli_step, 3), "wall_s": round(cli_wall, 1)}}, indent=2))


if __name__ == "__main__":
    main()
