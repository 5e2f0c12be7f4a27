"""The package's layers point only down, and nothing hides a cycle.

Every module of src/lmforge is parsed (imports at module level and inside functions alike, plus module names
written as strings, such as the lazy `_EXPORTS` tables and `lmforge.cli.STAGES`), each import is mapped from the
importing module's unit to the imported one's, and the test fails on
  (a) an import of a higher layer,
  (b) a cycle between units (one package importing another that imports it back, through any path),
  (c) a private name (`_x`) imported from another unit,
  (d) a stage's CLI module (`lmforge.X.cli`) imported by anything but the `lmforge` command: CLI modules only
      parse flags and call library code, so no library code lives there for others to import.

A unit is a package of lmforge (`lmforge.data`), a top-level module (`lmforge.text`), or the command line: the
`lmforge` command (cli.py, __main__.py) together with every stage's cli.py, which register its subcommands. The
table below is the one docs/architecture.md draws.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

import lmforge

SRC = Path(lmforge.__file__).parent

# lowest first; a unit may import its own layer and the layers below it
LAYERS: list[tuple[str, set[str]]] = [
    ("base", {"lmforge", "text", "files", "hub", "config", "progress", "sandbox", "plots", "metrics", "run_status"}),
    ("corpora and tokens", {"data", "tokenizer"}),
    ("chat and model", {"chat", "model"}),
    ("adapters, generation, training", {"peft", "infer", "train"}),
    ("stages", {"finetune", "classify", "eval", "rag", "prompting", "synth", "export"}),
    ("apps", {"serve", "studio"}),
    ("command line", {"cli", "quickstart"}),
]
LAYER_OF = {unit: i for i, (_, units) in enumerate(LAYERS) for unit in units}
MODULE_NAME = re.compile(r"lmforge(\.[a-z_][a-z0-9_]*)+")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_stage_cli(module: str) -> bool:
    return module.startswith("lmforge.") and module.endswith(".cli") and module != "lmforge.cli"


def unit_of(module: str) -> str:
    """The layer unit a module belongs to (see the module docstring)."""
    if module in ("lmforge.cli", "lmforge.__main__") or is_stage_cli(module):
        return "cli"
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "lmforge"


def exists(module: str) -> bool:
    path = SRC.parent.joinpath(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports(path: Path) -> list[tuple[int, str, str | None]]:
    """(line, imported module, imported name or None) for every lmforge import in the file, wherever it sits."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name, None) for a in node.names if a.name.split(".")[0] == "lmforge"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the importing package, up level - 1
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([node.module] if node.module else []))
            if base.split(".")[0] != "lmforge":
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                found.append((node.lineno, sub, None) if exists(sub) else (node.lineno, base, a.name))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and MODULE_NAME.fullmatch(node.value) \
                and exists(node.value):  # a module named in a string: a lazy export table, the CLI's stage list
            found.append((node.lineno, node.value, None))
    return found


def import_graph() -> list[tuple[str, int, str, str, str | None]]:
    """(importing file, line, importing module, imported module, name) over all of src/lmforge."""
    rows = []
    for path in sorted(SRC.rglob("*.py")):
        source = module_name(path)
        rows += [(str(path.relative_to(SRC.parent)), line, source, target, name)
                 for line, target, name in imports(path)]
    return rows


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one unit (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_every_unit_has_a_layer():
    units = {unit_of(module_name(p)) for p in SRC.rglob("*.py")}
    assert units - set(LAYER_OF) == set(), "add the new package to LAYERS (and to docs/architecture.md's table)"
    assert set(LAYER_OF) - units - {"cli"} == set(), "LAYERS names a unit that no longer exists"


def test_the_parser_sees_imports_inside_functions_and_strings(tmp_path):
    # the checks below are only as good as the import finder: it must see what a lazy import hides
    graph = import_graph()
    inside = [(f, line, t) for f, line, s, t, _ in graph if f == "lmforge/cli.py" and t == "lmforge.config"]
    assert inside, "cli.py imports ConfigError inside _user_errors(); the finder missed it"
    named = {t for f, _, _, t, _ in graph if f == "lmforge/cli.py"}
    assert "lmforge.data.cli" in named, "cli.py names its stage modules as strings; the finder missed them"


def test_imports_point_down():
    upward = [f"{f}:{line}: {unit_of(s)} ({LAYERS[LAYER_OF[unit_of(s)]][0]}) imports {t}"
              f"{'.' + n if n else ''} ({LAYERS[LAYER_OF[unit_of(t)]][0]})"
              for f, line, s, t, n in import_graph() if LAYER_OF[unit_of(t)] > LAYER_OF[unit_of(s)]]
    assert not upward, "imports of a higher layer:\n  " + "\n  ".join(upward)


def test_no_cycles_between_units():
    edges: dict[str, set[str]] = defaultdict(set)
    where: dict[tuple[str, str], str] = {}
    for f, line, s, t, _ in import_graph():
        a, b = unit_of(s), unit_of(t)
        if a != b:
            edges[a].add(b)
            where.setdefault((a, b), f"{f}:{line}")
    found = cycles(edges)
    detail = [" <-> ".join(c) + ": " + ", ".join(f"{a} -> {b} ({where[a, b]})" for a in c for b in c
                                                   if (a, b) in where) for c in found]
    assert not found, "import cycles between units:\n  " + "\n  ".join(detail)


def test_no_private_names_cross_units():
    crossing = [f"{f}:{line}: {t}.{n}" for f, line, s, t, n in import_graph()
                if n and n.startswith("_") and not n.startswith("__") and unit_of(s) != unit_of(t)]
    assert not crossing, "private names imported from another unit (make them public where they live, or move " \
                         "the code):\n  " + "\n  ".join(crossing)


def test_only_the_command_imports_stage_cli_modules():
    users = [f"{f}:{line}: {t}" for f, line, s, t, _ in import_graph() if is_stage_cli(t) and s != "lmforge.cli"]
    assert not users, "library code in a CLI module (move it to the stage's library):\n  " + "\n  ".join(users)


def test_every_imported_lmforge_module_exists():
    """An import inside a function runs only when that function does: a module that moved (eval/metrics.py ->
    metrics.py) leaves such imports behind in branches written at the same time, and only this finds them all."""
    missing = [f"{f}:{line}: {t}" + (f" (importing {n})" if n else "") for f, line, s, t, n in import_graph()
               if not exists(t)]
    assert not missing, "imports of lmforge modules that do not exist:\n  " + "\n  ".join(missing)


def test_every_imported_name_exists():
    """The same for names: `from lmforge.x import y` where y was renamed (train/objectives.py's model_inputs was
    `_model_inputs`) fails only when the importing function first runs."""
    import importlib

    missing = []
    for f, line, _, target, name in import_graph():
        if name and name != "*" and exists(target) and not hasattr(importlib.import_module(target), name) \
                and not exists(f"{target}.{name}"):
            missing.append(f"{f}:{line}: {target}.{name}")
    assert not missing, "imported names that do not exist:\n  " + "\n  ".join(missing)
