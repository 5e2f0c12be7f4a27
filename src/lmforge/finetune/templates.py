"""Chat templates for fine-tuning and the loss mask of each example.

A conversation is rendered with the model's own chat template (HF-exact, tokenizer/chat.py) or a named built-in
(`BUILTIN_TEMPLATES`). Which tokens the loss sees (`mask`):

- "assistant" (the default): every assistant turn, its end-of-turn token included, so the model learns to stop;
- "last": only the last assistant turn;
- "all" (`train_on_prompt`): every token.

The assistant spans come from the template's `{% generation %}` blocks where it has them (transformers' rule for
`return_assistant_tokens_mask`; the built-ins all do). For a template without them (most models' own), from the
renders of growing prefixes: the text that `messages[:i+1]` adds after `messages[:i]` with the generation prompt
is assistant turn i (without the whitespace that follows its end token). A template that renders earlier turns
differently once later turns exist (Qwen3 drops the reasoning of earlier turns) cannot be split that way: the
error says so and names the way out.

Labels are the next token of each position (`labels[t] = ids[t + 1]`, -100 where that token is not trained on),
as train/objectives.py expects; the first token of every response has its label (tested).
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass

from lmforge.finetune.conversations import Conversation
from lmforge.tokenizer.chat import TemplateError, _overlaps, _render, encode_chat

log = logging.getLogger(__name__)

MASKS = ("assistant", "last", "all")
IGNORE = -100

_CHATML = (
    "{%- for message in messages -%}"
    "{%- if message.role == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' -}}{%- generation -%}{{- message.content + '<|im_end|>' -}}{%- endgeneration -%}"
    "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

_QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
_QWEN25 = (
    "{%- if tools -%}"
    "{{- '<|im_start|>system\\n' -}}"
    "{{- messages[0].content if messages[0].role == 'system' else '" + _QWEN_SYSTEM + "' -}}"
    "{{- '\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided "
    "with function signatures within <tools></tools> XML tags:\\n<tools>' -}}"
    "{%- for tool in tools -%}{{- '\\n' -}}{{- tool | tojson -}}{%- endfor -%}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n' -}}"
    "{%- elif messages[0].role == 'system' -%}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>system\\n" + _QWEN_SYSTEM + "<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message.role == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- generation -%}"
    "{%- if message.tool_calls -%}"
    "{{- message.content if message.content else '' -}}"
    "{%- for tool_call in message.tool_calls -%}"
    "{%- if tool_call.function is defined -%}{%- set tool_call = tool_call.function -%}{%- endif -%}"
    "{{- ('\\n' if message.content or not loop.first else '') + '<tool_call>\\n{\"name\": \"' -}}"
    "{{- tool_call.name -}}{{- '\", \"arguments\": ' -}}{{- tool_call.arguments | tojson -}}{{- '}\\n</tool_call>' -}}"
    "{%- endfor -%}"
    "{%- else -%}{{- message.content -}}{%- endif -%}"
    "{{- '<|im_end|>' -}}"
    "{%- endgeneration -%}"
    "{{- '\\n' -}}"
    "{%- elif message.role == 'tool' -%}"
    "{%- if loop.index0 == 0 or messages[loop.index0 - 1].role != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}"
    "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' -}}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' -%}{{- '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- elif message.role == 'user' or not loop.first -%}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

BUILTIN_TEMPLATES = {
    # ChatML (OpenAI's format; lmforge's own tokenizers carry its tokens)
    "chatml": _CHATML,
    # Qwen2.5's own template (tools in the system turn, Hermes <tool_call> replies, tool results as
    # <tool_response> user turns), with generation blocks around each reply; renders exactly as the real one
    "qwen": _QWEN25,
    # Llama 3 / 3.1 / 3.2 instruct (Meta's format, content trimmed as their template does)
    "llama-3": "{{- bos_token -}}"
               "{%- for message in messages -%}"
               "{{- '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n' -}}"
               "{%- if message.role == 'assistant' -%}"
               "{%- generation -%}{{- message.content | trim + '<|eot_id|>' -}}{%- endgeneration -%}"
               "{%- else -%}{{- message.content | trim + '<|eot_id|>' -}}{%- endif -%}"
               "{%- endfor -%}"
               "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}",
    # Mistral instruct ([INST] ... [/INST] answer</s>; a system prompt goes before the first instruction)
    "mistral": "{{- bos_token -}}"
               "{%- set system = messages[0].content if messages[0].role == 'system' else '' -%}"
               "{%- for message in messages if message.role != 'system' -%}"
               "{%- if message.role == 'user' -%}"
               "{{- '[INST] ' + (system + '\\n\\n' if system and loop.first else '') + message.content + ' [/INST]' -}}"
               "{%- elif message.role == 'assistant' -%}"
               "{%- generation -%}{{- message.content + eos_token -}}{%- endgeneration -%}"
               "{%- endif -%}"
               "{%- endfor -%}",
    # Phi-3 (its own template, with generation blocks)
    "phi-3": "{%- for message in messages -%}"
             "{%- if message.role == 'assistant' -%}"
             "{{- '<|assistant|>\\n' -}}{%- generation -%}{{- message.content + '<|end|>' -}}{%- endgeneration -%}"
             "{{- '\\n' -}}"
             "{%- else -%}{{- '<|' + message.role + '|>\\n' + message.content + '<|end|>\\n' -}}{%- endif -%}"
             "{%- endfor -%}"
             "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- else -%}{{- eos_token -}}{%- endif -%}",
    # Stanford Alpaca's prompt (one instruction per turn), the response ends with EOS
    "alpaca": "{%- set system = messages[0].content if messages[0].role == 'system' else "
              "'Below is an instruction that describes a task. Write a response that appropriately completes the "
              "request.' -%}"
              "{{- system + '\\n\\n' -}}"
              "{%- for message in messages if message.role != 'system' -%}"
              "{%- if message.role == 'user' -%}{{- '### Instruction:\\n' + message.content + '\\n\\n### Response:\\n' -}}"
              "{%- elif message.role == 'assistant' -%}"
              "{%- generation -%}{{- message.content + eos_token -}}{%- endgeneration -%}{{- '\\n\\n' -}}"
              "{%- endif -%}"
              "{%- endfor -%}",
    # no roles: the prompt, a newline, the response and EOS (base models without a chat format)
    "plain": "{%- for message in messages -%}"
             "{%- if message.role == 'assistant' -%}"
             "{%- generation -%}{{- message.content + eos_token -}}{%- endgeneration -%}{{- '\\n' -}}"
             "{%- else -%}{{- message.content + '\\n' -}}{%- endif -%}"
             "{%- endfor -%}",
}


def template_hash(template: str) -> str:
    return hashlib.sha256(template.encode("utf-8")).hexdigest()[:16]


def resolve_template(tokenizer, name: str | None) -> tuple[str, str]:
    """(template text, what it is): a built-in name, "model" / None (the tokenizer's own), or Jinja text."""
    if name in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[name], f"built-in {name}"
    if name in (None, "", "model"):
        try:
            return tokenizer.get_chat_template(), "the model's chat template"
        except ValueError:
            from lmforge.config import ConfigError

            raise ConfigError("the model's tokenizer has no chat template; choose one with --template "
                              f"({', '.join(BUILTIN_TEMPLATES)})") from None
    if "{" in name:
        return name, "a custom template"
    import difflib

    from lmforge.config import ConfigError

    close = difflib.get_close_matches(name, BUILTIN_TEMPLATES, n=1)
    raise ConfigError(f"template: {name!r} is not a built-in template" + (f"; did you mean '{close[0]}'?" if close
                      else f" ({', '.join(BUILTIN_TEMPLATES)}, or model for the tokenizer's own)"))


def has_generation_blocks(template: str) -> bool:
    import re

    return re.search(r"\{%-?\s*generation\s*-?%\}", template) is not None


def assistant_spans(template: str, messages: list[dict], tools: list | None = None,
                    special_tokens_map: dict | None = None, only_last: bool = False,
                    control_tokens: tuple[str, ...] = ()) -> tuple[str, list[tuple[int, int]]]:
    """(rendered text, character spans of each assistant turn, in order; only the last with only_last).
    `control_tokens`: the tokenizer's, so that a turn never ends inside one."""
    kwargs = dict(tools=tools, special_tokens_map=special_tokens_map)
    text, spans = _render(template, messages, **kwargs)
    if has_generation_blocks(template):
        return text, spans[-1:] if only_last else spans
    spans = []
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    for i in turns[-1:] if only_last else turns:
        prompt, _ = _render(template, messages[:i], add_generation_prompt=True, **kwargs)
        upto, _ = _render(template, messages[:i + 1], **kwargs)
        # the turn ends where its own render and the whole conversation's part (a template may close the text
        # with something only at the very end, like Phi-3's EOS)
        end = _back_off(len(os.path.commonprefix([upto, text])), (upto, text), control_tokens)
        content = messages[i].get("content") or ""
        if not (text.startswith(prompt) and upto.startswith(prompt)) or content.strip() not in text[len(prompt):end]:
            raise TemplateError(
                f"this chat template renders assistant turn {i} differently once later turns follow (e.g. it drops "
                "the reasoning of earlier turns), so the turn cannot be found by prefix: train with mask 'last', "
                "give a template with {% generation %} blocks, or pick a built-in one (--template)")
        # whitespace after the turn's end token separates turns; it is not part of the reply (as in the
        # {% generation %} blocks of real templates)
        end = len(prompt) + len(text[len(prompt):end].rstrip())
        spans.append((len(prompt), end))
    return text, spans


def _back_off(end: int, texts: tuple[str, ...], control_tokens: tuple[str, ...]) -> int:
    """`end` moved back to the start of a control token it cuts in any of `texts` ("<|endoftext|>" and "<|user|>"
    share "<|")."""
    for token in control_tokens:
        for k in range(1, len(token)):
            if any(t[end - k:end - k + len(token)] == token for t in texts):
                return _back_off(end - k, texts, control_tokens)
    return end


@dataclass
class Encoded:
    input_ids: list[int]  # the example's tokens but the last
    labels: list[int]  # next token of each position, IGNORE where not trained
    truncated: bool


def encode_example(tokenizer, template: str, conv: Conversation, mask: str = "assistant",
                   max_length: int | None = None, eos_id: int | None = None) -> Encoded:
    """Tokens and labels of one example (see the module docstring). Plain-text examples train on every token and
    end with `eos_id`. Longer than max_length + 1 tokens: cut at the end (truncated=True)."""
    if mask not in MASKS:
        raise ValueError(f"mask must be one of {MASKS}, got {mask!r}")
    if conv.text is not None:
        ids = tokenizer.encode(conv.text) + ([eos_id] if eos_id is not None else [])
        trained = [1] * len(ids)
    else:
        enc = encode_chat(tokenizer, template, conv.messages, tools=conv.tools)
        spans = [] if mask == "all" else assistant_spans(template, conv.messages, conv.tools,
                                                         tokenizer.special_tokens_map(), only_last=mask == "last",
                                                         control_tokens=tuple(tokenizer.control_tokens()))[1]
        ids = enc.ids
        trained = [1] * len(ids) if mask == "all" else _overlaps(enc.offsets, spans)
    truncated = max_length is not None and len(ids) > max_length + 1
    if truncated:
        ids, trained = ids[:max_length + 1], trained[:max_length + 1]
    labels = [t if m else IGNORE for t, m in zip(ids[1:], trained[1:])]
    return Encoded(ids[:-1], labels, truncated)


def render_masked(tokenizer, template: str, conv: Conversation, mask: str = "assistant", limit: int = 1200) -> str:
    """One example as text with its trained part in [[...]]: what `finetune` shows at start."""
    enc = encode_example(tokenizer, template, conv, mask)
    ids = enc.input_ids + ([enc.labels[-1]] if enc.labels and enc.labels[-1] != IGNORE else [])
    trained = [0] + [int(label != IGNORE) for label in enc.labels]
    out, run, state = [], [], 0
    for tid, t in zip(ids, trained):  # decode runs of tokens: a character may span several byte-level tokens
        if t != state:
            out.append(tokenizer.decode(run))
            out.append("[[" if t else "]]")
            run, state = [], t
        run.append(tid)
    out.append(tokenizer.decode(run) + ("]]" if state else ""))
    text = "".join(out)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text) - limit} more characters)"


