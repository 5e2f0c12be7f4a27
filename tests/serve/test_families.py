"""`lmforge serve` on a new family with its own chat template: a tiny random Qwen3 (transformers' config class,
tests/model/test_families.py) with the real Qwen3 tokenizer and template; its thinking comes back as
reasoning_content, whole and streamed, and Qwen3-MoE answers through the same server."""

from __future__ import annotations

import pytest
import transformers

from lmforge.tokenizer import load_tokenizer
from tests import corpora
from tests.model.test_families import _hf_model

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen3", "qwen3_moe"])
def test_a_qwen3_family_model_returns_its_thinking_as_reasoning_content(family, tmp_path, monkeypatch):
    import lmforge.serve.app as app
    from tests.serve.test_server import Running, _qwen3_reply, _reasoning_and_content, _Scripted

    d = corpora.real_tokenizer("qwen3", tmp_path / family)
    _hf_model(family, len(transformers.AutoTokenizer.from_pretrained(d))).save_pretrained(d)
    tok = load_tokenizer(d)
    user = {"role": "user", "content": "北京是哪个国家的首都？"}
    reasoning, answer = "The user asks about Beijing.\n它是首都。", "中国。"
    reply = _qwen3_reply(tok.chat_template, user, reasoning, answer)  # what Qwen3's template renders for the turn
    # the random model is made to write that reply token by token (a decoding constraint), through the engine, the
    # tokenizer and the streaming detokenizer
    monkeypatch.setattr(app, "response_constraint", lambda response_format: _Scripted(reply))
    r = Running(d, max_batch=2)
    try:
        client = openai.OpenAI(base_url=r.url + "/v1", api_key="x")
        out = client.chat.completions.create(model="tiny", messages=[user], max_tokens=100, temperature=0)
        assert (out.choices[0].message.reasoning_content, out.choices[0].message.content) == (reasoning, answer)
        assert out.choices[0].finish_reason == "stop"  # <|im_end|>, Qwen3's end of turn, stopped it
        chunks = list(client.chat.completions.create(model="tiny", messages=[user], max_tokens=100, temperature=0,
                                                     stream=True))
        assert _reasoning_and_content(chunks) == (reasoning, answer)
    finally:
        r.close()


def test_chat_template_kwargs_switch_qwen3s_thinking_per_request_and_per_server(tmp_path):
    """`chat_template_kwargs` (vLLM's request field; the openai SDK's extra_body) reaches the template: Qwen3 with
    enable_thinking false gets the prompt transformers renders for it (an empty <think></think> block), the server's
    own --chat-template-kwargs apply when the request names none, and a variable the template never reads is a 400
    naming the field."""
    import json
    import urllib.error
    import urllib.request

    from tests.serve.test_server import Running

    d = corpora.real_tokenizer("qwen3", tmp_path / "qwen3")
    hf_tok = transformers.AutoTokenizer.from_pretrained(d)
    _hf_model("qwen3", len(hf_tok)).save_pretrained(d)
    user = [{"role": "user", "content": "北京是哪个国家的首都？"}]

    def prompt_tokens(url: str, body: dict) -> int:
        req = urllib.request.Request(url + "/v1/chat/completions", method="POST",
                                     data=json.dumps({"messages": user, "max_tokens": 1, **body}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            return json.loads(resp.read())["usage"]["prompt_tokens"]

    def expected(thinking: bool) -> int:
        return len(hf_tok.apply_chat_template(user, add_generation_prompt=True, tokenize=True, return_dict=False,
                                              enable_thinking=thinking))

    assert expected(False) > expected(True)  # the empty thinking block
    r = Running(d, max_batch=2)
    try:
        assert prompt_tokens(r.url, {}) == expected(True)
        assert prompt_tokens(r.url, {"chat_template_kwargs": {"enable_thinking": False}}) == expected(False)
        with pytest.raises(urllib.error.HTTPError) as e:
            prompt_tokens(r.url, {"chat_template_kwargs": {"enable_thinkng": False}})
        body = json.loads(e.value.read())
        assert e.value.code == 400 and body["error"]["param"] == "chat_template_kwargs"
        assert "never reads 'enable_thinkng'" in body["error"]["message"]
    finally:
        r.close()
    r = Running(d, max_batch=2, template_kwargs={"enable_thinking": False})
    try:
        assert prompt_tokens(r.url, {}) == expected(False)
        assert prompt_tokens(r.url, {"chat_template_kwargs": {"enable_thinking": True}}) == expected(True)
    finally:
        r.close()
