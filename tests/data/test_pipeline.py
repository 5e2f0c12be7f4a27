"""The pipeline as a user runs it: readers of every format, bad input, rejects accounting,
resume after an interruption, the Ray executor, the CLI."""

from __future__ import annotations

import gzip
import json
import random
import subprocess
import sys

import pytest

from lmforge.config import ConfigError
from lmforge.data.pipeline import PipelineConfig, load_pipeline, run_pipeline
from lmforge.data.sources import CorpusError, iter_documents
from tests.corpora import chinese_news, english


def _read_gz(paths) -> list[dict]:
    out = []
    for p in sorted(paths):
        with gzip.open(p, "rt", encoding="utf-8") as f:
            out += [json.loads(line) for line in f]
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Three shards of real English and Chinese paragraphs with planted duplicates and bad lines."""
    d = tmp_path_factory.mktemp("pipeline_in")
    rng = random.Random(0)
    en = [p for p in english(400_000).split("\n\n") if len(p.split()) > 60][:120]
    zh = [p for p in chinese_news(200_000).split("\n") if len(p) > 120][:60]
    docs = [{"id": f"en{i}", "text": t} for i, t in enumerate(en)] + [{"id": f"zh{i}", "text": t} for i, t in enumerate(zh)]
    copies = []
    for d_ in docs[:20] + docs[-10:]:
        words = d_["text"].split(" ")
        copies.append({"id": d_["id"] + "-copy", "text": " ".join(words + ["extra"]) if len(words) > 5 else d_["text"] + "。"})
    copies.append({"id": "exact-copy", "text": docs[5]["text"].upper()})
    everything = docs + copies
    rng.shuffle(everything)
    thirds = [everything[i::3] for i in range(3)]
    for i, part in enumerate(thirds):
        with open(d / f"part{i}.jsonl", "w", encoding="utf-8") as f:
            for j, rec in enumerate(part):
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                if i == 1 and j == 3:
                    f.write('{"id": "broken", "text": "unterminated\n')
                    f.write(json.dumps({"id": "no-text", "body": "x"}) + "\n")
    return d, len(everything)


def _config(inp, out, **kw) -> PipelineConfig:
    steps = kw.pop("steps", ["whitespace", "pii", {"language": {"keep": ["en", "zh"]}}, "gopher_repetition",
                             "exact_dedup", {"minhash_dedup": {"threshold": 0.8, "verify": True}}])
    return load_pipeline(None, input=[str(inp)], output=str(out), steps=steps, on_error="skip", workers=2,
                         progress=False, **kw)


def test_pipeline_accounts_for_every_document(corpus, tmp_path):
    inp, n_docs = corpus
    stats = run_pipeline(_config(inp, tmp_path / "out"))
    kept = _read_gz((tmp_path / "out" / "data").glob("*.jsonl.gz"))
    rejects = _read_gz((tmp_path / "out" / "rejects").glob("*.jsonl.gz"))
    assert stats["documents_read"] == n_docs + 2  # two bad lines are records too
    assert len(kept) == stats["documents_kept"]
    assert len(kept) + len(rejects) == stats["documents_read"]
    ids = [r["id"] for r in kept] + [r["id"] for r in rejects if r["id"]]
    assert len(ids) == len(set(ids))  # nothing twice
    read_rejects = [r for r in rejects if r["step"] == "read"]
    assert sorted(r["reason"].split(":")[0] for r in read_rejects) == ["field 'text' is missing", "malformed JSON"]
    assert all(r["where"].startswith(str(inp / "part1.jsonl") + ":") for r in read_rejects)
    # no planted copy survives beside its original (a filter may have removed the original first)
    kept_ids = {r["id"] for r in kept}
    assert not any(i.endswith("-copy") and i.removesuffix("-copy") in kept_ids for i in kept_ids)  # noqa: B023
    assert not ("exact-copy" in kept_ids and "en5" in kept_ids)
    dup_rejects = [r for r in rejects if r["step"] in ("exact_dedup", "minhash_dedup")]
    assert len(dup_rejects) >= 20
    for r in dup_rejects:  # the last dedup step's survivors are in the output
        if r["step"] != "minhash_dedup":
            continue
        original = r["reason"].split("duplicate of ")[1]
        assert original in kept_ids
    clustered = [r for r in kept if "minhash_dedup_cluster" in r]
    assert clustered and all(r["minhash_dedup_cluster"] == r["id"] for r in clustered)
    # per-step counts chain: each step starts with what the previous one kept
    steps = stats["steps"]
    for a, b in zip(steps, steps[1:]):
        assert a["docs_out"] == b["docs_in"]
    assert sum(s["docs_in"] - s["docs_out"] for s in steps) == len(rejects)


def test_resume_after_interruption_gives_the_same_output(corpus, tmp_path):
    inp, _ = corpus
    full = tmp_path / "full"
    run_pipeline(_config(inp, full))
    expected = _read_gz((full / "data").glob("*.jsonl.gz"))
    # simulate a crash in the last stage: one shard's output and marker never written
    partial = tmp_path / "partial"
    run_pipeline(_config(inp, partial))
    (partial / "data" / "00001.jsonl.gz").unlink()
    (partial / "work" / "stage2" / "00001.done.json").unlink()
    (partial / "stats.json").unlink()
    stats = run_pipeline(_config(inp, partial))
    assert _read_gz((partial / "data").glob("*.jsonl.gz")) == expected
    assert stats["documents_kept"] == len(expected)


def test_output_of_a_different_pipeline_is_not_overwritten(corpus, tmp_path):
    inp, _ = corpus
    run_pipeline(_config(inp, tmp_path / "o", steps=["whitespace"]))
    with pytest.raises(ConfigError, match="a pipeline with other settings"):
        run_pipeline(_config(inp, tmp_path / "o", steps=["pii"]))
    run_pipeline(_config(inp, tmp_path / "o", steps=["pii"]), overwrite=True)


def test_on_error_fail_names_file_and_line(corpus, tmp_path):
    inp, _ = corpus
    cfg = _config(inp, tmp_path / "o", steps=["whitespace"])
    cfg.on_error = "fail"
    with pytest.raises(CorpusError, match=r"part1\.jsonl:5: malformed JSON"):
        run_pipeline(cfg)
    # shards that finished are complete; nothing half-written is left behind
    assert not list((tmp_path / "o").rglob("*.tmp"))
    _read_gz((tmp_path / "o").rglob("*.jsonl.gz"))


def test_split_by_language_and_parquet_output(corpus, tmp_path):
    import pyarrow.parquet as pq

    inp, _ = corpus
    out = tmp_path / "o"
    run_pipeline(_config(inp, out, steps=["language"], split_by="language", output_format="parquet"))
    langs = {p.name for p in (out / "data").iterdir()}
    assert {"en", "zh"} <= langs
    table = pq.read_table(next((out / "data" / "zh").glob("*.parquet")))
    assert all(json.loads(m)["language"] == "zh" for m in table.column("meta").to_pylist())


def test_unknown_step_and_parameter_errors():
    with pytest.raises(ConfigError, match="Did you mean 'minhash_dedup'"):
        load_pipeline(None, input=["builtin:python-docs"], output="x", steps=["minhash_dedupe"])
    with pytest.raises(ConfigError, match="threshold"):
        load_pipeline(None, input=["builtin:python-docs"], output="x", steps=[{"minhash_dedup": {"treshold": 0.7}}])


def test_readers_of_every_format(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    (tmp_path / "a.csv").write_text('id,text\n1,"first, with comma"\n2,second\n3,too,many\n', encoding="utf-8")
    (tmp_path / "b.tsv").write_text("text\tlang\n中文文本\tzh\n", encoding="utf-8")
    pq.write_table(pa.table({"id": ["p1"], "text": ["from parquet"]}), tmp_path / "c.parquet")
    with open(tmp_path / "d.jsonl.zst", "wb") as f:
        f.write(zstandard.ZstdCompressor().compress(json.dumps({"text": "zstd line"}).encode() + b"\n"))
    article = " ".join(["This is the main article text that a reader wants to keep."] * 8)
    (tmp_path / "e.html").write_text(
        f"<html><head><title>T</title></head><body><nav><a href='/'>Home</a> | <a>About</a></nav>"
        f"<article><h1>Title</h1><p>{article}</p><p>第二段中文内容，也应该保留下来。</p></article>"
        f"<footer>Copyright 2026 Example Corp. All rights reserved.</footer></body></html>", encoding="utf-8")
    _write_pdf(tmp_path / "f.pdf", "Hello from a PDF text layer")
    bad = []
    docs = list(iter_documents([str(tmp_path)], on_bad=lambda where, reason, raw: bad.append((where, reason))))
    texts = {d.text.strip() for d in docs}
    assert {"first, with comma", "second", "中文文本", "from parquet", "zstd line"} <= texts
    html = next(d for d in docs if d.id.endswith("e.html"))
    assert "main article text" in html.text and "第二段中文内容" in html.text and "About" not in html.text
    pdf = next(d for d in docs if d.id.endswith("f.pdf"))
    assert "Hello from a PDF text layer" in pdf.text
    assert bad == [(f"{tmp_path / 'a.csv'}:4", "row has 3 columns, the header has 2")]
    with pytest.raises(CorpusError, match=r"a\.csv:4: row has 3 columns"):
        list(iter_documents([str(tmp_path / "a.csv")]))


def _write_pdf(path, text: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(4, 2))
    fig.text(0.1, 0.5, text)
    fig.savefig(path, format="pdf")
    plt.close(fig)


@pytest.mark.slow
def test_ray_executor_gives_the_same_output_as_local(corpus, tmp_path):
    pytest.importorskip("ray")
    inp, _ = corpus
    run_pipeline(_config(inp, tmp_path / "local"))
    run_pipeline(_config(inp, tmp_path / "ray", executor="ray"))
    import ray

    ray.shutdown()
    local = _read_gz((tmp_path / "local" / "data").glob("*.jsonl.gz"))
    on_ray = _read_gz((tmp_path / "ray" / "data").glob("*.jsonl.gz"))
    assert local == on_ray and local
    assert _read_gz((tmp_path / "local" / "rejects").glob("*.gz")) == _read_gz((tmp_path / "ray" / "rejects").glob("*.gz"))


def test_cli_dedup_stats_and_classifier(corpus, tmp_path):
    inp, _ = corpus
    cli = [sys.executable, "-m", "lmforge", "data"]
    out = tmp_path / "dedup"
    r = subprocess.run(cli + ["dedup", "--input", str(inp), "--output", str(out), "--verify", "--on-error", "skip"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "minhash_dedup" in r.stdout and (out / "report.md").exists() and (out / "stats.png").exists()
    r = subprocess.run(cli + ["stats", str(out)], capture_output=True, text=True)
    assert r.returncode == 0 and "exact_dedup" in r.stdout
    r = subprocess.run(cli + ["dedup", "--input", str(inp), "--output", str(tmp_path / "x")], capture_output=True,
                       text=True)
    assert r.returncode == 2 and "malformed JSON" in r.stderr and "part1.jsonl:5" in r.stderr
    words = english(400_000).split()
    chunks = [" ".join(words[i:i + 60]) for i in range(0, len(words) - 60, 60)]
    rng = random.Random(1)
    (tmp_path / "pos").mkdir()
    (tmp_path / "neg").mkdir()
    with open(tmp_path / "pos" / "good.jsonl", "w") as fp, open(tmp_path / "neg" / "bad.jsonl", "w") as fn:
        for c in chunks:
            shuffled = c.split()
            rng.shuffle(shuffled)
            fp.write(json.dumps({"text": c}) + "\n")
            fn.write(json.dumps({"text": " ".join(shuffled)}) + "\n")
    r = subprocess.run(cli + ["train-classifier", "--positive", str(tmp_path / "pos"), "--negative", str(tmp_path / "neg"),
                              "--out", str(tmp_path / "clf")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "clf" / "classifier.json").read_text())["metrics"]["heldout_accuracy"] > 0.8


def _kept(out) -> list[dict]:
    return _read_gz((out / "data").rglob("*.jsonl.gz"))


def test_a_rerun_after_the_inputs_changed_loses_nothing(tmp_path):
    """Adding, removing or editing an input file between runs: the rerun refuses with one line (the earlier output
    untouched), never mixes old shards with new files; --overwrite redoes it."""
    import shutil

    inp = tmp_path / "in"
    inp.mkdir()
    paras = [p for p in english(200_000).split("\n\n") if len(p.split()) > 40][:30]
    for i in range(3):
        with open(inp / f"f{i}.jsonl", "w") as f:
            for j, p in enumerate(paras[i::3]):
                f.write(json.dumps({"id": f"f{i}-{j}", "text": p}) + "\n")
    for steps in (["whitespace"], ["whitespace", "exact_dedup"]):
        out = tmp_path / f"out{len(steps)}"
        cfg = _config(inp, out, steps=steps)
        run_pipeline(cfg)
        first = sorted(d["id"] for d in _kept(out))
        (inp / "a-new.jsonl").write_text(json.dumps({"id": "new", "text": paras[0] + " changed"}) + "\n")
        snapshot = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
        with pytest.raises(ConfigError, match="inputs changed.*added: .*a-new.jsonl"):
            run_pipeline(cfg)
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == snapshot
        stats = run_pipeline(cfg, overwrite=True)
        assert sorted(d["id"] for d in _kept(out)) == sorted(first + ["new"])
        assert stats["documents_read"] == 31
        (inp / "a-new.jsonl").unlink()
        with pytest.raises(ConfigError, match="removed: .*a-new.jsonl"):
            run_pipeline(cfg)
        shutil.copy(inp / "f1.jsonl", tmp_path / "f1.bak")
        with open(inp / "f1.jsonl", "a") as f:
            f.write(json.dumps({"id": "late", "text": paras[1]}) + "\n")
        run_pipeline(cfg, overwrite=True)
        with open(inp / "f2.jsonl", "a") as f:
            f.write(json.dumps({"id": "later", "text": paras[2] + " x"}) + "\n")
        with pytest.raises(ConfigError, match="changed: .*f2.jsonl"):
            run_pipeline(cfg)
        shutil.copy(tmp_path / "f1.bak", inp / "f1.jsonl")
        (inp / "f2.jsonl").write_text("".join(json.dumps({"id": f"f2-{j}", "text": p}) + "\n"
                                              for j, p in enumerate(paras[2::3])))


def test_a_failed_run_restarts_without_overwrite(tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"id": "a", "text": english(2000)}) + "\n" + '{"id": "b", "text": "cut\n')
    out = tmp_path / "out"
    with pytest.raises(CorpusError):  # on_error: fail stops at the bad line
        run_pipeline(load_pipeline(None, input=[str(inp)], output=str(out), steps=["whitespace"], progress=False))
    # the user fixes the config (skip bad lines): the unfinished run's leftovers do not block the new one
    stats = run_pipeline(load_pipeline(None, input=[str(inp)], output=str(out), steps=["whitespace"], on_error="skip",
                                       progress=False))
    assert stats["documents_kept"] == 1 and stats["documents_rejected"] == 1


def test_a_global_step_that_receives_nothing_gives_an_empty_valid_result(tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": str(i), "text": "short"}) + "\n" for i in range(5)))
    out = tmp_path / "out"
    stats = run_pipeline(_config(inp, out, steps=[{"length": {"min_chars": 1000}}, "exact_dedup", "minhash_dedup"]))
    assert stats["documents_read"] == 5 and stats["documents_kept"] == 0 and stats["documents_rejected"] == 5
    assert _kept(out) == []


def test_a_step_with_a_bug_fails_the_run_with_its_traceback(tmp_path, monkeypatch):
    """on_error: skip is for bad input, not for bugs: a programming error in a step stops the run."""
    from lmforge.data.clean import Whitespace

    def buggy(self, doc):
        return doc.txt  # AttributeError: a typo in a step

    monkeypatch.setattr(Whitespace, "apply", buggy)
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"id": "a", "text": "hello world"}) + "\n")
    with pytest.raises(AttributeError, match="txt"):
        run_pipeline(_config(inp, tmp_path / "out", steps=["whitespace"]))


def test_split_by_names_never_collide_or_escape(tmp_path):
    inp = tmp_path / "in.jsonl"
    values = ["a/b", "a_b", "..", ".", "中文", "x y"]
    inp.write_text("".join(json.dumps({"id": f"d{i}", "text": english(3000)[i * 200:(i + 1) * 200], "src": v}) + "\n"
                           for i, v in enumerate(values)))
    out = tmp_path / "out"
    run_pipeline(_config(inp, out, steps=["whitespace"], split_by="src", text_field="text"))
    folders = sorted(p.name for p in (out / "data").iterdir() if p.is_dir())
    assert len(folders) == len(values)  # one folder per value: a/b and a_b apart
    assert all((out / "data" / f).resolve().parent == (out / "data").resolve() for f in folders)
    assert not (tmp_path / "00000.jsonl.gz").exists() and not (out / "00000.jsonl.gz").exists()
    assert {d["src"] for d in _kept(out)} == set(values)
    assert "中文" in folders and "a_b" in folders


def _mixed_folder(d):
    """Real text in the formats and encodings users bring, with a corrupt parquet and a malformed JSONL line."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    zh = [p for p in chinese_news(40_000).split("\n") if len(p) > 80]
    en = [p for p in english(100_000).split("\n\n") if len(p.split()) > 50]
    d.mkdir()
    (d / "en.txt").write_text(en[0], encoding="utf-8")
    (d / "zh_utf8.md").write_text(zh[0], encoding="utf-8")
    (d / "zh_gbk.txt").write_bytes(zh[1].encode("gbk"))
    (d / "page.html").write_text(f"<html><head><title>T</title></head><body><nav>menu</nav><article><p>{en[1]}</p>"
                                 f"<p>{en[2]}</p></article></body></html>", encoding="utf-8")
    import csv

    with open(d / "table.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerows([["id", "text"], ["c1", en[3]], ["c2", zh[2]], ["c3", "too", "many", "columns"]])
    (d / "records.jsonl").write_text(json.dumps({"id": "j1", "text": zh[3]}, ensure_ascii=False) + "\n"
                                     + '{"id": "j2", "text": "cut off\n' + json.dumps({"id": "j3", "text": en[4]}) + "\n",
                                     encoding="utf-8")
    pq.write_table(pa.table({"id": ["p1"], "text": [en[5]]}), d / "good.parquet")
    (d / "corrupt.parquet").write_bytes(b"PAR1 this is not a parquet file at all")


def test_a_folder_of_mixed_real_world_files_runs_with_skip(tmp_path):
    inp = tmp_path / "mixed"
    _mixed_folder(inp)
    out = tmp_path / "out"
    stats = run_pipeline(load_pipeline(None, input=[str(inp)], output=str(out), steps=["whitespace", "pii"],
                                       on_error="skip", encoding="auto", progress=False))
    kept = {d["id"]: d for d in _kept(out)}
    rejects = _read_gz((out / "rejects").glob("*.jsonl.gz"))
    assert stats["documents_read"] == len(kept) + len(rejects)  # every document accounted for
    assert kept[str(inp / "zh_gbk.txt")]["encoding"] == "gb18030"
    assert "，" in kept[str(inp / "zh_gbk.txt")]["text"]
    assert {"c1", "c2", "j1", "j3", "p1"} <= set(kept) and len(kept) == 9
    reasons = {r["where"].rsplit("/", 1)[-1].split(":")[0]: (r["where"], r["reason"]) for r in rejects}
    assert "not a readable parquet file" in reasons["corrupt.parquet"][1]
    assert reasons["records.jsonl"][0].endswith(":2") and "malformed JSON" in reasons["records.jsonl"][1]
    assert "row has 4 columns" in reasons["table.csv"][1]  # where: the line the row starts on (texts span lines)
    assert all(r["step"] == "read" for r in rejects)
    # read as UTF-8 (the default), the GBK file is a reject whose reason names settings that exist
    out2 = tmp_path / "out2"
    run_pipeline(load_pipeline(None, input=[str(inp)], output=str(out2), steps=["whitespace"], on_error="skip",
                               progress=False))
    gbk = next(r for r in _read_gz((out2 / "rejects").glob("*.jsonl.gz")) if r["where"].endswith("zh_gbk.txt"))
    assert "invalid UTF-8 at byte offset 0" in gbk["reason"] and "encoding: gb18030" in gbk["reason"]
    assert "--encoding" in gbk["reason"]


def test_other_stages_that_read_corpora_skip_bad_input_too(tmp_path):
    from lmforge.cli import main

    inp = tmp_path / "mixed"
    _mixed_folder(inp)
    assert main(["tokenizer", "train", "--input", str(inp), "--vocab-size", "400", "--out", str(tmp_path / "tok"),
                 "--no-progress"]) == 2  # default: the first bad input stops, naming it
    assert main(["tokenizer", "train", "--input", str(inp), "--vocab-size", "400", "--out", str(tmp_path / "tok"),
                 "--no-progress", "--on-error", "skip", "--encoding", "auto"]) == 0
    skipped = [json.loads(line) for line in (tmp_path / "tok" / "rejects.jsonl").read_text().splitlines()]
    assert {s["where"].rsplit("/", 1)[-1].split(":")[0] for s in skipped} == {"corrupt.parquet", "records.jsonl",
                                                                               "table.csv"}
    assert main(["data", "tokenize", "--tokenizer", str(tmp_path / "tok"), "--input", str(inp), "--out",
                 str(tmp_path / "tokens"), "--on-error", "skip", "--encoding", "auto", "--val-fraction", "0"]) == 0
    manifest = json.loads((tmp_path / "tokens" / "manifest.json").read_text())
    assert manifest["rejected"] == 3 and manifest["splits"]["train"]["documents"] == 9
    assert main(["rag", "index", "--input", str(inp), "--out", str(tmp_path / "idx"), "--no-dense", "--on-error",
                 "skip", "--encoding", "auto", "--json"]) == 0
    assert len((tmp_path / "idx" / "rejects.jsonl").read_text().splitlines()) == 3


def test_no_empty_reject_files(tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": str(i), "text": english(5000)[i * 500:(i + 1) * 500]}) + "\n"
                           for i in range(4)))
    out = tmp_path / "out"
    stats = run_pipeline(_config(inp, out, steps=["whitespace", "exact_dedup"]))
    assert stats["documents_rejected"] == 0
    assert not (out / "rejects").exists() or not any((out / "rejects").iterdir())


