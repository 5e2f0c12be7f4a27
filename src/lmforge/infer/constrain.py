"""Constrained decoding for JSON output: `response_format` json_object and json_schema.

A `JSONConstraint` answers one question about text: is it the beginning of a JSON document that the schema allows
(`prefix_ok`), and is it a whole one (`complete`)? The scheduler (`allowed_logits`) asks it about each candidate
token, best logit first, and samples only among tokens that keep the text a valid prefix; the end-of-sequence token
is allowed only once the document is complete. Because the check is on text, it works for every tokenizer (a token
may hold several JSON characters, or half of a Chinese character inside a string).

The schema subset: `type` object (properties, required, additionalProperties), array (items, minItems, maxItems),
string (enum), number, integer, boolean, null, a list of types, `enum` and `const` of any JSON value, `anyOf` /
`oneOf` (any branch), and `$ref` to `#/$defs/...` or `#/definitions/...`. Keys outside it (formats, patterns,
numeric bounds) are not enforced; json_schema with `strict` documents that subset.
"""

from __future__ import annotations

import json
import logging

log = logging.getLogger(__name__)
_WS = " \t\n\r"


class _End(Exception):
    """The text ended inside a value that could still be completed."""


class _Bad(Exception):
    """The text cannot begin any document the schema allows."""


def _needs_escape(key: str) -> bool:
    return any(c in '"\\' or ord(c) < 0x20 for c in key)


def _partial_string(body: str) -> str:
    """The characters of an unfinished JSON string body (an escape cut in half is left out)."""
    for cut in range(0, 7):
        try:
            return json.loads('"' + body[:len(body) - cut] + '"')
        except json.JSONDecodeError:
            continue
    return body


