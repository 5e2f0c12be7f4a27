"""DPO step time and loss values: `lmforge finetune --objective dpo` against trl's DPOTrainer on the same model and
the same pairs, both with the reference log-probabilities computed once before training.

Model: a SmolLM2-135M-shaped Llama (576 wide, 9 / 3 heads, SwiGLU 1536) with --layers blocks and Qwen2.5's real
tokenizer and chat template, random weights saved with transformers. Pairs: questions from Python's reference docs
(a sentence without its end) with the true end as the chosen reply and another sentence's end as the rejected one,
as conversational prompt / chosen / rejected records (trl renders them with the same chat template). Both sides:
full fine-tuning, AdamW (0.9, 0.999), lr 5e-6 constant, no weight decay, grad clip 1.0, batch --batch pairs, beta 0.1,
sigmoid loss, fp32, --steps steps. lmforge runs as the command a user types; trl's side is its Trainer in this
process. Seconds per step are medians after the first two steps (lmforge: metrics.jsonl step_s; trl: wall time per
step from a callback). Prints JSON.

    python benchmarks/dpo.py [--layers 4] [--pairs 64] [--batch 8] [--steps 12]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build_model(d: Path, layers: int) -> None:
    import torch
    import transformers

    from tests.corpora import real_tokenizer

    real_tokenizer("qwen2.5-instruct", d)
    tok = transformers.AutoTokenizer.from_pretrained(d)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=576, intermediate_size=1536,
                                   num_hidden_layers=layers, num_attention_heads=9, num_key_value_heads=3,
                                   max_position_embeddings=2048, tie_word_embeddings=True,
                                   eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"))
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)


def build_pairs(n: int) -> list[dict]:
    from lmforge.text import split_sentences
    from tests import corpora

    rng = random.Random(0)
    sents = [s for s in split_sentences(corpora.english(300_000)) if 10 <= len(s.split()) <= 30]
    rng.shuffle(sents)
    rows = []
    for i in range(n):
        words, other = sents[i].split(), sents[n + i].split()
        rows.append({"prompt": [{"role": "user", "content": "Complete: " + " ".join(words[:-4])}],
                     "chosen": [{"role": "assistant", "content": " ".join(words[-4:])}],
                     "rejected": [{"role": "assistant", "content": " ".join(other[-4:])}]})
    return rows


def run_trl(model_dir: Path, rows: list[dict], batch: int, steps: int, out: Path) -> dict:
    import torch
    import transformers
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    args = DPOConfig(output_dir=str(out), per_device_train_batch_size=batch, max_steps=steps, learning_rate=5e-6,
                     lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0, beta=0.1,
                     loss_type=["sigmoid"], precompute_ref_log_probs=True, logging_steps=1, report_to=[],
                     use_cpu=True, save_strategy="no", seed=0, disable_tqdm=True, max_length=512,
                     dataloader_num_workers=0)
    times, losses = [], []

    class Clock(transformers.TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t0)

        def on_log(self, args, state, control, logs=None, **k):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    t0 = time.perf_counter()
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         callbacks=[Clock()])
    trainer.train()
    return {"step_s": statistics.median(times[2:]), "losses": [round(x, 4) for x in losses],
            "wall_s": round(time.perf_counter() - t0, 1)}


def run_lmforge(model_dir: Path, rows: list[dict], batch: int, steps: int, out: Path) -> dict:
    data = out.parent / "pairs.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    cmd = [sys.executable, "-m", "lmforge", "finetune", "--model", str(model_dir), "--data", str(data), "--out",
           str(out), "--objective", "dpo", "--method", "full", "--batch-size", str(batch), "--max-steps", str(steps),
           "--lr", "5e-6", "--warmup-steps", "0", "--min-lr-ratio", "1.0", "--weight-decay", "0", "--beta2", "0.999",
           "--val-fraction", "0", "--samples", "0", "--eval-every", "0", "--no-progress"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    wall = time.perf_counter() - t0
    rec = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rec = [r for r in rec if "step_s" in r]
    return {"step_s": statistics.median(r["step_s"] for r in rec[2:]), "losses": [round(r["loss"], 4) for r in rec],
            "wall_s": round(wall, 1), "command": " ".join(["lmforge"] + cmd[3:])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=12)
    a = ap.parse_args()
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build_model(tmp / "model", a.layers)
        rows = build_pairs(a.pairs)
        ours = run_lmforge(tmp / "model", rows, a.batch, a.steps, tmp / "lmforge")
        theirs = run_trl(tmp / "model", rows, a.batch, a.steps, tmp / "trl")
    print(json.dumps({
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores", "torch": torch.__version__,
        "setup": vars(a), "lmforge": ours, "trl": theirs,
        "step_speedup_vs_trl": round(theirs["step_s"] / ours["step_s"], 2),
        "first_loss": {"lmforge": ours["losses"][0], "trl": theirs["losses"][0]},
    }, indent=2))


if __name__ == "__main__":
    main()
