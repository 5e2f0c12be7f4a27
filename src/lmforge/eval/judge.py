"""LLM-as-judge through any OpenAI-compatible endpoint (lmforge serve, a llama.cpp or vLLM server, a hosted API).

  pointwise  the judge scores each response 0-100 against the reference answer, with the prompt of Raschka's
             "Build a Large Language Model (From Scratch)" (chapter 7): "Given the input ... and correct output ...,
             score the model response ... on a scale from 0 to 100, where 100 is the best score. Respond with the
             integer number only."
  pairwise   the judge picks the better of two responses, asked twice with the order swapped; a side wins only when
             both orders agree (position bias cancels: a judge that always says "A" gives ties, not a winner)

Every raw reply is kept (judge.jsonl), and a reply with no usable verdict is counted, never guessed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path


class JudgeError(RuntimeError):
    """The endpoint could not be reached or answered with an error (the message says which and why)."""


@dataclass
class OpenAIClient:
    """The judge's endpoint: one chat turn in, the reply's text out, through infer/client.py's HTTPClient (the one
    OpenAI-compatible client: retries 429 and 5xx answers with exponential backoff, honouring Retry-After). Nothing
    listening at `base_url` fails at once, without retries; every failure is a JudgeError."""

    base_url: str
    model: str = "default"
    api_key: str | None = None
    timeout: float = 120.0  # seconds per request
    retries: int = 4

    def chat(self, messages: list[dict], temperature: float = 0.0, max_tokens: int = 256) -> str:
        from lmforge.infer.client import ClientError, HTTPClient, Sampling

        client = HTTPClient(self.base_url, self.model, self.api_key, timeout=self.timeout, concurrency=1,
                            retries=self.retries, retry_connect=False)
        try:
            (choices,) = client.chat([messages], Sampling(temperature=temperature, max_tokens=max_tokens))
        except ClientError as e:
            raise JudgeError(str(e)) from None
        if not choices:
            raise JudgeError(f"{client.base_url}: the answer is not an OpenAI chat completion (no choices)")
        return choices[0].text


def read_judge_records(path: str | Path) -> list[dict]:
    """Alpaca-style records to judge (instruction, input (optional), output: the reference answer), each with its
    line number as `_line`; errors name the file and line (TaskError)."""
    from lmforge.eval.tasks import TaskError, read_jsonl

    if not Path(path).is_file():
        raise TaskError(f"{path}: no such file")
    rows = read_jsonl(Path(path))
    for row in rows:
        if not isinstance(row.get("instruction"), str) or "output" not in row:
            raise TaskError(f"{path}:{row.get('_line', '?')}: a judge record is alpaca-style: instruction, input "
                            "(optional), output")
    return rows


def recorded_responses(entries: Sequence[dict], field_name: str, path: str | Path) -> list[str]:
    """The responses to judge from a field of the records (a missing one names its line)."""
    from lmforge.eval.tasks import TaskError

    missing = [e["_line"] for e in entries if not isinstance(e.get(field_name), str)]
    if missing:
        raise TaskError(f"{path}:{missing[0]}: no {field_name!r} field to judge (name it with --response-field, or "
                        "generate responses with --model DIR)")
    return [e[field_name] for e in entries]


def generate_responses(client, entries: Sequence[dict], max_tokens: int = 256) -> list[str]:
    """Greedy responses of a model client (infer/client.py) to the records: the record as the book formats it, in
    one user turn of the model's chat template, or, for a model without a template, followed by alpaca's
    "### Response:" header as plain text; stripped of surrounding whitespace."""
    from lmforge.infer.client import Sampling

    plain = getattr(client, "template", "") is None
    turns = [format_input(e) + ("\n\n### Response:\n" if plain else "") for e in entries]
    replies = client.complete(turns, Sampling(temperature=0.0, max_tokens=max_tokens))
    return [choices[0].text.strip() for choices in replies]

def format_input(entry: dict) -> str:
    """An alpaca record as the book formats it for the judge (instruction, then the input if any)."""
    text = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
            f"request.\n\n### Instruction:\n{entry['instruction']}")
    if entry.get("input"):
        text += f"\n\n### Input:\n{entry['input']}"
    return text


def pointwise_prompt(entry: dict, response: str) -> str:
    return (f"Given the input `{format_input(entry)}` and correct output `{entry['output']}`, score the model "
            f"response `{response}` on a scale from 0 to 100, where 100 is the best score. Respond with the integer "
            "number only.")


def pairwise_prompt(entry: dict, first: str, second: str) -> str:
    return (f"Given the input `{format_input(entry)}` and the reference answer `{entry['output']}`, which response "
            f"is better?\n\nResponse A: `{first}`\n\nResponse B: `{second}`\n\nAnswer with the single letter A or B, "
            "or the word tie if they are equally good.")


_SCORE = re.compile(r"\b(100|[0-9]{1,2})\b")
_VERDICT = re.compile(r"\b(A|B|tie)\b", re.IGNORECASE)


def parse_score(reply: str) -> int | None:
    m = _SCORE.search(reply)
    return int(m.group(1)) if m else None


def parse_verdict(reply: str) -> str | None:
    m = _VERDICT.search(reply.strip())
    if not m:
        return None
    v = m.group(1)
    return "tie" if v.lower() == "tie" else v.upper()


def judge_pointwise(client: OpenAIClient, entries: Sequence[dict], responses: Sequence[str],
                    progress: Callable[[int], None] | None = None) -> tuple[dict, list[dict]]:
    """(summary, rows): mean score over the replies that held one, how many did not, and every raw reply."""
    rows, scores = [], []
    for entry, response in zip(entries, responses):
        prompt = pointwise_prompt(entry, response)
        reply = client.chat([{"role": "user", "content": prompt}])
        score = parse_score(reply)
        if score is not None:
            scores.append(score)
        rows.append({"instruction": entry["instruction"], "response": response, "prompt": prompt, "reply": reply,
                     "score": score})
        if progress:
            progress(1)
    return {"mean_score": sum(scores) / len(scores) if scores else float("nan"), "scored": len(scores),
            "unparsed": len(rows) - len(scores), "n": len(rows)}, rows


def judge_pairwise(client: OpenAIClient, entries: Sequence[dict], a: Sequence[str], b: Sequence[str],
                   progress: Callable[[int], None] | None = None) -> tuple[dict, list[dict]]:
    """Each pair asked as (a, b) and as (b, a). Outcome per item: "a", "b", "tie" (the orders disagree or the
    judge said tie) or "unparsed"; win rates exclude unparsed items."""
    rows, counts = [], {"a": 0, "b": 0, "tie": 0, "unparsed": 0}
    consistent = 0
    for entry, ra, rb in zip(entries, a, b):
        first = client.chat([{"role": "user", "content": pairwise_prompt(entry, ra, rb)}])
        second = client.chat([{"role": "user", "content": pairwise_prompt(entry, rb, ra)}])
        v1, v2 = parse_verdict(first), parse_verdict(second)
        if v1 is None or v2 is None:
            outcome = "unparsed"
        else:
            # map both verdicts onto the systems: in the swapped order "A" means b
            s1 = {"A": "a", "B": "b", "tie": "tie"}[v1]
            s2 = {"A": "b", "B": "a", "tie": "tie"}[v2]
            outcome = s1 if s1 == s2 else "tie"
            consistent += s1 == s2
        counts[outcome] += 1
        rows.append({"instruction": entry["instruction"], "a": ra, "b": rb, "reply_ab": first, "reply_ba": second,
                     "outcome": outcome})
        if progress:
            progress(1)
    decided = len(rows) - counts["unparsed"]
    return {"win_rate_a": counts["a"] / decided if decided else float("nan"),
            "win_rate_b": counts["b"] / decided if decided else float("nan"),
            "tie_rate": counts["tie"] / decided if decided else float("nan"),
            "position_consistency": consistent / decided if decided else float("nan"), **counts,
            "n": len(rows)}, rows
