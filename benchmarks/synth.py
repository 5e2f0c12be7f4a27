"""Self-instruct throughput against `lmforge serve` on this CPU: valid, deduplicated instructions per minute, and
where the generated ones went (kept or rejected, by reason).

Both commands are the ones a user types: `lmforge serve --model DIR` in a child process, then `lmforge synth
self-instruct --seed-tasks builtin:seeds-en --endpoint URL --num N` against it. The model is the quickstart's
fine-tuned, merged model (`lmforge quickstart` writes runs/quickstart/finetune-merged), or --model DIR. There is no
peer in this script: distilabel, the usual peer, needs an online LLM provider and is not installed here.

    python benchmarks/synth.py [--model DIR] [--num 20] [--rounds 5]
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
    ap.add_argument("--model", default=str(ROOT / "runs" / "quickstart" / "finetune-merged"))
    ap.add_argument("--num", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5, help="stop after this many rounds even if --num is not reached")
    ap.add_argument("--prompts-per-round", type=int, default=4)
    a = ap.parse_args()
    if not Path(a.model, "config.json").exists():
        sys.exit(f"{a.model}: no model (run `lmforge quickstart` first, or pass --model DIR)")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
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
    print(json.dumps({
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores", "model": a.model,
        "command": " ".join(["lmforge"] + cmd[3:]), "wall_s": round(wall, 1), "rounds": stats["rounds"],
        "generated": stats["generated"], "kept_items": stats["kept"], "instructions_kept": stats["instructions_kept"],
        "valid_instructions_per_minute": round(stats["instructions_kept"] / wall * 60, 2),
        "generated_per_minute": round(stats["generated"] / wall * 60, 1),
        "rejection_reasons": stats["rejection_reasons"], "tokens": stats.get("tokens"),
    }, indent=2))


if __name__ == "__main__":
    main()
