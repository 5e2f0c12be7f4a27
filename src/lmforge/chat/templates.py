"""Which chat template a conversation is rendered with: the built-ins, the model's own, and one order of precedence.

Where a template can come from, in the order `resolve_template` tries a choice (`--template` on every command,
FinetuneConfig.template, `template=` in the Python API):

  1. nothing, "" or "model": the model's own template (below);
  2. the name of one of the model's named templates (tokenizer_config.json's list, e.g. "tool_use");
  3. a built-in name (`BUILTIN_TEMPLATES`: chatml, qwen, llama-3, mistral, phi-3, alpaca, plain);
  4. a path: a Jinja file, a .json file holding "chat_template" (chat_template.json, tokenizer_config.json), or a
     model directory (its own template, by the rule below);
  5. text holding "{": the template itself.

A choice always wins over the model's own. The model's own template is what transformers would use, read from its
directory when the tokenizer is loaded (tokenizer/formats.py `read_tokenizer_config`): chat_template.jinja, else
chat_template.json, else tokenizer_config.json's "chat_template", either a string or a list of named templates of
which "default" is used, or "tool_use" when the conversation offers tools and the model has one.
`lmforge export gguf`, the server, generation, evaluation and fine-tuning all resolve templates here.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path

from lmforge.chat.render import ChatEncoding, TemplateError, encode_chat, render_chat
from lmforge.config import ConfigError
from lmforge.tokenizer.formats import read_tokenizer_config

MODEL_TEMPLATE = ("", "model")  # the choices that mean "the model's own" (and None)

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
    """A short fingerprint of a template (logs, template.json): 16 hex digits of its SHA-256."""
    return hashlib.sha256(template.encode("utf-8")).hexdigest()[:16]


def has_generation_blocks(template: str) -> bool:
    """Whether the template marks assistant text with `{% generation %}` (transformers' assistant-mask blocks)."""
    import re

    return re.search(r"\{%-?\s*generation\s*-?%\}", template) is not None


def pick_template(template: str | dict | list | None, tools: list | None = None, name: str | None = None) -> str | None:
    """The template to use from tokenizer_config's chat_template (a string, or named templates: `name`, else
    "tool_use" when tools are given and it exists, else "default")."""
    if template is None or isinstance(template, str):
        return template
    named = {t["name"]: t["template"] for t in template} if isinstance(template, list) else dict(template)
    if name is not None:
        if name not in named:
            raise TemplateError(f"no chat template named {name!r}; this tokenizer has {sorted(named)}")
        return named[name]
    if tools is not None and "tool_use" in named:
        return named["tool_use"]
    return named.get("default")


def model_template(tokenizer, chat_template: str | None = None, tools: list | None = None) -> str:
    """The template a tokenizer renders with: `chat_template` (a template, or the name of one of the tokenizer's
    named templates), else "tool_use" when tools are given and it has one, else its default. A TemplateError when
    it has none."""
    named = tokenizer.chat_templates
    if chat_template is not None:
        return named[chat_template] if named and chat_template in named else chat_template
    template = pick_template(named, tools) if named else tokenizer.chat_template
    if not template:
        raise TemplateError("this tokenizer has no chat template; set tokenizer.chat_template (a Jinja template, as "
                            "in HF tokenizer_config.json) or choose one (--template)")
    return template


def _from_file(path: Path, choice: str) -> str:
    """The template a file or model directory holds (see the module docstring, 4)."""
    if path.is_dir():
        template = pick_template(read_tokenizer_config(path).get("chat_template"))
        if not template:
            raise ConfigError(f"template: {choice}: the directory has no chat template (chat_template.jinja, "
                              "chat_template.json or tokenizer_config.json's chat_template)")
        return template
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"template: cannot read {choice}: {e}") from None
    if path.suffix != ".json":
        return text
    try:
        template = pick_template(json.loads(text).get("chat_template"))
    except (json.JSONDecodeError, AttributeError, KeyError, TypeError) as e:
        raise ConfigError(f"template: {choice}: not a JSON object with a chat_template ({e})") from None
    if not template:
        raise ConfigError(f"template: {choice} has no \"chat_template\"")
    return template


