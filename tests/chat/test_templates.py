"""Where a chat template comes from: every source of chat/templates.py's one order, which wins, and the same order in
every command (the model's own files read as transformers 5 reads them; `lmforge export gguf` writes the same)."""

from __future__ import annotations

import json
import shutil

import pytest
import transformers

from lmforge.chat.templates import BUILTIN_TEMPLATES, apply_chat_template, resolve_template
from lmforge.config import ConfigError
from lmforge.tokenizer import load_tokenizer

MSGS = [{"role": "user", "content": "x"}]
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}


def _model_dir(trained_dir, d, template):
    """lmforge's trained tokenizer files (small: quick to load in both libraries) with `template` as
    tokenizer_config.json's chat_template."""
    d.mkdir()
    src = trained_dir
    shutil.copy(src / "tokenizer.json", d / "tokenizer.json")
    config = json.loads((src / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    return d


def _own(d, tools=None) -> str:
    """What the model's own template renders for MSGS (each test template writes its name)."""
    return apply_chat_template(load_tokenizer(d), MSGS, tools=tools)


def _hf(d, tools=None) -> str:
    return transformers.AutoTokenizer.from_pretrained(d).apply_chat_template(MSGS, tools=tools, tokenize=False)


def test_the_models_own_template_files_in_order(trained_dir, real_tokenizers, tmp_path):
    # tokenizer_config.json's string
    d = _model_dir(trained_dir, tmp_path / "m", "config {{ messages[0].content }}")
    assert _own(d) == _hf(d) == "config x"
    assert resolve_template(load_tokenizer(d)) == ("config {{ messages[0].content }}", "the model's chat template")
    # chat_template.json (a processor's file, Gemma 3 keeps its template only there) wins over the config; the
    # tokenizer of transformers does not read it, so the reference is the file itself
    (d / "chat_template.json").write_text(json.dumps({"chat_template": "json {{ messages[0].content }}"}))
    assert _own(d) == "json x"
    gemma = real_tokenizers["gemma-3-it-template-only"]
    assert resolve_template(load_tokenizer(d), str(gemma / "chat_template.json"))[0] == \
        json.loads((gemma / "chat_template.json").read_text())["chat_template"]
    # chat_template.jinja wins over both (transformers 4.43+ saves templates there)
    (d / "chat_template.jinja").write_text("jinja {{ messages[0].content }}")
    assert _own(d) == _hf(d) == "jinja x"
    # additional_chat_templates/NAME.jinja: named templates beside the default, as transformers 5 saves them;
    # a conversation with tools picks "tool_use"
    (d / "additional_chat_templates").mkdir()
    (d / "additional_chat_templates" / "tool_use.jinja").write_text("tools {{ tools | length }}")
    assert _own(d) == _hf(d) == "jinja x"
    assert _own(d, [TOOL]) == _hf(d, [TOOL]) == "tools 1"
    assert resolve_template(load_tokenizer(d), "tool_use") == ("tools {{ tools | length }}",
                                                               "the model's 'tool_use' chat template")


def test_named_templates_in_the_config_as_transformers_picks_them(trained_dir, tmp_path):
    d = _model_dir(trained_dir, tmp_path / "m", [{"name": "default", "template": "D{{ messages[0].content }}"},
                                                     {"name": "tool_use", "template": "T{{ tools | length }}"}])
    assert _own(d) == _hf(d) == "Dx"
    assert _own(d, [TOOL]) == _hf(d, [TOOL]) == "T1"


def test_a_choice_wins_over_the_models_own(trained_dir, real_tokenizers, tmp_path):
    d = _model_dir(trained_dir, tmp_path / "m", [{"name": "default", "template": "D"},
                                                     {"name": "rag", "template": "R"}])
    tok = load_tokenizer(d)
    for choice in (None, "", "model"):
        assert resolve_template(tok, choice) == ("D", "the model's chat template")
    assert resolve_template(tok, "rag") == ("R", "the model's 'rag' chat template")
    assert resolve_template(tok, "qwen") == (BUILTIN_TEMPLATES["qwen"], "built-in qwen")
    assert resolve_template(tok, "{{ 'inline' }}") == ("{{ 'inline' }}", "a custom template")
    jinja = tmp_path / "t.jinja"
    jinja.write_text("file {{ messages | length }}")
    assert resolve_template(tok, str(jinja)) == ("file {{ messages | length }}", f"file {jinja}")
    # a tokenizer_config.json or a whole model directory: its own template, by the order above
    smol = real_tokenizers["smollm3-3b-template-only"]
    assert resolve_template(tok, str(smol))[0] == (smol / "chat_template.jinja").read_text()
    assert resolve_template(tok, str(d / "tokenizer_config.json"))[0] == "D"
    with pytest.raises(ConfigError, match="neither a built-in.*did you mean 'chatml'"):
        resolve_template(tok, "chatm")
    # no template of the model's own: an error where one is needed, none for plain-text generation
    bare = _model_dir(trained_dir, tmp_path / "bare", None)
    with pytest.raises(ConfigError, match="no chat template"):
        resolve_template(load_tokenizer(bare))
    assert resolve_template(load_tokenizer(bare), required=False) == (None, "none")


def test_gguf_export_and_inference_load_take_the_template_that_wins(trained_dir, tmp_path):
    """`lmforge export gguf` read tokenizer_config.json's template before chat_template.jinja (the opposite of
    transformers) and never chat_template.json; now every command resolves here."""
    from lmforge.export.gguf import export_gguf, read_gguf
    from lmforge.infer.load import load_for_inference
    from tests.models import tiny_llama

    d = tiny_llama(tmp_path / "m", trained_dir)
    own = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    (d / "chat_template.jinja").write_text(own)
    assert json.loads((d / "tokenizer_config.json").read_text())["chat_template"] != own
    meta, _ = read_gguf(export_gguf(d, tmp_path / "m.gguf", dtype="f32"))
    assert meta["tokenizer.chat_template"] == own == transformers.AutoTokenizer.from_pretrained(d).chat_template
    assert meta["tokenizer.ggml.eot_token_id"] == load_tokenizer(d).special_tokens["<|im_end|>"]
    assert load_for_inference(d).template == own
