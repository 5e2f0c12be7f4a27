"""benchmarks/sts.py's Lee reader and split: a hand-made matrix read into the pairs it spells, bad files named, and
the split by documents keeping every test document out of training."""

from __future__ import annotations

import importlib.util
import os
from itertools import combinations
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "sts.py"
spec = importlib.util.spec_from_file_location("sts_benchmark", SCRIPT)
sts = importlib.util.module_from_spec(spec)
_environ = dict(os.environ)
spec.loader.exec_module(sts)  # the script sets HF_HUB_OFFLINE for its own run: not for the tests after this one
os.environ.clear()
os.environ.update(_environ)

DOCS = ["Shares fell by £3 on Monday.", "Prices of shares dropped.", "A whale was freed from a net."]


def write_lee(d: Path, matrix: str, docs=DOCS, newline_at_end: bool = False) -> Path:
    # gensim's copy: Latin-1 bytes, no final newline
    (d / "lee.cor").write_bytes(("\n".join(docs) + ("\n" if newline_at_end else "")).encode("latin-1"))
    (d / "similarities0-1.txt").write_text(matrix)
    return d


def test_upper_triangle_read_as_pairs(tmp_path):
    docs, pairs = sts.read_lee(write_lee(tmp_path, "1\t0.8\t0.2\n0\t1\t0.25\n0\t0\t1\n"))
    assert docs == DOCS  # the pound sign decoded from Latin-1
    assert pairs == [(0, 1, 0.8), (0, 2, 0.2), (1, 2, 0.25)]


def test_symmetric_matrix_and_final_newline_read_the_same(tmp_path):
    docs, pairs = sts.read_lee(write_lee(tmp_path, "1 0.8 0.2\n0.8 1 0.25\n0.2 0.25 1\n", newline_at_end=True))
    assert docs == DOCS
    assert pairs == [(0, 1, 0.8), (0, 2, 0.2), (1, 2, 0.25)]


def test_bad_files_are_named(tmp_path):
    with pytest.raises(SystemExit, match=r"similarities0-1.txt: row 3 column 2 is 0.3, neither 0 nor its mirror"):
        sts.read_lee(write_lee(tmp_path, "1 0.8 0.2\n0 1 0.25\n0 0.3 1\n"))
    with pytest.raises(SystemExit, match=r"similarities0-1.txt: not a 2 x 2 matrix .* for the 2 documents"):
        sts.read_lee(write_lee(tmp_path, "1 0.8 0.2\n0 1 0.25\n0 0 1\n", docs=DOCS[:2]))


def test_split_by_documents_keeps_test_documents_out_of_training():
    docs = [f"document {i}" for i in range(50)]
    pairs = [(i, j, (i + j) / 100) for i, j in combinations(range(50), 2)]
    splits = [sts.lee_split(docs, pairs, seed) for seed in range(3)]
    for split in splits:
        assert {k: len(v) for k, v in split.items()} == {"train": 435, "dev": 45, "test": 45, "unseen": 145}
        seen = {r[k] for r in split["train"] for k in ("doc1", "doc2")}
        dev = {r[k] for r in split["dev"] for k in ("doc1", "doc2")}
        test = {r[k] for r in split["test"] for k in ("doc1", "doc2")}
        assert len(seen) == 30 and len(dev) == 10 and len(test) == 10 and not seen & test and not dev & test
        for r in split["unseen"]:  # no train document, at least one test document
            assert not {r["doc1"], r["doc2"]} & seen and {r["doc1"], r["doc2"]} & test
            assert (r["text1"], r["text2"], r["score"]) == (docs[r["doc1"]], docs[r["doc2"]], pairs_score(r))
    assert len({frozenset(r["doc1"] for r in s["test"]) for s in splits}) == 3  # each seed draws its own


def pairs_score(row: dict) -> float:
    return (row["doc1"] + row["doc2"]) / 100
