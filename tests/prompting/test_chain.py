"""Prompt chains: outputs feed later templates, retrieval and tool steps, resuming after a stop, one-line errors."""

from __future__ import annotations

import json

import pytest

from lmforge.config import ConfigError
from lmforge.data.document import Document
from lmforge.prompting.chain import Chain, run_chain
from lmforge.prompting.client import Completion, ModelClient
from lmforge.rag.index import IndexConfig, RagIndex


class Echo(ModelClient):
    """Replies "<prompt upper-cased>"; raises after `fail_after` requests (a crash mid-run)."""

    def __init__(self, fail_after: int | None = None):
        self.prompts, self.fail_after = [], fail_after

    def chat(self, conversations, sampling=None, n=1, tools=None):
        if self.fail_after is not None and len(self.prompts) >= self.fail_after:
            raise RuntimeError("the server went away")
        out = []
        for c in conversations:
            self.prompts.append(c[-1]["content"])
            out.append([Completion(c[-1]["content"].upper())])
        return out


@pytest.fixture()
def files(tmp_path):
    index = RagIndex(tmp_path / "idx", IndexConfig(dense=False))
    index.upsert([Document("cats", "Cats purr when content."), Document("tea", "Green tea contains catechins.")])
    chain = tmp_path / "chain.yaml"
    chain.write_text(f"""steps:
  - name: passages
    retrieve: {index.path}
    query: "{{question}}"
    k: 1
  - name: draft
    prompt: "Q: {{question}} S: {{passages}}"
    max_tokens: 32
  - name: total
    tool: calculator
    input: "{{a}} * 7"
  - name: final
    prompt: "{{draft}} / {{total}}"
""", encoding="utf-8")
    inputs = tmp_path / "in.jsonl"
    rows = [{"question": q, "a": a} for q, a in [("why do cats purr", 2), ("what is in green tea", 3),
                                                  ("cats again", 4), ("tea again", 5)]]
    inputs.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return chain, inputs, tmp_path / "out.jsonl"


def test_outputs_feed_later_steps(files):
    chain, inputs, out = files
    client = Echo()
    assert run_chain(Chain.load(chain), client, inputs, out, batch_size=2) == {"done": 4, "skipped": 0,
                                                                               "out": str(out)}
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    first = rows[0]
    assert first["passages"] == "[1] (cats) Cats purr when content." and first["total"] == "14"
    assert first["draft"] == "Q: WHY DO CATS PURR S: [1] (CATS) CATS PURR WHEN CONTENT."
    assert first["final"] == first["draft"].upper() + " / 14" and first["_line"] == 1
    assert rows[1]["passages"].startswith("[1] (tea)") and [r["a"] for r in rows] == [2, 3, 4, 5]
    assert len(client.prompts) == 8  # two model steps x four records, in batches


def test_a_stopped_run_goes_on_where_it_stopped(files):
    chain, inputs, out = files
    with pytest.raises(RuntimeError):  # batch 1 (2 records, 2 model steps) written, batch 2 fails
        run_chain(Chain.load(chain), Echo(fail_after=3), inputs, out, batch_size=2)
    assert len(out.read_text(encoding="utf-8").splitlines()) == 2
    with open(out, "a", encoding="utf-8") as f:
        f.write('{"_line": 3, "quest')  # a line cut mid-write
    again = Echo()
    assert run_chain(Chain.load(chain), again, inputs, out, batch_size=2)["skipped"] == 2
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["_line"] for r in rows] == [1, 2, 3, 4] and len(again.prompts) == 4
    assert run_chain(Chain.load(chain), Echo(), inputs, out) == {"done": 0, "skipped": 4, "out": str(out)}


@pytest.mark.parametrize("steps, message", [
    ([{"name": "a", "prompt": "x", "retrieve": "i"}], "exactly one of"),
    ([{"name": "a b", "prompt": "x"}], "identifier"),
    ([{"name": "a", "prompt": "x", "temprature": 0}], "unknown key 'temprature'"),
    ([{"name": "a", "prompt": "{b}"}, {"name": "b", "prompt": "x"}], "the output of a later step"),
    ([{"name": "a", "prompt": "x"}, {"name": "a", "prompt": "y"}], "used by an earlier step"),
    ([{"name": "a", "tool": "shell", "input": "x"}], "not calculator or python"),
    ([{"name": "a", "retrieve": "idx"}], "needs 'query'"),
])
def test_chain_file_errors_name_the_step(steps, message):
    with pytest.raises(ConfigError, match=message):
        Chain.from_list(steps, "c.yaml")


def test_input_errors_name_the_line(files, tmp_path):
    chain, _, out = files
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "a": 1}\n{"a": 2}\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad.jsonl:2: step 'passages': template: no value for \{question\}"):
        run_chain(Chain.load(chain), Echo(), bad, out)
    clash = tmp_path / "clash.jsonl"
    clash.write_text('{"question": "q", "a": 1, "draft": "mine"}\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="clash.jsonl:1: the input has a field 'draft'"):
        run_chain(Chain.load(chain), Echo(), clash, tmp_path / "o2.jsonl")


def test_cli(files, capsys, monkeypatch):
    from lmforge.cli import main
    from lmforge.prompting import cli

    chain, inputs, out = files
    monkeypatch.setattr(cli, "make_client", lambda args: Echo())
    assert main(["prompt", "chain", str(chain), "--inputs", str(inputs), "--out", str(out), "--json",
                 "--endpoint", "http://unused/v1"]) == 0
    assert json.loads(capsys.readouterr().out)["done"] == 4
    assert main(["prompt", "chain", str(chain) + ".missing", "--inputs", str(inputs), "--out", str(out)]) != 0
    assert "chain.yaml.missing" in capsys.readouterr().err
