"""Tool calls in the formats chat templates teach models, parsed into OpenAI's `tool_calls`.

  hermes / Qwen2.5 / Qwen3   <tool_call>{"name": ..., "arguments": {...}}</tool_call> (one block per call, text around
                             them is the message's content)
  Llama 3.1+ (JSON)          the whole reply is one JSON object {"name": ..., "parameters" | "arguments": {...}}
  Mistral                    [TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]

While streaming, text that may be the start of a tool call is held back until it is clearly not one (or the reply
ends), so a client never receives half a tool call as content; the calls go out in one delta with finish_reason
"tool_calls" (vllm#10589: a streamed tool call must end that way).
"""

from __future__ import annotations

import json
import re
import uuid

_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
OPENERS = ("<tool_call>", "[TOOL_CALLS]")


def _call(obj) -> dict | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": obj["name"], "arguments": json.dumps(args, ensure_ascii=False)}}


def parse_tool_calls(text: str, tool_names: set[str] | None = None) -> tuple[str | None, list[dict]]:
    """(content left, tool calls) of a reply. Only calls of the offered tools count (`tool_names`); a block that is
    not valid JSON stays in the content, unparsed, rather than becoming a wrong call."""
    def known(c):
        return c is not None and (tool_names is None or c["function"]["name"] in tool_names)

    calls, kept = [], []
    last = 0
    for m in _HERMES.finditer(text):
        try:
            call = _call(json.loads(m.group(1)))
        except json.JSONDecodeError:
            call = None
        if known(call):
            calls.append(call)
            kept.append(text[last:m.start()])
            last = m.end()
    if calls:
        content = ("".join(kept) + text[last:]).strip()
        return content or None, calls
    stripped = text.strip()
    if stripped.startswith("[TOOL_CALLS]"):
        try:
            items = json.loads(stripped[len("[TOOL_CALLS]"):].strip())
        except json.JSONDecodeError:
            items = None
        found = [c for c in (_call(i) for i in (items if isinstance(items, list) else [items])) if known(c)]
        if found:
            return None, found
    if stripped.startswith("{"):
        try:
            call = _call(json.loads(stripped))
        except json.JSONDecodeError:
            call = None
        if known(call):
            return None, [call]
    return text, []


class HoldBack:
    """Streaming content filter: passes text through until it could be a tool call, then holds the rest."""

    def __init__(self):
        self.text, self.sent, self.holding = "", 0, False

    def push(self, piece: str) -> str:
        self.text += piece
        if self.holding:
            return ""
        start = self.text.lstrip()
        if start[:1] == "{" and self.sent == 0:  # a JSON-style call is the whole reply: hold it all
            self.holding = True
            return ""
        for opener in OPENERS:
            i = self.text.find(opener, self.sent)
            if i >= 0:
                out, self.sent, self.holding = self.text[self.sent:i], i, True
                return out
        # keep back a tail that could still grow into an opener
        safe = len(self.text)
        for opener in OPENERS:
            for k in range(len(opener) - 1, 0, -1):
                if self.text.endswith(opener[:k]):
                    safe = min(safe, len(self.text) - k)
                    break
        out, self.sent = self.text[self.sent:safe], max(self.sent, safe)
        return out

    def rest(self) -> str:
        """The held-back text (at the end of the reply)."""
        return self.text[self.sent:]