def resolve_template(tokenizer, choice: str | None = None, *, required: bool = True) -> tuple[str | None, str]:
    """(template text, where it came from) for `choice` (see the module docstring for the order). Without a
    choice and without a template of the model's own: a ConfigError when `required`, else (None, "none")."""
    if choice is None or choice in MODEL_TEMPLATE:
        try:
            return model_template(tokenizer), "the model's chat template"
        except TemplateError:
            if not required:
                return None, "none"
            raise ConfigError("the model's tokenizer has no chat template; choose one with --template "
                              f"({', '.join(BUILTIN_TEMPLATES)})") from None
    if tokenizer.chat_templates and choice in tokenizer.chat_templates:
        return tokenizer.chat_templates[choice], f"the model's {choice!r} chat template"
    if choice in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[choice], f"built-in {choice}"
    if "{" in choice:
        return choice, "a custom template"
    path = Path(choice).expanduser()
    if path.exists():
        return _from_file(path, choice), f"file {choice}"
    import difflib

    close = difflib.get_close_matches(choice, list(BUILTIN_TEMPLATES) + list(tokenizer.chat_templates or ()), n=1)
    raise ConfigError(f"template: {choice!r} is neither a built-in template ({', '.join(BUILTIN_TEMPLATES)}), one of "
                      "the model's, a file nor Jinja text" + (f"; did you mean '{close[0]}'?" if close else ""))


# what lmforge passes a template itself: never a user's chat_template_kwargs
_SET_BY_LMFORGE = ("messages", "tools", "documents", "add_generation_prompt", "continue_final_message")


def check_template_variables(variables: dict, template: str | None, source: str,
                             where: str = "chat_template_kwargs") -> None:
    """`variables` (apply_chat_template's extra keyword arguments, e.g. Qwen3's enable_thinking) must be variables
    the template reads: a misspelt one would otherwise be ignored without a word."""
    if variables and not template:
        raise ConfigError(f"{where}: the model has no chat template to pass {', '.join(map(str, variables))} to")
    for name in variables:
        if name in _SET_BY_LMFORGE:
            raise ConfigError(f"{where}: {name} is set by lmforge for each conversation; give the template's own "
                              "variables only")
        if not re.search(rf"\b{re.escape(str(name))}\b", template):
            raise ConfigError(f"{where}: the chat template ({source}) never reads {name!r}")


def use_template(tokenizer, template: str | None) -> None:
    """Make `template` the tokenizer's chat template for everything that renders with it afterwards (the named
    templates it had are dropped, so the choice holds with tools too); None leaves the tokenizer as it is."""
    if template is not None:
        tokenizer.chat_template, tokenizer.chat_templates = template, None


def apply_chat_template(tokenizer, messages: Sequence, add_generation_prompt: bool = False, tokenize: bool = False,
                        *, tools: list | None = None, documents: list | None = None,
                        continue_final_message: bool | str = False, return_assistant_tokens_mask: bool = False,
                        chat_template: str | None = None, **variables) -> str | list[int] | ChatEncoding:
    """Render a conversation with `tokenizer`'s chat template, as transformers' `tokenizer.apply_chat_template` does.

    `chat_template`: a template, or the name of one of the tokenizer's named templates (`model_template`). Returns
    the text (`tokenize=False`), the ids (`tokenize=True`), or a `ChatEncoding` with ids, the assistant mask from
    `{% generation %}` blocks and token offsets (`return_assistant_tokens_mask=True`). Control tokens inside
    messages, tools, documents and variables are always encoded as text (chat/render.py).
    """
    template = model_template(tokenizer, chat_template, tools)
    kwargs = dict(tools=tools, documents=documents, add_generation_prompt=add_generation_prompt,
                  continue_final_message=continue_final_message, **variables)
    if not tokenize and not return_assistant_tokens_mask:
        return render_chat(template, messages, special_tokens_map=tokenizer.special_tokens_map(), **kwargs)
    encoded = encode_chat(tokenizer, template, messages, **kwargs)
    return encoded if return_assistant_tokens_mask else encoded.ids
