"""ReAct agents (Yao et al. 2022): Thought / Action / Observation steps with tools, over any ModelClient.

Two ways of calling tools:
  text    the model writes "Thought: ...\\nAction: NAME\\nAction Input: ..." (or "Final Answer: ..."); generation stops
          at "Observation:", the tool runs, and its result is appended as the observation. Works with any model.
  openai  OpenAI tool calling: the tools go to the model as definitions (the chat template renders them, or the
          endpoint does), calls come back as tool_calls and results go in as "tool" messages. The same agent runs
          against lmforge serve, a llama.cpp server or a hosted API.
Every run stops at max_steps, or when the model repeats an action with the same input `loop_limit` times (loop
detection); the trace (one JSON object per step) is returned and, with `trace_path`, written as JSONL.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lmforge.infer.client import ModelClient, Sampling
from lmforge.prompting.config import MAX_TOKENS, AgentCommand
from lmforge.prompting.tools import Tool, describe

REACT_PROMPT = """Answer the question as well as you can. You have these tools:
{tools}

Use this format:
Thought: what to do next
Action: one of [{names}]
Action Input: the input to the action
Observation: the action's result
... (Thought / Action / Action Input / Observation can repeat)
Thought: I now know the final answer
Final Answer: the answer to the question

Question: {question}
"""

_ACTION = re.compile(r"Action\s*:\s*(.+?)\s*\n+\s*Action\s*Input\s*:\s*(.*)", re.S)
_FINAL = re.compile(r"Final\s*Answer\s*:\s*(.*)", re.S)
_THOUGHT = re.compile(r"^\s*(?:Thought\s*:)?\s*(.*?)(?=\n\s*(?:Action|Final\s*Answer)\s*:|\Z)", re.S)


@dataclass
class Step:
    step: int
    thought: str = ""
    action: str | None = None
    input: str | dict | None = None
    observation: str | None = None
    final: str | None = None
    raw: str = ""


@dataclass
class AgentResult:
    answer: str | None
    stopped: str  # "final", "max_steps", "loop", "no_action"
    steps: list[Step] = field(default_factory=list)
    tokens: int = 0

    def trace(self) -> list[dict]:
        return [asdict(s) for s in self.steps]


def parse_react(text: str) -> tuple[str, str | None, str | None, str | None]:
    """(thought, action, action input, final answer) of one model turn."""
    thought = (_THOUGHT.match(text).group(1) if _THOUGHT.match(text) else "").strip()
    final = _FINAL.search(text)
    action = _ACTION.search(text)
    if final and (not action or final.start() < action.start()):
        return thought, None, None, final.group(1).strip()
    if action:
        value = action.group(2).strip()
        value = value.split("\nObservation", 1)[0].strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'`":
            value = value[1:-1]
        return thought, action.group(1).strip(), value, None
    return thought, None, None, None


class ReActAgent:
    def __init__(self, client: ModelClient, tools: list[Tool], mode: str = AgentCommand.mode,
                 max_steps: int = AgentCommand.max_steps,
                 loop_limit: int = 2, sampling: Sampling | None = None, prompt: str = REACT_PROMPT):
        if mode not in ("text", "openai"):
            raise ValueError(f"mode {mode!r}: text or openai")
        self.client, self.tools, self.mode = client, {t.name: t for t in tools}, mode
        self.max_steps, self.loop_limit, self.prompt = max_steps, loop_limit, prompt
        self.sampling = sampling or Sampling(temperature=0.0, max_tokens=MAX_TOKENS)

    def _observe(self, name: str | None, value) -> str:
        if name not in self.tools:
            return f"Error: unknown tool {name!r}; the tools are {', '.join(self.tools)}"
        return self.tools[name].run(value)

    def run(self, question: str, trace_path: str | Path | None = None) -> AgentResult:
        result = self._run_text(question) if self.mode == "text" else self._run_openai(question)
        if trace_path is not None:
            from lmforge.files import atomic_write

            with atomic_write(Path(trace_path)) as f:
                for row in result.trace():
                    f.write(json.dumps({"question": question, **row}, ensure_ascii=False) + "\n")
        return result

    def _loop(self, seen: dict, key) -> bool:
        seen[key] = seen.get(key, 0) + 1
        return seen[key] >= self.loop_limit

    def _run_text(self, question: str) -> AgentResult:
        tools = list(self.tools.values())
        base = self.prompt.format(tools=describe(tools), names=", ".join(self.tools), question=question)
        scratch, steps, seen, tokens = "", [], {}, 0
        s = Sampling(**{**asdict(self.sampling), "stop": sorted(set(self.sampling.stop) | {"\nObservation:",
                                                                                         "Observation:"})})
        for i in range(1, self.max_steps + 1):
            reply = self.client.complete([base + scratch], s)[0][0]
            tokens += reply.completion_tokens
            thought, action, value, final = parse_react(reply.text)
            step = Step(i, thought, action, value, raw=reply.text)
            steps.append(step)
            if final is not None:
                step.final = final
                return AgentResult(final, "final", steps, tokens)
            if action is None:
                return AgentResult(None, "no_action", steps, tokens)
            if self._loop(seen, (action, value)):
                step.observation = "(stopped: the same action and input again)"
                return AgentResult(None, "loop", steps, tokens)
            step.observation = self._observe(action, value)
            body = reply.text.rstrip()
            scratch += ("" if body.startswith("Thought") else "Thought: ") + body + \
                f"\nObservation: {step.observation}\n"
        return AgentResult(None, "max_steps", steps, tokens)

    def _run_openai(self, question: str) -> AgentResult:
        messages = [{"role": "user", "content": question}]
        defs = [t.openai() for t in self.tools.values()]
        steps, seen, tokens = [], {}, 0
        for i in range(1, self.max_steps + 1):
            reply = self.client.chat([messages], self.sampling, tools=defs)[0][0]
            tokens += reply.completion_tokens
            if not reply.tool_calls:
                steps.append(Step(i, "", final=reply.text.strip(), raw=reply.text))
                return AgentResult(reply.text.strip(), "final", steps, tokens)
            calls = [{"id": c.get("id") or f"call_{i}_{k}", "type": "function",
                      "function": {"name": c["name"], "arguments": c["arguments"]}}
                     for k, c in enumerate(reply.tool_calls)]
            messages.append({"role": "assistant", "content": reply.text or "", "tool_calls": calls})
            for c, call in zip(reply.tool_calls, calls):
                key = (c["name"], json.dumps(c["arguments"], sort_keys=True, ensure_ascii=False))
                step = Step(i, reply.text.strip(), c["name"], c["arguments"], raw=reply.text)
                steps.append(step)
                if self._loop(seen, key):
                    step.observation = "(stopped: the same call again)"
                    return AgentResult(None, "loop", steps, tokens)
                step.observation = self._observe(c["name"], c["arguments"])
                messages.append({"role": "tool", "tool_call_id": call["id"], "name": c["name"],
                                 "content": step.observation})
        return AgentResult(None, "max_steps", steps, tokens)