def test_a_large_jsonl_file_is_read_as_several_tasks_with_the_same_result(corpus, tmp_path, monkeypatch):
    """One big file keeps both cores busy: it is cut at line ends into map tasks, and the output (kept documents and
    their order, rejects with their absolute line numbers, dedup decisions) equals reading it whole."""
    import shutil

    inp, _ = corpus
    big = tmp_path / "big.jsonl"
    with open(big, "wb") as out:
        for part in sorted(inp.glob("*.jsonl")):
            out.write(part.read_bytes())
    whole = run_pipeline(_config(big, tmp_path / "whole"))
    monkeypatch.setattr("lmforge.data.pipeline.PIECE_BYTES", 20_000)
    split = run_pipeline(_config(big, tmp_path / "split"))
    assert split["shards"] > 5 and whole["shards"] == 1
    assert [d["id"] for d in _kept(tmp_path / "split")] == [d["id"] for d in _kept(tmp_path / "whole")]
    rejects = {(r["id"], r["where"], r["reason"]) for r in _read_gz((tmp_path / "split" / "rejects").glob("*.gz"))}
    assert rejects == {(r["id"], r["where"], r["reason"]) for r in _read_gz((tmp_path / "whole" / "rejects").glob("*.gz"))}
    lines = big.read_bytes().split(b"\n")
    broken = next(n for n, line in enumerate(lines, start=1) if b'"id": "broken"' in line)
    assert sum(len(x) + 1 for x in lines[:broken - 1]) > 20_000  # in a later piece, numbered as in the whole file
    assert any(w == f"{big}:{broken}" and "malformed JSON" in r for _, w, r in rejects)
    assert split["documents_read"] == whole["documents_read"]
    shutil.rmtree(tmp_path / "whole")


