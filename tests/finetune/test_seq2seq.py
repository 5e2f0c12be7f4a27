"""Sequence-to-sequence fine-tuning on a decoder: source/target records in every format, the task's instruction,
validation metrics equal to sacrebleu / rouge-score, the best checkpoint chosen by them."""

from __future__ import annotations

import csv
import json

import pytest
import yaml

from lmforge.config import ConfigError
from lmforge.finetune.conversations import DataFormatError
from lmforge.finetune.seq2seq import load_task_conversations, task_scores, task_template

PAIRS = [("I like tea.", "我喜欢茶。"), ("The weather is nice today.", "今天天气很好。"),
         ("Where is the station?", "车站在哪里？"), ("He reads a book.", "他在看书。"),
         ("We are going home.", "我们要回家了。"), ("Thank you very much.", "非常感谢。")]


def test_every_format_gives_the_same_conversations(tmp_path):
    rows = [{"source": s, "target": t} for s, t in PAIRS]
    (tmp_path / "a.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    for name, delim in (("a.tsv", "\t"), ("a.csv", ",")):
        with open(tmp_path / name, "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f, delimiter=delim)
            w.writerow(["source", "target"])
            w.writerows(PAIRS)
    got = {name: load_task_conversations(str(tmp_path / name), "translate", "en", "zh")
           for name in ("a.json", "a.jsonl", "a.tsv", "a.csv")}
    first = [c.messages for c in got["a.json"]]
    assert all([c.messages for c in convs] == first for convs in got.values())
    assert first[0] == [{"role": "user", "content": "将下面的英文翻译成中文。\n\nI like tea."},
                        {"role": "assistant", "content": "我喜欢茶。"}]
    assert got["a.tsv"][1].where.endswith("a.tsv:3")  # the header is line 1


def test_instructions_templates_and_errors(tmp_path):
    assert task_template("translate", "fr", "de") == "Translate the following French text into German.\n\n{source}"
    with pytest.raises(ConfigError, match="--src-lang and --tgt-lang"):
        task_template("translate", "en", "")
    with pytest.raises(ConfigError, match=r"unknown language code 'xx'"):
        task_template("translate", "en", "xx")
    with pytest.raises(ConfigError, match=r"\{source\}"):
        task_template("translate", template="English:")
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps({"doc": "今天北京下了大雨，很多航班延误。", "summary": "北京大雨致航班延误"}, ensure_ascii=False)
                    + "\n" + json.dumps({"doc": "The council approved the new park budget on Monday.",
                                         "summary": "Park budget approved"}) + "\n", encoding="utf-8")
    convs = load_task_conversations(str(path), "summarize", columns={"source": "doc", "target": "summary"})
    assert convs[0].messages[0]["content"].startswith("请概括下面这段文字。")
    assert convs[1].messages[0]["content"].startswith("Summarize the following text.")
    convs = load_task_conversations(str(path), "summarize", template="Text: {source}\nTL;DR:",
                                    columns={"source": "doc", "target": "summary"})
    assert convs[1].messages[0]["content"] == "Text: The council approved the new park budget on Monday.\nTL;DR:"
    with pytest.raises(DataFormatError, match=r"s.jsonl:1: field 'source' \(source\): missing \(the record has doc, "
                                              r"summary; map yours with --columns"):
        load_task_conversations(str(path), "summarize")


def test_task_scores_equal_sacrebleu_and_rouge_score():
    sacrebleu = pytest.importorskip("sacrebleu")
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    hyps = ["我喜欢喝茶。", "今天天气不错。", "车站在哪？", "他看书。"]
    refs = [t for _, t in PAIRS[:4]]
    got = task_scores("translate", hyps, refs, "zh")
    assert got["val_bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs], tokenize="zh").score, abs=1e-9)
    assert got["val_chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score, abs=1e-9)
    en_h, en_r = ["the cat sat on a mat", "it is raining"], ["the cat sat on the mat", "it rains today"]
    assert task_scores("translate", en_h, en_r, "en")["val_bleu"] == pytest.approx(
        sacrebleu.corpus_bleu(en_h, [en_r]).score, abs=1e-9)

    class CharTokenizer:  # rouge-score's own scorer over Han characters (punctuation dropped, as rouge-score does)
        def tokenize(self, text):
            return [c for c in text if "\u4e00" <= c <= "\u9fff"]

    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=CharTokenizer())
    want = sum(scorer.score(r, h)["rougeL"].fmeasure for h, r in zip(hyps, refs)) / len(hyps)
    assert task_scores("summarize", hyps, refs)["val_rougeL"] == pytest.approx(want, abs=1e-9)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    want = sum(scorer.score(r, h)["rougeL"].fmeasure for h, r in zip(en_h, en_r)) / 2
    assert task_scores("summarize", en_h, en_r)["val_rougeL"] == pytest.approx(want, abs=1e-9)


def test_translation_finetune_scores_replies_and_keeps_the_best_bleu(trained_dir, tmp_path, capsys):
    from lmforge.cli import main
    from tests.models import tiny_llama

    data = tmp_path / "train.tsv"
    with open(data, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["en", "zh"])
        w.writerows(PAIRS * 6)
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps({"en": s, "zh": t}, ensure_ascii=False) + "\n" for s, t in PAIRS[:3]),
                   encoding="utf-8")
    model = tiny_llama(tmp_path / "base", trained_dir, max_positions=512)
    assert main(["finetune", "--model", str(model), "--data", str(data), "--val-data", str(val), "--task", "translate",
                 "--src-lang", "en", "--tgt-lang", "zh", "--columns", "{source: en, target: zh}", "--max-steps", "30",
                 "--eval-every", "10", "--batch-size", "6", "--max-length", "64", "--lr", "1e-2", "--sample-tokens",
                 "12", "--method", "full", "--no-progress", "--out", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    evals = [r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
             if "val_bleu" in r]
    assert [r["step"] for r in evals] == [0, 10, 20, 30] and all("val_chrf" in r for r in evals)
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    last = [s for s in samples if s["step"] == 30]
    assert [s["reference"] for s in last] == [t for _, t in PAIRS[:3]]
    # the recorded BLEU is sacrebleu's on the replies written beside it
    sacrebleu = pytest.importorskip("sacrebleu")
    assert evals[-1]["val_bleu"] == pytest.approx(sacrebleu.corpus_bleu(
        [s["reply"].strip() for s in last], [[s["reference"] for s in last]], tokenize="zh").score, abs=1e-6)
    best = max(evals, key=lambda r: r["val_bleu"])  # first of the best: later ties do not replace it
    state = json.loads((tmp_path / "run" / "best" / "trainer_state.json").read_text())
    assert state["step"] == best["step"]
    # the saved config names the metric that chose best/ (not the val_loss default a task run replaces)
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["best_metric"] == "val_bleu"
