"""The Data view: a file read by finetune's reader and rendered through a chat template, with the trained part
equal to transformers' return_assistant_tokens_mask on a real model's tokenizer, token counts, refused records with
their file:line, and paths kept inside the studio's folder."""

from __future__ import annotations

import json
import shutil

import pytest

from lmforge.studio.data_preview import preview_data

transformers = pytest.importorskip("transformers")

RECORDS = [
    {"instruction": "北京是哪个国家的首都？", "input": "", "output": "北京是中华人民共和国的首都。"},
    {"instruction": "Translate to English", "input": "你好，世界", "output": "Hello, world."},
    {"instruction": "A record without its answer", "input": ""},
    {"instruction": "What is 2 + 2?", "input": "", "output": "4", "system": "Answer briefly."},
]


@pytest.fixture()
def data_dir(real_tokenizers, tmp_path):
    shutil.copytree(real_tokenizers["qwen2.5-instruct"], tmp_path / "qwen")
    (tmp_path / "alpaca.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in RECORDS),
                                           encoding="utf-8")
    return tmp_path


def _hf_messages(record: dict) -> list[dict]:
    user = record["instruction"] + ("\n" + record["input"] if record["input"] else "")
    system = [{"role": "system", "content": record["system"]}] if "system" in record else []
    return system + [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]


@pytest.mark.parametrize("template", ["qwen", "chatml"])
def test_trained_spans_equal_transformers_assistant_mask(data_dir, template):
    from lmforge.chat.templates import BUILTIN_TEMPLATES

    hf = transformers.AutoTokenizer.from_pretrained(data_dir / "qwen")
    out = preview_data(data_dir / "alpaca.jsonl", data_dir / "qwen", template=template)
    assert out["template"] == f"built-in {template}"
    assert [e["where"].rsplit(":", 1)[1] for e in out["examples"]] == ["1", "2", "4"]
    assert out["rejects"] == [{"where": f"{data_dir / 'alpaca.jsonl'}:3", "reason": out["rejects"][0]["reason"]}]
    assert "output" in out["rejects"][0]["reason"]  # the missing field is named
    for example, record in zip(out["examples"], [RECORDS[0], RECORDS[1], RECORDS[3]]):
        want = hf.apply_chat_template(_hf_messages(record), chat_template=BUILTIN_TEMPLATES[template], tokenize=True,
                                      return_dict=True, return_assistant_tokens_mask=True)
        ids, mask = want["input_ids"], want["assistant_masks"]
        # the whole rendered example (its last token shown when trained: a label holds it, chat/masks.py)
        assert "".join(t for t, _ in example["runs"]) == hf.decode(ids if mask[-1] else ids[:-1])
        trained = "".join(t for t, on in example["runs"] if on)
        # the trained part is what transformers marks (the first token never has a label to train)
        assert trained == hf.decode([t for t, m in zip(ids[1:], mask[1:]) if m])
        assert record["output"] in trained and record["instruction"] not in trained
        assert example["tokens"] == len(ids) and example["trained_tokens"] == sum(mask[1:])


def test_mask_choices_paging_and_the_models_own_template(data_dir):
    everything = preview_data(data_dir / "alpaca.jsonl", data_dir / "qwen", mask="all", limit=1)
    example = everything["examples"][0]
    assert everything["template"] == "the model's chat template" and len(everything["examples"]) == 1
    assert example["trained_tokens"] == example["tokens"] - 1  # every token but the first
    second = preview_data(data_dir / "alpaca.jsonl", data_dir / "qwen", start=1, limit=5)
    assert [e["where"].rsplit(":", 1)[1] for e in second["examples"]] == ["2", "4"]


def test_the_endpoint_keeps_paths_inside_the_studio_folder(data_dir, parsers):
    from fastapi.testclient import TestClient

    from lmforge.studio.app import Studio, create_studio_app

    (data_dir / "runs").mkdir()
    app = create_studio_app(Studio(data_dir / "runs", parsers, cwd=data_dir), port=7860, token="t")
    with TestClient(app, base_url="http://127.0.0.1:7860") as c:
        r = c.get("/api/data/preview", params={"path": "alpaca.jsonl", "tokenizer": "qwen", "template": "chatml"})
        assert r.status_code == 200 and len(r.json()["examples"]) == 3
        r = c.get("/api/data/preview", params={"path": "../../etc/passwd", "tokenizer": "qwen"})
        assert r.status_code == 400 and "outside" in r.json()["error"]
        r = c.get("/api/data/preview", params={"path": "alpaca.jsonl", "tokenizer": "qwen", "template": "chatmlx"})
        assert r.status_code == 400 and "chatmlx" in r.json()["error"]  # the CLI's own one-line error
        assert "chatml" in c.get("/api/templates").json()["templates"]
