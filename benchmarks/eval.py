"""Evaluation speed, side by side in one run, JSON out.

1. Multiple-choice items per second: lmforge (`lmforge.eval.run.evaluate`, and the `lmforge eval run` command a
   user types) against lm-evaluation-harness's HF backend (`lm_eval.simple_evaluate`, and its `lm_eval` command) on
   the same local model directory and the same items: an ARC-style task (multi-token choices, zero-shot) and an
   MMLU-style task (letter choices, 5-shot), with per-item log-likelihoods and accuracy checked equal.
2. Metric throughput against sacrebleu (BLEU, chrF) and rouge-score (ROUGE-1/2/L) on the same pairs, scores checked
   equal.

    python benchmarks/eval.py                       # SmolLM2-135M-shaped random model, 100 + 100 items, 10k pairs
    python benchmarks/eval.py --items 30 --pairs 2000 --layers 4   # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build_model(d: Path, layers: int) -> Path:
    """A SmolLM2-135M-shaped Llama (576 wide, 9 heads / 3 KV heads, SwiGLU 1536) with Phi-3's real tokenizer."""
    import torch
    import transformers

    from tests.corpora import real_tokenizer

    real_tokenizer("phi-3-mini-instruct", d)
    tok = transformers.AutoTokenizer.from_pretrained(d)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=576, intermediate_size=1536,
                                   num_hidden_layers=layers, num_attention_heads=9, num_key_value_heads=3,
                                   max_position_embeddings=2048, tie_word_embeddings=True,
                                   bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    return d


def build_items(d: Path, n: int) -> dict:
    """ARC-style and MMLU-style items from real English sentences (the Python reference): the question is a
    sentence without its last three words, the choices are those words and three other sentences' last three."""
    from lmforge.text import split_sentences
    from tests import corpora

    rng = random.Random(0)
    sents = [s for s in split_sentences(corpora.english(400_000)) if 12 <= len(s.split()) <= 40]
    rng.shuffle(sents)
    need = 3 * n + 5
    pool = sents[:need * 2]

    def split(s):  # ARC's shape: a long question, short answers (ARC-Easy: about 20 words and 1-5 words)
        w = s.split()
        return " ".join(w[:-3]), " ".join(w[-3:])

    arc, mmlu = [], []
    for i in range(n):
        q, a = split(pool[i])
        others = [split(pool[n + 3 * i + k])[1] for k in range(3)]
        choices = others[:]
        gold = rng.randrange(4)
        choices.insert(gold, a)
        labels = ["A", "B", "C", "D"]
        arc.append({"id": f"a{i}", "question": {"stem": f"How does this sentence end: {q}",
                                                "choices": [{"text": c, "label": lab} for c, lab in zip(choices, labels)]},
                    "answerKey": labels[gold]})
        mmlu.append([f"Which ending completes: {q}", *choices, labels[gold]])
    d.mkdir(parents=True, exist_ok=True)
    arc_path = d / "ARC-Bench-Test.jsonl"
    arc_path.write_text("".join(json.dumps(r) + "\n" for r in arc), encoding="utf-8")
    import csv

    for split_name, rows in (("test", mmlu[5:]), ("dev", mmlu[:5])):
        (d / "mmlu" / split_name).mkdir(parents=True, exist_ok=True)
        with open(d / "mmlu" / split_name / f"python_reference_{split_name}.csv", "w", newline="",
                  encoding="utf-8") as f:
            csv.writer(f).writerows(rows)
    # the same items as lm-eval's tasks read them (its own arc_easy / mmlu templates, local json files)
    (d / "arc_hf.jsonl").write_text("".join(json.dumps({"id": r["id"], "question": r["question"]["stem"],
                                                        "choices": {"text": [c["text"] for c in r["question"]["choices"]],
                                                                    "label": [c["label"] for c in r["question"]["choices"]]},
                                                        "answerKey": r["answerKey"]}) + "\n" for r in arc))
    for split_name, rows in (("test", mmlu[5:]), ("dev", mmlu[:5])):
        (d / f"mmlu_{split_name}.jsonl").write_text("".join(json.dumps(
            {"question": r[0], "subject": "python_reference", "choices": r[1:5], "answer": "ABCD".index(r[5])}) + "\n"
            for r in rows))
    import yaml
    from lm_eval import tasks as lm_tasks

    root = Path(lm_tasks.__file__).parent
    arc_spec = yaml.safe_load((root / "arc" / "arc_easy.yaml").read_text())
    mmlu_spec = yaml.safe_load((root / "mmlu" / "default" / "_default_template_yaml").read_text())
    keep = ("output_type", "doc_to_text", "doc_to_choice", "doc_to_target", "metric_list", "fewshot_config")
    (d / "bench_arc.yaml").write_text(yaml.safe_dump({k: arc_spec[k] for k in keep if k in arc_spec} | {
        "task": "bench_arc", "dataset_path": "json", "test_split": "test",
        "dataset_kwargs": {"data_files": {"test": str(d / "arc_hf.jsonl")}}}))
    (d / "bench_mmlu.yaml").write_text(yaml.safe_dump({k: mmlu_spec[k] for k in keep if k in mmlu_spec} | {
        "task": "bench_mmlu", "dataset_path": "json", "test_split": "test", "fewshot_split": "dev",
        "description": "The following are multiple choice questions (with answers) about python reference.\n\n",
        "dataset_kwargs": {"data_files": {"test": str(d / "mmlu_test.jsonl"), "dev": str(d / "mmlu_dev.jsonl")}}}))
    return {"arc": arc_path, "mmlu": d / "mmlu", "yaml_dir": d}


