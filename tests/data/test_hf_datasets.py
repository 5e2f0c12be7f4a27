"""Hugging Face datasets as input: save_to_disk and Hub-style Arrow/Parquet folders, read by the data stage,
finetune and classify; rows and ClassLabel names checked against `datasets` itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

datasets = pytest.importorskip("datasets")

from lmforge.data.hf_datasets import DatasetSourceError, is_dataset_source, iter_dataset_records  # noqa: E402
from lmforge.data.sources import CorpusError, iter_documents, iter_records, resolve_inputs  # noqa: E402

REVIEWS = [("这家餐厅的菜很好吃，服务也周到。", "pos"), ("物流太慢了，包装还破了。", "neg"),
           ("The battery lasts all day.", "pos"), ("屏幕有坏点，非常失望。", "neg"),
           ("质量不错，下次还会买。", "pos"), ("It stopped working after a week.", "neg")]


def _features():
    return datasets.Features({"text": datasets.Value("string"),
                              "label": datasets.ClassLabel(names=["neg", "pos"])})


def _reviews(rows=REVIEWS):
    return datasets.Dataset.from_dict({"text": [t for t, _ in rows], "label": [1 if y == "pos" else 0 for _, y in rows]},
                                      features=_features())


def _as_datasets_reads_it(ds) -> list[dict]:
    """The reference: datasets' own rows, ClassLabel ints turned into names by the feature's int2str."""
    out = []
    for rec in ds:
        row = dict(rec)
        for k, f in ds.features.items():
            if isinstance(f, datasets.ClassLabel):
                row[k] = f.int2str(row[k])
            elif isinstance(getattr(f, "feature", None), datasets.ClassLabel):
                row[k] = [f.feature.int2str(v) for v in row[k]]
        out.append(row)
    return out


def test_save_to_disk_rows_and_label_names_equal_datasets(tmp_path):
    ds = _reviews()
    ds.save_to_disk(tmp_path / "one", num_shards=3)  # several shards: their order is state.json's
    assert len(list((tmp_path / "one").glob("*.arrow"))) > 1
    got = list(iter_records(str(tmp_path / "one")))
    assert [r for _, r in got] == _as_datasets_reads_it(datasets.load_from_disk(tmp_path / "one"))
    assert got[0][0] == f"{tmp_path / 'one'}[train]:row 1" and got[0][1]["text"] == REVIEWS[0][0]

    ner = datasets.Dataset.from_dict(
        {"tokens": [list("张三在北京工作"), ["Ann", "visited", "Paris"]], "ner_tags": [[1, 2, 0, 3, 4, 0, 0], [1, 0, 3]]},
        features=datasets.Features({"tokens": datasets.Sequence(datasets.Value("string")),
                                    "ner_tags": datasets.Sequence(datasets.ClassLabel(
                                        names=["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]))}))
    ner.save_to_disk(tmp_path / "ner")
    rows = [r for _, r in iter_records(str(tmp_path / "ner"))]
    assert rows == _as_datasets_reads_it(datasets.load_from_disk(tmp_path / "ner"))
    assert rows[0]["ner_tags"] == ["B-PER", "I-PER", "O", "B-LOC", "I-LOC", "O", "O"]
    from lmforge.classify.data import read_tagged  # classify --task token reads the names as BIO tags

    tagged = read_tagged([str(tmp_path / "ner")])
    assert tagged[1].tokens == ["Ann", "visited", "Paris"] and tagged[1].tags == ["B-PER", "O", "B-LOC"]


def test_dataset_dict_splits_and_hub_style_parquet_folders(tmp_path):
    dd = datasets.DatasetDict(train=_reviews(REVIEWS[:4]), test=_reviews(REVIEWS[4:]))
    dd.save_to_disk(tmp_path / "dd")
    assert [r["text"] for _, r in iter_records(str(tmp_path / "dd"))] == [t for t, _ in REVIEWS[:4]]  # train
    assert [r["label"] for _, r in iter_records(str(tmp_path / "dd#test"))] == ["pos", "neg"]
    with pytest.raises(DatasetSourceError, match=r"no split 'dev' \(splits: train, test\)"):
        list(iter_records(str(tmp_path / "dd#dev")))
    # the Hub's layout: data/{split}-00000-of-00001.parquet (ClassLabel names from the schema datasets writes)
    hub = tmp_path / "hub"
    (hub / "data").mkdir(parents=True)
    (hub / "README.md").write_text("---\nlicense: mit\n---\n")
    dd["train"].to_parquet(hub / "data" / "train-00000-of-00001.parquet")
    dd["test"].to_parquet(hub / "data" / "test-00000-of-00001.parquet")
    assert is_dataset_source(hub) and resolve_inputs([str(hub)]) == [str(hub)]
    assert [r for _, r in iter_records(f"{hub}#test")] == _as_datasets_reads_it(dd["test"])
    # an arrow folder in the refs/convert layout (split folders), read as datasets' Arrow files
    arrow = tmp_path / "arrow" / "validation"
    arrow.mkdir(parents=True)
    dd["test"].save_to_disk(tmp_path / "tmp")
    (tmp_path / "tmp" / "data-00000-of-00001.arrow").rename(arrow / "0000.arrow")
    assert [r["text"] for _, r in iter_dataset_records(tmp_path / "arrow")] == [t for t, _ in REVIEWS[4:]]


def test_errors_name_the_missing_column_and_never_wait_on_the_network(tmp_path):
    _reviews().save_to_disk(tmp_path / "ds")
    with pytest.raises(CorpusError, match=r"no column 'review' \(columns: text, label\)"):
        list(iter_documents([str(tmp_path / "ds")], text_field="review"))
    from lmforge.classify.data import read_labelled

    with pytest.raises(CorpusError, match=r"\[train\]:row 1: field 'sentiment': missing"):
        read_labelled([str(tmp_path / "ds")], label_field="sentiment")
    # a local path that does not exist is an immediate error, never a hub lookup
    with pytest.raises(CorpusError, match="no such file"):
        resolve_inputs([str(tmp_path / "nope")])
    assert not is_dataset_source(tmp_path / "nope") and not is_dataset_source(f"{tmp_path}/nope#train")
    # a hub id is read only when asked for, and refused at once when the hub is off
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    code = ("from lmforge.data.sources import iter_records\n"
            "try:\n list(iter_records('hf:someone/reviews:zh#test'))\nexcept Exception as e: print(type(e).__name__, e)")
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60).stdout
    assert "DatasetSourceError hf:someone/reviews:zh#test: a Hub dataset, and the Hub is off" in out
    assert time.monotonic() - start < 30


def test_data_stage_reads_a_saved_dataset(tmp_path, capsys):
    from lmforge.cli import main

    rows = REVIEWS + [REVIEWS[0]]  # one exact duplicate for the dedup step to remove
    _reviews(rows).save_to_disk(tmp_path / "ds")
    assert main(["data", "dedup", "--input", str(tmp_path / "ds"), "--output", str(tmp_path / "out"), "--exact",
                 "--workers", "1"]) == 0
    kept = [json.loads(line) for f in sorted((tmp_path / "out" / "data").glob("*.jsonl*"))
            for line in _read_text(f).splitlines()]
    assert sorted(d["text"] for d in kept) == sorted(t for t, _ in REVIEWS)
    assert {d["label"] for d in kept} == {"pos", "neg"}  # other columns stay, ClassLabels as names


def _read_text(path) -> str:
    import gzip

    return gzip.open(path, "rt", encoding="utf-8").read() if str(path).endswith(".gz") else path.read_text("utf-8")


def test_finetune_reads_a_saved_dataset(trained_dir, tmp_path):
    from lmforge.finetune.conversations import load_conversations
    from lmforge.finetune.run import FinetuneConfig, run_finetune
    from tests.models import tiny_llama

    qa = [("北京是哪个国家的首都？", "北京是中国的首都。"), ("What is two plus two?", "Four."),
          ("一年有几个月？", "一年有十二个月。"), ("Name a primary colour.", "Red.")] * 3
    ds = datasets.Dataset.from_dict({"instruction": [q for q, _ in qa], "input": [""] * len(qa),
                                     "output": [a for _, a in qa]})
    datasets.DatasetDict(train=ds, validation=ds.select(range(4))).save_to_disk(tmp_path / "sft")
    convs = load_conversations(str(tmp_path / "sft"))
    assert [c.messages[-1]["content"] for c in convs] == [a for _, a in qa]
    assert convs[0].messages[0] == {"role": "user", "content": "北京是哪个国家的首都？"}
    model = tiny_llama(tmp_path / "base", trained_dir)
    summary = run_finetune(FinetuneConfig(model=str(model), data=str(tmp_path / "sft"),
                                          val_data=f"{tmp_path / 'sft'}#validation", out=str(tmp_path / "run"),
                                          max_steps=2, batch_size=4, max_length=64, eval_every=2, progress=False,
                                          samples=0))
    assert summary["data"]["train"]["examples"] == len(qa) and summary["data"]["val"]["examples"] == 4


def test_classify_trains_and_evaluates_on_a_saved_dataset(trained_dir, tmp_path, capsys):
    import transformers

    from lmforge.cli import main
    from tests.models import tiny_llama

    datasets.DatasetDict(train=_reviews(REVIEWS * 4), test=_reviews()).save_to_disk(tmp_path / "reviews")
    model = tiny_llama(tmp_path / "base", trained_dir)
    assert main(["classify", "train", "--model", str(model), "--data", str(tmp_path / "reviews"), "--val-data",
                 f"{tmp_path / 'reviews'}#test", "--max-steps", "2", "--batch-size", "8", "--max-length", "32",
                 "--no-progress", "--out", str(tmp_path / "clf")]) == 0
    capsys.readouterr()
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "clf" / "best")
    assert hf.config.id2label == {0: "neg", 1: "pos"}  # the ClassLabel names, not 0 / 1
    assert main(["classify", "eval", "--model", str(tmp_path / "clf" / "best"), "--data",
                 f"{tmp_path / 'reviews'}#test", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["examples"] == len(REVIEWS)
