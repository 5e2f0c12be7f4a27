"""The token ids generation stops at: one rule for every caller (generate, chat, the server, prompting, evaluation).

A reply ends at the end-of-text token (the tokenizer's EOS and the model config's `eos_token_id`) or at the token the
chat template writes right after an assistant's message (ChatML's <|im_end|>, Phi-3's <|end|>, Llama 3's
<|eot_id|>): a chat model ends its turn with the latter, and plain completion of a chat model stops there too, as
transformers does with an instruct model's generation_config (which lists both).
"""

from __future__ import annotations

from lmforge.chat.render import TemplateError, render_chat

_PROBE = "lmforge-probe-reply"


def _model_eos(eos) -> list[int]:
    """`eos`: a model config (anything with `eos_token_id`), an id, a list of ids, or None."""
    if eos is None:
        return []
    if hasattr(eos, "eos_token_id"):
        eos = eos.eos_token_id
    if eos is None:
        return []
    return [int(eos)] if isinstance(eos, int) else [int(i) for i in eos]


def eos_ids(tokenizer, eos=None) -> list[int]:
    """The end-of-text ids: the tokenizer's EOS token, then the model's (`eos`: its config, an id or ids)."""
    ids = []
    name = getattr(tokenizer, "eos_token", None)
    if name in tokenizer.special_tokens:
        ids.append(tokenizer.special_tokens[name])
    return list(dict.fromkeys(ids + _model_eos(eos)))


def turn_end_ids(tokenizer, template: str | None = None) -> list[int]:
    """The control token the chat template (default: the tokenizer's) writes right after an assistant's message;
    [] without a template, or when the template ends a reply with no control token."""
    template = template if template is not None else getattr(tokenizer, "chat_template", None)
    if not template:
        return []
    try:
        text = render_chat(template, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}],
                           special_tokens_map=tokenizer.special_tokens_map())
    except TemplateError:  # a template that refuses this shape: no end-of-turn token is known
        return []
    after = text[text.find(_PROBE) + len(_PROBE):].lstrip() if _PROBE in text else ""
    for name in tokenizer.control_tokens():  # longest first
        if after.startswith(name) and tokenizer.token_to_id(name) is not None:
            return [tokenizer.token_to_id(name)]
    return []


def stop_ids(tokenizer, eos=None, template: str | None = None) -> list[int]:
    """Every id a reply stops at, sorted: `eos_ids` and `turn_end_ids` together."""
    return sorted(set(eos_ids(tokenizer, eos)) | set(turn_end_ids(tokenizer, template)))