def bench_mc(model_dir: Path, files: dict, lm_eval_batch: int, out: Path) -> dict:
    import lm_eval
    import torch
    from lm_eval.tasks import TaskManager

    from lmforge.eval.run import evaluate
    from lmforge.eval.tasks import load_task
    from lmforge.model import load_hf_model
    from lmforge.tokenizer import load_tokenizer

    torch.set_num_threads(os.cpu_count() or 1)
    model, tok = load_hf_model(model_dir), load_tokenizer(model_dir)
    rows = {}
    for name, task_name, data, shots in (("arc", "arc_easy", files["arc"], 0), ("mmlu", "mmlu", files["mmlu"], 5)):
        task = load_task(task_name, data, num_fewshot=shots)
        t = time.perf_counter()
        res, preds = evaluate(model, tok, task, show_progress=False)
        ours_s = time.perf_counter() - t
        t = time.perf_counter()
        theirs = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model_dir},dtype=float32,device=cpu",
                                         tasks=[f"bench_{name}"], num_fewshot=shots, log_samples=True,
                                         batch_size=lm_eval_batch,
                                         task_manager=TaskManager(include_path=str(files["yaml_dir"])))
        theirs_s = time.perf_counter() - t  # includes lm-eval's model load (about 1 s here); ours excludes it
        samples = sorted(theirs["samples"][f"bench_{name}"], key=lambda s: s["doc_id"])
        diff = max(abs(a - float(b[0])) for s, p in zip(samples, preds)
                   for a, b in zip(p["loglikelihoods"], s["filtered_resps"]))
        same = all(p["pred"] == max(range(len(s["filtered_resps"])), key=lambda i: float(s["filtered_resps"][i][0]))
                   for s, p in zip(samples, preds))
        rows[name] = {"items": res["n"], "shots": shots, "lmforge_s": round(ours_s, 2),
                      "lm_eval_s": round(theirs_s, 2), "lmforge_items_per_s": round(res["n"] / ours_s, 2),
                      "lm_eval_items_per_s": round(res["n"] / theirs_s, 2), "speedup": round(theirs_s / ours_s, 2),
                      "acc": res["acc"], "lm_eval_acc": theirs["results"][f"bench_{name}"]["acc,none"],
                      "max_abs_loglik_diff": diff, "same_predictions": same}
    # the commands a user types, whole (interpreter start, imports, model load included)
    env = dict(os.environ)
    cli = {}
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "lmforge", "eval", "run", "--model", str(model_dir), "--task", "mmlu",
                    "--data", str(files["mmlu"]), "--shots", "5", "--out", str(out / "lmforge-run"), "--overwrite",
                    "--json"], check=True, env=env, capture_output=True)
    cli["lmforge_eval_run_s"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "lm_eval", "run", "--model", "hf", "--model_args",
                    f"pretrained={model_dir},dtype=float32", "--device", "cpu", "--tasks", "bench_mmlu", "--num_fewshot", "5",
                    "--include_path", str(files["yaml_dir"]), "--batch_size", str(lm_eval_batch)],
                   env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"lm_eval failed: {done.stderr[-3000:]}")
    cli["lm_eval_cli_s"] = round(time.perf_counter() - t, 2)
    cli["speedup"] = round(cli["lm_eval_cli_s"] / cli["lmforge_eval_run_s"], 2)
    rows["cli_mmlu_5shot"] = cli
    return rows


