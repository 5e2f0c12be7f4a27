"""Rewards (finetune/rewards.py): hand-worked cases, GSM8K's and MATH's own answer formats, Chinese text."""

from __future__ import annotations

import json

import pytest

from lmforge.config import ConfigError
from lmforge.finetune.rewards import (
    RewardError,
    answers_equal,
    extract_answer,
    parse_reward,
    parse_rewards,
    python_tests_reward,
    score,
)


def value(spec: str, completion: str, record: dict | None = None, prompt: str = "q") -> float | None:
    return parse_reward(spec).fn(prompt, completion, record or {})


# a GSM8K train record as it ships (openai/grade-school-math, train.jsonl line 1)
GSM8K = {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips to her "
                     "friends in May. How many clips did Natalia sell altogether in April and May?",
         "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
                   "altogether in April and May.\n#### 72"}


def test_answer_extraction_gsm8k_boxed_last_number():
    assert extract_answer(GSM8K["answer"]) == "72"
    assert extract_answer("so x = \\boxed{\\frac{3}{4}} and we are done, 17") == "\\frac{3}{4}"
    assert extract_answer("nested \\boxed{2^{10}} here") == "2^{10}"
    assert extract_answer("First 12 apples, then 30 more: 42 in all.") == "42"
    assert extract_answer("答案是４２。") == "42"  # full-width digits in Chinese text
    assert extract_answer("总共卖了 1,000 个") == "1,000"
    assert extract_answer("no number here") is None


@pytest.mark.parametrize("a,b,equal", [
    ("1,000", "1000", True), ("3.0", "3", True), ("3/4", "0.75", True), ("\\frac{3}{4}", "0.75", True),
    ("\\dfrac{6}{8}", "3/4", True), ("$18", "18", True), ("50%", "50", True), ("72.", "72", True),
    ("-5", "5", False), ("0.1", "1/10", True), ("1,000.5", "1000.5", True), ("3.01", "3", False),
    ("x^2", "x^2", True), ("x^2", "x^3", False), ("7。", "7", True)])
def test_numeric_equality(a, b, equal):
    assert answers_equal(a, b) is equal


def test_math_reward_on_gsm8k_records():
    assert value("math", "48 + 24 = 72\n#### 72", GSM8K) == 1.0
    assert value("math", "She sold 72 clips.", GSM8K) == 1.0  # the last number
    assert value("math", "The answer is \\boxed{72}.", GSM8K) == 1.0
    assert value("math", "She sold 70 clips, I think.", GSM8K) == 0.0
    assert value("math", "纳塔莉亚一共卖了七十二个", GSM8K) == 0.0  # no number: no answer
    assert value("math", "答：一共卖了 72 个夹子。", GSM8K) == 1.0
    # MATH's solutions: the reference inside \boxed
    assert value("math", "\\boxed{0.5}", {"solution": "Hence the probability is $\\boxed{\\frac{1}{2}}$."}) == 1.0
    assert value("math:final", "7", {"final": "7", "answer": "8"}) == 1.0  # an explicit column
    with pytest.raises(RewardError, match="answer"):
        value("math", "72", {"question": "no reference"})


def test_format_length_and_weights():
    r = parse_reward(r"format:^<think>.*</think>")
    assert r.weight == 1.0 and r.fn("", "<think>hm</think> 4", {}) == 1.0 and r.fn("", "4 <think>x</think>", {}) == 0.0
    r = parse_reward(r"format:\d+:0.5")  # a trailing :NUMBER is the weight
    assert r.weight == 0.5 and r.name == r"format:\d+" and r.fn("", "a1", {}) == 1.0
    assert value("format:答案", "答案：72") == 1.0
    # length in characters: inside 4..8 -> 1; 2 chars -> 2/4; 12 chars -> 1 - 4/8; 16 or more -> 0
    assert value("length:4-8", "你好世界") == 1.0
    assert value("length:4-8", "ab") == 0.5
    assert value("length:4-8", "x" * 12) == 0.5
    assert value("length:4-8", "x" * 20) == 0.0
    assert parse_reward("math:2").weight == 2.0 and parse_reward("math:2").name == "math"
    for bad in ("format", "format:(", "length:9-3", "nothing", "json_schema:/no/such.json"):
        with pytest.raises(ConfigError):
            parse_reward(bad)
    with pytest.raises(ConfigError, match="at least one"):
        parse_rewards([])


def test_json_schema(tmp_path):
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"城市": {"type": "string"}, "n": {"type": "integer"}},
                                  "required": ["城市", "n"]}), encoding="utf-8")
    spec = f"json_schema:{schema}"
    assert value(spec, '{"城市": "北京", "n": 3}') == 1.0
    assert value(spec, 'Here it is:\n```json\n{"城市": "上海", "n": 1}\n```') == 1.0
    assert value(spec, '{"城市": "北京", "n": "3"}') == 0.0  # n is not an integer
    assert value(spec, '{"城市": "北京"') == 0.0  # not JSON


def test_python_tests_in_the_sandbox():
    record = {"tests": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add('a', 'b') == 'ab'"]}
    good = "Here:\n```python\ndef add(a, b):\n    return a + b\n```"
    assert value("python_tests", good, record) == 1.0
    # numbers only: the first two tests pass, the strings' one fails
    assert value("python_tests", "def add(a, b):\n    return a + b if isinstance(a, int) else None",
                 record) == pytest.approx(2 / 3)
    assert value("python_tests", "def add(a, b) return", record) == 0.0  # a syntax error passes nothing
    quick = python_tests_reward("tests", timeout=2)
    assert quick("q", "while True: pass", {"tests": "assert True"}) == 0.0  # stopped by the time limit
    # the sandbox: the completion cannot read the user's files, so a test that needs them fails
    assert value("python_tests", "import os\nhome = os.path.exists('/etc/passwd')", {"tests": "assert home"}) == 0.0
    with pytest.raises(RewardError, match="tests"):
        value("python_tests", good, {})


def test_function_reward_and_errors_name_the_record(tmp_path):
    (tmp_path / "r.py").write_text(
        "def chinese_share(prompt, completion, lang=None, **record):\n"
        "    if lang is None:\n        return None\n"
        "    return sum('\\u4e00' <= c <= '\\u9fff' for c in completion) / max(len(completion), 1)\n"
        "def broken(prompt, completion, **record):\n    return 1 / 0\n", encoding="utf-8")
    rewards = parse_rewards([f"{tmp_path / 'r.py'}:chinese_share:2", "format:^你"])
    rows = score(rewards, ["p", "p"], ["你好ab", "hello"], [{"lang": "zh"}, {}], ["d.jsonl:1", "d.jsonl:2"])
    assert rows == [[0.5, 1.0], [None, 0.0]] and rewards[0].weight == 2.0
    broken = parse_rewards([f"{tmp_path / 'r.py'}:broken"])
    with pytest.raises(RewardError, match=r"d.jsonl:7: reward .*broken raised ZeroDivisionError"):
        score(broken, ["p"], ["c"], [{}], ["d.jsonl:7"])
    with pytest.raises(ConfigError, match="no function"):
        parse_reward(f"{tmp_path / 'r.py'}:missing")
