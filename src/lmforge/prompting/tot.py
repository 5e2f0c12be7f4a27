"""Tree of Thoughts (Yao et al. 2023) on the Game of 24, over any ModelClient; plain chain of thought beside it.

    solver = TreeOfThoughts(client, breadth=5)            # BFS: keep the b best states after every step
    result = solver.solve("4 9 10 13")                     # {"answer": "(13 - 9) * (10 - 4)", "correct": True, ...}
    TreeOfThoughts(client, search="dfs").solve(...)       # DFS: best child first, prune states valued "impossible"
    check_24("(13 - 9) * (10 - 4)", "4 9 10 13")           # exact, with fractions; never eval()

A state is the multiset of numbers left, each with the expression that made it. One step: the *propose* prompt asks
the model for possible next operations ("a op b = c"); each line whose a and b are among the numbers left becomes a
child state, its value c recomputed exactly (the model's own "= c" is not trusted: arithmetic slips would otherwise
turn into wrong states). The *value* prompt asks whether the numbers left can still reach 24 (sure / likely /
impossible, scored 20 / 1 / 0.001 as in the paper, summed over `evaluate_samples` samples); a state with one number
is valued without the model (20 if it is 24). Three steps leave one number; its expression is the answer, so the
paper's fourth "write the answer" step needs no model here. Success of BFS is the best final state being 24;
`any_correct` also reports whether any of the b final states is.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction

from lmforge.infer.client import ModelClient, Sampling
from lmforge.prompting.config import TotCommand

PROPOSE_PROMPT = """Each step combines two of the numbers with +, -, * or / and writes what is left.
Input: 3 5 7 12
Possible next steps:
3 + 5 = 8 (left: 7 8 12)
12 / 3 = 4 (left: 4 5 7)
7 - 3 = 4 (left: 4 5 12)
5 * 3 = 15 (left: 7 12 15)
12 - 7 = 5 (left: 3 5 5)
12 + 7 = 19 (left: 3 5 19)
7 * 5 = 35 (left: 3 12 35)
12 - 5 = 7 (left: 3 7 7)
Input: {numbers}
Possible next steps:
"""

VALUE_PROMPT = """Can the numbers reach 24 with +, -, * and /, each number used once? Answer sure, likely or impossible.
12 12
12 + 12 = 24
sure
2 3 4
2 * 3 * 4 = 24
sure
1 1 3
1 + 1 + 3 = 5, 1 * 1 * 3 = 3, (1 + 1) * 3 = 6: all too small
impossible
5 7 8
5 + 7 + 8 = 20, (8 - 5) * 7 = 21, 8 * (7 - 5) = 16; the numbers are close to 24
likely
11 50
50 - 11 = 39, 50 + 11 = 61, 50 / 11 is not whole: no way to 24
impossible
{numbers}
"""

COT_PROMPT = """Use the four numbers and +, -, *, / (each number once) to make 24. Work it out step by step, then write
the whole expression on the last line as "Answer: (expression) = 24".
Input: 4 4 6 8
Steps:
4 + 8 = 12 (left: 4 6 12)
6 - 4 = 2 (left: 2 12)
2 * 12 = 24 (left: 24)
Answer: (6 - 4) * (4 + 8) = 24
Input: 2 9 10 12
Steps:
12 * 2 = 24 (left: 9 10 24)
10 - 9 = 1 (left: 1 24)
24 * 1 = 24 (left: 24)
Answer: (12 * 2) * (10 - 9) = 24
Input: {numbers}
Steps:
"""

VALUE_SCORES = {"sure": 20.0, "likely": 1.0, "impossible": 0.001}
_STEP = re.compile(r"(-?\d+(?:\.\d+)?)\s*([-+*/×÷])\s*(-?\d+(?:\.\d+)?)\s*=")


# ----- the exact checker ----------------------------------------------------------------------------------------------

class ExpressionError(ValueError):
    """Text that is not an arithmetic expression over numbers, + - * / and parentheses."""


def _tokens(text: str) -> list[str]:
    out = re.findall(r"\d+(?:\.\d+)?|[-+*/()×÷]|\S", text)
    bad = [t for t in out if not re.fullmatch(r"\d+(?:\.\d+)?|[-+*/()×÷]", t)]
    if bad:
        raise ExpressionError(f"unexpected {bad[0]!r}")
    return [{"×": "*", "÷": "/"}.get(t, t) for t in out]


def evaluate(expression: str) -> tuple[Fraction, list[Fraction]]:
    """The exact value of an expression of numbers, + - * / and parentheses (the usual precedence, unary minus), and
    the numbers it uses, in order. Division by zero and malformed text raise ExpressionError."""
    tokens, pos, used = _tokens(expression), 0, []

    def peek():
        return tokens[pos] if pos < len(tokens) else None

    def take():
        nonlocal pos
        pos += 1
        return tokens[pos - 1]

    def atom() -> Fraction:
        t = peek()
        if t is None:
            raise ExpressionError("ends too early")
        if t == "(":
            take()
            v = sum_()
            if peek() != ")":
                raise ExpressionError("unbalanced parentheses")
            take()
            return v
        if t == "-":
            take()
            return -atom()
        if re.fullmatch(r"\d+(?:\.\d+)?", t):
            take()
            used.append(Fraction(t))
            return Fraction(t)
        raise ExpressionError(f"unexpected {t!r}")

    def product() -> Fraction:
        v = atom()
        while peek() in ("*", "/"):
            op, rhs = take(), atom()
            if op == "/" and rhs == 0:
                raise ExpressionError("division by zero")
            v = v * rhs if op == "*" else v / rhs
        return v

    def sum_() -> Fraction:
        v = product()
        while peek() in ("+", "-"):
            v = v + product() if take() == "+" else v - product()
        return v

    value = sum_()
    if pos != len(tokens):
        raise ExpressionError(f"unexpected {tokens[pos]!r}")
    return value, used


def check_24(answer: str, puzzle: str) -> bool:
    """True when `answer` (an expression, optionally "= 24" after it, "Answer:" before it) uses exactly the puzzle's
    numbers, each once, and equals 24 exactly."""
    text = answer.strip()
    if ":" in text:
        text = text.rsplit(":", 1)[1]
    text = text.split("=")[0]
    try:
        value, used = evaluate(text)
    except ExpressionError:
        return False
    return value == 24 and sorted(used) == sorted(Fraction(n) for n in puzzle.split())


# ----- states ---------------------------------------------------------------------------------------------------------

@dataclass
class State:
    """Numbers left, each with the expression that made it (a puzzle number is its own expression)."""

    numbers: list[Fraction]
    exprs: list[str]
    steps: list[str] = field(default_factory=list)
    value: float = 0.0

    @classmethod
    def start(cls, puzzle: str) -> State:
        nums = [Fraction(n) for n in puzzle.split()]
        return cls(nums, [_show(n) for n in nums])

    def left(self) -> str:
        return " ".join(_show(n) for n in sorted(self.numbers))

    def key(self) -> tuple:
        return tuple(sorted(self.numbers))

    def apply(self, a: Fraction, op: str, b: Fraction) -> State | None:
        """The state after `a op b`, or None when a or b is not among the numbers left (or b is 0 for /)."""
        nums, exprs = list(self.numbers), list(self.exprs)
        if a not in nums:
            return None
        ea = exprs.pop(nums.index(a))
        nums.remove(a)
        if b not in nums or (op == "/" and b == 0):
            return None
        eb = exprs.pop(nums.index(b))
        nums.remove(b)
        c = {"+": a + b, "-": a - b, "*": a * b, "/": a / b if b else None}[op]
        line = f"{_show(a)} {op} {_show(b)} = {_show(c)} (left: {' '.join(_show(n) for n in sorted(nums + [c]))})"
        return State(nums + [c], exprs + [f"({ea} {op} {eb})" if nums else f"{ea} {op} {eb}"], self.steps + [line])

    def answer(self) -> str | None:
        return self.exprs[0] if len(self.numbers) == 1 else None


def _show(x: Fraction) -> str:
    return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"


def proposals(state: State, reply: str) -> list[State]:
    """The child states a propose reply names (each "a op b =" line whose a and b are left), repeats dropped."""
    out, seen = [], set()
    for m in _STEP.finditer(reply):
        op = {"×": "*", "÷": "/"}.get(m.group(2), m.group(2))
        child = state.apply(Fraction(m.group(1)), op, Fraction(m.group(3)))
        if child is not None and child.key() not in seen:
            seen.add(child.key())
            out.append(child)
    return out


def parse_value(reply: str) -> float:
    """A value reply's verdict: the last of sure / likely / impossible it names (0 if none)."""
    found = re.findall(r"\b(sure|likely|impossible)\b", reply.lower())
    return VALUE_SCORES[found[-1]] if found else 0.0