class JSONConstraint:
    """Valid-prefix checks for JSON text; `schema=None` allows any JSON object (response_format json_object)."""

    def __init__(self, schema: dict | None = None, max_whitespace: int = 8):
        self.root = schema if schema is not None else {"type": "object"}
        self.max_whitespace = max_whitespace  # a longer run between tokens of JSON is refused: no endless blanks
        self.defs = {**(self.root.get("$defs") or {}), **(self.root.get("definitions") or {})}

    # --- the public questions ---------------------------------------------------------------------------------
    def prefix_ok(self, text: str) -> bool:
        if len(text) - len(text.lstrip(_WS)) > 1:  # the document starts at once (one blank for a " {" token)
            return False
        try:
            end = self._value(text, self._skip(text, 0), self.root)
        except _End:
            return True
        except _Bad:
            return False
        rest = text[end:]  # after the document: a little whitespace only
        return all(c in _WS for c in rest) and len(rest) <= self.max_whitespace

    def complete(self, text: str) -> bool:
        try:
            end = self._value(text, self._skip(text, 0), self.root)
        except (_End, _Bad):
            return False
        return all(c in _WS for c in text[end:])

    # --- a recursive-descent parser that stops at the end of the text ---------------------------------------
    def _resolve(self, schema: dict) -> dict:
        while isinstance(schema, dict) and "$ref" in schema:
            ref = schema["$ref"]
            name = ref.rsplit("/", 1)[-1]
            if name not in self.defs:
                raise _Bad
            schema = self.defs[name]
        return schema if isinstance(schema, dict) else {}

    def _skip(self, s: str, i: int) -> int:
        start = i
        while i < len(s) and s[i] in _WS:
            i += 1
        if i - start > self.max_whitespace:
            raise _Bad
        return i

    def _value(self, s: str, i: int, schema: dict) -> int:
        schema = self._resolve(schema)
        if i >= len(s):
            raise _End
        for key in ("anyOf", "oneOf"):
            if key in schema:
                return self._any(s, i, [dict(schema, **b) if isinstance(b, dict) else b for b in schema[key]], key)
        if "const" in schema:
            return self._literal_value(s, i, schema["const"])
        if "enum" in schema:
            return self._any_literal(s, i, schema["enum"])
        types = schema.get("type")
        types = [types] if isinstance(types, str) else (types or ["object", "array", "string", "number", "boolean",
                                                                  "null"])
        c = s[i]
        if c == "{" and "object" in types:
            return self._object(s, i, schema)
        if c == "[" and "array" in types:
            return self._array(s, i, schema)
        if c == '"' and "string" in types:
            return self._string(s, i)
        if (c == "-" or c.isdigit()) and ("number" in types or "integer" in types):
            return self._number(s, i, integer="number" not in types)
        for word, kind in (("true", "boolean"), ("false", "boolean"), ("null", "null")):
            if kind in types and word.startswith(s[i:i + len(word)]) and s[i] == word[0]:
                if len(s) - i < len(word):
                    raise _End
                return i + len(word)
        raise _Bad

    @staticmethod
    def _first(attempts) -> int:
        """The end of the first alternative that parses; _End if one could still complete; else _Bad."""
        ended = False
        for attempt in attempts:
            try:
                return attempt()
            except _End:
                ended = True
            except _Bad:
                continue
        raise _End if ended else _Bad

    def _any(self, s: str, i: int, branches: list, key: str) -> int:
        subs = [{k: v for k, v in b.items() if k != key} if isinstance(b, dict) else {} for b in branches]
        return self._first(lambda sub=sub: self._value(s, i, sub) for sub in subs)

    def _any_literal(self, s: str, i: int, values: list) -> int:
        return self._first(lambda v=v: self._literal_value(s, i, v) for v in values)

    def _literal_value(self, s: str, i: int, value) -> int:
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
        rest = s[i:]
        if text.startswith(rest):
            raise _End
        if rest.startswith(text):
            return i + len(text)
        raise _Bad

    def _string(self, s: str, i: int) -> int:
        i += 1  # the opening quote
        while i < len(s):
            c = s[i]
            if c == '"':
                return i + 1
            if c == "\\":
                if i + 1 >= len(s):
                    raise _End
                e = s[i + 1]
                if e in '"\\/bfnrt':
                    i += 2
                    continue
                if e == "u":
                    hexpart = s[i + 2:i + 6]
                    if any(h not in "0123456789abcdefABCDEF" for h in hexpart):
                        raise _Bad
                    if len(hexpart) < 4:
                        raise _End
                    i += 6
                    continue
                raise _Bad
            if ord(c) < 0x20:  # control characters must be escaped inside JSON strings
                raise _Bad
            i += 1
        raise _End

    def _number(self, s: str, i: int, integer: bool) -> int:
        j = i
        if s[j] == "-":
            j += 1
            if j >= len(s):
                raise _End
        if not s[j].isdigit():
            raise _Bad
        if s[j] == "0":
            j += 1
        else:
            while j < len(s) and s[j].isdigit():
                j += 1
        if j < len(s) and s[j] == "." and not integer:
            j += 1
            if j >= len(s):
                raise _End
            if not s[j].isdigit():
                raise _Bad
            while j < len(s) and s[j].isdigit():
                j += 1
        if j < len(s) and s[j] in "eE" and not integer:
            j += 1
            if j < len(s) and s[j] in "+-":
                j += 1
            if j >= len(s):
                raise _End
            if not s[j].isdigit():
                raise _Bad
            while j < len(s) and s[j].isdigit():
                j += 1
        if j >= len(s):
            raise _End  # a number may go on: it is complete only when something follows it
        return j

    def _object(self, s: str, i: int, schema: dict) -> int:
        props = schema.get("properties") or {}
        required = list(schema.get("required") or [])
        extra = schema.get("additionalProperties", not props)  # a schema with properties: only those
        seen: set[str] = set()
        i = self._skip(s, i + 1)
        if i >= len(s):
            raise _End
        if s[i] == "}":
            if any(r not in seen for r in required):
                raise _Bad
            return i + 1
        while True:
            if i >= len(s):
                raise _End
            if s[i] != '"':
                raise _Bad
            start = i
            try:
                i = self._string(s, i)
            except _End:
                body = s[start + 1:]
                left = [k for k in props if k not in seen]
                if extra is False and (("\\" in body and not any(_needs_escape(k) for k in left))
                                       or not any(k.startswith(_partial_string(body)) for k in left)):
                    raise _Bad from None  # a key being written must begin one of the allowed keys
                raise
            key = json.loads(s[start:i])
            if key in seen or (key not in props and extra is False):
                raise _Bad
            seen.add(key)
            i = self._skip(s, i)
            if i >= len(s):
                raise _End
            if s[i] != ":":
                raise _Bad
            i = self._skip(s, i + 1)
            sub = props.get(key, extra if isinstance(extra, dict) else {})
            i = self._skip(s, self._value(s, i, sub))
            if i >= len(s):
                raise _End
            if s[i] == "}":
                if any(r not in seen for r in required):
                    raise _Bad
                return i + 1
            if s[i] != ",":
                raise _Bad
            if extra is False and all(k in seen for k in props):
                raise _Bad  # every allowed key is used: no room for another
            i = self._skip(s, i + 1)

    def _array(self, s: str, i: int, schema: dict) -> int:
        items = schema.get("items") or {}
        lo, hi = schema.get("minItems", 0), schema.get("maxItems")
        n = 0
        i = self._skip(s, i + 1)
        if i >= len(s):
            raise _End
        if s[i] == "]":
            if n < lo:
                raise _Bad
            return i + 1
        while True:
            i = self._skip(s, self._value(s, i, items))
            n += 1
            if hi is not None and n > hi:
                raise _Bad
            if i >= len(s):
                raise _End
            if s[i] == "]":
                if n < lo:
                    raise _Bad
                return i + 1
            if s[i] != ",":
                raise _Bad
            i = self._skip(s, i + 1)


