"""Rewards for RL fine-tuning: what a completion earns, computed from its text and its record's other columns.

`--reward NAME[:ARG][:WEIGHT]` (several: summed with their weights; a trailing `:NUMBER` is the weight):

- `math[:COLUMN]`      1 when the completion's final answer equals the record's (COLUMN, default the first of
                       answer / solution / ground_truth / final_answer), else 0. The answer is the text after GSM8K's
                       `####`, else the last `\\boxed{...}` (MATH), else the last number; the reference is read the same
                       way. Numbers compare as numbers: "1,000" = "1000", "3.0" = "3", "3/4" = "\\frac{3}{4}" = "0.75".
- `format:REGEX`       1 when REGEX matches somewhere in the completion (Python `re.search`; anchor with ^ and $,
                       add (?s) to let . cross lines), else 0.
- `json_schema:FILE`   1 when the completion (or its ```json block) is JSON valid against the schema in FILE, else 0.
- `length:MIN-MAX`     1 for a completion of MIN..MAX characters (a CJK character counts one), falling linearly to 0
                       at 0 characters below and at 2 x MAX above.
- `python_tests[:COLUMN]`  the share of the record's tests (COLUMN, default `tests`: a string of code, or a list of
                       them, each one test) that pass when run after the completion's code (its last ```python block,
                       else all of it) in lmforge's sandbox (lmforge/sandbox.py: no files, no network, time and memory
                       limits). Model-written code never runs outside it.
- `model:DIR`          a reward model's score (`lmforge finetune --objective reward` trains one; any one-label
                       `*ForSequenceClassification` directory of a family lmforge loads, with its tokenizer and chat
                       template): the prompt as the user's turn and the completion as the assistant's.
- `FILE.py:FUNCTION`   your own: `FUNCTION(prompt, completion, **record) -> float | None`.

A reward returns a float, or None: "no opinion on this completion" (counted; a completion that every reward skips
takes no part in its group's baseline and gets advantage 0, as TRL does). A reward that raises is a RewardError naming
the record (file:line) and the reward.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from lmforge.config import ConfigError

ANSWER_COLUMNS = ("answer", "solution", "ground_truth", "final_answer")


class RewardError(ValueError):
    """A reward that failed on a record; the message names the record and the reward."""


@dataclass
class Reward:
    """One reward function and its weight. `fn(prompt, completion, record) -> float | None`."""

    name: str
    fn: Callable[[str, str, dict], float | None]
    weight: float = 1.0


# --- the --reward spec ------------------------------------------------------------------------------------------------

def _split_weight(spec: str) -> tuple[str, float]:
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return spec, 1.0


def parse_reward(spec: str) -> Reward:
    """A Reward from one `--reward` value; a bad spec is a ConfigError naming it."""
    body, weight = _split_weight(spec.strip())
    name, _, arg = body.partition(":")
    if not math.isfinite(weight):
        raise ConfigError(f"reward {spec!r}: the weight must be a finite number")
    if name == "math":
        return Reward(body, math_reward(arg or None), weight)
    if name == "format":
        if not arg:
            raise ConfigError(f"reward {spec!r}: format needs a regular expression (format:REGEX)")
        return Reward(body, format_reward(arg), weight)
    if name == "json_schema":
        return Reward(body, json_schema_reward(arg), weight)
    if name == "length":
        m = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", arg)
        if not m or int(m.group(1)) > int(m.group(2)) or int(m.group(2)) == 0:
            raise ConfigError(f"reward {spec!r}: length needs a range of characters, length:MIN-MAX (MIN <= MAX)")
        return Reward(body, length_reward(int(m.group(1)), int(m.group(2))), weight)
    if name == "python_tests":
        return Reward(body, python_tests_reward(arg or "tests"), weight)
    if name == "model":
        return Reward(body, model_reward(arg, spec), weight)
    if name.endswith(".py"):
        return Reward(body, function_reward(name, arg, spec), weight)
    raise ConfigError(f"reward {spec!r}: not one of math, format:REGEX, json_schema:FILE, length:MIN-MAX, "
                      "python_tests, model:DIR, FILE.py:FUNCTION")


def parse_rewards(specs: Sequence[str]) -> list[Reward]:
    if not specs:
        raise ConfigError("reward: RL needs at least one --reward (math, format:REGEX, json_schema:FILE, "
                          "length:MIN-MAX, python_tests, model:DIR, FILE.py:FUNCTION)")
    return [parse_reward(s) for s in specs]


def score(rewards: Sequence[Reward], prompts: Sequence[str], completions: Sequence[str], records: Sequence[dict],
          wheres: Sequence[str]) -> list[list[float | None]]:
    """rewards[k] of every completion: one row per completion, one column per reward (None: skipped)."""
    rows = []
    for prompt, completion, record, where in zip(prompts, completions, records, wheres):
        row = []
        for r in rewards:
            try:
                value = r.fn(prompt, completion, record)
            except (RewardError, ConfigError):
                raise
            except Exception as e:
                raise RewardError(f"{where}: reward {r.name} raised {type(e).__name__}: {e}") from e
            if value is not None:
                try:
                    value = float(value)
                except (TypeError, ValueError):
                    raise RewardError(f"{where}: reward {r.name} returned {value!r}, not a number or None") from None
                if not math.isfinite(value):
                    raise RewardError(f"{where}: reward {r.name} returned {value}")
            row.append(value)
        rows.append(row)
    return rows


# --- math ---------------------------------------------------------------------------------------------------------

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:\s*/\s*\d+)?|-?\.\d+")


def _boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (or \\fbox{...}), braces balanced."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, j = 1, i
    while j < len(text) and depth:
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        j += 1
    return text[i:j - 1] if depth == 0 else None


def extract_answer(text: str) -> str | None:
    """The final answer of a solution: after GSM8K's `####`, else the last \\boxed{}, else the last number."""
    text = unicodedata.normalize("NFKC", text)  # full-width digits and punctuation (Chinese text) -> ASCII
    if "####" in text:
        after = text.rsplit("####", 1)[1].strip()
        return after.splitlines()[0].strip() if after else None
    boxed = _boxed(text)
    if boxed is not None:
        return boxed.strip()
    numbers = _NUMBER.findall(text)
    return numbers[-1].strip() if numbers else None


