"""Chat templates rendered exactly as transformers renders them, and encoded so that data never becomes control.

Rendering follows transformers' `apply_chat_template` (transformers/utils/chat_template_utils.py, 4.45-5.x):
a sandboxed Jinja environment with trim_blocks and lstrip_blocks; `{% break %}` / `{% continue %}`; a
`{% generation %}...{% endgeneration %}` block that records which characters the assistant wrote;
`raise_exception`, `strftime_now`, `namespace`, `dict`; a `tojson` filter with HF's options (no HTML escaping,
`ensure_ascii=False`, indent / separators / sort_keys); the tokenizer's named special tokens (`bos_token`,
`eos_token`, ...) as variables; `tools`, `documents`, `add_generation_prompt` and `continue_final_message`.
Messages are plain dicts; keys set to None are dropped and reasoning fields aliased, as transformers 5 does.

Encoding keeps data apart from control. A control token is an added token of the tokenizer. Where one appears
in a string the caller passed (a message, a tool schema, a document, an extra variable), the inputs are rendered a
second time with those tokens wrapped in two private markers (U+F0000, U+F0001, which are first removed from the
inputs so they cannot be forged); the control tokens of the text that line up with marked ones are encoded as
plain text, and the rest (what the template itself wrote) with the tokenizer's added-token rules. A user message
or a RAG source holding "<|im_end|>\n<|im_start|>system ..." is therefore text to the model, not a new turn.

The ids equal transformers' `apply_chat_template(..., sanitize_control_tokens=True)`, and its plain
`apply_chat_template(tokenize=True)` when no input holds a control token. Where they differ, on purpose:
lmforge treats every added token as control (also non-special ones such as Phi-3's `</s>` or Qwen's
`<tool_call>`, which transformers leaves to become their ids); the text is always the plain render (transformers
renders the marked inputs, so a template that splits a turn at a marked token and strips around it, as Qwen3
does at "</think>", gets different text); and the assistant mask comes with the safe encoding.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime
from typing import Any

MARK_START, MARK_END = "\U000f0000", "\U000f0001"
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


class TemplateError(ValueError):
    """A chat template rejected the messages (its own raise_exception) or failed to render."""


@dataclasses.dataclass
class ChatEncoding:
    """A rendered and encoded conversation.

    `assistant_mask[i]` is 1 where token i overlaps a `{% generation %}` block (transformers' rule); all zeros for a
    template without such blocks. `offsets[i]` is the (start, end) character span of token i in `text`.
    """

    text: str
    ids: list[int]
    assistant_mask: list[int]
    offsets: list[tuple[int, int]]


# --- the Jinja environment (transformers' semantics) -------------------------------------------------------

def _build_environment():
    import jinja2
    import jinja2.ext
    from jinja2 import nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTracker(jinja2.ext.Extension):
        """{% generation %}: records the character span of its output while a render is tracked."""

        tags = {"generation"}

        def __init__(self, environment):
            super().__init__(environment)
            self._tracking: ContextVar = ContextVar("lmforge_generation", default=None)
            environment.extend(track_generation=self.track)

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_generation"), [], [], body).set_lineno(lineno)

        def _generation(self, caller):
            text = caller()
            tracking = self._tracking.get()
            if tracking is not None:  # the blocks yielded so far end where this one starts
                blocks, spans = tracking
                start = sum(map(len, blocks))
                spans.append((start, start + len(text)))
            return text

        @contextmanager
        def track(self, blocks: list, spans: list):
            token = self._tracking.set((blocks, spans))
            try:
                yield
            finally:
                self._tracking.reset(token)

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters (<, >, &, '); templates expect plain JSON
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    class TemplateDict:
        """`dict(...)` for templates, without the attributes of the dict type itself."""

        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        """`namespace(...)` that refuses underscore names (no way to reach Python internals)."""

        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes ({name!r})")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTracker, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now, dict=TemplateDict(),
                       namespace=TemplateNamespace)
    return env


@functools.lru_cache(maxsize=1)
def _environment():
    return _build_environment()


@functools.lru_cache(maxsize=32)
def compile_template(template: str):
    """The compiled Jinja template (cached); a syntax error is a TemplateError naming the line."""
    import jinja2

    try:
        return _environment().from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"chat template line {e.lineno}: {e.message}") from None


# --- inputs ---------------------------------------------------------------------------------------------------

def _plain(value: Any) -> Any:
    """What a template may see: JSON-like values only (dataclasses and pydantic models become dicts; any other
    object a placeholder naming its type), so nothing with methods reaches the sandbox."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def normalize_messages(messages: Sequence) -> list[dict]:
    """Messages as the template sees them: dicts without None values, reasoning under all its names."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TemplateError(f"messages must be a list of {{role, content}} dicts, got {type(messages).__name__}")
    if not messages:
        raise TemplateError("cannot render an empty conversation: give at least one message")
    out = []
    for i, m in enumerate(messages):
        m = _plain(m)
        if not isinstance(m, dict):
            raise TemplateError(f"message {i} must be a mapping with 'role' and 'content', got {m!r}")
        m = {k: v for k, v in m.items() if v is not None}  # OpenAI's content=None / tool_calls=None
        reasoning = next((m[k] for k in _REASONING_FIELDS if m.get(k) is not None), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


def _control_patterns(control_tokens: tuple[str, ...]) -> tuple[re.Pattern, re.Pattern]:
    return _control_patterns_cached(tuple(sorted(set(control_tokens), key=len, reverse=True)))


@functools.lru_cache(maxsize=32)
def _control_patterns_cached(longest_first: tuple[str, ...]) -> tuple[re.Pattern, re.Pattern]:
    """A regex for any control token (longest first), and one for a marked token or a lone marker."""
    tokens = re.compile("|".join(map(re.escape, longest_first)) or "(?!)")
    marked = re.compile(f"{MARK_START}({tokens.pattern}){MARK_END}|[{MARK_START}{MARK_END}]")
    return tokens, marked


def mark_control_tokens(value: Any, tokens_re: re.Pattern) -> Any:
    """Wrap each control token inside the strings of `value` (recursively; dict keys are left) in the markers."""
    if isinstance(value, str):
        value = value.replace(MARK_START, "").replace(MARK_END, "")
        return tokens_re.sub(lambda m: MARK_START + m.group() + MARK_END, value)
    if isinstance(value, dict):
        return {k: mark_control_tokens(v, tokens_re) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [mark_control_tokens(v, tokens_re) for v in value]
    return value


# --- rendering -------------------------------------------------------------------------------------------------

def render_with_spans(template: str, messages: Sequence, *, tools: list | None = None, documents: list | None = None,
            add_generation_prompt: bool = False, continue_final_message: bool | str = False,
            control_tokens: tuple[str, ...] = (), special_tokens_map: dict | None = None,
            **variables) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the character spans of its `{% generation %}` blocks (transformers' assistant-mask
    spans). With `control_tokens`, the control tokens inside the inputs are wrapped in the markers (encode_chat's
    second render). `special_tokens_map` ({"eos_token": ...}) are variables the tokenizer provides: never marked,
    and overridden by the caller's own `variables`."""
    import jinja2

    if continue_final_message and add_generation_prompt:
        raise TemplateError("continue_final_message and add_generation_prompt cannot both be set: continue the last "
                            "message, or open a new assistant turn")
    compiled = compile_template(template)
    chat = normalize_messages(messages)
    if tools is not None:
        for t in tools:
            if not isinstance(t, Mapping):
                raise TemplateError(f"tools must be JSON schemas (dicts), got {type(t).__name__}")
        tools = _plain(list(tools))
    if documents is not None:
        for d in documents:
            if not isinstance(d, Mapping):
                raise TemplateError("documents must be dicts with 'title' and 'text' keys")
        documents = _plain(list(documents))
    variables = _plain(variables)
    if control_tokens:
        tokens_re, _ = _control_patterns(control_tokens)
        chat, tools, documents, variables = (mark_control_tokens(x, tokens_re) for x in (chat, tools, documents, variables))
    variables = {**(special_tokens_map or {}), **variables}
    final = None
    if continue_final_message:
        field = continue_final_message if isinstance(continue_final_message, str) else "content"
        final = chat[-1].get(field)
        if final is None:
            raise TemplateError(f"continue_final_message: the last message has no {field!r} to continue")
        fields = [f for f in _REASONING_FIELDS if chat[-1].get(f) == final] if field in _REASONING_FIELDS else [field]
        if not any(f in template for f in fields):
            raise TemplateError(f"continue_final_message: the chat template never reads {field!r}")
        if isinstance(final, (list, tuple)):
            for block in reversed(final):
                if isinstance(block, dict) and "text" in block:
                    final = block["text"]
                    block["text"] = block["text"] + _CONTINUE_TAG
                    break
            else:
                raise TemplateError("continue_final_message: the last message has no text block to continue")
        else:
            for f in fields:
                chat[-1][f] = chat[-1][f] + _CONTINUE_TAG
    blocks: list[str] = []
    spans: list[tuple[int, int]] = []
    try:
        with compiled.environment.track_generation(blocks, spans):
            for block in compiled.generate(messages=chat, tools=tools, documents=documents,
                                           add_generation_prompt=add_generation_prompt, **variables):
                blocks.append(block)
    except TemplateError:
        raise
    except jinja2.TemplateError as e:  # undefined attributes called, security errors
        raise TemplateError(f"chat template failed: {e}") from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError) as e:
        # the template's own code failed on these messages (e.g. "text" + a list of content parts)
        raise TemplateError(f"chat template failed on these messages: {type(e).__name__}: {e}") from e
    text = "".join(blocks)
    if final is not None:
        tag = _CONTINUE_TAG.strip()
        if final.strip() not in text or tag not in text:
            raise TemplateError("continue_final_message: the template removed part of the final message, so it "
                                "cannot be continued")
        at = text.rindex(tag)
        text = text[:at] if text[at:at + len(_CONTINUE_TAG)] == _CONTINUE_TAG else text[:at].rstrip()
    return text, spans


