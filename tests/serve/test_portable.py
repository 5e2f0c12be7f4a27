"""`lmforge serve` and `lmforge generate` on the portable path (model/portable.py): a tiny random Granite, outside
lmforge's native families, with the real Qwen2.5 tokenizer, answers an OpenAI completion and prints a generation
with transformers' greedy tokens."""

from __future__ import annotations

import pytest
import torch
import transformers

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