def _as_number(text: str) -> Fraction | None:
    s = unicodedata.normalize("NFKC", text).strip()
    s = re.sub(r"\\text\{([^}]*)\}|\\mathrm\{([^}]*)\}", lambda m: m.group(1) or m.group(2) or "", s)
    s = s.replace("\\$", "").replace("$", "").replace("\\!", "").replace("\\,", "").replace("\\%", "").replace("%", "")
    s = s.strip().rstrip(".。").strip()
    m = re.fullmatch(r"(-?)\\d?frac\{([^{}]+)\}\{([^{}]+)\}", s)
    if m:
        s = f"{m.group(1)}{m.group(2)}/{m.group(3)}"
    s = s.replace(" ", "")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):  # thousands separators
        s = s.replace(",", "")
    try:
        if "/" in s:
            a, b = s.split("/")
            return Fraction(a) / Fraction(b)
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def answers_equal(predicted: str | None, reference: str | None) -> bool:
    """Numeric equality where both read as numbers (exact, as fractions), else equal text up to spaces."""
    if predicted is None or reference is None:
        return False
    a, b = _as_number(predicted), _as_number(reference)
    if a is not None and b is not None:
        return a == b
    def norm(s):
        return re.sub(r"\s+", "", unicodedata.normalize("NFKC", s)).rstrip(".。").lower()
    return norm(predicted) == norm(reference)


def math_reward(column: str | None = None) -> Callable:
    def reward(prompt: str, completion: str, record: dict) -> float:
        key = column or next((c for c in ANSWER_COLUMNS if c in record), None)
        if key is None or record.get(key) is None:
            raise RewardError(f"the math reward needs the reference answer: no {column or ' / '.join(ANSWER_COLUMNS)} "
                              f"field (name it with --reward math:COLUMN)")
        reference = str(record[key])
        return 1.0 if answers_equal(extract_answer(completion), extract_answer(reference) or reference) else 0.0
    return reward


# --- format, JSON schema, length ----------------------------------------------------------------------------------------

def format_reward(pattern: str) -> Callable:
    try:
        compiled = re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"reward format:{pattern}: not a regular expression ({e})") from None
    return lambda prompt, completion, record: 1.0 if compiled.search(completion) else 0.0


_JSON_BLOCK = re.compile(r"```(?:json)?\s*\n(.*?)```", re.DOTALL)


def json_schema_reward(path: str) -> Callable:
    if not path or not Path(path).is_file():
        raise ConfigError(f"reward json_schema:{path}: no such schema file")
    try:
        schema = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"reward json_schema:{path}: not JSON ({e})") from None
    try:
        import jsonschema
    except ImportError:
        raise ConfigError("reward json_schema needs the jsonschema package: pip install jsonschema") from None
    try:
        validator = jsonschema.validators.validator_for(schema)(schema)
        validator.check_schema(schema)
    except jsonschema.SchemaError as e:
        raise ConfigError(f"reward json_schema:{path}: not a valid JSON schema ({e.message})") from None

    def reward(prompt: str, completion: str, record: dict) -> float:
        blocks = _JSON_BLOCK.findall(completion)
        text = blocks[-1] if blocks else completion
        try:
            value = json.loads(text.strip())
        except json.JSONDecodeError:
            return 0.0
        return 1.0 if validator.is_valid(value) else 0.0
    return reward


