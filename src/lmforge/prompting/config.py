"""The settings of `lmforge prompt cot | agent | auto-cot | eval | tot | chain`: one dataclass per command, its
flags built from it (config.py's `add_config_args`, so `--config FILE` too) and its defaults the library's own
(reasoning.py, agent.py, tot.py and chain.py take their keyword defaults from here). Apart from the code that runs
them so that the CLI builds its flags at start-up without loading it. The model's own options (a directory or an
endpoint, --max-tokens, --seed, --json) are infer/client.py's `add_client_args`, not part of these."""

from __future__ import annotations

from dataclasses import dataclass, field

#: tokens a reply may take at most: the commands' --max-tokens default and the library's (CoT, self-consistency,
#: agents, chain steps)
MAX_TOKENS = 256
#: the methods `lmforge prompt eval` compares (prompting/reasoning.py `compare_methods`)
METHODS = ("greedy", "cot", "self-consistency")


def _at_least(n: int):
    return (lambda v: v >= n, f">= {n}")


@dataclass
class CotCommand:
    """`lmforge prompt cot`: one question answered by chain of thought, or by self-consistency's vote."""

    question: str = field(default="", metadata={"help": "the question", "required": True})
    demos: str | None = field(default=None, metadata={"help": "few-shot CoT demonstrations (question, rationale)",
                                                      "metavar": "FILE.jsonl"})
    samples: int = field(default=1, metadata={"help": "sampled chains for self-consistency (1: greedy CoT)",
                                              "check": _at_least(1)})
    temperature: float = field(default=0.7, metadata={"help": "self-consistency's sampling temperature"})
    rule: str = field(default="number", metadata={"help": "answer extraction: number, letter, text, regex:PATTERN"})


@dataclass
class AgentCommand:
    """`lmforge prompt agent`: a ReAct agent with tools (prompting/agent.py)."""

    question: str = field(default="", metadata={"help": "the question", "required": True})
    tools: str = field(default="calculator", metadata={
        "help": "calculator, python, search:INDEX_DIR (comma-separated)"})
    tool_module: list[str] = field(default_factory=list, metadata={
        "help": "your own tools: functions of one string argument (module or file.py; repeatable)", "append": True,
        "metavar": "MODULE:FN[,FN]"})
    mode: str = field(default="text", metadata={
        "help": "text: Thought/Action/Observation lines; openai: the API's tool calling", "choices": ["text", "openai"]})
    max_steps: int = field(default=8, metadata={"help": "model turns at most before the agent gives up",
                                                "check": _at_least(1)})
    trace: str | None = field(default=None, metadata={"help": "write every step here", "metavar": "FILE.jsonl"})


@dataclass
class AutoCotCommand:
    """`lmforge prompt auto-cot`: Auto-CoT demonstrations built from questions (prompting/reasoning.py)."""

    questions: str = field(default="", metadata={"help": "records with a 'question' field", "required": True,
                                                 "metavar": "FILE.jsonl"})
    clusters: int = field(default=8, metadata={"help": "question clusters: one demonstration from each",
                                               "check": _at_least(1)})
    out: str = field(default="", metadata={"help": "the demonstrations (use with --demos)", "required": True,
                                           "metavar": "FILE.jsonl"})


@dataclass
class EvalCommand:
    """`lmforge prompt eval`: GSM8K-style accuracy of greedy answers, CoT and self-consistency."""

    data: str = field(default="", metadata={"help": "GSM8K jsonl (question, answer '... #### N')", "required": True,
                                            "metavar": "FILE.jsonl"})
    methods: str = field(default=",".join(METHODS), metadata={"help": "the methods compared (comma-separated)"})
    demos: str | None = field(default=None, metadata={"help": "few-shot CoT demonstrations (question, rationale)",
                                                      "metavar": "FILE.jsonl"})
    samples: int = field(default=5, metadata={"help": "self-consistency: chains per question",
                                              "check": _at_least(1)})
    temperature: float = field(default=0.7, metadata={"help": "self-consistency's sampling temperature"})
    limit: int = field(default=0, metadata={"help": "the first N questions only (0: all)"})
    out: str | None = field(default=None, metadata={"help": "write the per-question predictions too",
                                                    "metavar": "FILE.json"})


@dataclass
class TotCommand:
    """`lmforge prompt tot`: Tree of Thoughts on the Game of 24 (prompting/tot.py)."""

    puzzle: str | None = field(default=None, metadata={
        "help": "one puzzle, four numbers (default: the built-in list, --ranks)"})
    ranks: str = field(default="901-1000", metadata={"help": "built-in puzzles by rank: 901-1000, or 901,905"})
    search: str = field(default="bfs", metadata={"help": "breadth-first (--breadth) or depth-first (--max-states)",
                                                 "choices": ["bfs", "dfs"]})
    breadth: int = field(default=5, metadata={"help": "BFS: states kept after each step (the paper's b)",
                                              "check": _at_least(1)})
    evaluate_samples: int = field(default=1, metadata={
        "help": "value replies per state (the paper: 3, sampled); 1 is greedy", "check": _at_least(1)})
    temperature: float = field(default=0.7, metadata={"help": "sampling temperature of the value replies (n > 1)"})
    max_states: int = field(default=30, metadata={"help": "DFS: states expanded at most per puzzle",
                                                  "check": _at_least(1)})
    compare_cot: bool = field(default=False, metadata={"help": "also solve each puzzle by plain chain of thought"})
    trace: str | None = field(default=None, metadata={"help": "write every puzzle's result and search trace here",
                                                      "metavar": "FILE.jsonl"})


@dataclass
class ChainCommand:
    """`lmforge prompt chain`: a prompt chain over a JSONL of inputs (prompting/chain.py); the chain file itself is
    the command's positional argument."""

    inputs: str = field(default="", metadata={"help": "one JSON object a line: the variables", "required": True,
                                              "metavar": "FILE.jsonl"})
    out: str = field(default="", metadata={"help": "each input plus one field per step", "required": True,
                                           "metavar": "FILE.jsonl"})
    batch_size: int = field(default=16, metadata={"help": "records per batch (model steps: one request each)",
                                                  "check": _at_least(1)})
