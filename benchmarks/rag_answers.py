"""Answer quality of `rag ask --rag stuff | sequence | token` on the built-in questions; JSON out.

    .venv/bin/python benchmarks/rag_answers.py --index runs/pydocs --model runs/smollm2 --limit 12

The index is one of the built-in corpus (`lmforge rag index --input builtin:python-docs --out runs/pydocs`, add
`--no-dense` for BM25 alone); the questions are the 54 that `rag eval --queries builtin:python-docs` uses (the first
`--limit` by id). Each question is answered once per method with `--no-cite`, and every answer is scored twice by
rag/grounding.py with the word-overlap judge: as the model wrote it (its own [n] markers) and after `--cite`'s
per-sentence citing (`cite_sentences`, what `rag ask` prints by default). Reported per method: ALCE citation recall
and precision, RAGAS faithfulness, answer support (the mean share of the answer's content words found in its
sources, what --abstain compares), context recall against the qrels, and seconds per answer (the process's wall
time, so under load it says so: `uptime` is recorded before and after).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--methods", default="stuff,sequence,token")
    ap.add_argument("--k", type=int, default=3, help="sources per answer")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--limit", type=int, default=0, help="the first N questions by id (0: all 54)")
    ap.add_argument("--out", default="rag_answers.json")
    args = ap.parse_args()

    from lmforge.infer.load import load_for_inference
    from lmforge.rag.answer import AskConfig, ask
    from lmforge.rag.evaluate import builtin_questions
    from lmforge.rag.grounding import OverlapSupport, answer_metrics, cite_sentences, context_recall
    from lmforge.rag.index import RagIndex

    index = RagIndex.open(args.index)
    loaded = load_for_inference(args.model)
    queries, qrels = builtin_questions()
    ids = sorted(qrels)[:args.limit or None]
    support = OverlapSupport()
    results = {"machine": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "date": time.strftime("%Y-%m-%d"), "model": args.model, "k": args.k,
               "max_new_tokens": args.max_new_tokens, "questions": len(ids),
               "load_before": os.getloadavg(), "methods": {}}
    for method in args.methods.split(","):
        cfg = AskConfig(k=args.k, mode="hybrid" if index.cfg.dense else "sparse", max_new_tokens=args.max_new_tokens,
                        rag=method, cite=False)
        rows = []
        for q in ids:
            started = time.perf_counter()
            result = ask(index, queries[q], loaded.model, loaded.tokenizer, cfg)
            seconds = time.perf_counter() - started
            texts = [s["text"] for s in result["sources"]]
            answer = result["answer"] or ""
            cited, _, answer_support = cite_sentences(answer, {s["n"]: s["text"] for s in result["sources"]}, support)
            docs = [f"python-docs/{d}" if not d.startswith("python-docs/") else d
                    for d in dict.fromkeys(s["doc_id"] for s in result["sources"])]
            rows.append({"query": q, "answer": answer, "cited": cited, "seconds": seconds,
                         "own": answer_metrics(answer, texts, support), "cite": answer_metrics(cited, texts, support),
                         "answer_support": answer_support,
                         "context_recall": context_recall(docs, {f"python-docs/{d}": r for d, r in qrels[q].items()})})
            print(json.dumps({"method": method, "query": q, "seconds": round(seconds, 1), "answer": answer[:80]},
                             ensure_ascii=False), flush=True)
        def mean(f, rows=rows) -> float:
            return float(np.mean([f(r) for r in rows]))

        results["methods"][method] = {
            **{f"{name}_{which}": mean(lambda r, w=which, n=name: r[w][n]) for which in ("own", "cite")
               for name in ("citation_recall", "citation_precision", "faithfulness")},
            "answer_support": mean(lambda r: r["answer_support"]),
            "context_recall": mean(lambda r: r["context_recall"]),
            "seconds_per_answer": mean(lambda r: r["seconds"]), "rows": rows}
        results["load_after"] = os.getloadavg()
        with open(args.out, "w", encoding="utf-8") as f:  # after each method: a run stopped early keeps what it did
            json.dump(results, f, indent=2, ensure_ascii=False)
    for method, m in results["methods"].items():
        print(method, {k: round(v, 3) for k, v in m.items() if k != "rows"})


if __name__ == "__main__":
    main()
