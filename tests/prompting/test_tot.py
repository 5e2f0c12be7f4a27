"""Tree of Thoughts on the Game of 24: the exact checker against Python's own parser and a brute-force solver, BFS and
DFS driven by a scripted client at the ModelClient boundary, the CLI and its trace."""

from __future__ import annotations

import ast
import contextlib
import itertools
import json
import operator
import random
from fractions import Fraction

import pytest

from lmforge.infer.client import Completion, ModelClient
from lmforge.prompting.tot import (
    VALUE_PROMPT,
    State,
    TreeOfThoughts,
    builtin_puzzles,
    check_24,
    cot_solve,
    evaluate,
    parse_value,
    proposals,
)

OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def reference_value(expr: str) -> tuple[Fraction, list[Fraction]]:
    """Python's own parser (ast, no evaluation of code) walked with Fractions: the independent reference."""
    used = []

    def walk(node):
        if isinstance(node, ast.BinOp) and type(node.op) in OPS:
            return OPS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -walk(node.operand)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            used.append(Fraction(node.value))
            return Fraction(node.value)
        raise ValueError(ast.dump(node))

    return walk(ast.parse(expr, mode="eval").body), used


def solutions(puzzle: str) -> list[str]:
    """Every way to combine the numbers pairwise (brute force), as expressions equal to 24."""
    out = []

    def go(items):
        if len(items) == 1:
            if items[0][0] == 24:
                out.append(items[0][1])
            return
        for i, j in itertools.permutations(range(len(items)), 2):
            (a, ea), (b, eb) = items[i], items[j]
            rest = [x for k, x in enumerate(items) if k not in (i, j)]
            for op in "+-*/":
                if op == "/" and b == 0:
                    continue
                c = {"+": a + b, "-": a - b, "*": a * b, "/": a / b if b else 0}[op]
                go(rest + [(c, f"({ea} {op} {eb})")])

    go([(Fraction(n), n) for n in puzzle.split()])
    return out


def test_evaluate_equals_pythons_parser_on_random_expressions():
    rng = random.Random(0)

    def expr(depth):
        if depth == 0 or rng.random() < 0.3:
            return str(rng.randint(1, 13))
        return f"({expr(depth - 1)} {rng.choice('+-*/')} {expr(depth - 1)})"

    checked = 0
    for _ in range(500):
        e = expr(3).strip()
        try:
            want = reference_value(e)
        except ZeroDivisionError:
            continue
        assert evaluate(e) == want, e
        checked += 1
    assert checked > 400
    assert evaluate("2 + 3 * 4 - 6 / 3") == (Fraction(12), [2, 3, 4, 6, 3])  # precedence
    assert evaluate("-(2 - 5) × 8")[0] == 24


def test_check_24_is_exact_and_strict():
    assert check_24("8 / (3 - 8 / 3)", "3 3 8 8")  # 24 only in exact arithmetic (float: 23.999999999999996)
    assert check_24("Answer: (6 - 4) * (4 + 8) = 24", "4 4 6 8")
    assert not check_24("(6 - 4) * (4 + 8)", "4 4 6 9")          # the wrong numbers
    assert not check_24("(6 - 4) * 12", "4 4 6 8")               # not each number once
    assert not check_24("6 * 4", "4 4 6 8")
    assert not check_24("__import__('os').system('true')", "1 2 3 4")
    assert not check_24("2 ** 3 * 3", "2 3 3 4") and not check_24("(1 + 2", "1 2 3 4") and not check_24("4/0", "4 0")
    for puzzle in builtin_puzzles("901-902"):  # every brute-force solution of the paper's puzzles checks
        found = solutions(puzzle)
        assert found and all(check_24(s, puzzle) for s in found[:50])


def test_builtin_list_is_the_papers():
    hard = builtin_puzzles()
    assert len(hard) == 100 and hard[0] == "4 5 6 10" and builtin_puzzles("1") == ["1 1 4 6"]
    assert all(solutions(p) for p in hard[:3])  # the list holds solvable puzzles


def test_proposals_recompute_the_arithmetic():
    s = State.start("4 9 10 13")
    children = proposals(s, "13 - 9 = 5 (left: 4 5 10)\n10 - 4 = 6 (left: 6 9 13)\n7 * 2 = 14\n13 - 9 = 4\n")
    assert [c.left() for c in children] == ["4 4 10", "6 9 13"]  # 13 - 9 is 4 whatever the model says; 7, 2 absent
    final = children[0].apply(Fraction(10), "-", Fraction(4)).apply(Fraction(4), "*", Fraction(6))
    assert final.answer() == "(13 - 9) * (10 - 4)" and check_24(final.answer(), "4 9 10 13")
    assert parse_value("10 + 14 = 24\nsure") == 20 and parse_value("likely... no, impossible") == 0.001


class Oracle(ModelClient):
    """Proposes the given lines for each state; values states by a table (default: impossible)."""

    name = "oracle"

    def __init__(self, propose: dict[str, str], values: dict[str, str]):
        self.propose, self.values, self.calls = propose, values, {"propose": 0, "value": 0}

    def chat(self, conversations, sampling=None, n=1, tools=None):
        out = []
        for c in conversations:
            prompt = c[-1]["content"]
            if prompt.startswith(VALUE_PROMPT.split("{")[0]):
                self.calls["value"] += 1
                left = prompt.rstrip("\n").splitlines()[-1]
                out.append([Completion(self.values.get(left, "impossible"))] * n)
            elif "Possible next steps:" in prompt:
                self.calls["propose"] += 1
                left = prompt.split("Input: ")[-1].split("\n")[0]
                out.append([Completion(self.propose.get(left, ""))] * n)
            else:
                out.append([Completion("Answer: (13 - 9) * (10 - 4) = 24")] * n)
        return out


