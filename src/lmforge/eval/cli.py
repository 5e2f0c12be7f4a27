"""`lmforge eval run | ppl | metrics | compare | judge | contamination | rag`."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from lmforge.config import add_config_args, config_from_args
from lmforge.eval.config import ContaminationConfig, EvalRunConfig, JudgeConfig

EXAMPLES = """examples:
  lmforge eval run --model runs/sft/best --task arc_easy --data ARC-Easy/ARC-Easy-Test.jsonl
  lmforge eval run --model runs/sft/best --task mmlu --data mmlu/data --shots 5 --limit 200 --json
  lmforge eval run --model runs/sft/best --task cmmlu --data cmmlu --shots 5
  lmforge eval run --model runs/sft/best --task my_task.yaml
  lmforge eval run --model runs/sft/best --task cmmlu --data cmmlu --shots 5 --format-sweep
  torchrun --nproc-per-node 2 -m lmforge eval run --model runs/sft/best --task mmlu --data mmlu/data
  lmforge eval ppl --model runs/pt/best --data held_out.txt
  lmforge eval metrics --pred outputs.txt --ref refs.txt --metric bleu,chrf,rouge
  lmforge eval compare runs/eval/a runs/eval/b --out compare.png
  lmforge eval contamination --corpus runs/clean/out --task gsm8k --data gsm8k/test.jsonl
  lmforge eval judge --data answers.jsonl --endpoint http://127.0.0.1:8000/v1 --out runs/judge
  lmforge eval rag --index runs/pydocs --queries builtin:python-docs --model runs/smollm2 --rag token
