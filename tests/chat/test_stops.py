"""One set of stop ids for one model, whichever entry point generates: `lmforge generate`, `lmforge chat`, the
server, the prompting client, evaluation (plain and chat formats), the Python API's generate and ChatSession."""

from __future__ import annotations

import io
import json

import pytest

from lmforge.chat.stops import eos_ids, stop_ids, turn_end_ids
from lmforge.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def model_dir(trained_dir, tmp_path_factory):
    from tests.models import tiny_llama

    return tiny_llama(tmp_path_factory.mktemp("stops"), trained_dir)


@pytest.fixture
def seen(monkeypatch):
    """The stop ids of every request the one scheduler is given (generate, chat, prompting, evaluation and, through
    the continuous batcher, the server), and of the requests the server submits."""
    from lmforge.infer.batching import ContinuousBatcher
    from lmforge.infer.scheduler import Scheduler

    ids: list[tuple[str, list[int]]] = []
    add, submit = Scheduler.add, ContinuousBatcher.submit

    def spy_add(self, prompt, configs, *a, **kw):
        from lmforge.infer.sampling import SamplingConfig

        ids.extend(("scheduler", sorted(c.stop_token_ids))
                   for c in ([configs] if isinstance(configs, SamplingConfig) else configs))
        return add(self, prompt, configs, *a, **kw)

    def spy_submit(self, prompt, cfg, *a, **kw):
        ids.extend(("server", sorted(c.stop_token_ids)) for c in cfg)
        return submit(self, prompt, cfg, *a, **kw)

    monkeypatch.setattr(Scheduler, "add", spy_add)
    monkeypatch.setattr(ContinuousBatcher, "submit", spy_submit)
    return ids


@pytest.mark.slow  # nine entry points end to end (~23 s): the slow tier, which CI runs too
def test_every_entry_point_stops_at_the_same_ids(model_dir, seen, tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    from lmforge.cli import main
    from lmforge.infer import ChatSession, SamplingConfig, generate
    from lmforge.infer.client import EngineClient, Sampling
    from lmforge.infer.load import load_for_inference
    from lmforge.serve.app import Server, create_app

    tok = load_tokenizer(model_dir)
    # worked by hand: the trained tokenizer's EOS (the model's eos_token_id too) and ChatML's end of turn
    want = sorted([tok.special_tokens["<|endoftext|>"], tok.special_tokens["<|im_end|>"]])
    loaded = load_for_inference(model_dir)
    assert loaded.stop_ids == want == stop_ids(tok, loaded.model.cfg)
    assert "stops at <|endoftext|> <|im_end|>" in loaded.description

    generate(loaded.model, tok, "hi", max_new_tokens=1)
    list(ChatSession(loaded.model, tok, SamplingConfig(max_new_tokens=1)).reply("hi"))
    EngineClient(str(model_dir)).complete(["hi"], Sampling(max_tokens=1))
    with TestClient(create_app(Server(loaded.model, tok, "m")), base_url="http://127.0.0.1") as client:
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
        assert r.status_code == 200, r.text
    assert main(["generate", "--model", str(model_dir), "--prompt", "hi", "--max-new-tokens", "1"]) == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n\n"))
    assert main(["chat", "--model", str(model_dir), "--max-new-tokens", "1"]) == 0
    (tmp_path / "t.jsonl").write_text(json.dumps({"q": "2+2=?", "a": "4"}) + "\n")
    (tmp_path / "t.yaml").write_text("task: t\ndata: t.jsonl\noutput_type: generate_until\ndoc_to_text: '{{q}}'\n"
                                     "doc_to_target: '{{a}}'\ngeneration_kwargs:\n  max_gen_toks: 1\n")
    for fmt in ("plain", "chat"):
        assert main(["eval", "run", "--model", str(model_dir), "--task", str(tmp_path / "t.yaml"), "--format", fmt,
                     "--out", str(tmp_path / fmt), "--json"]) == 0
    kinds = [k for k, _ in seen]
    # seven requests from the entry points that drive the scheduler themselves, and the server's, which reaches
    # the same scheduler through the batcher
    assert kinds.count("scheduler") == 8 and kinds.count("server") == 1, kinds
    assert all(ids == want for _, ids in seen), seen


def test_stop_ids_of_real_chat_templates(real_tokenizers):
    """EOS from the tokenizer and the model config; the end of turn from what the template writes after a reply."""
    qwen = load_tokenizer(real_tokenizers["qwen2.5-instruct"])
    end, eot = qwen.special_tokens["<|im_end|>"], qwen.special_tokens["<|endoftext|>"]
    assert eos_ids(qwen) == [end]  # Qwen2.5-Instruct's tokenizer_config names <|im_end|> as its EOS
    assert eos_ids(qwen, eot) == [end, eot] and eos_ids(qwen, [eot, end]) == [end, eot]
    assert turn_end_ids(qwen) == [end] and stop_ids(qwen, eot) == sorted([end, eot])
    phi = load_tokenizer(real_tokenizers["phi-3-mini-instruct"])
    assert turn_end_ids(phi) == [phi.token_to_id("<|end|>")]
    assert turn_end_ids(phi, "{{ messages[0].content }}") == []  # a template that ends a reply with no token
