"""Chat templates and loss masks for SFT, against transformers on real tokenizers and templates."""

from __future__ import annotations

import copy
import json

import pytest
import transformers

from lmforge.chat.masks import IGNORE, assistant_spans, encode_example, render_masked, stop_token_check
from lmforge.chat.render import TemplateError, render_chat
from lmforge.chat.templates import BUILTIN_TEMPLATES, apply_chat_template
from lmforge.finetune.conversations import Conversation
from lmforge.tokenizer import load_tokenizer

MULTITURN = [
    {"role": "system", "content": "你是一个乐于助人的助手。"},
    {"role": "user", "content": "北京是哪个国家的首都？"},
    {"role": "assistant", "content": "北京是中华人民共和国的首都。"},
    {"role": "user", "content": "What is its population, roughly?"},
    {"role": "assistant", "content": "About 21 million people live in Beijing."},
]
NO_SYSTEM = MULTITURN[1:]
# a tool-calling exchange as LLaMA-Factory's glaive_toolcall_zh_demo reads (a call without content, its result)
TOOLS = [{"type": "function", "function": {"name": "generate_invoice", "description": "生成发票", "parameters": {
    "type": "object", "properties": {"customer_name": {"type": "string", "description": "客户名称"}},
    "required": ["customer_name"]}}}, {"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
TOOL_CHAT = [
    {"role": "user", "content": "我需要为约翰·多伊生成一张发票，再查一下北京的天气。"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "generate_invoice", "arguments": {"customer_name": "约翰·多伊"}}},
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "北京"}}}]},
    {"role": "tool", "content": '{"invoice_id": "INV12345"}'},
    {"role": "tool", "content": '{"weather": "晴"}'},
    {"role": "assistant", "content": "发票已生成，编号 INV12345。北京今天晴。"},
    {"role": "user", "content": "Thanks! Once more for Jane?"},
    {"role": "assistant", "content": "Sure.", "tool_calls": [
        {"type": "function", "function": {"name": "generate_invoice", "arguments": {"customer_name": "Jane"}}}]},
]


def _real_template(real_tokenizers, name):
    return json.loads((real_tokenizers[name] / "tokenizer_config.json").read_text())["chat_template"]


def test_builtin_templates_render_as_the_models_own(real_tokenizers):
    qwen = _real_template(real_tokenizers, "qwen2.5-instruct")
    phi3 = _real_template(real_tokenizers, "phi-3-mini-instruct")
    for messages in (MULTITURN, NO_SYSTEM, NO_SYSTEM[:2]):
        for gen in (False, True):
            m = messages[:-1] if gen else messages
            assert render_chat(BUILTIN_TEMPLATES["qwen"], m, add_generation_prompt=gen) == \
                render_chat(qwen, m, add_generation_prompt=gen)
            assert render_chat(BUILTIN_TEMPLATES["phi-3"], m, add_generation_prompt=gen, eos_token="<|endoftext|>") == \
                render_chat(phi3, m, add_generation_prompt=gen, eos_token="<|endoftext|>")
        if messages[0]["role"] == "system":
            assert render_chat(BUILTIN_TEMPLATES["chatml"], messages) == render_chat(qwen, messages)
    for tools, messages in ((TOOLS, TOOL_CHAT), (TOOLS, [MULTITURN[0]] + TOOL_CHAT), (None, TOOL_CHAT)):
        for gen in (False, True):
            m = messages[:-1] if gen else messages
            assert render_chat(BUILTIN_TEMPLATES["qwen"], m, tools=tools, add_generation_prompt=gen) == \
                render_chat(qwen, m, tools=tools, add_generation_prompt=gen)
    # Llama 3 and Mistral, hand-written from their model cards
    two = NO_SYSTEM[:2]
    assert render_chat(BUILTIN_TEMPLATES["llama-3"], two, bos_token="<|begin_of_text|>") == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n北京是哪个国家的首都？<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n北京是中华人民共和国的首都。<|eot_id|>")
    assert render_chat(BUILTIN_TEMPLATES["mistral"], MULTITURN, bos_token="<s>", eos_token="</s>") == (
        "<s>[INST] 你是一个乐于助人的助手。\n\n北京是哪个国家的首都？ [/INST]北京是中华人民共和国的首都。</s>"
        "[INST] What is its population, roughly? [/INST]About 21 million people live in Beijing.</s>")


@pytest.mark.parametrize("tok,template", [("qwen2.5-instruct", "qwen"), ("qwen2.5-instruct", "chatml"),
                                          ("phi-3-mini-instruct", "phi-3"), ("qwen2.5-instruct", "alpaca"),
                                          ("qwen2.5-instruct", "plain")])