@pytest.mark.parametrize("between", [[], ["pii"]], ids=["dedup-only", "a-map-step-between"])
def test_dedup_stages_keep_signatures_not_texts_and_equal_the_library(corpus, tmp_path, between):
    """Between global steps only signatures and decisions are kept: a stage without map steps writes no text, the
    next reads its input again and applies the decision. Either way the output equals exact dedup then MinHash
    with verification done by hand with the library, in the pipeline's document order."""
    from lmforge.data import dedup as D
    from lmforge.data.step import build_step

    inp, _ = corpus
    out = tmp_path / "out"
    steps = ["exact_dedup"] + between + [{"minhash_dedup": {"threshold": 0.8}}]
    run_pipeline(_config(inp, out, steps=steps))
    text_shards = sorted(p.relative_to(out / "work").parts[0] for p in (out / "work").rglob("*.jsonl.gz"))
    assert text_shards == (["stage1"] * 3 if between else [])  # the pii stage's own output, nothing else

    docs = list(iter_documents([str(inp)], on_bad=lambda *a: None))
    first = {}
    after_exact = [d for d, k in zip(docs, D.exact_keys([d.text for d in docs]).tolist())
                   if first.setdefault(k, d.id) == d.id]
    for name in between:
        step = build_step(name, {})
        after_exact = [step.apply(d) for d in after_exact]
    result = D.near_duplicates([d.text for d in after_exact], threshold=0.8, verify=True)
    expected = [d for d, keep in zip(after_exact, result.keep) if keep]
    kept = _kept(out)
    assert [r["id"] for r in kept] == [d.id for d in expected]
    assert [r["text"] for r in kept] == [d.text for d in expected]
    # both decisions reach the output's metadata and the rejects, whichever stage applied them
    assert len(after_exact) < len(docs)  # the corpus plants an exact copy
    assert any("exact_dedup_cluster" in r for r in kept) and any("minhash_dedup_cluster" in r for r in kept)
    rejected = _read_gz((out / "rejects").glob("*.jsonl.gz"))
    assert sum(r["step"] == "exact_dedup" for r in rejected) == len(docs) - len(after_exact)
    assert sum(r["step"] == "minhash_dedup" for r in rejected) == len(after_exact) - len(expected)
