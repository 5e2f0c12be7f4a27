"""The loss mask of a fine-tuning example, and the checks a template must pass before training with it.

A conversation is rendered with the model's own chat template (HF-exact, chat/render.py) or a named built-in
(chat/templates.py). Which tokens the loss sees (`mask`):

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

import os
from dataclasses import dataclass
from typing import Protocol

from lmforge.chat.render import TemplateError, encode_chat, render_chat, render_with_spans, tokens_in_spans
from lmforge.chat.templates import has_generation_blocks

MASKS = ("assistant", "last", "all")
IGNORE = -100


class Example(Protocol):
    """What an example offers (finetune's Conversation): `messages` and `tools`, or plain `text`; `where` it was
    read (file:line) for messages."""

    messages: list[dict]
    tools: list[dict] | None
    text: str | None
    where: str


def assistant_spans(template: str, messages: list[dict], tools: list | None = None,
                    special_tokens_map: dict | None = None, only_last: bool = False,
                    control_tokens: tuple[str, ...] = (), variables: dict | None = None
                    ) -> tuple[str, list[tuple[int, int]]]:
    """(rendered text, character spans of each assistant turn, in order; only the last with only_last).
    `control_tokens`: the tokenizer's, so that a turn never ends inside one. `variables`: the template's own
    (Qwen3's enable_thinking), as apply_chat_template's extra keyword arguments."""
    kwargs = dict(tools=tools, special_tokens_map=special_tokens_map, **(variables or {}))
    text, spans = render_with_spans(template, messages, **kwargs)
    if has_generation_blocks(template):
        return text, spans[-1:] if only_last else spans
    spans = []
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    for i in turns[-1:] if only_last else turns:
        prompt, _ = render_with_spans(template, messages[:i], add_generation_prompt=True, **kwargs)
        upto, _ = render_with_spans(template, messages[:i + 1], **kwargs)
        # the turn ends where its own render and the whole conversation's part (a template may close the text
        # with something only at the very end, like Phi-3's EOS)
        end = _back_off(len(os.path.commonprefix([upto, text])), (upto, text), control_tokens)
        content = messages[i].get("content") or ""
        if not (text.startswith(prompt) and upto.startswith(prompt)) or content.strip() not in text[len(prompt):end]:
            raise TemplateError(
                f"this chat template renders assistant turn {i} differently once later turns follow (e.g. it drops "
                "the reasoning of earlier turns), or differently from its generation prompt (e.g. reasoning in a "
                "reply while enable_thinking is false), so the turn cannot be found by prefix: train with mask "
                "'last', give a template with {% generation %} blocks, or pick a built-in one (--template)")
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


def encode_example(tokenizer, template: str, conv: Example, mask: str = "assistant",
                   max_length: int | None = None, eos_id: int | None = None, variables: dict | None = None) -> Encoded:
    """Tokens and labels of one example (see the module docstring). Plain-text examples train on every token and
    end with `eos_id`. Longer than max_length + 1 tokens: cut at the end (truncated=True). `variables`: the
    template's own (Qwen3's enable_thinking)."""
    if mask not in MASKS:
        raise ValueError(f"mask must be one of {MASKS}, got {mask!r}")
    if conv.text is not None:
        ids = tokenizer.encode(conv.text) + ([eos_id] if eos_id is not None else [])
        trained = [1] * len(ids)
    else:
        enc = encode_chat(tokenizer, template, conv.messages, tools=conv.tools, **(variables or {}))
        spans = [] if mask == "all" else assistant_spans(template, conv.messages, conv.tools,
                                                         tokenizer.special_tokens_map(), only_last=mask == "last",
                                                         control_tokens=tuple(tokenizer.control_tokens()),
                                                         variables=variables)[1]
        ids = enc.ids
        trained = [1] * len(ids) if mask == "all" else tokens_in_spans(enc.offsets, spans)
    truncated = max_length is not None and len(ids) > max_length + 1
    if truncated:
        ids, trained = ids[:max_length + 1], trained[:max_length + 1]
    labels = [t if m else IGNORE for t, m in zip(ids[1:], trained[1:])]
    return Encoded(ids[:-1], labels, truncated)


def masked_runs(tokenizer, enc: Encoded) -> list[tuple[str, bool]]:
    """An encoded example as (text, trained) runs, in order: each run's tokens decoded together (a character may
    span several byte-level tokens). The example's last token is shown when it is trained on."""
    ids = enc.input_ids + ([enc.labels[-1]] if enc.labels and enc.labels[-1] != IGNORE else [])
    trained = [False] + [label != IGNORE for label in enc.labels]
    runs, run, state = [], [], False
    for tid, t in zip(ids, trained):
        if t != state and run:
            runs.append((tokenizer.decode(run), state))
            run = []
        state = t
        run.append(tid)
    if run:
        runs.append((tokenizer.decode(run), state))
    return runs


def render_masked(tokenizer, template: str, conv: Example, mask: str = "assistant", limit: int = 1200,
                  variables: dict | None = None) -> str:
    """One example as text with its trained part in [[...]]: what `finetune` shows at start."""
    enc = encode_example(tokenizer, template, conv, mask, variables=variables)
    text = "".join(f"[[{t}]]" if trained else t for t, trained in masked_runs(tokenizer, enc))
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



def tool_rendering_check(tokenizer, template: str, conversations: list[Example]) -> str | None:
    """An error message when examples carry tool definitions or tool calls that the template does not render
    (SmolLM2's and most base models' templates ignore `tools` and `tool_calls`): the model would learn an empty
    reply where each call should be, and calls to tools it never saw. Decided on the first such example: rendered
    with and without its tools (and its calls), the text must differ. None when it does, or no example has them."""
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