def stop_token_check(tokenizer, template: str, eos_ids: list[int]) -> str | None:
    """A warning when the template ends an assistant turn with a token that is not among the ids generation stops
    at (the tokenizer's EOS, generation_config's eos_token_id): the model would learn to write it and never stop.
    None when they agree."""
    probe = "lmforge-probe-reply"
    try:
        text, spans = assistant_spans(template, [{"role": "user", "content": "hi"},
                                                 {"role": "assistant", "content": probe}],
                                      special_tokens_map=tokenizer.special_tokens_map())
    except TemplateError:
        return None
    after = text[text.find(probe) + len(probe):spans[-1][1] if spans else len(text)]
    for name in tokenizer.control_tokens():
        if after.lstrip().startswith(name):
            tid = tokenizer.token_to_id(name)
            if tid is not None and tid not in eos_ids:
                names = [tokenizer.decode([i]) for i in eos_ids] or ["none"]
                return (f"the chat template ends a reply with {name} (id {tid}), but generation stops at "
                        f"{', '.join(names)} (ids {eos_ids}): the fine-tuned model would not stop. The exported "
                        f"model's generation_config.json gets {name} as an end-of-turn id; set it wherever you "
                        "serve the model too")
            return None
    if not any(tokenizer.token_to_id(n) is not None and after.lstrip().startswith(n) for n in tokenizer.control_tokens()):
        return ("the chat template ends a reply with no control token the tokenizer knows "
                f"({after.strip()[:20]!r}): the model cannot learn to stop; use a template whose end-of-turn "
                "token is in the vocabulary")
    return None



