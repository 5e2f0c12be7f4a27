"""Measured figures live in docs/benchmarks.md (with the machine and date), not in the code's docstrings and help
texts: there they go stale without anyone noticing, and they say how fast instead of what.

The check reads every docstring (module, class, function) and every help text (`help=` / `description=` / `epilog=`
of argparse, `"help"` in a config field's metadata) of src/lmforge and flags the shapes a measurement takes: a
fractional speed-up ("1.24x"), a rate ("45 GFLOPS", "22 GB/s", "300 tokens/s"), a duration that something took
("about 30 s", "2.5 minutes on 2 CPU cores", "6 s for ..."), or a change in time ("from 6 s to 21 s"). Defaults,
limits and arithmetic ("every 10 s", "4x less memory than float32", "(default 30 s)") are not measurements and
pass.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import lmforge

SRC = Path(lmforge.__file__).parent
DURATION = r"\d+(?:\.\d+)? ?(?:ms|s|sec|seconds|min|minutes|hours?)\b"
MEASURED = [
    re.compile(r"\b\d+\.\d+ ?[x×](?![\w-])"),  # 1.24x, 0.9 x: a ratio with decimals is measured, not designed
    re.compile(r"\b\d+(?:\.\d+)?[x×] (?:faster|slower)\b"),
    re.compile(r"\b\d+(?:\.\d+)? ?(?:[GMT]FLOPS|[GMK]B/s|GiB/s|MiB/s|tokens?/s|tok/s)\b"),
    re.compile(rf"(?:\babout|~|\btakes?|\btook|\bin) ?{DURATION}"),
    re.compile(rf"{DURATION} (?:for|per token|per step) "),
    re.compile(rf"{DURATION} on (?:an? |the |this |\d+ )?(?:\d+-core|CPUs?|GPUs?|cores?|VM|machine|laptop|[HA]100)"),
    re.compile(rf"\bfrom {DURATION} to "),
]
HELP_KEYWORDS = {"help", "description", "epilog"}


def _text(node: ast.AST) -> str | None:
    """The string a node spells: a constant, an f-string's literal parts, or implicitly joined pieces."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value for v in node.values if isinstance(v, ast.Constant) and isinstance(v.value, str))
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        parts = [_text(node.left), _text(node.right)]
        return "".join(p for p in parts if p)
    return None


def prose(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, text) of every docstring and help text in a parsed module."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                out.append((node.body[0].lineno, doc))
        elif isinstance(node, ast.Call):
            out += [(k.value.lineno, t) for k in node.keywords if k.arg in HELP_KEYWORDS and (t := _text(k.value))]
        elif isinstance(node, ast.Dict):
            out += [(v.lineno, t) for k, v in zip(node.keys, node.values)
                    if isinstance(k, ast.Constant) and k.value in HELP_KEYWORDS and (t := _text(v))]
    return out


def figures(source: str) -> list[tuple[int, str]]:
    """(line, matched text) of every measurement-shaped phrase in the module's prose; overlapping matches of
    several patterns count once (the longest)."""
    found = []
    for line, text in prose(ast.parse(source)):
        flat = " ".join(text.split())
        spans = sorted({m.span() for pattern in MEASURED for m in pattern.finditer(flat)}, key=lambda s: (s[0], -s[1]))
        end = -1
        for a, b in spans:
            if a >= end:
                found.append((line, flat[a:b]))
                end = b
    return found


def test_the_check_flags_measurements_and_passes_defaults():
    # what the code used to say (each was moved to docs/benchmarks.md) ...
    flagged = '''
def f(p):
    """8 rows take 48 ms (45 GFLOPS); with the kernel a compiled step went from slower than eager to 1.24x faster."""
    p.add_argument("--x", help="compiles once per machine, about 30 s")
    p.add_parser("q", description="The whole chain. About 2.5 minutes on 2 CPU cores.")
    return dict(help="on CPU it made training 1.5x slower"), dict(help=f"a loop slowed from 6 s to 21 s per step")
'''
    assert sorted(m for _, m in figures(flagged)) == sorted(["take 48 ms", "45 GFLOPS", "1.24x faster", "about 30 s",
                                                            "2.5 minutes on 2 CPU", "1.5x slower", "from 6 s to "])
    # ... and what stays: defaults, limits, arithmetic, shapes
    fine = '''
def g(p):
    """Scales per output channel: 4x less memory than float32, 2 x width rows, a 0.5 threshold, 16 rows at a time."""
    p.add_argument("--interval", help="seconds between progress lines (default 10 s); every 30 s on a file")
    return dict(help="stop after this many seconds (0: no limit); step 1.5 of the schedule")
'''
    assert figures(fine) == []


def test_no_measured_figures_in_docstrings_or_help_texts():
    found = [f"{path.relative_to(SRC.parent)}:{line}: {match!r}" for path in sorted(SRC.rglob("*.py"))
             for line, match in figures(path.read_text(encoding="utf-8"))]
    assert not found, "measured figures in the code (move them to docs/benchmarks.md, with machine and date):\n  " \
                      + "\n  ".join(found)
