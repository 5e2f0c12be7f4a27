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
import warnings
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from lmforge.eval.scoring import _encode, score_choices
from lmforge.eval.tasks import Task, TaskError
from lmforge.metrics import bleu, chrf, exact_match, rouge_pair

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


def _text(tokenizer, ctx) -> str:
    """The prompt as the model read it (a chat-formatted prompt arrives as ids): kept with each prediction, as
    lm-eval's --log_samples keeps its arguments, so an item can be read back (the studio's Evals view)."""
    return ctx if isinstance(ctx, str) else tokenizer.decode(list(ctx))


def _progress(total: int, desc: str):
    from lmforge.progress import progress

    return progress(total=total, desc=desc, unit="item")


FORMATS = ("plain", "chat", "chat-multiturn")


def prompts(tokenizer, task: Task, docs: list[dict], fmt: str = "plain") -> list:
    """Each doc's prompt: lm-eval's plain text (`plain`), or token ids of the model's chat template with the
    few-shot block in one user turn (`chat`) or one exchange per example (`chat-multiturn`)."""
    if fmt == "plain":
        return [task.context(d) for d in docs]
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r}: one of {', '.join(FORMATS)}")
    if not tokenizer.chat_template:
        raise TaskError(f"{task.name}: format {fmt} needs a chat template, and this tokenizer has none")
    from lmforge.chat.render import encode_chat

    return [encode_chat(tokenizer, tokenizer.chat_template, task.messages(d, multiturn=fmt == "chat-multiturn"),
                        add_generation_prompt=True).ids for d in docs]


def evaluate_multiple_choice(model, tokenizer, task: Task, docs: list[dict], batch_tokens: int = 8192,
                             show_progress: bool = True, fmt: str = "plain") -> tuple[dict, list[dict]]:
    contexts = prompts(tokenizer, task, docs, fmt)
    choices = [task.choices(d) for d in docs]
    golds = [task.target(d) for d in docs]
    # after a chat template's generation prompt the answer starts the reply: no delimiter before it
    delim = task.target_delimiter if fmt == "plain" else ""
    items = [(c, [delim + ch for ch in chs]) for c, chs in zip(contexts, choices)]
    bar = _progress(len(items), task.name) if show_progress else None
    scores = score_choices(model, tokenizer, items, batch_tokens=batch_tokens,
                           progress=bar.update if bar is not None else None)
    if bar is not None:
        bar.close()
    rows = []
    for doc, ctx, chs, gold, sc in zip(docs, contexts, choices, golds, scores):
        lls = [s.logprob for s in sc]
        pred = max(range(len(lls)), key=lambda i: lls[i])
        norm = [ll / max(len(ch), 1) for ll, ch in zip(lls, chs)]
        pred_norm = max(range(len(norm)), key=lambda i: norm[i])
        values = {"acc": float(pred == gold), "acc_norm": float(pred_norm == gold)}
        rows.append({"doc": doc.get("_line"), "prompt_sha": _hash(str(ctx)), "prompt": _text(tokenizer, ctx),
                     "choices": chs, "loglikelihoods": lls,
                     "greedy": [s.greedy for s in sc], "tokens": [s.n_tokens for s in sc], "gold": gold,
                     "pred": pred, "pred_norm": pred_norm} | {m: values[m] for m in task.metrics if m in values})
    return summarize(task, docs, rows), rows


