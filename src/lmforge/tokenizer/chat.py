"""Chat templates: Jinja templates that turn a list of {role, content} messages into text.

The semantics are those of HF `tokenizer_config.json` "chat_template" (sandboxed Jinja,
`trim_blocks`/`lstrip_blocks`, `raise_exception`), so a model's own template renders the
same here as in transformers.
"""

from __future__ import annotations

import functools

# ChatML (used by Qwen and many others); lmforge-trained tokenizers reserve its markers.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")


class TemplateError(ValueError):
    """A chat template rejected the messages (its own raise_exception) or failed to render."""


def _raise(message: str):
    raise TemplateError(message)


@functools.lru_cache(maxsize=16)
def _compile(template: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    return env.from_string(template)


def render_chat(template: str, messages: list[dict], add_generation_prompt: bool = False, **extra) -> str:
    """Render `messages` with a chat template; each message needs 'role' and 'content'."""
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise TemplateError(f"message {i} must be a mapping with 'role' and 'content', got {m!r}")
    try:
        return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **extra)
    except TemplateError:
        raise
    except Exception as e:  # jinja2's syntax and runtime errors
        raise TemplateError(f"chat template failed: {e}") from None