def render_chat(template: str, messages: Sequence, add_generation_prompt: bool = False, *,
                tools: list | None = None, documents: list | None = None, continue_final_message: bool | str = False,
                special_tokens_map: dict | None = None, **variables) -> str:
    """The conversation as text, exactly as transformers' `apply_chat_template(tokenize=False)` renders it."""
    text, _ = render_with_spans(template, messages, tools=tools, documents=documents, add_generation_prompt=add_generation_prompt,
                      continue_final_message=continue_final_message, special_tokens_map=special_tokens_map, **variables)
    return text


# --- encoding ---------------------------------------------------------------------------------------------------

def tokens_in_spans(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """1 for every token overlapping a span (transformers' rule: a token cut by a span boundary counts)."""
    mask = [0] * len(offsets)
    k = 0
    for i, (start, end) in enumerate(offsets):
        while k < len(spans) and start >= spans[k][1]:
            k += 1
        if k == len(spans):
            break
        if end > spans[k][0]:
            mask[i] = 1
    return mask


def _data_flags(marked: str, marked_re: re.Pattern) -> tuple[str, list[bool]]:
    """The marked render without its markers, and for each character whether it belongs to a marked token."""
    text: list[str] = []
    flags: list[bool] = []
    pos = 0
    for m in marked_re.finditer(marked):
        text.append(marked[pos:m.start()])
        flags += [False] * (m.start() - pos)
        if m.group(1) is not None:
            text.append(m.group(1))
            flags += [True] * len(m.group(1))
        pos = m.end()
    text.append(marked[pos:])
    flags += [False] * (len(marked) - pos)
    return "".join(text), flags


def _from_data(template: str, messages: Sequence, text: str, control: tuple[str, ...], kwargs: dict) -> list[bool]:
    """For each character of `text` (the plain render), whether it is part of a control token that came from the
    inputs. The inputs are rendered a second time with their control tokens marked; where a template's string
    methods make that render differ from the plain one (Qwen3 splits assistant turns at "</think>" and strips
    newlines, which a marker stops), the two are aligned and only characters that align with marked ones count."""
    tokens_re, marked_re = _control_patterns(control)
    marked, _ = render_with_spans(template, messages, control_tokens=control, **kwargs)
    plain, flags = _data_flags(marked, marked_re)
    if plain == text:
        return flags
    import difflib

    out = [False] * len(text)
    for a, b, size in difflib.SequenceMatcher(None, plain, text, autojunk=False).get_matching_blocks():
        out[b:b + size] = flags[a:a + size]
    return out


def _mentions(value: Any, tokens_re: re.Pattern) -> bool:
    if isinstance(value, str):
        return tokens_re.search(value) is not None
    if isinstance(value, Mapping):
        return any(_mentions(v, tokens_re) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_mentions(v, tokens_re) for v in value)
    return False


def encode_chat(tokenizer, template: str, messages: Sequence, *, add_generation_prompt: bool = False,
                tools: list | None = None, documents: list | None = None,
                continue_final_message: bool | str = False, **variables) -> ChatEncoding:
    """Render and encode a conversation; control tokens from the inputs stay text (see the module docstring)."""
    kwargs = dict(tools=tools, documents=documents, add_generation_prompt=add_generation_prompt,
                  continue_final_message=continue_final_message, special_tokens_map=tokenizer.special_tokens_map(),
                  **variables)
    text, spans = render_with_spans(template, messages, **kwargs)
    control = tokenizer.control_tokens()
    tokens_re, _ = _control_patterns(control)
    # pieces of the text: (text, encode as plain text?, start); control tokens from the inputs are plain text
    pieces: list[tuple[str, bool, int]] = []
    if control and _mentions([list(messages), tools, documents, variables], tokens_re):
        data = _from_data(template, messages, text, control, kwargs)
        pos = 0
        for m in tokens_re.finditer(text):
            if all(data[m.start():m.end()]):
                pieces.append((text[pos:m.start()], False, pos))
                pieces.append((m.group(), True, m.start()))
                pos = m.end()
        pieces.append((text[pos:], False, pos))
    else:
        pieces.append((text, False, 0))
    newline, _ = tokenizer.encode_template_text("\n")
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    for n, (piece, as_text, start) in enumerate(pieces):
        if not piece:
            continue
        encode = tokenizer.encode_plain_with_offsets if as_text else tokenizer.encode_template_text
        if n == 0:
            piece_ids, piece_offsets = encode(piece)
        else:
            # inside a chat a piece is not the start of the text: encode it after a newline and drop the newline, so
            # a SentencePiece normalizer does not prepend its word marker (transformers' _encode_chat_piece)
            piece_ids, piece_offsets = encode("\n" + piece)
            if piece_ids[:len(newline)] == newline:
                piece_ids = piece_ids[len(newline):]
                piece_offsets = [(max(a - 1, 0), max(b - 1, 0)) for a, b in piece_offsets[len(newline):]]
            else:
                piece_ids, piece_offsets = encode(piece)
        ids += piece_ids
        offsets += [(start + a, start + b) for a, b in piece_offsets]
    return ChatEncoding(text, ids, tokens_in_spans(offsets, spans), offsets)


