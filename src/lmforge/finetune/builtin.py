"""An instruction set drawn from the Python reference (the built-in corpus), deterministically, for the quickstart.

Each section of a reference page (a heading underlined with `*`, `=` or `-`) becomes one question about its
heading ("What is ...?", "Explain ...", ...: the form picked by a hash of the heading, so the set is the same on
every machine) whose answer is the section's first prose paragraph, cut to its first two sentences. Grammar
productions and code (indented lines) are never answers.
"""

from __future__ import annotations

import hashlib
import re

_UNDERLINE = re.compile(r"^([*=\-])\1{2,}\s*$")
QUESTION_FORMS = ("What is {h}?", "Explain {h}.", "What does the Python reference say about {h}?",
                  "Tell me about {h} in Python.", "Describe {h} briefly.")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\"])")


def _sections(text: str) -> list[tuple[str, str]]:
    """(heading, body) pairs of one reference page."""
    lines = text.split("\n")
    marks = [i for i in range(1, len(lines)) if _UNDERLINE.match(lines[i]) and lines[i - 1].strip()
             and len(lines[i].strip()) >= len(lines[i - 1].strip()) - 2]
    out = []
    for k, i in enumerate(marks):
        end = marks[k + 1] - 1 if k + 1 < len(marks) else len(lines)
        out.append((lines[i - 1].strip(), "\n".join(lines[i + 1:end])))
    return out


def _first_prose(body: str) -> str | None:
    for para in re.split(r"\n\s*\n", body):
        lines = [ln for ln in para.split("\n") if ln.strip()]
        if not lines or any(ln.startswith((" ", "\t")) for ln in lines):  # grammar, code, lists, notes
            continue
        text = " ".join(ln.strip() for ln in lines)
        if len(text) < 40 or text.endswith(":") and len(text) < 80 or text.startswith(("New in", "Changed in")):
            continue
        sentences = _SENTENCE_END.split(text)
        answer = " ".join(sentences[:2])
        answer = answer if len(answer) <= 400 else sentences[0][:400]
        return answer[:-1] + "." if answer.endswith(":") else answer  # "... into a program:" introduced code
    return None


def _topic(heading: str) -> str:
    h = heading.replace('"', "").replace("*", "")
    return h[0].lower() + h[1:] if h[:1].isupper() and not h[1:2].isupper() else h


def python_docs_instructions(texts: list[str], max_examples: int = 400) -> list[dict]:
    """Alpaca records {instruction, input, output} from reference pages, in page order, duplicates dropped."""
    seen, out = set(), []
    for text in texts:
        for heading, body in _sections(text):
            answer = _first_prose(body)
            if answer is None or heading.lower() in seen:
                continue
            seen.add(heading.lower())
            form = QUESTION_FORMS[int(hashlib.sha256(heading.encode()).hexdigest(), 16) % len(QUESTION_FORMS)]
            out.append({"instruction": form.format(h=_topic(heading)), "input": "", "output": answer})
            if len(out) >= max_examples:
                return out
    return out
