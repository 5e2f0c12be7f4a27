"""Running tasks on a model and writing what a run found: results.json (per task and metric, with standard errors),
predictions.jsonl (one line per item: the prompt's hash, per-choice log-likelihoods or the generation, the answer and
whether it was right) and report.md (a table).

Multiple choice: acc = argmax of the summed log-likelihoods, acc_norm = argmax of log-likelihood per character of the
choice (lm-eval's definition: characters of the choice text, without the delimiter). Generation: greedy (or sampled)
text until a stop string, each filter extracts an answer, exact_match compares it with the reference after the
task's clean-up; rouge1/2/L/Lsum (per item, Chinese by characters), bleu and chrf (corpus level, sacrebleu's
definitions) compare it with the reference too.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from lmforge.eval.metrics import bleu, chrf, exact_match, rouge_pair
from lmforge.eval.scoring import _encode, score_choices
from lmforge.eval.tasks import Task


ROUGE_METRICS = ("rouge1", "rouge2", "rougeL", "rougeLsum")
GENERATION_METRICS = ("exact_match", *ROUGE_METRICS, "bleu", "chrf")


def mean_stderr(values: Sequence[float]) -> float:
    """Standard error of a mean: sample standard deviation (n - 1) over sqrt(n), as lm-eval reports it."""
    n = len(values)
    if n < 2:
        return float("nan")
    mu = sum(values) / n
    return math.sqrt(sum((v - mu) ** 2 for v in values) / (n - 1) / n)


def _summary(per_item: dict[str, list[float]]) -> dict[str, float]:
    out = {}
    for metric, values in per_item.items():
        out[metric] = sum(values) / len(values) if values else float("nan")
        out[f"{metric}_stderr"] = mean_stderr(values)
    return out


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="item", disable=None, leave=False)


def evaluate_multiple_choice(model, tokenizer, task: Task, docs: list[dict], batch_tokens: int = 8192,
                             show_progress: bool = True) -> tuple[dict, list[dict]]:
    contexts = [task.context(d) for d in docs]
    choices = [task.choices(d) for d in docs]
    golds = [task.target(d) for d in docs]
    items = [(c, [task.target_delimiter + ch for ch in chs]) for c, chs in zip(contexts, choices)]
    bar = _progress(len(items), task.name) if show_progress else None
    scores = score_choices(model, tokenizer, items, batch_tokens=batch_tokens,
                           progress=bar.update if bar is not None else None)
    if bar is not None:
        bar.close()
    per_item, rows = defaultdict(list), []
    groups: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for doc, ctx, chs, gold, sc in zip(docs, contexts, choices, golds, scores):
        lls = [s.logprob for s in sc]
        pred = max(range(len(lls)), key=lambda i: lls[i])
        norm = [ll / max(len(ch), 1) for ll, ch in zip(lls, chs)]
        pred_norm = max(range(len(norm)), key=lambda i: norm[i])
        values = {"acc": float(pred == gold), "acc_norm": float(pred_norm == gold)}
        for m in task.metrics:
            if m in values:
                per_item[m].append(values[m])
                if task.group_by:
                    groups[str(doc.get(task.group_by))][m].append(values[m])
        rows.append({"doc": doc.get("_line"), "prompt_sha": _hash(ctx), "choices": chs, "loglikelihoods": lls,
                     "greedy": [s.greedy for s in sc], "tokens": [s.n_tokens for s in sc], "gold": gold,
                     "pred": pred, "pred_norm": pred_norm} | {m: values[m] for m in task.metrics if m in values})
    results = _summary(per_item) | {"n": len(docs)}
    if groups:  # per subject; the task's own figure is over all items (lm-eval's size-weighted MMLU average)
        results["groups"] = {g: _summary(v) | {"n": len(next(iter(v.values())))} for g, v in sorted(groups.items())}
    return results, rows


def evaluate_generation(model, tokenizer, task: Task, docs: list[dict], temperature: float = 0.0,
                        seed: int | None = 0, batch_size: int = 8, max_new_tokens: int | None = None,
                        show_progress: bool = True) -> tuple[dict, list[dict]]:
    from lmforge.infer.engine import generate
    from lmforge.infer.sampling import SamplingConfig

    cfg = SamplingConfig(max_new_tokens=max_new_tokens or task.max_new_tokens, temperature=temperature,
                         stop_strings=list(task.until), seed=seed)
    contexts = [task.context(d) for d in docs]
    refs = [task.target(d) for d in docs]
    outputs: list[str] = []
    bar = _progress(len(docs), task.name) if show_progress else None
    for i in range(0, len(docs), batch_size):
        prompts = [_encode(tokenizer, c) for c in contexts[i:i + batch_size]]
        outputs += generate(model, tokenizer, prompts, cfg)
        if bar is not None:
            bar.update(len(prompts))
    if bar is not None:
        bar.close()
    per_item, rows = defaultdict(list), []
    answers: dict[str, list[str]] = defaultdict(list)
    for doc, ctx, out, ref in zip(docs, contexts, outputs, refs):
        row = {"doc": doc.get("_line"), "prompt_sha": _hash(ctx), "generation": out, "reference": ref}
        for f in task.filters:
            answer = f.apply(out)
            suffix = "" if f.name == "none" else f",{f.name}"
            answers[suffix].append(answer)
            row[f"answer,{f.name}"] = answer
            for metric in task.metrics:
                if metric == "exact_match":
                    score = exact_match([answer], [ref], **task.exact_match)
                elif metric in ROUGE_METRICS:
                    score = rouge_pair(answer, ref, types=(metric,))[metric][2]
                else:
                    continue
                per_item[metric + suffix].append(score)
                row[metric + suffix] = score
        rows.append(row)
    results = _summary(per_item)
    for suffix, outs in answers.items():  # corpus-level metrics: one figure, no per-item values
        if "bleu" in task.metrics:
            results["bleu" + suffix] = bleu(outs, refs)["score"]
        if "chrf" in task.metrics:
            results["chrf" + suffix] = chrf(outs, refs)["score"]
    return results | {"n": len(docs)}, rows


def evaluate(model, tokenizer, task: Task, limit: int | None = None, batch_tokens: int = 8192,
             temperature: float = 0.0, seed: int | None = 0, show_progress: bool = True) -> tuple[dict, list[dict]]:
    """Score `task` on the model: (results, per-item rows). `limit` takes the first N documents."""
    docs = task.docs[:limit] if limit else task.docs
    if not docs:
        raise ValueError(f"{task.name}: no documents to evaluate")
    start = time.perf_counter()
    if task.output_type == "multiple_choice":
        results, rows = evaluate_multiple_choice(model, tokenizer, task, docs, batch_tokens, show_progress)
    else:
        results, rows = evaluate_generation(model, tokenizer, task, docs, temperature, seed,
                                            show_progress=show_progress)
    seconds = time.perf_counter() - start
    results |= {"num_fewshot": task.num_fewshot, "seconds": round(seconds, 3),
                "items_per_s": round(len(docs) / seconds, 2) if seconds else None}
    return results, rows


def headline(results: dict) -> list[tuple[str, float, float]]:
    """(metric, value, stderr) of the metrics a table shows."""
    return [(k, v, results.get(f"{k}_stderr", float("nan"))) for k, v in results.items()
            if isinstance(v, float) and not k.endswith("_stderr") and k not in ("seconds", "items_per_s")]


def write_run(out: str | os.PathLike, model_dir: str, all_results: dict[str, dict],
              all_rows: dict[str, list[dict]], config: dict) -> Path:
    """results.json, predictions_<task>.jsonl and report.md in `out`, each written to a temporary name first."""
    from lmforge.files import atomic_write, write_json, write_text

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", {"model": str(model_dir), "config": config, "results": all_results})
    for task, rows in all_rows.items():
        with atomic_write(out / f"predictions_{task}.jsonl") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    lines = [f"# Evaluation of `{model_dir}`", "", "| task | shots | metric | value | ± stderr | n |",
             "|---|---|---|---|---|---|"]
    for task, res in all_results.items():
        for metric, value, err in headline(res):
            lines.append(f"| {task} | {res.get('num_fewshot', 0)} | {metric} | {value:.4f} | "
                         f"{'' if math.isnan(err) else f'{err:.4f}'} | {res.get('n', '')} |")
    groups = [(t, g, r) for t, res in all_results.items() for g, r in res.get("groups", {}).items()]
    if groups:
        lines += ["", "| task | group | metric | value | n |", "|---|---|---|---|---|"]
        for t, g, r in groups:
            for metric, value, _ in headline(r):
                lines.append(f"| {t} | {g} | {metric} | {value:.4f} | {r['n']} |")
    write_text(out / "report.md", "\n".join(lines) + "\n")
    return out
