"""A labelled set built from the built-in corpus (Python's reference docs), for trying the classifiers offline.

`python_docs_topics()`: the paragraphs of `pydoc_data.topics`, each labelled with what its section documents:
statement, expression or type. `--data builtin:python-docs-topics` reads it.
"""

from __future__ import annotations

GROUPS = {
    "statement": ("assert", "assignment", "async", "augassign", "break", "class", "compound", "continue", "del", "for",
                  "function", "global", "if", "import", "nonlocal", "pass", "raise", "return", "try", "while", "with",
                  "yield"),
    "expression": ("atom-identifiers", "atom-literals", "attribute-references", "await", "binary", "bitwise",
                   "booleans", "calls", "comparisons", "exprlists", "lambda", "operator-summary", "power", "shifting",
                   "slicings", "subscriptions", "unary"),
    "type": ("bltin-code-objects", "bltin-ellipsis-object", "bltin-null-object", "bltin-type-objects", "dict",
             "floating", "imaginary", "integers", "lists", "numbers", "numeric-types", "sequence-types",
             "string-methods", "strings", "typesfunctions", "typesmapping", "typesmethods", "typesmodules", "typesseq",
             "typesseq-mutable"),
}
BUILTIN = "builtin:python-docs-topics"


def python_docs_topics(min_chars: int = 80) -> list[dict]:
    """[{"text", "label", "topic"}]: every prose paragraph of at least min_chars characters (code blocks and
    headings left out), in the docs' order."""
    from pydoc_data.topics import topics

    rows = []
    for label, names in GROUPS.items():
        for name in names:
            if name not in topics:  # another Python version's docs: a topic may be missing
                continue
            for para in topics[name].split("\n\n"):
                lines = para.strip().splitlines()
                if not lines or lines[0].startswith((" ", ">>>")) or set(lines[-1].strip()) <= set("*=-~^"):
                    continue
                text = " ".join(line.strip() for line in lines)
                if len(text) >= min_chars:
                    rows.append({"text": text, "label": label, "topic": name})
    return rows