def bench_metrics(n: int) -> dict:
    import sacrebleu
    from rouge_score import rouge_scorer
    from tests.eval.test_metrics import _perturb

    from lmforge import metrics
    from lmforge.text import split_sentences
    from tests import corpora

    rng = random.Random(0)
    refs = [s for s in split_sentences(corpora.english(3_000_000)) if 20 < len(s) < 400]
    refs = (refs * (n // len(refs) + 1))[:n]
    hyps = [_perturb(r, rng, False) for r in refs]
    out = {"pairs": n}

    def timed(fn):
        t = time.perf_counter()
        v = fn()
        return v, time.perf_counter() - t

    ours, a = timed(lambda: metrics.bleu(hyps, refs)["score"])
    theirs, b = timed(lambda: sacrebleu.corpus_bleu(hyps, [refs]).score)
    out["bleu"] = {"lmforge_s": round(a, 3), "sacrebleu_s": round(b, 3), "speedup": round(b / a, 2),
                   "equal": abs(ours - theirs) < 1e-9, "score": ours}
    ours, a = timed(lambda: metrics.chrf(hyps, refs)["score"])
    theirs, b = timed(lambda: sacrebleu.corpus_chrf(hyps, [refs]).score)
    out["chrf"] = {"lmforge_s": round(a, 3), "sacrebleu_s": round(b, 3), "speedup": round(b / a, 2),
                   "equal": abs(ours - theirs) < 1e-9, "score": ours}
    types = ["rouge1", "rouge2", "rougeL"]
    ours, a = timed(lambda: metrics.rouge(hyps, refs, types=types))
    scorer = rouge_scorer.RougeScorer(types)

    def reference():
        scores = [scorer.score(r, h) for h, r in zip(hyps, refs)]
        return {t: sum(s[t].fmeasure for s in scores) / len(scores) for t in types}

    theirs, b = timed(reference)
    out["rouge"] = {"lmforge_s": round(a, 3), "rouge_score_s": round(b, 3), "speedup": round(b / a, 2),
                    "equal": all(abs(ours[t] - theirs[t]) < 1e-12 for t in types), "scores": ours}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=100, help="items per task")
    ap.add_argument("--layers", type=int, default=30, help="blocks of the SmolLM2-135M-shaped model (30 = its own)")
    ap.add_argument("--lm-eval-batch", type=int, default=1, help="lm-eval's --batch_size (1 is its default)")
    ap.add_argument("--pairs", type=int, default=10_000, help="pairs for the metric throughput")
    ap.add_argument("--skip-mc", action="store_true")
    args = ap.parse_args()
    result = {"machine": {"cpus": os.cpu_count()}, "date": time.strftime("%Y-%m-%d")}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if not args.skip_mc:
            model = build_model(tmp / "model", args.layers)
            files = build_items(tmp / "tasks", args.items)
            result["multiple_choice"] = bench_mc(model, files, args.lm_eval_batch, tmp)
            result["model"] = {"shape": "SmolLM2-135M", "layers": args.layers, "tokenizer": "phi-3 (32k)"}
        result["metrics"] = bench_metrics(args.pairs)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