# ----- search ---------------------------------------------------------------------------------------------------------

class TreeOfThoughts:
    """BFS (`breadth` best states kept per step) or DFS (best child first; states valued below `prune_below` are not
    expanded; at most `max_states` expansions) over Game-of-24 states. `evaluate_samples` value replies per state,
    sampled at `temperature` when more than one (greedy otherwise)."""

    def __init__(self, client: ModelClient, search: str = TotCommand.search, breadth: int = TotCommand.breadth,
                 evaluate_samples: int = TotCommand.evaluate_samples, temperature: float = TotCommand.temperature,
                 prune_below: float = 1.0, max_states: int = TotCommand.max_states, max_tokens: int = 160,
                 seed: int = 0):
        if search not in ("bfs", "dfs"):
            raise ValueError(f"search must be bfs or dfs, got {search!r}")
        self.client, self.search, self.breadth = client, search, breadth
        self.evaluate_samples, self.temperature, self.prune_below = evaluate_samples, temperature, prune_below
        self.max_states, self.max_tokens, self.seed = max_states, max_tokens, seed
        self.trace: list[dict] = []

    def expand(self, states: Sequence[State]) -> list[list[State]]:
        replies = self.client.complete([PROPOSE_PROMPT.format(numbers=s.left()) for s in states],
                                       Sampling(temperature=0.0, max_tokens=self.max_tokens, stop=["Input:"]))
        children = [proposals(s, r[0].text) for s, r in zip(states, replies)]
        self.trace.append({"kind": "propose", "states": [s.left() for s in states],
                           "replies": [r[0].text for r in replies], "children": [len(c) for c in children]})
        return children

    def value(self, states: Sequence[State]) -> None:
        """Set each state's value: by the rules when one number is left, else by the value prompt."""
        ask = [s for s in states if len(s.numbers) > 1]
        for s in states:
            if len(s.numbers) == 1:
                s.value = VALUE_SCORES["sure"] if s.numbers[0] == 24 else VALUE_SCORES["impossible"]
        if ask:
            n = self.evaluate_samples
            sampling = Sampling(temperature=self.temperature if n > 1 else 0.0, max_tokens=64, stop=["\n\n"],
                                seed=self.seed)
            replies = self.client.complete([VALUE_PROMPT.format(numbers=s.left()) for s in ask], sampling, n=n)
            for s, r in zip(ask, replies):
                s.value = sum(parse_value(c.text) for c in r)
            self.trace.append({"kind": "value", "states": [s.left() for s in ask],
                               "replies": [[c.text for c in r] for r in replies], "values": [s.value for s in ask]})

    def solve(self, puzzle: str) -> dict:
        self.trace = []
        root = State.start(puzzle)
        finals = self._bfs(root) if self.search == "bfs" else self._dfs(root)
        answers = [s.answer() for s in finals if s.answer() is not None]
        best = answers[0] if answers else None
        return {"puzzle": puzzle, "method": f"tot-{self.search}", "answer": best,
                "correct": best is not None and check_24(best, puzzle),
                "any_correct": any(check_24(a, puzzle) for a in answers),
                "steps": finals[0].steps if finals else [], "trace": self.trace}

    def _bfs(self, root: State) -> list[State]:
        frontier = [root]
        for _ in range(len(root.numbers) - 1):
            children, seen = [], set()
            for group in self.expand(frontier):
                for c in group:
                    if c.key() not in seen:
                        seen.add(c.key())
                        children.append(c)
            if not children:
                return []
            self.value(children)
            frontier = sorted(children, key=lambda s: -s.value)[:self.breadth]
            self.trace.append({"kind": "select", "kept": [[s.left(), s.value] for s in frontier]})
        return frontier

    def _dfs(self, root: State) -> list[State]:
        budget = [self.max_states]

        def visit(state: State) -> State | None:
            if len(state.numbers) == 1:
                return state if state.numbers[0] == 24 else None
            if budget[0] <= 0:
                return None
            budget[0] -= 1
            children = self.expand([state])[0]
            self.value(children)
            for child in children:
                if child.value < self.prune_below:
                    self.trace.append({"kind": "prune", "state": child.left(), "value": child.value})
            for child in sorted((c for c in children if c.value >= self.prune_below), key=lambda s: -s.value):
                found = visit(child)
                if found is not None:
                    return found
            return None

        found = visit(root)
        return [found] if found is not None else []


