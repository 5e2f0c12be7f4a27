"""`lmforge chat` on the new families with their own real chat templates (Qwen3 with its thinking switch, Phi-3):
two turns in the terminal, at the command's default flags, each reply equal to transformers' greedy `generate` on
the conversation as transformers' `apply_chat_template` renders it."""

from __future__ import annotations

import pytest
import torch
import transformers

from lmforge.cli import main
from tests import corpora
from tests.model.test_families import _hf_model


def _inputs(*lines: str):
    answers = iter(lines)
    return lambda prompt="": next(answers)


def _expected(hf, tok, messages, stops, max_new, **template_kwargs) -> str:
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False,
                                  **template_kwargs)
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=max_new, do_sample=False, eos_token_id=stops,
                          pad_token_id=stops[0])
    new = [t for t in out[0, len(ids):].tolist() if t not in stops]
    return tok.decode(new, skip_special_tokens=False)


@pytest.mark.parametrize("family,tokenizer,stop_names,kwargs", [
    ("qwen3", "qwen3", ["<|im_end|>", "<|endoftext|>"], {"enable_thinking": False}),
    ("phi3", "phi-3-mini-instruct", ["<|end|>", "<|endoftext|>"], {}),
])
def test_chat_on_a_family_model_answers_as_transformers_does(family, tokenizer, stop_names, kwargs, tmp_path,
                                                             capsys, monkeypatch):
    d = corpora.real_tokenizer(tokenizer, tmp_path / family)
    tok = transformers.AutoTokenizer.from_pretrained(d)
    hf = _hf_model(family, len(tok))
    hf.save_pretrained(d)
    stops = [tok.convert_tokens_to_ids(n) for n in stop_names]
    flags = ["chat", "--model", str(d), "--temperature", "0", "--max-new-tokens", "6"]
    if kwargs:
        flags += ["--chat-template-kwargs", "{enable_thinking: false}"]
    monkeypatch.setattr("builtins.input", _inputs("你好，请介绍一下北京。", "And in English? 🙂", ""))
    assert main(flags) == 0
    out = capsys.readouterr().out
    first = [{"role": "user", "content": "你好，请介绍一下北京。"}]
    reply1 = _expected(hf, tok, first, stops, 6, **kwargs)
    second = first + [{"role": "assistant", "content": reply1}, {"role": "user", "content": "And in English? 🙂"}]
    reply2 = _expected(hf, tok, second, stops, 6, **kwargs)
    assert out == f"model> {reply1}\nmodel> {reply2}\n"
