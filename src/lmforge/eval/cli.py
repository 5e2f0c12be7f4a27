"""`lmforge eval run | ppl | metrics | compare | judge | contamination`."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

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
"""


def _load_model(args):
    from lmforge.infer.load import load_from_args

    loaded = load_from_args(args)
    return loaded.model, loaded.tokenizer


def _out_dir(args, name: str) -> Path:
    from lmforge.train.config import RunDirectoryError

    out = Path(args.out) if args.out else Path("runs") / "eval" / f"{Path(args.model).resolve().name}-{name}"
    if (out / "results.json").exists() and not args.overwrite:
        raise RunDirectoryError(f"{out} already holds an evaluation (results.json); pass --overwrite to replace it "
                                "or --out DIR for another")
    return out


def _fmt(v) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def cmd_run(args: argparse.Namespace) -> int:
    from lmforge.cli import UserError
    from lmforge.eval.run import evaluate, headline, write_run
    from lmforge.eval.tasks import load_task

    datas = args.data or []
    if len(datas) > len(args.task):
        raise UserError(f"{len(datas)} --data for {len(args.task)} --task: give one --data per task, in order")
    tasks = [load_task(t, datas[i] if i < len(datas) else None, args.shots_data, args.shots)
             for i, t in enumerate(args.task)]
    import os

    from lmforge.eval.run import format_sweep

    main_process = os.environ.get("RANK", "0") == "0"
    out = _out_dir(args, "+".join(t.name for t in tasks))
    model, tokenizer = _load_model(args)
    results, rows = {}, {}
    kw = {"batch_tokens": args.batch_tokens, "temperature": args.temperature, "seed": args.seed}
    for task in tasks:
        results[task.name], rows[task.name] = evaluate(model, tokenizer, task, limit=args.limit, fmt=args.format,
                                                       show_progress=not args.json, **kw)
        results[task.name]["data"] = task.source
        if args.format_sweep:
            results[task.name]["format_sweep"] = format_sweep(model, tokenizer, task, limit=args.limit,
                                                              show_progress=False, **kw)
    if not main_process:  # torchrun: every process holds all results; one writes them
        return 0
    config = {"tasks": args.task, "data": datas, "shots": args.shots, "limit": args.limit, "dtype": args.dtype,
              "temperature": args.temperature, "format": args.format,
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


METRICS = ("bleu", "chrf", "chrf++", "ter", "rouge", "exact_match", "squad", "accuracy", "f1", "mcc")


def _read_lines(path: str, field: str | None) -> list:
    from lmforge.cli import UserError

    p = Path(path)
    if not p.is_file():
        raise UserError(f"{path}: no such file")
    text = p.read_text(encoding="utf-8")
    if p.suffix in (".jsonl", ".json"):
        out = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n}: not JSON ({e.msg})") from None
            if isinstance(row, dict):
                key = field or next((k for k in ("prediction", "text", "reference", "answer", "output") if k in row),
                                    None)
                if key is None or key not in row:
                    raise UserError(f"{path}:{n}: no field {field or 'prediction/text/reference/answer/output'!r}; "
                                    "name it with --field")
                row = row[key]
            out.append(row)
        return out
    return text.split("\n")[:-1] if text.endswith("\n") else text.split("\n")