def test_builtin_masks_equal_transformers_assistant_tokens_mask(real_tokenizers, tok, template):
    folder = real_tokenizers[tok]
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    ours = load_tokenizer(folder)
    text = BUILTIN_TEMPLATES[template]
    for messages, tools in ((MULTITURN, None), (NO_SYSTEM, None)) + (((TOOL_CHAT, TOOLS),) if template == "qwen" else ()):
        want = hf.apply_chat_template(copy.deepcopy(messages), chat_template=text, tokenize=True, return_dict=True,
                                      return_assistant_tokens_mask=True, tools=tools)
        enc = encode_example(ours, text, Conversation(messages, tools))
        assert enc.input_ids + [want["input_ids"][-1]] == want["input_ids"]
        # labels[t] is token t+1 where token t+1 is an assistant token: transformers' mask shifted by one
        assert enc.labels == [t if m else IGNORE for t, m in zip(want["input_ids"][1:], want["assistant_masks"][1:])]


def _with_generation_blocks(qwen_template: str) -> str:
    """Qwen2.5's template with {% generation %} around the plain assistant turn (the same text rendered)."""
    old = "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    assert old in qwen_template
    new = ("{%- if message.role == 'assistant' %}{{- '<|im_start|>assistant\\n' }}{% generation %}"
           "{{- message.content + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}{%- else %}" + old + "{%- endif %}")
    return qwen_template.replace(old, new)


def test_prefix_masks_on_a_template_without_generation_blocks_equal_transformers(real_tokenizers):
    """Qwen2.5's own template has no {% generation %}: lmforge finds the turns by prefix renders; transformers'
    mask on the same template with the blocks added is the reference."""
    folder = real_tokenizers["qwen2.5-instruct"]
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    ours = load_tokenizer(folder)
    qwen = _real_template(real_tokenizers, "qwen2.5-instruct")
    marked = _with_generation_blocks(qwen)
    for messages in (MULTITURN, NO_SYSTEM, NO_SYSTEM[:2]):
        assert render_chat(marked, messages) == render_chat(qwen, messages)
        want = hf.apply_chat_template(copy.deepcopy(messages), chat_template=marked, tokenize=True, return_dict=True,
                                      return_assistant_tokens_mask=True)
        mask = want["assistant_masks"]
        enc = encode_example(ours, qwen, Conversation(messages))
        assert enc.labels == [t if m else IGNORE for t, m in zip(want["input_ids"][1:], mask[1:])]
        # Phi-3's template closes the text with EOS only at the very end: middle turns stop before it
    phi = real_tokenizers["phi-3-mini-instruct"]
    ours_phi = load_tokenizer(phi)
    hf_phi = transformers.AutoTokenizer.from_pretrained(phi)
    want = hf_phi.apply_chat_template(copy.deepcopy(MULTITURN), chat_template=BUILTIN_TEMPLATES["phi-3"], tokenize=True,
                                      return_dict=True, return_assistant_tokens_mask=True)
    enc = encode_example(ours_phi, _real_template(real_tokenizers, "phi-3-mini-instruct"), Conversation(MULTITURN))
    trained = [t for t in enc.labels if t != IGNORE]
    builtin = [t for t, m in zip(want["input_ids"][1:], want["assistant_masks"][1:]) if m]
    # the same turns; the real template's final EOS is trained on too (it is part of the last turn's render)
    assert trained[:len(builtin)] == builtin and len(trained) - len(builtin) <= 1


def test_the_first_response_token_is_trained_and_masks_select_turns(real_tokenizers):
    ours = load_tokenizer(real_tokenizers["qwen2.5-instruct"])
    template = BUILTIN_TEMPLATES["chatml"]
    conv = Conversation(MULTITURN)
    enc = encode_example(ours, template, conv)
    first = ours.encode("北京是中华人民共和国的首都。")[0]
    prompt = apply_chat_template(ours, MULTITURN[:2], add_generation_prompt=True, chat_template=template, tokenize=True)
    # position len(prompt) - 1 (the "\n" after "<|im_start|>assistant") predicts the first response token
    assert enc.labels[len(prompt) - 1] == first
    assert enc.labels[len(prompt) - 2] == IGNORE
    trained = ours.decode([t for t in enc.labels if t != IGNORE])
    assert trained == "北京是中华人民共和国的首都。<|im_end|>About 21 million people live in Beijing.<|im_end|>"
    last = encode_example(ours, template, conv, mask="last")
    assert ours.decode([t for t in last.labels if t != IGNORE]) == "About 21 million people live in Beijing.<|im_end|>"
    everything = encode_example(ours, template, conv, mask="all")
    assert IGNORE not in everything.labels
    cut = encode_example(ours, template, conv, max_length=20)
    assert cut.truncated and len(cut.input_ids) == len(cut.labels) == 20
    shown = render_masked(ours, template, conv)
    assert "[[北京是中华人民共和国的首都。<|im_end|>]]" in shown and "<|im_start|>user\n北京是哪个国家的首都？" in shown


def test_a_template_that_rewrites_earlier_turns_is_refused_unless_last(real_tokenizers):
    ours = load_tokenizer(real_tokenizers["qwen3"])
    qwen3 = _real_template(real_tokenizers, "qwen3")
    messages = [{"role": "user", "content": "1+1?"},
                {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n2"},
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "<think>\nadd again\n</think>\n\n4"}]
    with pytest.raises(TemplateError, match="renders assistant turn 1 differently"):
        encode_example(ours, qwen3, Conversation(messages))
    last = encode_example(ours, qwen3, Conversation(messages), mask="last")
    trained = ours.decode([t for t in last.labels if t != IGNORE])
    assert "add again" in trained and trained.rstrip().endswith("4<|im_end|>")
    text, spans = assistant_spans(qwen3, messages, only_last=True)
    assert text[spans[0][0]:spans[0][1]].startswith("<think>")


