"""Chat A/B: the same conversation to two checkpoints through the one engine; each greedy reply equals what
transformers generates from the same chat-template prompt with the same model."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
transformers = pytest.importorskip("transformers")


def _transformers_reply(model_dir, messages, max_new_tokens: int) -> str:
    """transformers' greedy continuation of the chat-template prompt, cut at the model's stop tokens (the engine
    stops at EOS and the template's end of turn)."""
    import torch

    from lmforge.chat.stops import stop_ids
    from lmforge.model import load_hf_model

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    from lmforge.tokenizer import load_tokenizer

    ours = load_tokenizer(model_dir)
    stops = set(stop_ids(ours, load_hf_model(model_dir).cfg, ours.chat_template))
    cut = next((i for i, t in enumerate(out) if t in stops), len(out))
    return tok.decode(out[:cut])


def test_two_checkpoints_answer_side_by_side_as_transformers_does(workspace, parsers):
    from fastapi.testclient import TestClient

    from lmforge.studio.app import Studio, create_studio_app

    studio = Studio(workspace / "runs", parsers, cwd=workspace)
    with TestClient(create_studio_app(studio, port=7860, token="t"), base_url="http://127.0.0.1:7860") as c:
        listed = {x["path"] for x in c.get("/api/checkpoints").json()["checkpoints"]}
        assert {"runs/pt-done/best", "runs/pt-done/last"} <= listed
        messages = [{"role": "system", "content": "你是一个助手。"}, {"role": "user", "content": "北京在哪里？"}]
        r = c.post("/api/chat", headers={"X-Lmforge-Token": "t"},
                   json={"checkpoints": ["model", "runs/pt-done/last"], "messages": messages, "max_tokens": 12})
        assert r.status_code == 200, r.text
        a, b = r.json()["replies"]
        assert (a["checkpoint"], b["checkpoint"]) == (str(workspace / "model"), str(workspace / "runs/pt-done/last"))
        assert a["text"] == _transformers_reply(workspace / "model", messages, 12)
        assert b["text"] == _transformers_reply(workspace / "runs" / "pt-done" / "last", messages, 12)
        assert a["completion_tokens"] <= 12 and a["seconds"] >= 0
        # each side continues its own conversation
        history = [messages + [{"role": "assistant", "content": a["text"]}, {"role": "user", "content": "再说一遍"}],
                   messages + [{"role": "assistant", "content": b["text"]}, {"role": "user", "content": "再说一遍"}]]
        r = c.post("/api/chat", headers={"X-Lmforge-Token": "t"},
                   json={"checkpoints": ["model", "runs/pt-done/last"], "conversations": history, "max_tokens": 6})
        assert r.json()["replies"][0]["text"] == _transformers_reply(workspace / "model", history[0], 6)
        # refused: no token, a path outside the studio's folder, a bad message
        assert c.post("/api/chat", json={"checkpoints": ["model"], "messages": messages}).status_code == 403
        r = c.post("/api/chat", headers={"X-Lmforge-Token": "t"}, json={"checkpoints": ["/etc"], "messages": messages})
        assert r.status_code == 400 and "outside" in r.json()["error"]
        r = c.post("/api/chat", headers={"X-Lmforge-Token": "t"},
                   json={"checkpoints": ["model"], "messages": [{"role": "wizard", "content": "x"}]})
        assert r.status_code == 400 and "messages" in r.json()["error"]
