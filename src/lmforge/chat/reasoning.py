"""Reasoning blocks: the `<think>...</think>` part of a reply, split from the answer (whole or while streaming).

Reasoning models write their thinking first, between two markers, then the answer: Qwen3, DeepSeek-R1 and its
distills, SmolLM3 and GLM use `<think>` / `</think>`; others have markers of their own, which their chat template
writes when it renders an assistant turn's `reasoning_content` (Qwen3's does: "<think>\n" + reasoning + "\n</think>\n\n"
+ answer). `reasoning_markers(template)` finds them that way, or by the known pairs the template mentions (DeepSeek-R1's
template never renders reasoning, it strips it from earlier turns); a template with neither has no reasoning blocks,
and its replies are left alone.

Some templates open the block themselves: DeepSeek-R1's generation prompt ends with "<think>\n", so the reply starts
inside the reasoning and has only the closing marker (`opens_reasoning(prompt_text)`).

The split (`split_reasoning`), as the templates render it: a reply that begins (after whitespace) with the opening
marker, or any reply to a prompt that opened one, holds reasoning up to the closing marker and the answer after it;
the newlines around the reasoning and before the answer are the template's, not the text's (Qwen3 renders
`reasoning.strip("\n")` and `answer.lstrip("\n")`). A reply cut off before the closing marker is all reasoning; a reply
that does not begin with the marker is all answer. `ReasoningStream` gives the same two texts in pieces as a reply is
generated: text that could still turn out to be a marker, or the newlines before one, is held back until it is clear.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.chat.render import TemplateError, render_chat

# marker pairs of reasoning models whose templates do not render reasoning_content (DeepSeek-R1, SmolLM3 write the
# <think> pair into the prompt or the system text only); Magistral's [THINK] pair
KNOWN_MARKERS = (("<think>", "</think>"), ("[THINK]", "[/THINK]"))
_PROBES = ("lmforge-probe-question", "lmforge-probe-reasoning", "lmforge-probe-answer")


@dataclass(frozen=True)
class ReasoningMarkers:
    start: str = "<think>"
    end: str = "</think>"


@dataclass(frozen=True)
class Reasoned:
    """A reply split: `reasoning` (None when the reply has no reasoning block) and `content`, the answer."""

    reasoning: str | None
    content: str


def reasoning_markers(template: str | None, special_tokens_map: dict | None = None) -> ReasoningMarkers | None:
    """The markers the template puts around an assistant's reasoning, or None when it has no reasoning blocks."""
    if not template:
        return None
    question, reasoning, answer = _PROBES
    try:
        prompt = render_chat(template, [{"role": "user", "content": question}], add_generation_prompt=True,
                             special_tokens_map=special_tokens_map)
        text = render_chat(template, [{"role": "user", "content": question},
                                      {"role": "assistant", "content": answer, "reasoning_content": reasoning}],
                           special_tokens_map=special_tokens_map)
    except TemplateError:
        prompt = text = ""
    if reasoning in text and answer in text and text.startswith(prompt.rstrip()):
        at, to = text.index(reasoning), text.index(answer)
        start = text[:at][len(prompt):].strip() if text.startswith(prompt) else ""
        start = start or _opened(prompt)
        end = text[at + len(reasoning):to].strip()
        if start and end and not any(c.isspace() for c in start + end):
            return ReasoningMarkers(start, end)
    for start, end in KNOWN_MARKERS:
        if end in template:
            return ReasoningMarkers(start, end)
    return None


def _opened(prompt: str) -> str:
    """The opening marker the generation prompt ends with ("" for none)."""
    tail = prompt.rstrip()
    return next((s for s, _ in KNOWN_MARKERS if tail.endswith(s)), "")


def opens_reasoning(prompt_text: str, markers: ReasoningMarkers | None) -> bool:
    """Whether a prompt ends inside a reasoning block (its last text is the opening marker), so the reply starts
    with reasoning and carries only the closing marker."""
    return markers is not None and prompt_text.rstrip().endswith(markers.start)


def split_reasoning(text: str, markers: ReasoningMarkers, inside: bool = False) -> Reasoned:
    """A whole reply split into reasoning and answer (see the module docstring); `inside`: the prompt opened the
    block (`opens_reasoning`)."""
    if not inside:
        stripped = text.lstrip()
        if not stripped.startswith(markers.start):
            return Reasoned(None, text)
        text = stripped[len(markers.start):]
    reasoning, closed, content = text.partition(markers.end)
    return Reasoned(reasoning.strip("\n"), content.lstrip("\n") if closed else "")


class ReasoningStream:
    """`split_reasoning` in pieces: `push(text)` returns the (reasoning, content) text that is certain so far, and
    `flush()` the rest at the end of the reply. The pieces joined equal `split_reasoning` of the whole text, wherever
    the reply was cut into pieces."""

    def __init__(self, markers: ReasoningMarkers, inside: bool = False):
        self.markers = markers
        self.state = "reasoning" if inside else "start"  # start: not yet known whether the reply opens a block
        self.pending = ""  # text not yet given out
        self.started = False  # reasoning text given out (its leading newlines are dropped before this)
        self.has_reasoning = inside  # known once the block or the answer has begun

    def push(self, text: str) -> tuple[str, str]:
        self.pending += text
        if self.state == "start":
            head = self.pending.lstrip()
            if len(head) < len(self.markers.start) and self.markers.start.startswith(head):  # it may be a marker
                return "", ""
            if not head.startswith(self.markers.start):
                self.state = "content"
                return "", self._take_all()
            self.state, self.has_reasoning = "reasoning", True
            self.pending = head[len(self.markers.start):]
        if self.state == "reasoning":
            reasoning, closed, rest = self.pending.partition(self.markers.end)
            if not closed:
                return self._reasoning_so_far(), ""
            self.state, self.pending = "after", rest
            out = self._drop_leading(reasoning).rstrip("\n")
            return out, self.push("")[1]
        if self.state == "after":  # the newlines between the closing marker and the answer are the template's
            self.pending = self.pending.lstrip("\n")
            if not self.pending:
                return "", ""
            self.state = "content"
        return "", self._take_all()

    def flush(self) -> tuple[str, str]:
        """The rest at the end of the reply."""
        if self.state == "start":  # never became a block: all answer, whitespace included
            self.state = "content"
            return "", self._take_all()
        if self.state == "reasoning":  # cut off inside the block
            return self._drop_leading(self._take_all()).rstrip("\n"), ""
        if self.state == "after":
            return "", ""
        return "", self._take_all()

    def _take_all(self) -> str:
        out, self.pending = self.pending, ""
        return out

    def _drop_leading(self, text: str) -> str:
        if not self.started:
            text = text.lstrip("\n")
            self.started = bool(text)
        return text

    def _reasoning_so_far(self) -> str:
        """The reasoning that is certain: not a tail that could begin the closing marker, nor the newlines before
        it (they go if the marker follows)."""
        self.pending = self.pending if self.started else self.pending.lstrip("\n")
        keep = next((k for k in range(len(self.markers.end) - 1, 0, -1) if self.pending.endswith(self.markers.end[:k])),
                    0)
        safe = len(self.pending) - keep
        while safe > 0 and self.pending[safe - 1] == "\n":
            safe -= 1
        out, self.pending = self.pending[:safe], self.pending[safe:]
        self.started = self.started or bool(out)
        return out
