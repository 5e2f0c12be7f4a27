"""`lmforge classify train | predict | eval`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lmforge.config import add_config_args, config_from_args

EXAMPLES = """examples:
  lmforge classify train --model ./all-MiniLM-L6-v2 --data reviews.csv --text-field review --label-field sentiment --out runs/clf
  lmforge classify train --model runs/quickstart/model --data spam.jsonl --train last --out runs/spam
  lmforge classify train --task token --model ./all-MiniLM-L6-v2 --data train.conll --out runs/ner
  lmforge classify predict --model runs/clf/best --data new.jsonl --out predictions.jsonl
  lmforge classify eval --model runs/clf/best --data test.csv --json
"""


def cmd_train(args: argparse.Namespace) -> int:
    from lmforge.classify.run import ClassifyConfig, run_classify

    cfg = config_from_args(ClassifyConfig, args)
    summary = run_classify(cfg)
    shown = {k: summary[k] for k in ("steps", "initial", "final", "best", "data", "plot") if k in summary}
    print(json.dumps(shown, indent=2, ensure_ascii=False))
    print(f"best checkpoint (HF {summary.get('hf_config', 'classifier')}): {cfg.out}/best; metrics per class in "
          f"{cfg.out}/metrics.json", file=sys.stderr)
    return 130 if "interrupted" in summary else 0


def _reading(args: argparse.Namespace) -> dict:
    return {"text_field": args.text_field, "label_field": args.label_field, "tokens_field": args.tokens_field,
            "tags_field": args.tags_field, "encoding": args.encoding}


def _is_regression(model_dir: str) -> bool:
    path = Path(model_dir) / "config.json"
    return path.exists() and json.loads(path.read_text()).get("problem_type") == "regression"


def cmd_predict(args: argparse.Namespace) -> int:
    from lmforge.classify.data import read_examples
    from lmforge.classify.predict import Predictor, task_config
    from lmforge.files import atomic_write

    if _is_regression(args.model):
        from lmforge.classify.regression import regression_cli

        return regression_cli(args, "predict")
    cfg = task_config(args.model, **_reading(args))
    p = Predictor(args.model, max_length=args.max_length)
    records = read_examples(cfg, args.data, None, need_labels=False)
    rows = p.predict(records)
    if args.out:
        with atomic_write(Path(args.out)) as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"{len(rows)} predictions -> {args.out}", file=sys.stderr)
    else:
        for row in rows:
            print(json.dumps(row, ensure_ascii=False))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from lmforge.classify.predict import evaluate_dir, task_config

    if _is_regression(args.model):
        from lmforge.classify.regression import regression_cli

        return regression_cli(args, "eval")
    cfg = task_config(args.model, **_reading(args))
    report = evaluate_dir(args.model, args.data, cfg, confusion_png=args.plot)
    if args.json:
        print(json.dumps(report, ensure_ascii=False))
        return 0
    o = report["overall"]
    print(f"{report['examples']} examples: " + ", ".join(f"{k} {v:.4f}" for k, v in o.items()))
    table = report.get("per_class") or report.get("per_type") or {}
    if table:
        print(f"{'label':<20} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>8}")
        for name, row in table.items():
            print(f"{name:<20} {row['precision']:>9.4f} {row['recall']:>9.4f} {row['f1']:>9.4f} {row['support']:>8}")
    if "confusion_matrix" in report:
        cm = report["confusion_matrix"]
        print("confusion matrix (rows: true, columns: predicted; order " + ", ".join(cm["labels"]) + "):")
        for row in cm["matrix"]:
            print("  " + " ".join(f"{v:>6}" for v in row))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from lmforge.classify.run import ClassifyConfig

    p = sub.add_parser("classify", help="text classifiers and BIO taggers (train / predict / eval)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
                       description="Sequence classification (binary, multi-class, multi-label) and token "
                                   "classification (BIO / NER) heads on an lmforge decoder or a BERT-family "
                                   "encoder, trained on the one loop and saved as HF *ForSequenceClassification / "
                                   "*ForTokenClassification directories. See docs/finetune.md.")
    csub = p.add_subparsers(dest="classify_command", metavar="ACTION", parser_class=type(p))
    p.set_defaults(func=lambda a: p.print_help())
    t = csub.add_parser("train", help="train a classifier head", formatter_class=argparse.RawDescriptionHelpFormatter,
                        epilog=EXAMPLES)
    add_config_args(t, ClassifyConfig)
    t.set_defaults(func=cmd_train, _parser=t)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", required=True, metavar="DIR", help="a classifier directory (runs/NAME/best)")
    common.add_argument("--data", required=True, metavar="FILE", help="csv/tsv/jsonl/json/parquet, or CoNLL / "
                                                                        "token-tag JSONL for a token classifier, or a "
                                                                        "datasets folder (DIR, DIR#SPLIT)")
    common.add_argument("--text-field", default="text")
    common.add_argument("--text-pair-field", default="", help="regression: the second text of a pair")
    common.add_argument("--label-field", default="label")
    common.add_argument("--tokens-field", default="tokens")
    common.add_argument("--tags-field", default="tags")
    common.add_argument("--encoding", default="utf-8")
    pr = csub.add_parser("predict", parents=[common], help="labels and calibrated probabilities for new data")
    pr.add_argument("--out", metavar="FILE.jsonl", help="write the predictions here (default: stdout)")
    pr.add_argument("--max-length", type=int, default=None, help="tokens per text (default: the model's limit)")
    pr.set_defaults(func=cmd_predict)
    ev = csub.add_parser("eval", parents=[common], help="metrics on labelled data (per class, confusion matrix)")
    ev.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    ev.add_argument("--plot", metavar="FILE.png", help="also draw the confusion matrix")
    ev.set_defaults(func=cmd_eval)
