"""Tools an agent may call: a safe calculator, a sandboxed Python runner, search over an lmforge RAG index, and any
Python function a user registers. Each has a name, a one-line description and an OpenAI tool definition, and
`run(input) -> str` never raises for bad input: the error becomes the observation the model reads.

The calculator parses the expression with `ast` and evaluates only numbers, + - * / // % **, unary signs and a
small set of math functions (no names, attributes, calls of anything else, or huge powers): nothing is `eval`ed.
The Python tool runs code in lmforge's sandbox (lmforge/sandbox.py: bubblewrap namespaces with an empty filesystem
and no network, a seccomp filter against new processes, resource limits), and refuses to run where it is unavailable.
"""

from __future__ import annotations

import ast
import inspect
import math
import operator
import os
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Tool:
    name: str
    description: str
    fn: Callable[[str], str]
    parameter: str = "input"  # the one string argument of its OpenAI definition

    def run(self, text) -> str:
        if isinstance(text, dict):  # OpenAI tool calls: {"input": "..."} (or the tool's one parameter)
            text = text.get(self.parameter, next(iter(text.values()), "")) if text else ""
        try:
            return str(self.fn(str(text)))
        except Exception as e:  # a tool's failure is the model's observation, not the agent's crash
            return f"Error: {type(e).__name__}: {e}"

    def openai(self) -> dict:
        return {"type": "function", "function": {
            "name": self.name, "description": self.description,
            "parameters": {"type": "object", "properties": {self.parameter: {"type": "string"}},
                           "required": [self.parameter]}}}


# --- calculator ------------------------------------------------------------------------------------------------------

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCTIONS = {"sqrt": math.sqrt, "abs": abs, "round": round, "log": math.log, "log10": math.log10, "exp": math.exp,
              "sin": math.sin, "cos": math.cos, "tan": math.tan, "floor": math.floor, "ceil": math.ceil,
              "min": min, "max": max}
_CONSTANTS = {"pi": math.pi, "e": math.e}
MAX_EXPRESSION = 500  # characters
MAX_MAGNITUDE = 1e100  # operands of ** and results beyond this are refused (no 9**9**9 that never finishes)


class CalculatorError(ValueError):
    pass


def calculate(expression: str) -> float | int:
    """The value of an arithmetic expression (module docstring); CalculatorError for anything else."""
    expression = expression.strip().replace("^", "**").replace("×", "*").replace("÷", "/")
    if len(expression) > MAX_EXPRESSION:
        raise CalculatorError(f"expression longer than {MAX_EXPRESSION} characters")
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError:
        raise CalculatorError(f"not an arithmetic expression: {expression!r}") from None

    def check(v):
        if isinstance(v, (int, float)) and abs(v) > MAX_MAGNITUDE:
            raise CalculatorError("number too large")
        return v

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return check(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            a, b = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and (abs(b) > 1000 or (abs(a) > 1 and abs(b) * math.log10(abs(a)) > 100)):
                raise CalculatorError("power too large")
            try:
                return check(_BINARY[type(node.op)](a, b))
            except ZeroDivisionError:
                raise CalculatorError("division by zero") from None
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](ev(node.operand))
        if isinstance(node, ast.Name) and node.id in _CONSTANTS:
            return _CONSTANTS[node.id]
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS
                and not node.keywords and len(node.args) <= 2):
            return check(_FUNCTIONS[node.func.id](*[ev(a) for a in node.args]))
        raise CalculatorError(f"not allowed in a calculation: {ast.dump(node)[:60]}")

    value = ev(tree)
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return int(value)
    return value


def calculator_tool() -> Tool:
    return Tool("calculator", "Evaluates an arithmetic expression, e.g. (3 + 4) * 2 / 5 or sqrt(16).",
                lambda s: str(calculate(s)), parameter="expression")


# --- sandboxed Python ------------------------------------------------------------------------------------------------