def evaluate_generation(model, tokenizer, task: Task, docs: list[dict], temperature: float = 0.0,
                        seed: int | None = 0, batch_size: int = 8, max_new_tokens: int | None = None,
                        show_progress: bool = True, fmt: str = "plain") -> tuple[dict, list[dict]]:
    from lmforge.infer.engine import Request, generate_stream
    from lmforge.infer.sampling import SamplingConfig
    from lmforge.infer.scheduler import model_context

    # no stop ids given: the engine's (chat.stop_ids: EOS and the template's end of turn, in every format)
    max_new = max_new_tokens or task.max_new_tokens
    cfg = SamplingConfig(max_new_tokens=max_new, temperature=temperature, stop_strings=list(task.until), seed=seed)
    contexts = prompts(tokenizer, task, docs, fmt)
    refs = [task.target(d) for d in docs]
    # a prompt too long for the context loses its beginning, as lm-eval cuts it, keeping room for the reply (at
    # least half the context; the engine clips a longer max_new_tokens and says so)
    context = model_context(model)
    keep = context - min(max_new, context // 2)
    encoded = [(_encode(tokenizer, c) if isinstance(c, str) else list(c))[-keep:] for c in contexts]
    outputs = [""] * len(docs)
    bar = _progress(len(docs), task.name) if show_progress else None
    # batch_size rows decode together; a finished row takes the next document at once
    for event in generate_stream(model, tokenizer, [Request(ids, cfg) for ids in encoded], batch_size=batch_size):
        outputs[event.index] += event.text
        if event.finish_reason is not None and bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    rows = []
    for doc, ctx, out, ref in zip(docs, contexts, outputs, refs):
        row = {"doc": doc.get("_line"), "prompt_sha": _hash(str(ctx)), "prompt": _text(tokenizer, ctx),
               "generation": out, "reference": ref}
        for f in task.filters:
            answer = f.apply(out)
            suffix = "" if f.name == "none" else f",{f.name}"
            row[f"answer,{f.name}"] = answer
            for metric in task.metrics:
                if metric == "exact_match":
                    row[metric + suffix] = exact_match([answer], [ref], **task.exact_match)
                elif metric in ROUGE_METRICS:
                    row[metric + suffix] = rouge_pair(answer, ref, types=(metric,))[metric][2]
        rows.append(row)
    return summarize(task, docs, rows), rows


def evaluate(model, tokenizer, task: Task, limit: int | None = None, batch_tokens: int = 8192,
             temperature: float = 0.0, seed: int | None = 0, show_progress: bool = True,
             fmt: str = "plain") -> tuple[dict, list[dict]]:
    """Score `task` on the model: (results, per-item rows). `limit` takes the first N documents; `fmt` is the
    prompt format (FORMATS). Under torchrun each process scores every WORLD_SIZE-th document and every process
    returns the results of all of them (gathered over torch.distributed)."""
    docs = task.docs[:limit] if limit else task.docs
    if not docs:
        raise ValueError(f"{task.name}: no documents to evaluate")
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    mine = docs[rank::world] if world > 1 else docs
    start = time.perf_counter()
    if task.output_type == "multiple_choice":
        _, rows = evaluate_multiple_choice(model, tokenizer, task, mine, batch_tokens, show_progress and rank == 0,
                                           fmt)
    else:
        _, rows = evaluate_generation(model, tokenizer, task, mine, temperature, seed,
                                      show_progress=show_progress and rank == 0, fmt=fmt)
    if world > 1:  # put the shards back in document order, then score them all as one process would
        rows = _gather_rows(rows, world, len(docs))
    results = summarize(task, docs, rows)
    if task.output_type != "multiple_choice":
        empty = sum(1 for r in rows if not r["generation"].strip())
        results["empty_generations"] = empty
        if empty * 2 > len(rows) and rank == 0:  # the metrics then score (almost) nothing
            warnings.warn(f"{task.name}: {empty} of {len(rows)} generations are empty, so its metrics score almost "
                          "nothing: the model ends its reply at once (a stop id or one of the task's `until` strings "
                          "first), or its context leaves no room to answer", stacklevel=2)
    seconds = time.perf_counter() - start
    results |= {"num_fewshot": task.num_fewshot, "format": fmt, "seconds": round(seconds, 3),
                "items_per_s": round(len(docs) / seconds, 2) if seconds else None}
    return results, rows


def _gather_rows(rows: list[dict], world: int, n: int) -> list[dict]:
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    parts: list = [None] * world
    dist.all_gather_object(parts, rows)
    out = [None] * n
    for r, part in enumerate(parts):
        for i, row in enumerate(part):
            out[r + i * world] = row
    return out


def summarize(task: Task, docs: list[dict], rows: list[dict]) -> dict:
    """Task-level results from per-item rows: means with standard errors of every per-item metric, per-group
    scores (MMLU's subjects), and the corpus-level metrics (bleu, chrf) of generation tasks."""
    keys = [k for k in rows[0] if k.split(",")[0] in ("acc", "acc_norm", *GENERATION_METRICS)
            and isinstance(rows[0][k], float)] if rows else []
    results = _summary({k: [r[k] for r in rows] for k in keys})
    if task.group_by and task.output_type == "multiple_choice":  # per subject; the task's own figure is over all
        # items (lm-eval's size-weighted MMLU average)
        groups: dict[str, list[dict]] = defaultdict(list)
        for d, r in zip(docs, rows):
            groups[str(d.get(task.group_by))].append(r)
        results["groups"] = {g: _summary({k: [r[k] for r in rs] for k in keys}) | {"n": len(rs)}
                             for g, rs in sorted(groups.items())}
    if task.output_type != "multiple_choice":
        for f in task.filters:
            suffix = "" if f.name == "none" else f",{f.name}"
            outs, refs = [r[f"answer,{f.name}"] for r in rows], [r["reference"] for r in rows]
            if "bleu" in task.metrics:
                results["bleu" + suffix] = bleu(outs, refs)["score"]
            if "chrf" in task.metrics:
                results["chrf" + suffix] = chrf(outs, refs)["score"]
    return results | {"n": len(rows)}


def format_sweep(model, tokenizer, task: Task, limit: int | None = None, **kw) -> dict:
    """The task scored in every prompt format the tokenizer allows (plain; chat and chat-multiturn when it has
    a chat template), and per metric the spread (max - min) between them: how much the number depends on the
    format rather than the model."""
    formats = FORMATS if tokenizer.chat_template else ("plain",)
    by_format = {fmt: evaluate(model, tokenizer, task, limit=limit, fmt=fmt, **kw)[0] for fmt in formats}
    metrics = [m for m, _, _ in headline(by_format["plain"])]
    spread = {m: max(r[m] for r in by_format.values()) - min(r[m] for r in by_format.values()) for m in metrics}
    return {"formats": {f: {m: r[m] for m in metrics} for f, r in by_format.items()}, "spread": spread,
            "note": None if tokenizer.chat_template else "no chat template: only the plain format"}


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
    lines = [f"# Evaluation of `{model_dir}`", "", "| task | shots | format | metric | value | ± stderr | n |",
             "|---|---|---|---|---|---|---|"]
    for task, res in all_results.items():
        for metric, value, err in headline(res):
            lines.append(f"| {task} | {res.get('num_fewshot', 0)} | {res.get('format', 'plain')} | {metric} | "
                         f"{value:.4f} | {'' if math.isnan(err) else f'{err:.4f}'} | {res.get('n', '')} |")
    sweeps = [(t, res["format_sweep"]) for t, res in all_results.items() if res.get("format_sweep")]
    if sweeps:
        lines += ["", "Format sensitivity (the same items in every prompt format):", "",
                  "| task | metric | " + " | ".join(FORMATS) + " | spread |", "|---|---|" + "---|" * (len(FORMATS) + 1)]
        for t, sw in sweeps:
            for metric, spread in sw["spread"].items():
                cells = [f"{sw['formats'][f][metric]:.4f}" if f in sw["formats"] else "" for f in FORMATS]
                lines.append(f"| {t} | {metric} | " + " | ".join(cells) + f" | {spread:.4f} |")
    groups = [(t, g, r) for t, res in all_results.items() for g, r in res.get("groups", {}).items()]
    if groups:
        lines += ["", "| task | group | metric | value | n |", "|---|---|---|---|---|"]
        for t, g, r in groups:
            for metric, value, _ in headline(r):
                lines.append(f"| {t} | {g} | {metric} | {value:.4f} | {r['n']} |")
    write_text(out / "report.md", "\n".join(lines) + "\n")
    return out
