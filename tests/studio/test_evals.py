"""Evaluations side by side: two `lmforge eval run` directories (two models, one task) compared per metric as their
results.json say, and each item's outcome in both runs matched by its data line, even when one run saw fewer."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")

ITEMS = [{"q": "2+2=?", "a": "4"}, {"q": "北京是哪个国家的首都？", "a": "中国"}, {"q": "Capital of France?", "a": "Paris"},
         {"q": "3*3=?", "a": "9"}]


@pytest.fixture(scope="module")
def eval_root(workspace, tmp_path_factory):
    from lmforge.cli import main

    root = tmp_path_factory.mktemp("evals")
    (root / "t.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ITEMS), encoding="utf-8")
    (root / "qa.yaml").write_text("task: qa\ndata: t.jsonl\noutput_type: generate_until\ndoc_to_text: '{{q}}'\n"
                                  "doc_to_target: '{{a}}'\ngeneration_kwargs:\n  max_gen_toks: 3\n", encoding="utf-8")
    for name, model, limit in (("a", workspace / "model", []), ("b", workspace / "runs" / "pt-done" / "last",
                                                                  ["--limit", "3"])):
        assert main(["eval", "run", "--model", str(model), "--task", str(root / "qa.yaml"), "--out",
                     str(root / "runs" / name), "--json", *limit]) == 0
    return root


def test_metrics_and_items_side_by_side(eval_root, parsers):
    from fastapi.testclient import TestClient

    from lmforge.studio.app import Studio, create_studio_app

    studio = Studio(eval_root / "runs", parsers, cwd=eval_root)
    with TestClient(create_studio_app(studio, port=7860, token="t"), base_url="http://127.0.0.1:7860") as c:
        runs = {r["id"]: r for r in c.get("/api/runs").json()["runs"]}
        assert {runs["a"]["kind"], runs["b"]["kind"]} == {"eval run"} and runs["a"]["status"] == "finished"
        table = c.get("/api/evals", params=[("ids", "a"), ("ids", "b")]).json()
        results = {r: json.loads((eval_root / "runs" / r / "results.json").read_text())["results"]["qa"]
                   for r in ("a", "b")}
        rows = {(row["task"], row["metric"]): row["values"] for row in table["rows"]}
        assert ("qa", "exact_match") in rows
        for (_task, metric), values in rows.items():
            for r in ("a", "b"):
                assert values[r]["value"] == results[r][metric] and values[r]["n"] == results[r]["n"]
        assert (results["a"]["n"], results["b"]["n"]) == (4, 3)

        items = c.get("/api/evals/items", params=[("ids", "a"), ("ids", "b"), ("task", "qa")]).json()["items"]
        predictions = {r: [json.loads(x) for x in (eval_root / "runs" / r / "predictions_qa.jsonl").read_text(
            encoding="utf-8").splitlines()] for r in ("a", "b")}
        assert [i["doc"] for i in items] == [p["doc"] for p in predictions["a"]]
        for item, pa in zip(items, predictions["a"]):
            assert item["runs"]["a"] == pa
        assert [set(i["runs"]) for i in items] == [{"a", "b"}] * 3 + [{"a"}]  # b stopped at --limit 3
        assert items[1]["runs"]["a"]["reference"] == "中国"
        # the prompt the model read is kept with each prediction (the page shows it above the runs' outputs)
        assert [i["runs"]["a"]["prompt"] for i in items] == [r["q"] for r in ITEMS]

        assert c.get("/api/evals", params=[("ids", "../x")]).status_code == 404
        bad = c.get("/api/evals/items", params=[("ids", "a"), ("task", "../results")])
        assert bad.status_code == 400