def test_stop_token_mismatch_is_named(real_tokenizers):
    ours = load_tokenizer(real_tokenizers["qwen2.5-instruct"])
    im_end, eot = ours.token_to_id("<|im_end|>"), ours.token_to_id("<|endoftext|>")
    assert stop_token_check(ours, BUILTIN_TEMPLATES["chatml"], [im_end]) is None
    warning = stop_token_check(ours, BUILTIN_TEMPLATES["chatml"], [eot])
    assert "<|im_end|>" in warning and "would not stop" in warning
    # Llama 3's <|eot_id|> is not in Qwen's vocabulary: no token to learn to stop with
    assert "no control token" in stop_token_check(ours, BUILTIN_TEMPLATES["llama-3"], [eot])


def test_tool_data_through_a_template_that_drops_tools_is_refused(real_tokenizers):
    """SmolLM2's template (ChatML, like the chatml built-in) ignores tools and tool calls: the model would learn an
    empty reply where each call is. Found fine-tuning SmolLM2 on LLaMA-Factory's glaive_toolcall demos."""
    from lmforge.chat.masks import tool_rendering_check

    tok = load_tokenizer(real_tokenizers["qwen2.5-instruct"])
    convs = [Conversation(NO_SYSTEM, where="a.json:1"), Conversation(TOOL_CHAT, TOOLS, where="a.json:2")]
    problem = tool_rendering_check(tok, BUILTIN_TEMPLATES["chatml"], convs)
    assert problem.startswith("1 examples carry tools or tool calls, but the chat template does not render their "
                              "tool definitions or tool calls (a.json:2)")
    no_defs = [Conversation(TOOL_CHAT, None, where="b.json:1")]  # calls without definitions: the calls are named
    assert "render their tool calls (b.json:1)" in tool_rendering_check(tok, BUILTIN_TEMPLATES["chatml"], no_defs)
    assert tool_rendering_check(tok, BUILTIN_TEMPLATES["qwen"], convs) is None
    assert tool_rendering_check(tok, _real_template(real_tokenizers, "qwen2.5-instruct"), convs) is None
    assert tool_rendering_check(tok, BUILTIN_TEMPLATES["chatml"], convs[:1]) is None
    # LLaMA-Factory's own glaive tool-call records (tests/fixtures/llamafactory)
    from lmforge.finetune.conversations import load_conversations
    from tests.finetune.test_conversations import LLAMA_FACTORY

    glaive = load_conversations(f"{LLAMA_FACTORY}#glaive_toolcall_zh_demo")
    assert "glaive_toolcall_zh_demo.json:record 1" in tool_rendering_check(tok, BUILTIN_TEMPLATES["chatml"], glaive)
    assert tool_rendering_check(tok, BUILTIN_TEMPLATES["qwen"], glaive) is None
    text = render_masked(tok, BUILTIN_TEMPLATES["qwen"], glaive[0], limit=100_000)
    assert '[[<tool_call>\n{"name": "' in text  # the call is what the reply trains


@pytest.mark.parametrize("system,variables", [("/think", {}), ("Be brief. /no_think", {}), (None, {"enable_thinking": False}),
                                              (None, {})])
def test_smollm3_reasoning_switches_mask_as_transformers(real_tokenizers, system, variables):
    """SmolLM3's real template ({% generation %} blocks): /think and /no_think in the system message, or
    enable_thinking, choose the mode; lmforge's ids and labels equal transformers' return_assistant_tokens_mask
    (Qwen2.5's vocabulary: SmolLM3 has the same <|im_start|> / <|im_end|> control tokens)."""
    template = (real_tokenizers["smollm3-3b-template-only"] / "chat_template.jinja").read_text()
    folder = real_tokenizers["qwen2.5-instruct"]
    hf, ours = transformers.AutoTokenizer.from_pretrained(folder), load_tokenizer(folder)
    messages = ([{"role": "system", "content": system}] if system else []) + NO_SYSTEM
    want = hf.apply_chat_template(copy.deepcopy(messages), chat_template=template, tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True, **variables)
    enc = encode_example(ours, template, Conversation(messages), variables=variables)
    assert enc.input_ids + [want["input_ids"][-1]] == want["input_ids"]
    assert enc.labels == [t if m else IGNORE for t, m in zip(want["input_ids"][1:], want["assistant_masks"][1:])]
    thinking = system == "/think" or (system is None and not variables)
    text = render_chat(template, messages, **variables)
    assert ("Reasoning Mode: /think" in text) == thinking
    # without thinking every reply opens with an empty reasoning block, which is trained (inside the generation block)
    assert (text.count("<|im_start|>assistant\n<think>\n\n</think>\n") == 2) != thinking