PROPOSE = {"4 9 10 13": "4 + 9 = 13 (left: 10 13 13)\n13 - 9 = 4 (left: 4 4 10)",
           "10 13 13": "13 - 13 = 0 (left: 0 10)", "4 4 10": "10 - 4 = 6 (left: 4 6)", "4 6": "4 * 6 = 24",
           "0 10": "0 + 10 = 10"}


def test_bfs_keeps_the_breadth_the_values_allow():
    misled = {"10 13 13": "sure", "4 4 10": "likely", "0 10": "sure", "4 6": "sure"}
    wide = TreeOfThoughts(Oracle(PROPOSE, misled), breadth=2).solve("4 9 10 13")
    assert wide["correct"] and wide["answer"] == "(13 - 9) * (10 - 4)"
    narrow = TreeOfThoughts(Oracle(PROPOSE, misled), breadth=1).solve("4 9 10 13")
    assert not narrow["correct"] and not narrow["any_correct"]  # b = 1 followed the wrong "sure"
    kinds = [t["kind"] for t in wide["trace"]]
    assert kinds[:3] == ["propose", "value", "select"] and wide["steps"][-1] == "4 * 6 = 24 (left: 24)"


def test_dfs_prunes_impossible_states():
    values = {"10 13 13": "impossible", "4 4 10": "likely", "4 6": "sure"}
    oracle = Oracle(PROPOSE, values)
    result = TreeOfThoughts(oracle, search="dfs").solve("4 9 10 13")
    assert result["correct"] and oracle.calls["propose"] == 3  # root, 4 4 10, 4 6: the pruned branch never expanded
    assert {"kind": "prune", "state": "10 13 13", "value": 0.001} in result["trace"]
    capped = TreeOfThoughts(Oracle(PROPOSE, values), search="dfs", max_states=1).solve("4 9 10 13")
    assert not capped["correct"] and capped["answer"] is None


def test_cot_baseline_is_checked_exactly():
    rows = cot_solve(Oracle({}, {}), ["4 9 10 13", "1 1 1 1"])
    assert [r["correct"] for r in rows] == [True, False]


def test_cli_writes_the_trace(tmp_path, monkeypatch, capsys):
    from lmforge.cli import main
    from lmforge.infer import client

    monkeypatch.setattr(client, "client_from_args", lambda args: Oracle(PROPOSE, {"4 4 10": "likely", "4 6": "sure"}))
    trace = tmp_path / "t.jsonl"
    assert main(["prompt", "tot", "--endpoint", "http://unused/v1", "--puzzle", "4 9 10 13", "--compare-cot",
                 "--trace", str(trace), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report == {"puzzles": 1, "model": "oracle", "tot-bfs": 1.0, "tot-bfs-any": 1.0, "cot": 1.0}
    rows = [json.loads(line) for line in trace.read_text(encoding="utf-8").splitlines()]
    assert [r["method"] for r in rows] == ["tot-bfs", "cot"] and rows[0]["trace"]
    assert main(["prompt", "tot", "--endpoint", "http://unused/v1", "--puzzle", "4 9 x"]) != 0
    assert "four whole numbers" in capsys.readouterr().err


@pytest.mark.parametrize("puzzle", ["1 1 1 1"])
def test_an_unsolvable_puzzle_has_no_answer(puzzle):
    assert solutions(puzzle) == []
    assert TreeOfThoughts(Oracle({}, {})).solve(puzzle)["answer"] is None


def test_a_stopped_cli_run_keeps_the_puzzles_it_solved(tmp_path, monkeypatch, capsys):
    """`prompt tot` over many puzzles takes hours on a small machine: stopped midway (Ctrl-C, a crash), its --trace
    holds every puzzle finished so far, and each one was reported as it finished."""
    from lmforge.cli import main
    from lmforge.infer import client
    from lmforge.prompting import tot

    monkeypatch.setattr(client, "client_from_args", lambda args: Oracle(PROPOSE, {"4 4 10": "likely", "4 6": "sure"}))
    monkeypatch.setattr(tot, "builtin_puzzles", lambda ranks: ["4 9 10 13", "1 1 1 1"])
    solve = tot.TreeOfThoughts.solve

    def stop_at_the_second(self, puzzle):
        if puzzle != "4 9 10 13":
            raise KeyboardInterrupt
        return solve(self, puzzle)

    monkeypatch.setattr(tot.TreeOfThoughts, "solve", stop_at_the_second)
    trace = tmp_path / "t.jsonl"
    with contextlib.suppress(KeyboardInterrupt):
        main(["prompt", "tot", "--endpoint", "http://unused/v1", "--ranks", "901-902", "--trace", str(trace), "--json"])
    rows = [json.loads(line) for line in trace.read_text(encoding="utf-8").splitlines()]
    assert [(r["puzzle"], r["correct"]) for r in rows] == [("4 9 10 13", True)]
    assert "[1/2] 4 9 10 13" in capsys.readouterr().err
