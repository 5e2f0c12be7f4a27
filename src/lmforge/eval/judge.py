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

import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


class JudgeError(RuntimeError):
    """The endpoint could not be reached or answered with an error (the message says which and why)."""


@dataclass
class OpenAIClient:
    """A minimal OpenAI-compatible chat client over urllib (no SDK needed): POST {base_url}/chat/completions.
    Retries 429 and 5xx answers with exponential backoff (honouring Retry-After)."""

    base_url: str
    model: str = "default"
    api_key: str | None = None
    timeout: float = 120.0
    retries: int = 4
    extra: dict = field(default_factory=dict)  # more request fields (seed, top_p, ...)

    def chat(self, messages: list[dict], temperature: float = 0.0, max_tokens: int = 256) -> str:
        url = self.base_url.rstrip("/") + "/chat/completions"
        body = json.dumps({"model": self.model, "messages": messages, "temperature": temperature,
                           "max_tokens": max_tokens, **self.extra}).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        delay = 1.0
        for attempt in range(self.retries + 1):
            req = urllib.request.Request(url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    data = json.loads(resp.read().decode("utf-8"))
                return data["choices"][0]["message"]["content"] or ""
            except urllib.error.HTTPError as e:
                detail = e.read().decode("utf-8", "replace")[:300]
                if (e.code == 429 or e.code >= 500) and attempt < self.retries:
                    wait = float(e.headers.get("Retry-After") or delay)
                    time.sleep(min(wait, 30.0))
                    delay *= 2
                    continue
                raise JudgeError(f"{url}: HTTP {e.code}: {detail}") from None
            except urllib.error.URLError as e:
                raise JudgeError(f"{url}: cannot connect ({e.reason})") from None
            except (KeyError, IndexError, json.JSONDecodeError):
                raise JudgeError(f"{url}: the answer is not an OpenAI chat completion") from None
        raise JudgeError(f"{url}: still failing after {self.retries} retries")


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