class WrappedJSON:
    """A JSON document between fixed text: `prefix` + document + `suffix` (a tool call in its template's wrapper,
    e.g. <tool_call>\n{...}\n</tool_call>)."""

    def __init__(self, inner: JSONConstraint, prefix: str = "", suffix: str = ""):
        self.inner, self.prefix, self.suffix = inner, prefix, suffix

    def _split(self, text: str):
        """(state, rest): "prefix" while the prefix is being written, "doc" inside the document, "after" with the
        text after it; None when the text cannot be one."""
        p = self.prefix
        if len(text) <= len(p):
            return ("prefix", "") if p.startswith(text) else None
        if not text.startswith(p):
            return None
        body = text[len(p):]
        if len(body) - len(body.lstrip(_WS)) > 1:  # the document starts at once (one blank for a " {" token)
            return None
        inner = self.inner
        try:
            end = inner._value(body, inner._skip(body, 0), inner.root)
        except _End:
            return ("doc", "")
        except _Bad:
            return None
        return ("after", body[end:])

    def prefix_ok(self, text: str) -> bool:
        split = self._split(text)
        if split is None:
            return False
        state, rest = split
        return state != "after" or self.suffix.startswith(rest) or (rest.strip() == "" and len(rest) <= 2)

    def complete(self, text: str) -> bool:
        split = self._split(text)
        return split is not None and split[0] == "after" and split[1].rstrip() == self.suffix.rstrip()


def tool_call_constraint(tools: list[dict], name: str | None, template: str | None) -> WrappedJSON:
    """The one tool call a request requires (tool_choice "required", or one named function): {"name", "arguments"}
    with the tool's own parameter schema, in the wrapper the chat template teaches (Hermes / Qwen's <tool_call>
    block; a bare JSON object otherwise, as Llama 3's templates ask)."""
    chosen = [t["function"] for t in tools if name is None or t["function"]["name"] == name]
    branches = [{"type": "object", "properties": {"name": {"const": f["name"]},
                                                  "arguments": f.get("parameters") or {"type": "object"}},
                 "required": ["name", "arguments"], "additionalProperties": False} for f in chosen]
    schema = branches[0] if len(branches) == 1 else {"anyOf": branches}
    hermes = template is not None and "<tool_call>" in template
    return WrappedJSON(JSONConstraint(schema), "<tool_call>\n" if hermes else "", "\n</tool_call>" if hermes else "")



def allowed_logits(logits, constraint, raw: bytes, stops: set[int], token_bytes, keep: int):
    """One row's (V,) logits with -inf for every token that would break `constraint` after the reply's bytes `raw`:
    candidates are checked best logit first until `keep` allowed ones are found (1 for greedy decoding); a stop token
    is allowed only once the text is complete. `token_bytes(id)` gives a token's bytes."""
    import torch

    allowed: list[int] = []
    order = torch.argsort(logits, descending=True).tolist()
    complete = constraint.complete(raw.decode("utf-8", "replace"))
    for t in order:
        ok = complete if t in stops else constraint.prefix_ok((raw + token_bytes(t)).decode("utf-8", "replace"))
        if ok:
            allowed.append(t)
            if len(allowed) >= keep:
                break
    if not allowed:  # nothing can continue the text (a gap in the constraint): end it, and say so in the log
        log.warning("constrained decoding reached a dead end after %r; ending the reply", raw[-40:])
        allowed = sorted(stops)[:1] or order[:1]
    out = torch.full_like(logits, float("-inf"))
    out[allowed] = logits[allowed]
    return out
