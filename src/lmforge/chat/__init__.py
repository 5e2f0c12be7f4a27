"""Chat: templates rendered as transformers renders them, which template a model uses, SFT loss masks, the ids a
reply stops at, tool calls and reasoning blocks in replies. Below inference, fine-tuning, serving, evaluation and
export; above the tokenizer.

    from lmforge.chat import apply_chat_template, resolve_template, stop_ids
    template, source = resolve_template(tokenizer, "qwen")            # a built-in, a file, the model's own, ...
    ids = apply_chat_template(tokenizer, messages, add_generation_prompt=True, tokenize=True)
    stops = stop_ids(tokenizer, model.cfg)                             # EOS and the template's end of turn
"""

from lmforge import lazy_exports

# names load on first use: the chat package is imported by commands that never render a template
_EXPORTS = {
    "ChatEncoding": "lmforge.chat.render",
    "TemplateError": "lmforge.chat.render",
    "encode_chat": "lmforge.chat.render",
    "render_chat": "lmforge.chat.render",
    "BUILTIN_TEMPLATES": "lmforge.chat.templates",
    "apply_chat_template": "lmforge.chat.templates",
    "model_template": "lmforge.chat.templates",
    "resolve_template": "lmforge.chat.templates",
    "template_hash": "lmforge.chat.templates",
    "use_template": "lmforge.chat.templates",
    "IGNORE": "lmforge.chat.masks",
    "encode_example": "lmforge.chat.masks",
    "eos_ids": "lmforge.chat.stops",
    "stop_ids": "lmforge.chat.stops",
    "turn_end_ids": "lmforge.chat.stops",
    "parse_tool_calls": "lmforge.chat.tools",
    "ReasoningMarkers": "lmforge.chat.reasoning",
    "ReasoningStream": "lmforge.chat.reasoning",
    "reasoning_markers": "lmforge.chat.reasoning",
    "split_reasoning": "lmforge.chat.reasoning",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(globals(), _EXPORTS)