def cmd_metrics(args: argparse.Namespace) -> int:
    from lmforge import metrics as m
    from lmforge.cli import UserError

    preds = _read_lines(args.pred, args.field)
    refs = [_read_lines(r, args.field) for r in args.ref]
    for r, path in zip(refs, args.ref):
        if len(r) != len(preds):
            raise UserError(f"{path}: {len(r)} lines but {args.pred} has {len(preds)}")
    names = [x.strip() for x in args.metric.split(",") if x.strip()]
    out = {}
    for name in names:
        if name == "bleu":
            res = m.bleu(preds, refs, tokenize=args.tokenize)
            out["bleu"], out["bleu_tokenize"] = res["score"], res["tokenize"]
        elif name in ("chrf", "chrf++"):
            out[name] = m.chrf(preds, refs, word_order=2 if name == "chrf++" else 0)["score"]
        elif name == "ter":
            out["ter"] = m.ter(preds, refs)["score"]
        elif name == "rouge":
            per = list(zip(*refs)) if len(refs) > 1 else refs[0]
            out |= m.rouge(preds, per, stem=args.stem, chinese=args.chinese)
        elif name == "exact_match":
            out["exact_match"] = m.exact_match(preds, refs[0])
        elif name == "squad":
            out |= {f"squad_{k}": v for k, v in m.squad(preds, [list(g) for g in zip(*refs)]).items()}
        elif name in ("accuracy", "f1", "mcc"):
            if name == "accuracy":
                out["accuracy"] = m.accuracy(refs[0], preds)
            elif name == "f1":
                out |= {f"{k}_macro": v for k, v in m.precision_recall_f1(refs[0], preds, "macro").items()}
            else:
                out["mcc"] = m.matthews_corrcoef(refs[0], preds)
        else:
            raise UserError(f"--metric {name!r}: one of {', '.join(METRICS)}")
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

    task = load_task(args.task, args.data)
    items = task_item_texts(task)
    corpus = ((d.id, d.text) for d in iter_documents(args.corpus, text_field=args.text_field))
    with progress(desc="corpus", unit="doc", enabled=not args.json) as bar:
        report = check_contamination(items, corpus, ngram=args.ngram, threshold=args.threshold, progress=bar.update)
    summary = {"task": task.name, "data": task.source} | report.summary()
    flagged = [{"doc": task.docs[i].get("_line"), "overlap": report.overlap[i], "documents": report.documents[i],
                "text": items[i]} for i in report.contaminated]
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        write_json(Path(args.out) / "contamination.json", summary | {"flagged": flagged})
    if args.json:
        print(json.dumps(summary | {"flagged": flagged}, ensure_ascii=False))
        return 0
    def items(n: int) -> str:
        return f"{n} item" + ("" if n == 1 else "s")

    short = summary["too_short"]
    print(f"{task.name}: {items(summary['items'])}"
          + (f", of which {short} {'is' if short == 1 else 'are'} shorter than one {args.ngram}-gram (not checked)"
             if short else "")
          + f"; {summary['contaminated']} of the {summary['checked']} checked ({100 * summary['contaminated_share']:.1f}%)"
          f" have >= {100 * args.threshold:.0f}% of their {args.ngram}-grams in the corpus")
    for f in flagged[:10]:
        print(f"  line {f['doc']}: {100 * f['overlap']:.0f}% in {', '.join(map(str, f['documents']))}: "
              f"{f['text'][:80]!r}")
    return 0


def _records(path: str) -> list[dict]:
    """Alpaca-style judge records (file:line errors from the task readers' jsonl reader)."""
    from lmforge.cli import UserError
    from lmforge.eval.tasks import read_jsonl

    if not Path(path).is_file():
        raise UserError(f"{path}: no such file")
    rows = read_jsonl(Path(path))
    for row in rows:
        if not isinstance(row.get("instruction"), str) or "output" not in row:
            raise UserError(f"{path}:{row.get('_line', '?')}: a judge record is alpaca-style: instruction, input (optional), "
                            "output")
    return rows


def _responses(args, entries: list[dict], field_name: str, model_dir: str | None, path: str) -> list[str]:
    """The responses to judge: a field of the records, or generated by a local model (greedy, its chat template)."""
    from lmforge.cli import UserError

    if model_dir is None:
        missing = [e["_line"] for e in entries if not isinstance(e.get(field_name), str)]
        if missing:
            raise UserError(f"{path}:{missing[0]}: no {field_name!r} field to judge (name it with --response-field, "
                            "or generate responses with --model DIR)")
        return [e[field_name] for e in entries]
    from lmforge.chat.render import encode_chat
    from lmforge.eval.judge import format_input
    from lmforge.infer.engine import generate
    from lmforge.infer.load import load_from_args
    from lmforge.infer.sampling import SamplingConfig

    loaded = load_from_args(args, model_dir)
    model, tok = loaded.model, loaded.tokenizer
    if loaded.template:
        prompts = [encode_chat(tok, loaded.template, [{"role": "user", "content": format_input(e)}],
                               add_generation_prompt=True).ids for e in entries]
    else:
        prompts = [format_input(e) + "\n\n### Response:\n" for e in entries]
    cfg = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=0.0, stop_token_ids=loaded.stop_ids)
    return [r.strip() for r in generate(model, tok, prompts, cfg, compile=loaded.compile)]


