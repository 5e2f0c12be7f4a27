"""Packed against padded SFT batches: examples (and their real tokens) per second through `lmforge finetune`.

    python benchmarks/sft_packing.py [--steps 6] [--max-length 512]

The data is a real instruction set of varied lengths: the questions and answers the quickstart draws from the
Python reference (finetune/builtin.py, 152 examples of 20 to 120 tokens), with a tokenizer trained on the same
corpus. The model is SmolLM2-135M-shaped with 6 layers (random weights, vocabulary sized to the tokenizer). The
same command runs three times, LoRA at default flags but the steps and the batching: --packing, --no-packing
--no-group-by-length, and --no-packing --group-by-length (the default). A packed row holds several examples; a
padded row holds one, padded to the longest of its batch. Prints JSON with examples/s, real tokens/s and the
ratios.
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    from pydoc_data.topics import topics

    import torch
    import transformers

    from lmforge.finetune.builtin import python_docs_instructions
    from lmforge.tokenizer import train_tokenizer

    tmp = Path(tempfile.mkdtemp())
    records = python_docs_instructions([topics[k] for k in sorted(topics)])
    data = tmp / "instructions.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    tok = train_tokenizer(["builtin:python-docs"], vocab_size=4096, show_progress=False)
    cfg = transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=576, intermediate_size=1536,
                                   num_hidden_layers=6, num_attention_heads=9, num_key_value_heads=3,
                                   tie_word_embeddings=True, max_position_embeddings=2048)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp / "model")
    tok.save(tmp / "model")
    runs = {"packed": ["--packing"], "padded": ["--no-packing", "--no-group-by-length"],
            "padded, grouped by length": ["--no-packing", "--group-by-length"]}
    out = {}
    for name, flags in runs.items():
        d = tmp / name.replace(" ", "_").replace(",", "")
        r = subprocess.run([sys.executable, "-m", "lmforge", "finetune", "--model", str(tmp / "model"), "--data",
                            str(data), "--out", str(d), "--max-steps", str(args.steps + 1), "--batch-size",
                            str(args.batch_size), "--max-length", str(args.max_length), "--eval-every", "0",
                            "--samples", "0", "--val-fraction", "0", "--no-progress", *flags],
                           capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(r.stderr)
        written = json.loads((d / "data.json").read_text())
        info = written["train"]
        rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines() if "loss" in line]
        step_s = statistics.median(row["step_s"] for row in rows[1:])
        tokens_per_example = info["tokens"] / info["examples"]
        # real tokens in a row: a packed row is filled to its utilisation, a padded row holds one example
        per_row = written["packing_utilisation"] * args.max_length if name == "packed" else tokens_per_example
        tokens_per_s = args.batch_size * per_row / step_s
        out[name] = {"step_s": round(step_s, 3), "real_tokens_per_row": round(per_row, 1),
                     "real_tokens_per_s": round(tokens_per_s), "examples_per_s": round(tokens_per_s / tokens_per_example, 2)}
    base = out["padded"]["examples_per_s"]
    print(json.dumps({
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "data": f"{len(records)} instructions drawn from the Python reference, mean "
                f"{info['tokens'] / info['examples']:.0f} tokens",
        "model": "SmolLM2-135M-shaped, 6 layers, LoRA r=8 all-linear", "batch": f"{args.batch_size} x {args.max_length}",
        "runs": out, "speedup_over_padded": {k: round(v["examples_per_s"] / base, 2) for k, v in out.items()}},
        indent=2))


if __name__ == "__main__":
    main()