"""


def _load_model(args):
    from lmforge.infer.load import load_from_args

    loaded = load_from_args(args)
    return loaded.model, loaded.tokenizer


def _fmt(v) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def cmd_run(args: argparse.Namespace) -> int:
    import os

    from lmforge.eval.config import eval_run_directory
    from lmforge.eval.run import evaluate, format_sweep, headline, write_run
    from lmforge.eval.tasks import load_task

    c = config_from_args(EvalRunConfig, args)
    tasks = [load_task(t, c.data[i] if i < len(c.data) else None, c.shots_data, c.shots)
             for i, t in enumerate(c.task)]
    main_process = os.environ.get("RANK", "0") == "0"
    out = eval_run_directory(c.out, args.model, "+".join(t.name for t in tasks), c.overwrite)
    model, tokenizer = _load_model(args)
    results, rows = {}, {}
    kw = {"batch_tokens": c.batch_tokens, "temperature": c.temperature, "seed": c.seed}
    for task in tasks:
        results[task.name], rows[task.name] = evaluate(model, tokenizer, task, limit=c.limit, fmt=c.format,
                                                       show_progress=not args.json, **kw)
        results[task.name]["data"] = task.source
        if c.format_sweep:
            results[task.name]["format_sweep"] = format_sweep(model, tokenizer, task, limit=c.limit,
                                                              show_progress=False, **kw)
    if not main_process:  # torchrun: every process holds all results; one writes them
        return 0
    config = {"tasks": c.task, "data": c.data, "shots": c.shots, "limit": c.limit, "dtype": args.dtype,
              "temperature": c.temperature, "format": c.format,
              "processes": int(os.environ.get("WORLD_SIZE", "1"))}
    write_run(out, args.model, results, rows, config)
    if args.json:
        print(json.dumps({"out": str(out), "results": results}, ensure_ascii=False))
        return 0
    for name, res in results.items():
        for metric, value, err in headline(res):
            print(f"{name:<16} {metric:<28} {value:.4f}" + (f" ± {err:.4f}" if not math.isnan(err) else "")
                  + f"   (n={res['n']}, {res['items_per_s']} items/s)")
        sweep = res.get("format_sweep")
        if sweep:
            for metric, spread in sweep["spread"].items():
                by = ", ".join(f"{f} {v[metric]:.4f}" for f, v in sweep["formats"].items())
                print(f"{name:<16} {metric:<28} format spread {spread:.4f} ({by})")
    print(f"wrote {out}/results.json, predictions_*.jsonl, report.md", file=sys.stderr)
    return 0


def _texts(specs: list[str], text_field: str) -> list[str]:
    from lmforge.data.sources import iter_documents

    return [d.text for d in iter_documents(specs, text_field=text_field) if d.text.strip()]


def cmd_ppl(args: argparse.Namespace) -> int:
    from lmforge.cli import UserError
    from lmforge.eval.scoring import perplexity
    from lmforge.progress import progress

    texts = _texts(args.data, args.text_field)
    if not texts:
        raise UserError(f"--data {' '.join(args.data)}: no text")
    model, tokenizer = _load_model(args)
    with progress(desc="perplexity", unit="window", enabled=not args.json) as bar:
        res = perplexity(model, tokenizer, texts, window=args.window, stride=args.stride, progress=bar.update)
    out = res.as_dict() | {"documents": len(texts), "window": args.window or model.cfg.max_seq_len}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"perplexity {res.perplexity:.3f}   bits/byte {res.bits_per_byte:.4f}   ({res.tokens} tokens, "
              f"{res.bytes} bytes, {len(texts)} documents)")
    return 0


def cmd_metrics(args: argparse.Namespace) -> int:
    from lmforge.cli import UserError
    from lmforge.eval.tasks import read_text_rows
    from lmforge.metrics import TEXT_METRICS, score_texts

    preds = read_text_rows(args.pred, args.field)
    refs = [read_text_rows(r, args.field) for r in args.ref]
    for r, path in zip(refs, args.ref):
        if len(r) != len(preds):
            raise UserError(f"{path}: {len(r)} lines but {args.pred} has {len(preds)}")
    names = [x.strip() for x in args.metric.split(",") if x.strip()]
    for name in names:
        if name not in TEXT_METRICS:
            raise UserError(f"--metric {name!r}: one of {', '.join(TEXT_METRICS)}")
    out = score_texts(names, preds, refs, tokenize=args.tokenize, stem=args.stem, chinese=args.chinese)
    if args.json:
        print(json.dumps(out, ensure_ascii=False))
    else:
        for k, v in out.items():
            print(f"{k:<16} {v:.4f}" if isinstance(v, float) else f"{k:<16} {v}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from lmforge.cli import UserError
    from lmforge.eval.run import headline

    runs = []
    for r in args.runs:
        p = Path(r) / "results.json" if Path(r).is_dir() else Path(r)
        if not p.is_file():
            raise UserError(f"{r}: no results.json")
        runs.append((Path(r).name if Path(r).is_dir() else p.parent.name, json.loads(p.read_text(encoding="utf-8"))))
    keys = []
    for _, res in runs:
        for task, tr in res["results"].items():
            for metric, _, _ in headline(tr):
                if (task, metric) not in keys:
                    keys.append((task, metric))
    table = {name: {f"{t}/{k}": res["results"].get(t, {}).get(k) for t, k in keys} for name, res in runs}
    if args.json:
        print(json.dumps(table, ensure_ascii=False))
    else:
        width = max(len(f"{t}/{k}") for t, k in keys) + 2
        print(" " * width + "".join(f"{n[:14]:>16}" for n, _ in runs))
        for t, k in keys:
            print(f"{t}/{k}".ljust(width) + "".join(f"{_fmt(table[n][f'{t}/{k}']):>16}" for n, _ in runs))
    if args.out:
        from lmforge.plots import plot_comparison

        plot_comparison(table, args.out)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def cmd_contamination(args: argparse.Namespace) -> int:
    from lmforge.data.sources import iter_documents
    from lmforge.eval.contamination import check_contamination, task_item_texts
    from lmforge.eval.tasks import load_task
    from lmforge.files import write_json
    from lmforge.progress import progress

    c = config_from_args(ContaminationConfig, args)
    task = load_task(c.task, c.data)
    items = task_item_texts(task)
    corpus = ((d.id, d.text) for d in iter_documents(c.corpus, text_field=c.text_field))
    with progress(desc="corpus", unit="doc", enabled=not args.json) as bar:
        report = check_contamination(items, corpus, ngram=c.ngram, threshold=c.threshold, progress=bar.update)
    summary = {"task": task.name, "data": task.source} | report.summary()
    flagged = [{"doc": task.docs[i].get("_line"), "overlap": report.overlap[i], "documents": report.documents[i],
                "text": items[i]} for i in report.contaminated]
    if c.out:
        Path(c.out).mkdir(parents=True, exist_ok=True)
        write_json(Path(c.out) / "contamination.json", summary | {"flagged": flagged})
    if args.json:
        print(json.dumps(summary | {"flagged": flagged}, ensure_ascii=False))
        return 0
    def items(n: int) -> str:
        return f"{n} item" + ("" if n == 1 else "s")

    short = summary["too_short"]
    print(f"{task.name}: {items(summary['items'])}"
          + (f", of which {short} {'is' if short == 1 else 'are'} shorter than one {c.ngram}-gram (not checked)"
             if short else "")
          + f"; {summary['contaminated']} of the {summary['checked']} checked ({100 * summary['contaminated_share']:.1f}%)"
          f" have >= {100 * c.threshold:.0f}% of their {c.ngram}-grams in the corpus")
    for f in flagged[:10]:
        print(f"  line {f['doc']}: {100 * f['overlap']:.0f}% in {', '.join(map(str, f['documents']))}: "
              f"{f['text'][:80]!r}")
    return 0


def _responses(args: argparse.Namespace, entries: list[dict], field_name: str, model_dir: str | None,
               path: str, max_tokens: int) -> list[str]:
    """The responses to judge: a field of the records, or generated by a local model (greedy, its chat template)."""
    from lmforge.eval.judge import generate_responses, recorded_responses
    from lmforge.infer.client import EngineClient

    if model_dir is None:
        return recorded_responses(entries, field_name, path)
    client = EngineClient(model_dir, template=args.template, compile=args.compile, dtype=args.dtype,
                          quantize=args.quantize, pack=args.pack)
    return generate_responses(client, entries, max_tokens)


def cmd_judge(args: argparse.Namespace) -> int:
    import os

    from lmforge.eval.judge import OpenAIClient, judge_pairwise, judge_pointwise, read_judge_records
    from lmforge.files import atomic_write, write_json
    from lmforge.progress import progress

    c = config_from_args(JudgeConfig, args)
    entries = read_judge_records(c.data)
    responses = _responses(args, entries, c.response_field, args.model, c.data, c.max_new_tokens)
    client = OpenAIClient(c.endpoint, model=c.judge_model, api_key=c.api_key or os.environ.get("OPENAI_API_KEY"))
    with progress(total=len(entries), desc="judge", unit="item", enabled=not args.json) as bar:
        if c.pairwise:
            other = _responses(args, read_judge_records(c.against) if c.against else entries, c.against_field,
                               c.against_model, c.against or c.data, c.max_new_tokens)
            summary, rows = judge_pairwise(client, entries, responses, other, progress=bar.update)
        else:
            summary, rows = judge_pointwise(client, entries, responses, progress=bar.update)
    summary |= {"judge": c.judge_model, "endpoint": c.endpoint, "mode": "pairwise" if c.pairwise else "pointwise"}
    out = Path(c.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "judge_summary.json", summary)
    with atomic_write(out / "judge.jsonl") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    if args.json:
        print(json.dumps(summary, ensure_ascii=False))
    else:
        print("  ".join(f"{k} {_fmt(v) if isinstance(v, float) else v}" for k, v in summary.items()))
        print(f"wrote {out}/judge.jsonl (every raw reply) and judge_summary.json", file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate models: benchmarks, perplexity, metrics, contamination",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
                       description="Benchmarks from their original files with lm-evaluation-harness's prompts and "
                                   "scores; metrics equal to sacrebleu, rouge-score and scikit-learn (Chinese "
                                   "handled); n-gram contamination checks. See docs/eval.md.")
    esub = p.add_subparsers(dest="eval_command", metavar="ACTION", parser_class=type(p))
    p.set_defaults(func=lambda a: p.print_help())
    from lmforge.infer.load import add_inference_args

    model, scoring = argparse.ArgumentParser(add_help=False), argparse.ArgumentParser(add_help=False)
    add_inference_args(model, compile=False)  # run: --template is the chat formats' template
    add_inference_args(scoring, compile=False, template=False)
    for parent in (model, scoring):
        parent.add_argument("--json", action="store_true", help="print the results as one JSON object")

    _add_run(esub, parents=[model])
    _add_ppl(esub, parents=[scoring])
    _add_metrics(esub)
    _add_compare(esub)
    _add_judge(esub)
    _add_contamination(esub)


def _add_run(esub, parents: list[argparse.ArgumentParser]) -> None:
    """`lmforge eval run`: benchmark tasks."""
    r = esub.add_parser("run", parents=parents, help="score a model on benchmark tasks",
                        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
    add_config_args(r, EvalRunConfig)
    r.set_defaults(func=cmd_run, _parser=r)


def _add_ppl(esub, parents: list[argparse.ArgumentParser]) -> None:
    """`lmforge eval ppl`: perplexity of text files."""
    q = esub.add_parser("ppl", parents=parents, help="perplexity and bits per byte on text files")
    q.add_argument("--data", nargs="+", required=True, help="text, markdown, jsonl or parquet files or folders")
    q.add_argument("--text-field", default="text", help="the text field of jsonl / parquet records")
    q.add_argument("--window", type=int, help="tokens per window (default: the model's context)")
    q.add_argument("--stride", type=int, help="tokens between windows (default: window / 2)")
    q.set_defaults(func=cmd_ppl, _parser=q)


def _add_metrics(esub) -> None:
    """`lmforge eval metrics`: metrics of prediction and reference files."""
    m = esub.add_parser("metrics", help="BLEU, chrF, TER, ROUGE, exact match, SQuAD, accuracy / F1 of files")
    m.add_argument("--pred", required=True, help="predictions: one per line, or jsonl (--field)")
    m.add_argument("--ref", required=True, action="append", help="references, line-aligned (repeat for several)")
    # metrics.TEXT_METRICS, written out: importing lmforge.metrics would slow every command's start-up (a test checks
    # that the two agree)
    m.add_argument("--metric", default="bleu,chrf,rouge", help="comma-separated: bleu, chrf, chrf++, ter, rouge, "
                                                                "exact_match, squad, accuracy, f1, mcc")
    m.add_argument("--field", help="the field of jsonl records to read")
    m.add_argument("--tokenize", default="auto", help="BLEU tokenizer: auto (zh for Chinese, else 13a), 13a, zh, char")
    m.add_argument("--chinese", default="auto", choices=["auto", "char", "jieba", "ignore"],
                   help="ROUGE on Chinese: characters (auto/char), jieba words, or dropped as rouge-score does")
    m.add_argument("--stem", action="store_true", help="ROUGE: Porter stemming (rouge-score's use_stemmer)")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_metrics, _parser=m)


def _add_compare(esub) -> None:
    """`lmforge eval compare`: runs side by side."""
    c = esub.add_parser("compare", help="runs side by side (table, bar chart)")
    c.add_argument("runs", nargs="+", help="run directories (or their results.json)")
    c.add_argument("--out", metavar="PNG", help="write a bar chart")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_compare, _parser=c)


def _add_judge(esub) -> None:
    """`lmforge eval judge`: LLM-as-judge."""
    from lmforge.infer.load import add_inference_args

    j = esub.add_parser("judge", help="LLM-as-judge through an OpenAI-compatible endpoint (pointwise or pairwise)",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        epilog="examples:\n  lmforge eval judge --data answers.jsonl --endpoint http://127.0.0.1:8000/v1 "
                               "--out runs/judge\n  lmforge eval judge --data held_out.jsonl --model runs/sft-merged "
                               "--against-model runs/base --endpoint http://127.0.0.1:8080/v1 --out runs/ab")
    add_inference_args(j, model_required=False, model_help="generate the responses with this model instead (greedy; "
                                                           "--dtype ... --template apply to --against-model too)")
    add_config_args(j, JudgeConfig)
    j.add_argument("--json", action="store_true")
    j.set_defaults(func=cmd_judge, _parser=j)


def _add_contamination(esub) -> None:
    """`lmforge eval contamination`: benchmark n-grams in a training corpus."""
    k = esub.add_parser("contamination", help="n-gram overlap between a training corpus and a benchmark")
    add_config_args(k, ContaminationConfig)
    k.add_argument("--json", action="store_true")
    k.set_defaults(func=cmd_contamination, _parser=k)