def cot_solve(client: ModelClient, puzzles: Sequence[str], max_tokens: int = 160) -> list[dict]:
    """Plain chain of thought (greedy, the same few-shot form): the "Answer:" line checked by check_24."""
    replies = client.complete([COT_PROMPT.format(numbers=p) for p in puzzles],
                              Sampling(temperature=0.0, max_tokens=max_tokens, stop=["Input:"]))
    out = []
    for p, r in zip(puzzles, replies):
        text = r[0].text
        line = next((x for x in reversed(text.splitlines()) if x.strip().lower().startswith("answer")), "")
        out.append({"puzzle": p, "method": "cot", "answer": line.split(":", 1)[1].strip() if ":" in line else None,
                    "correct": bool(line) and check_24(line, p), "reply": text})
    return out


def builtin_puzzles(ranks: str = TotCommand.ranks) -> list[str]:
    """Puzzles of the built-in list (prompting/data/game24.tsv, the paper's) by rank, "901-1000" or "1,5,7"."""
    from importlib import resources

    table = {}
    for line in resources.files("lmforge").joinpath("prompting/data/game24.tsv").read_text().splitlines():
        if line and not line.startswith("#"):
            rank, puzzle = line.split("\t")
            table[int(rank)] = puzzle
    wanted: list[int] = []
    for part in ranks.split(","):
        lo, _, hi = part.partition("-")
        wanted += range(int(lo), int(hi or lo) + 1)
    missing = [r for r in wanted if r not in table]
    if missing:
        from lmforge.config import ConfigError

        raise ConfigError(f"--ranks {ranks}: the built-in list has ranks 1-{max(table)}")
    return [table[r] for r in wanted]


def write_trace(path, rows: Sequence[dict]) -> None:
    """One JSON object a line: each puzzle's result (and its search trace)."""
    from lmforge.files import atomic_write

    with atomic_write(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
