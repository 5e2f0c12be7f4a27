"""CLI start-up: how long commands that need no model take, end to end, against the bare interpreter.

    python benchmarks/startup.py [--runs 15]

Each command runs as a user types it (a new process, `python -m lmforge ...`), interleaved with the floor
(`python -c pass`) round by round; the figures are medians of wall seconds. It also reports whether the command
imported torch (the goal: it does not, and takes at most 0.3 s). Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _time(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def _imports_torch(args: list[str]) -> bool:
    code = ("import sys, contextlib, io\nfrom lmforge.cli import main\nwith contextlib.redirect_stdout(io.StringIO()):\n"
            "    try:\n        main(sys.argv[1:])\n    except SystemExit:\n        pass\nprint('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True).stdout
    return out.strip().endswith("True")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=15)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    from lmforge.tokenizer import train_tokenizer

    train_tokenizer(["builtin:python-docs"], vocab_size=1024, show_progress=False).save(tmp / "tok")
    commands = {
        "lmforge --help": ["--help"],
        "lmforge tokenizer encode --text ...": ["tokenizer", "encode", "--tokenizer", str(tmp / "tok"), "--text",
                                                "分词器 tokenizer"],
        "lmforge rag index --help": ["rag", "index", "--help"],
    }
    floor_cmd = [sys.executable, "-c", "pass"]
    times: dict[str, list[float]] = {name: [] for name in commands}
    floor: list[float] = []
    for argv in commands.values():  # warm-up: page cache, pyc files
        _time([sys.executable, "-m", "lmforge", *argv])
    for _ in range(args.runs):
        floor.append(_time(floor_cmd))
        for name, argv in commands.items():
            times[name].append(_time([sys.executable, "-m", "lmforge", *argv]))
    base = statistics.median(floor)
    result = {"python -c pass (floor)": {"median_s": round(base, 3)}}
    for name, argv in commands.items():
        med = statistics.median(times[name])
        result[name] = {"median_s": round(med, 3), "min_s": round(min(times[name]), 3),
                        "over_floor_s": round(med - base, 3), "imports_torch": _imports_torch(argv)}
    print(json.dumps({"runs": args.runs, "commands": result}, indent=2))


if __name__ == "__main__":
    main()
