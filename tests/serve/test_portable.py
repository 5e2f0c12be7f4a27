"""`lmforge serve` and `lmforge generate` on the portable path (model/portable.py): a tiny random Granite, outside
lmforge's native families, with the real Qwen2.5 tokenizer, answers an OpenAI completion and prints a generation
with transformers' greedy tokens."""

from __future__ import annotations

import pytest
import torch
import transformers

from lmforge.model import load_hf_model
from lmforge.tokenizer import load_tokenizer
from tests.model.test_portable import PORTABLE, model_dir

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")


@pytest.fixture(scope="module")
def granite(tmp_path_factory):
    return model_dir(tmp_path_factory.mktemp("granite"), *PORTABLE["granite"][:2], **PORTABLE["granite"][2])


def test_serve_answers_with_transformers_greedy_tokens(granite):
    from tests.serve.test_server import Running

    hf = transformers.AutoModelForCausalLM.from_pretrained(granite).eval()
    tok = load_tokenizer(granite)
    prompt = "北京是中华人民共和国的首都"
    ids = tok.encode(prompt)
    with torch.no_grad():
        want = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, min_new_tokens=12)[0, len(ids):]
    r = Running(granite, max_batch=2)
    try:
        out = httpx.post(r.url + "/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 12,
                                                          "temperature": 0, "logprobs": 0}, timeout=120).json()
    finally:
        r.close()
    assert out["choices"][0]["text"] == tok.decode(want.tolist())


def test_generate_command_prints_transformers_greedy_text(granite, capsys):
    from lmforge.cli import main

    hf = transformers.AutoModelForCausalLM.from_pretrained(granite).eval()
    tok = load_tokenizer(granite)
    prompt = "The quick brown fox"
    ids = tok.encode(prompt)
    with torch.no_grad():
        want = hf.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False, min_new_tokens=10)[0, len(ids):]
    capsys.readouterr()
    assert main(["generate", "--model", str(granite), "--prompt", prompt, "--temperature", "0",
                 "--max-new-tokens", "10"]) == 0
    out, err = capsys.readouterr()
    assert out == tok.decode(want.tolist()) + "\n"
    assert "lmforge: portable path (transformers' GraniteForCausalLM)" in err


def test_chat_session_keeps_its_cache_across_turns(granite):
    """`lmforge chat`'s session: the second turn prefills only the new messages after the cached first turn, and
    each reply is transformers' greedy continuation of the whole rendered conversation."""
    from lmforge.chat.render import encode_chat
    from lmforge.infer.engine import ChatSession
    from lmforge.infer.sampling import SamplingConfig

    hf = transformers.AutoModelForCausalLM.from_pretrained(granite).eval()
    tok = load_tokenizer(granite)
    session = ChatSession(load_hf_model(granite), tok, SamplingConfig(max_new_tokens=8, temperature=0))
    for user in ("北京在哪里？", "What is two plus two?"):
        ids = encode_chat(tok, tok.chat_template, session.messages + [{"role": "user", "content": user}],
                          add_generation_prompt=True).ids
        with torch.no_grad():
            want = hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids):].tolist()
        stops = set(session.cfg.stop_token_ids)
        want = want[:next((i + 1 for i, t in enumerate(want) if t in stops), len(want))]
        assert "".join(session.reply(user)) == tok.decode([t for t in want if t not in stops])
    assert session.scheduler.stats["prefix_hits"] >= 1