def length_reward(low: int, high: int) -> Callable:
    def reward(prompt: str, completion: str, record: dict) -> float:
        n = len(completion.strip())
        if n < low:
            return n / low
        if n > high:
            return max(0.0, 1 - (n - high) / high)
        return 1.0
    return reward


# --- unit tests in the sandbox ------------------------------------------------------------------------------------

_CODE_BLOCK = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)
_SENTINEL = "__lmforge_tests_passed__"


def completion_code(completion: str) -> str:
    """The code of a completion: its last ```python block, else the whole text."""
    blocks = _CODE_BLOCK.findall(completion)
    return blocks[-1] if blocks else completion


def tests_program(code: str, tests: Sequence[str]) -> str:
    """The program the sandbox runs: the completion's code, then each test in its own try, then the passed count."""
    lines = [code, "", "_passed = 0"]
    for t in tests:
        lines.append("try:")
        lines.append(f"    exec(compile({t!r}, '<test>', 'exec'), globals())")
        lines.append("    _passed += 1")
        lines.append("except BaseException:")
        lines.append("    pass")
    lines.append(f"print({_SENTINEL!r}, _passed)")
    return "\n".join(lines)


def python_tests_reward(column: str = "tests", timeout: float = 10.0, memory_mb: int = 512) -> Callable:
    from lmforge.sandbox import Limits, SandboxUnavailable, run_python_code

    def reward(prompt: str, completion: str, record: dict) -> float:
        tests = record.get(column)
        if tests is None:
            raise RewardError(f"the python_tests reward needs the record's tests: no '{column}' field")
        tests = [tests] if isinstance(tests, str) else list(tests)
        if not tests or not all(isinstance(t, str) for t in tests):
            raise RewardError(f"field '{column}' is not a string of test code or a list of them")
        try:
            done = run_python_code(tests_program(completion_code(completion), tests),
                                   Limits(timeout=timeout, cpu_seconds=int(timeout), memory_mb=memory_mb))
        except SandboxUnavailable as e:
            raise ConfigError(f"reward python_tests: {e}") from None
        # the count is the last line the program prints; code that never reaches it (a syntax error, a timeout,
        # an exit) passes nothing
        found = re.findall(rf"^{_SENTINEL} (\d+)$", done.stdout, re.MULTILINE)
        return int(found[-1]) / len(tests) if found and not done.timed_out else 0.0
    return reward


# --- a reward model ---------------------------------------------------------------------------------------------------

def model_reward(directory: str, spec: str) -> Callable:
    import torch

    from lmforge.chat.render import encode_chat
    from lmforge.chat.templates import resolve_template
    from lmforge.model.heads import load_classifier
    from lmforge.tokenizer import load_tokenizer

    if not directory or not Path(directory).is_dir():
        raise ConfigError(f"reward {spec!r}: no model directory {directory!r} (model:DIR)")
    if not (Path(directory) / "tokenizer.json").exists():
        raise ConfigError(f"reward {spec!r}: {directory} has no tokenizer.json beside the reward model")
    model = load_classifier(directory)
    if model.task != "sequence" or len(model.labels) != 1:
        raise ConfigError(f"reward {spec!r}: {directory} is not a one-label sequence classifier (a reward model)")
    tokenizer = load_tokenizer(directory)
    template, _ = resolve_template(tokenizer, "model")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device).eval()
    limit = model.cfg.max_seq_len

    @torch.no_grad()
    def reward(prompt: str, completion: str, record: dict) -> float:
        ids = encode_chat(tokenizer, template, [{"role": "user", "content": prompt},
                                                {"role": "assistant", "content": completion}]).ids[-limit:]
        return float(model(torch.tensor([ids], device=device)).float()[0, 0])
    return reward


# --- your own function ------------------------------------------------------------------------------------------------

def function_reward(path: str, name: str, spec: str) -> Callable:
    if not name:
        raise ConfigError(f"reward {spec!r}: name the function, FILE.py:FUNCTION")
    if not Path(path).is_file():
        raise ConfigError(f"reward {spec!r}: no such file {path}")
    module_spec = importlib.util.spec_from_file_location(f"lmforge_reward_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)  # the user's own code, trusted as a config file is
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"reward {spec!r}: {path} has no function {name}")
    # the record's other columns as keywords (its own prompt / completion columns would clash with the arguments)
    return lambda prompt, completion, record: fn(prompt, completion, **{k: v for k, v in record.items()
                                                                        if k not in ("prompt", "completion")})