def tool_rendering_check(tokenizer, template: str, conversations: list[Conversation]) -> str | None:
    """An error message when examples carry tool definitions or tool calls that the template does not render
    (SmolLM2's and most base models' templates ignore `tools` and `tool_calls`): the model would learn an empty
    reply where each call should be, and calls to tools it never saw. Decided on the first such example: rendered
    with and without its tools (and its calls), the text must differ. None when it does, or no example has them."""
    from lmforge.tokenizer.chat import render_chat

    with_tools = [c for c in conversations if c.text is None and (c.tools or any(m.get("tool_calls")
                                                                                 for m in c.messages))]
    if not with_tools:
        return None
    conv = with_tools[0]
    no_calls = [{k: v for k, v in m.items() if k != "tool_calls"} for m in conv.messages]
    specials = tokenizer.special_tokens_map()
    try:
        text = render_chat(template, conv.messages, tools=conv.tools, special_tokens_map=specials)
        missing = []
        if conv.tools and text == render_chat(template, conv.messages, special_tokens_map=specials):
            missing.append("tool definitions")
        if no_calls != conv.messages and text == render_chat(template, no_calls, tools=conv.tools,
                                                             special_tokens_map=specials):
            missing.append("tool calls")
    except TemplateError:
        return None  # a template that refuses the conversation says so when the examples are encoded
    if not missing:
        return None
    return (f"{len(with_tools)} examples carry tools or tool calls, but the chat template does not render their "
            f"{' or '.join(missing)} ({conv.where or 'the first such example'}), so the model would learn empty "
            "replies where its calls should be. Use a template that renders tools (--template qwen: Qwen2.5's "
            "Hermes format), or leave those examples out")
