"""Contamination detection on planted overlaps, and the `lmforge eval` commands as a user runs them."""

from __future__ import annotations

import json
import random

import pytest

from lmforge.cli import main
from lmforge.eval.contamination import check_contamination
from lmforge.text import split_sentences
from tests import corpora


def test_planted_benchmark_items_are_found_and_clean_ones_are_not():
    rng = random.Random(0)
    en = [s for s in split_sentences(corpora.english(80_000)) if len(s.split()) >= 20]
    zh = [s for s in split_sentences(corpora.chinese_news(40_000)) if len(s) >= 30]
    items = en[:20] + zh[:20] + ["Too short to check."]
    # the corpus: other documents, with 5 English and 5 Chinese items planted inside them (one with changed case
    # and punctuation, which n-grams of words ignore), and one item only half present
    docs = [" ".join(rng.sample(en[40:], 5)) for _ in range(300)] + ["".join(rng.sample(zh[40:], 5)) for _ in range(100)]
    planted = [0, 3, 7, 11, 19, 20, 23, 27, 31, 39]
    for k, i in enumerate(planted):
        text = items[i].upper().replace(",", " ;") if k == 0 else items[i]
        docs[k * 30] = docs[k * 30] + " " + text + " " + docs[k * 30 + 1]
    half = en[5].split()
    docs[5] += " " + " ".join(half[: len(half) // 2])
    corpus = [(f"doc{j}", t) for j, t in enumerate(docs)]
    report = check_contamination(items, corpus, ngram=13, threshold=0.5, batch=64)
    assert report.contaminated == planted
    assert all(report.overlap[i] == 1.0 for i in planted)
    assert report.documents[planted[1]] == ["doc30"]
    assert 0 < report.overlap[5] < 0.5  # partly present: measured, not flagged
    assert report.overlap[-1] is None and report.summary()["too_short"] == 1
    clean = [i for i in range(len(items) - 1) if i not in planted and i != 5]
    # People's Daily repeats set phrases ("建设有中国特色社会主义事业"): a clean Chinese item shares a few 13-grams
    # with other articles (up to 46% of one item), below the threshold; clean English items share none
    assert all(report.overlap[i] == 0.0 for i in clean if i < 20)
    assert all(report.overlap[i] < 0.5 for i in clean)


def test_metrics_command_on_files(tmp_path, capsys):
    import sacrebleu

    pred = tmp_path / "pred.txt"
    ref = tmp_path / "ref.txt"
    pred.write_text("the cat sat on the mat\n今天天气很好我们去公园\n", encoding="utf-8")
    ref.write_text("the cat is on the mat\n今天天气很好，我们去公园吧\n", encoding="utf-8")
    assert main(["eval", "metrics", "--pred", str(pred), "--ref", str(ref), "--metric", "bleu,chrf,rouge",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    lines = pred.read_text(encoding="utf-8").splitlines(), ref.read_text(encoding="utf-8").splitlines()
    assert out["bleu_tokenize"] == "zh"
    assert out["bleu"] == pytest.approx(sacrebleu.corpus_bleu(lines[0], [lines[1]], tokenize="zh").score)
    assert out["chrf"] == pytest.approx(sacrebleu.corpus_chrf(lines[0], [lines[1]]).score)
    assert 0 < out["rougeL"] < 1
    ref.write_text("only one line\n", encoding="utf-8")
    assert main(["eval", "metrics", "--pred", str(pred), "--ref", str(ref)]) == 2
    assert "ref.txt: 1 lines but" in capsys.readouterr().err


def test_contamination_command_reads_a_task_and_a_corpus(tmp_path, capsys):
    rows = [{"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
                         "in May. How many clips did Natalia sell altogether in April and May?",
             "answer": "Natalia sold 48/2 = 24 clips in May. #### 72"},
            {"question": "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
                         "How much did she earn?", "answer": "Weng earns 12/60 = $0.2 per minute. #### 10"}]
    data = tmp_path / "gsm8k_test.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"id": "web-1", "text": "Forum post: " + rows[0]["question"] + " Answer: " +
                                  rows[0]["answer"]}) + "\n" + json.dumps({"id": "web-2", "text": corpora.english(
                                      5000)}) + "\n", encoding="utf-8")
    assert main(["eval", "contamination", "--corpus", str(corpus), "--task", "gsm8k", "--data", str(data),
                 "--out", str(tmp_path / "c"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["contaminated"] == 1 and out["flagged"][0]["documents"] == ["web-1"]
    assert json.loads((tmp_path / "c" / "contamination.json").read_text())["checked"] == 2
    # the plain report counts items as the file holds them: a third, too short to check, is said so
    rows.append({"question": "What is 2 + 2?", "answer": "#### 4"})
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    assert main(["eval", "contamination", "--corpus", str(corpus), "--task", "gsm8k", "--data", str(data)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == (
        "gsm8k: 3 items, of which 1 is shorter than one 13-gram (not checked); 1 of the 2 checked (50.0%) have >= 50% "
        "of their 13-grams in the corpus")


def test_compare_puts_runs_side_by_side_with_a_chart(tmp_path, capsys):
    from lmforge.eval.run import write_run

    for name, acc in (("base", 0.25), ("sft", 0.5)):
        write_run(tmp_path / name, name, {"arc_easy": {"acc": acc, "acc_stderr": 0.1, "acc_norm": acc + 0.1,
                                                       "n": 4, "num_fewshot": 0}}, {"arc_easy": []}, {})
    png = tmp_path / "compare.png"
    assert main(["eval", "compare", str(tmp_path / "base"), str(tmp_path / "sft"), "--out", str(png), "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert table == {"base": {"arc_easy/acc": 0.25, "arc_easy/acc_norm": 0.35},
                     "sft": {"arc_easy/acc": 0.5, "arc_easy/acc_norm": 0.6}}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["eval", "compare", str(tmp_path / "missing")]) == 2
    assert "no results.json" in capsys.readouterr().err
