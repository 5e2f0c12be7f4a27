"""Prompt chains: steps whose outputs feed later templates, run over a JSONL of inputs with resumable output.

A chain file (YAML or JSON):

    steps:
      - name: passages                    # a retrieval step: the top k passages of an lmforge index, numbered
        retrieve: runs/index
        query: "{question}"
        k: 3
      - name: draft                       # a model step: the template filled from the input and earlier steps
        prompt: "Sources:\\n{passages}\\n\\nAnswer briefly: {question}"
        max_tokens: 128
      - name: check                       # a tool step: calculator or python, its input a template
        tool: calculator
        input: "{expression}"

Every step has a `name` (a Python identifier, unique, not a field of the inputs) and exactly one of `prompt`,
`retrieve`, `tool`. Templates use `{name}` for an input field or an earlier step's output (`{{` `}}` for braces).
Model steps are greedy unless `temperature` is set; `stop` lists stop strings. Each input record comes out as
itself plus one field per step; records are written in order as each batch finishes, so a run that stops can be run
again with the same --out and goes on after the last record written.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.config import ConfigError
from lmforge.infer.client import ModelClient, Sampling
from lmforge.prompting.config import MAX_TOKENS, ChainCommand
from lmforge.prompting.fewshot import PromptTemplate

_STEP_KEYS = {"name", "prompt", "retrieve", "tool", "query", "input", "k", "mode", "max_tokens", "temperature", "stop"}


@dataclass
class Step:
    name: str
    kind: str  # prompt | retrieve | tool
    template: PromptTemplate
    target: str = ""  # retrieve: the index; tool: the tool's name
    k: int = 3
    mode: str | None = None
    sampling: Sampling = field(default_factory=Sampling)


@dataclass
class Chain:
    steps: list[Step]
    source: str = "chain"

    @classmethod
    def load(cls, path: str | Path) -> Chain:
        import yaml

        where = str(path)
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except OSError as e:
            raise ConfigError(f"{where}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{where}: not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(data, dict) or not isinstance(data.get("steps"), list) or not data["steps"]:
            raise ConfigError(f"{where}: expected a mapping with a non-empty list under 'steps'")
        return cls.from_list(data["steps"], where)

    @classmethod
    def from_list(cls, raw: Sequence[dict], where: str = "chain") -> Chain:
        steps: list[Step] = []
        for i, r in enumerate(raw, 1):
            at = f"{where}: step {i}"
            if not isinstance(r, dict):
                raise ConfigError(f"{at}: expected a mapping")
            name = r.get("name")
            if not isinstance(name, str) or not name.isidentifier():
                raise ConfigError(f"{at}: 'name' must be a Python identifier, got {name!r}")
            at = f"{where}: step {name!r}"
            unknown = sorted(set(r) - _STEP_KEYS)
            if unknown:
                raise ConfigError(f"{at}: unknown key {unknown[0]!r} (keys: {', '.join(sorted(_STEP_KEYS))})")
            if name in {s.name for s in steps}:
                raise ConfigError(f"{at}: the name is used by an earlier step")
            kinds = [k for k in ("prompt", "retrieve", "tool") if k in r]
            if len(kinds) != 1:
                raise ConfigError(f"{at}: needs exactly one of 'prompt', 'retrieve', 'tool'")
            kind = kinds[0]
            try:
                if kind == "prompt":
                    step = Step(name, kind, PromptTemplate(str(r["prompt"])), sampling=Sampling(
                        temperature=float(r.get("temperature", 0.0)), max_tokens=int(r.get("max_tokens", MAX_TOKENS)),
                        stop=list(r.get("stop", []))))
                elif kind == "retrieve":
                    if "query" not in r:
                        raise ConfigError(f"{at}: a retrieve step needs 'query' (a template)")
                    step = Step(name, kind, PromptTemplate(str(r["query"])), str(r["retrieve"]), int(r.get("k", 3)),
                                r.get("mode"))
                else:
                    if r["tool"] not in ("calculator", "python"):
                        raise ConfigError(f"{at}: tool {r['tool']!r} is not calculator or python")
                    if "input" not in r:
                        raise ConfigError(f"{at}: a tool step needs 'input' (a template)")
                    step = Step(name, kind, PromptTemplate(str(r["input"])), str(r["tool"]))
            except ConfigError as e:
                raise ConfigError(str(e) if str(e).startswith(where) else f"{at}: {e}") from None
            except (TypeError, ValueError) as e:
                raise ConfigError(f"{at}: {e}") from None
            earlier = {s.name for s in steps}
            later = [v for v in step.template.variables if v in {x.get("name") for x in raw[i:]} - earlier]
            if later:
                raise ConfigError(f"{at}: uses {{{later[0]}}}, the output of a later step")
            steps.append(step)
        return cls(steps, where)

    def run(self, client: ModelClient | None, records: Sequence[dict], where: str = "input") -> list[dict]:
        """Every step over `records` (a batch): model steps as one batched request each. Returns the records with
        one field per step."""
        names = {s.name for s in self.steps}
        for r in records:
            clash = sorted(names & set(r))
            if clash:
                raise ConfigError(f"{where}:{r.get('_line', '?')}: the input has a field {clash[0]!r}, the name of "
                                  "a chain step")
        out = [dict(r) for r in records]
        for step in self.steps:
            texts = []
            for r in out:
                try:
                    texts.append(step.template.format(**r))
                except ConfigError as e:
                    raise ConfigError(f"{where}:{r.get('_line', '?')}: step {step.name!r}: {e}") from None
            if step.kind == "prompt":
                if client is None:
                    raise ConfigError(f"{self.source}: step {step.name!r} needs a model (--model or --endpoint)")
                results = [c[0].text.strip() for c in client.complete(texts, step.sampling)]
            else:  # retrieve / tool: one call per record
                tool = self._tool(step)
                results = [tool.run(t) for t in texts]
            for r, value in zip(out, results):
                r[step.name] = value
        return out

    def _tool(self, step: Step):
        from lmforge.prompting import tools

        cache = self.__dict__.setdefault("_tools", {})
        if step.name not in cache:
            if step.kind == "retrieve":
                cache[step.name] = tools.search_tool(step.target, step.k, step.mode)
            else:
                cache[step.name] = tools.calculator_tool() if step.target == "calculator" else tools.python_tool()
        return cache[step.name]


def read_inputs(path: str | Path) -> Iterator[dict]:
    """Input records (JSON objects, one a line) with their line number as `_line`."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{lineno}: malformed JSON: {e.msg}") from None
            if not isinstance(r, dict):
                raise ConfigError(f"{path}:{lineno}: expected a JSON object")
            yield {**r, "_line": lineno}


def run_chain(chain: Chain, client: ModelClient | None, inputs: str | Path, out: str | Path,
              batch_size: int = ChainCommand.batch_size) -> dict:
    """Run the chain over every input record not yet in `out` (resuming after its last complete line)."""
    out = Path(out)
    done: set[int] = set()
    if out.exists():
        lines = out.read_text(encoding="utf-8").splitlines(keepends=True)
        keep = []
        for line in lines:
            try:
                done.add(json.loads(line)["_line"])
                keep.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):
                break  # a line cut by a crash mid-write: it and anything after it is run again
        if len(keep) != len(lines):
            out.write_text("".join(keep), encoding="utf-8")
    todo = [r for r in read_inputs(inputs) if r["_line"] not in done]
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a", encoding="utf-8") as f:
        for start in range(0, len(todo), batch_size):
            for r in chain.run(client, todo[start:start + batch_size], str(inputs)):
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
            f.flush()
    return {"done": len(todo), "skipped": len(done), "out": str(out)}