def run_python(code: str, timeout: float = 10.0, cpu_seconds: int = 10, memory_mb: int = 512) -> str:
    """stdout (and stderr) of `code` run in lmforge's sandbox (lmforge/sandbox.py: no files but its own temporary
    directory, no network, no processes, limits), or why it was stopped. Where the sandbox is unavailable the
    answer says so and nothing runs (unless LMFORGE_ALLOW_UNCONFINED_CODE=1)."""
    from lmforge.sandbox import Limits, SandboxUnavailable, run_python_code

    try:
        done = run_python_code(code, Limits(timeout=timeout, cpu_seconds=int(cpu_seconds), memory_mb=int(memory_mb)))
    except SandboxUnavailable as e:
        return f"Error: {e}"
    out = (done.stdout + done.stderr).strip()
    if done.timed_out:
        return f"Error: the code ran longer than {timeout:g} s and was stopped"
    if done.returncode < 0:
        name = done.signal_name
        return f"Error: stopped by {name}" + (" (CPU time limit)" if name == "SIGXCPU" else "") + (f"\n{out}" if out else "")
    if "MemoryError" in out:
        return f"Error: MemoryError (the {memory_mb} MB limit)\n{out[-500:]}"
    return out[-4000:] if out else "(no output)"


def python_tool(timeout: float = 10.0, memory_mb: int = 512) -> Tool:
    return Tool("python", "Runs Python code and returns what it prints (no network, no files kept, "
                          f"{timeout:g} s at most).", lambda s: run_python(s, timeout, int(timeout), memory_mb),
                parameter="code")


# --- RAG search and user tools ---------------------------------------------------------------------------------------

def search_tool(index, k: int = 3, mode: str | None = None) -> Tool:
    """Search an lmforge RagIndex (a directory or an opened index): the top k passages with their ids. mode:
    sparse, dense or hybrid (default: hybrid where the index has vectors, else sparse)."""
    if isinstance(index, (str, os.PathLike)):
        from lmforge.rag.index import RagIndex

        index = RagIndex.open(index)
    mode = mode or ("hybrid" if index.cfg.dense else "sparse")

    def search(query: str) -> str:
        hits = index.search(query, k, mode)
        if not hits:
            return "(no results)"
        return "\n".join(f"[{i}] ({h.chunk.doc_id}) {h.chunk.text[:400]}" for i, h in enumerate(hits, 1))

    return Tool("search", "Searches the document index and returns the most relevant passages.", search,
                parameter="query")


def function_tool(fn: Callable, name: str | None = None, description: str | None = None) -> Tool:
    """A user's Python function of one string argument (its docstring's first line describes it)."""
    doc = (inspect.getdoc(fn) or "").splitlines()
    params = list(inspect.signature(fn).parameters)
    return Tool(name or fn.__name__, description or (doc[0] if doc else fn.__name__), fn,
                parameter=params[0] if params else "input")


def load_user_tools(spec: str) -> list[Tool]:
    """`module:function[,function...]` or `path/to/file.py:function`: the named functions as tools."""
    import importlib
    import importlib.util

    where, _, names = spec.partition(":")
    if where.endswith(".py"):
        s = importlib.util.spec_from_file_location("lmforge_user_tools", where)
        if s is None or s.loader is None:
            raise ValueError(f"tools: cannot load {where}")
        module = importlib.util.module_from_spec(s)
        s.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    out = []
    for name in filter(None, names.split(",")):
        if not hasattr(module, name):
            raise ValueError(f"tools: {where} has no function {name!r}")
        out.append(function_tool(getattr(module, name)))
    return out


def describe(tools: list[Tool]) -> str:
    return "\n".join(f"{t.name}: {t.description}" for t in tools)


def build_tools(spec: str, user: list[str] = ()) -> list[Tool]:
    """The tools a command line names: `spec` is comma-separated calculator, python, search:INDEX_DIR; `user` are
    `load_user_tools` specs (MODULE:FN[,FN])."""
    from lmforge.config import ConfigError

    out = []
    for name in filter(None, spec.split(",")):
        kind, _, arg = name.partition(":")
        if kind == "calculator":
            out.append(calculator_tool())
        elif kind == "python":
            out.append(python_tool())
        elif kind == "search":
            if not arg:
                raise ConfigError("tools: search needs an index, as search:DIR (lmforge rag index --out DIR)")
            out.append(search_tool(arg))
        else:
            raise ConfigError(f"tools: {kind!r} is not calculator, python or search:INDEX (your own: --tool-module)")
    for spec_ in user:
        out += load_user_tools(spec_)
    if not out:
        raise ConfigError("tools: give at least one (--tools calculator,python,search:INDEX or --tool-module)")
    return out