def cmd_judge(args: argparse.Namespace) -> int:
    import os

    from lmforge.eval.judge import OpenAIClient, judge_pairwise, judge_pointwise
    from lmforge.files import atomic_write, write_json
    from lmforge.progress import progress

    entries = _records(args.data)
    responses = _responses(args, entries, args.response_field, args.model, args.data)
    client = OpenAIClient(args.endpoint, model=args.judge_model,
                          api_key=args.api_key or os.environ.get("OPENAI_API_KEY"))
    with progress(total=len(entries), desc="judge", unit="item", enabled=not args.json) as bar:
        if args.against or args.against_model:
            other = _responses(args, _records(args.against) if args.against else entries, args.against_field,
                               args.against_model, args.against or args.data)
            summary, rows = judge_pairwise(client, entries, responses, other, progress=bar.update)
        else:
            summary, rows = judge_pointwise(client, entries, responses, progress=bar.update)
    summary |= {"judge": args.judge_model, "endpoint": args.endpoint, "mode": "pairwise" if
                (args.against or args.against_model) else "pointwise"}
    out = Path(args.out)
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
    r.add_argument("--task", action="append", required=True,
                   help="arc_easy, arc_challenge, hellaswag, mmlu, ceval, cmmlu, gsm8k, or a TASK.yaml (repeatable)")
    r.add_argument("--data", action="append", metavar="FILE|DIR",
                   help="the task's file or directory, in its original format (one per --task, in order)")
    r.add_argument("--shots", type=int, default=None, help="few-shot examples (default: the task's, 0 for built-ins)")
    r.add_argument("--shots-data", metavar="FILE|DIR", help="where few-shot examples come from (default: the task's "
                                                             "dev split beside --data)")
    r.add_argument("--limit", type=int, help="the first N items only")
    r.add_argument("--batch-tokens", type=int, default=8192, help="context tokens per scoring batch")
    r.add_argument("--temperature", type=float, default=0.0, help="generation tasks: 0 = greedy")
    r.add_argument("--seed", type=int, default=0, help="generation tasks: sampling seed")
    r.add_argument("--format", default="plain", choices=["plain", "chat", "chat-multiturn"],
                   help="prompt format: lm-eval's plain text (comparable with published scores), or through the "
                        "model's chat template with few-shot examples in one turn or as turns")
    r.add_argument("--format-sweep", action="store_true",
                   help="also score every format and report the spread between them (how much is format)")
    r.add_argument("--out", metavar="DIR", help="run directory (default runs/eval/MODEL-TASK)")
    r.add_argument("--overwrite", action="store_true", help="replace an earlier evaluation in --out")
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
    m.add_argument("--metric", default="bleu,chrf,rouge", help=f"comma-separated: {', '.join(METRICS)}")
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
    j.add_argument("--data", required=True, help="alpaca jsonl: instruction, input, output (the reference answer)")
    j.add_argument("--response-field", default="model_response", help="the field holding the response to judge")
    add_inference_args(j, model_required=False, model_help="generate the responses with this model instead (greedy; "
                                                           "--dtype ... --template apply to --against-model too)")
    j.add_argument("--against", metavar="FILE", help="pairwise: a second file of responses (same items, in order)")
    j.add_argument("--against-field", default="model_response")
    j.add_argument("--against-model", metavar="DIR", help="pairwise: generate the second responses with this model")
    j.add_argument("--max-new-tokens", type=int, default=256, help="--model / --against-model: reply length")
    j.add_argument("--endpoint", required=True, help="the judge's OpenAI-compatible base URL (.../v1)")
    j.add_argument("--judge-model", default="default", help="the model name sent to the endpoint")
    j.add_argument("--api-key", help="bearer key (default: $OPENAI_API_KEY)")
    j.add_argument("--out", required=True, metavar="DIR", help="judge.jsonl (raw replies) and judge_summary.json")
    j.add_argument("--json", action="store_true")
    j.set_defaults(func=cmd_judge, _parser=j)


def _add_contamination(esub) -> None:
    """`lmforge eval contamination`: benchmark n-grams in a training corpus."""
    k = esub.add_parser("contamination", help="n-gram overlap between a training corpus and a benchmark")
    k.add_argument("--corpus", nargs="+", required=True, help="training files or folders (any format lmforge data reads)")
    k.add_argument("--task", required=True, help="a built-in task or TASK.yaml")
    k.add_argument("--data", help="the task's file or directory")
    k.add_argument("--text-field", default="text")
    k.add_argument("--ngram", type=int, default=13, help="n-gram length in words (characters for Chinese items)")
    k.add_argument("--threshold", type=float, default=0.5, help="share of an item's n-grams that flags it")
    k.add_argument("--out", metavar="DIR", help="write contamination.json there")
    k.add_argument("--json", action="store_true")
    k.set_defaults(func=cmd_contamination, _parser=k)
