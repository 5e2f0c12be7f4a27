"""The settings of `lmforge eval run | judge | contamination` and the evaluation run directory, apart from the
scoring code so that the CLI builds its flags from them without torch (config.py's `add_config_args`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lmforge.train.config import RunDirectoryError


@dataclass
class EvalRunConfig:
    """`lmforge eval run`: benchmark tasks scored on one model (the model's own options: infer/load.py)."""

    task: list[str] = field(default_factory=list, metadata={
        "help": "arc_easy, arc_challenge, hellaswag, mmlu, ceval, cmmlu, gsm8k, or a TASK.yaml (repeatable)",
        "append": True, "required": True})
    data: list[str] = field(default_factory=list, metadata={
        "help": "the task's file or directory, in its original format (one per --task, in order)", "append": True,
        "metavar": "FILE|DIR"})
    shots: int | None = field(default=None, metadata={
        "help": "few-shot examples (default: the task's, 0 for built-ins)"})
    shots_data: str | None = field(default=None, metadata={
        "help": "where few-shot examples come from (default: the task's dev split beside --data)",
        "metavar": "FILE|DIR"})
    limit: int | None = field(default=None, metadata={"help": "the first N items only"})
    batch_tokens: int = field(default=8192, metadata={"help": "context tokens per scoring batch"})
    temperature: float = field(default=0.0, metadata={"help": "generation tasks: 0 = greedy"})
    seed: int = field(default=0, metadata={"help": "generation tasks: sampling seed"})
    format: str = field(default="plain", metadata={
        "help": "prompt format: lm-eval's plain text (comparable with published scores), or through the model's chat "
                "template with few-shot examples in one turn or as turns",
        "choices": ["plain", "chat", "chat-multiturn"]})
    format_sweep: bool = field(default=False, metadata={
        "help": "also score every format and report the spread between them (how much is format)"})
    out: str | None = field(default=None, metadata={"help": "run directory (default runs/eval/MODEL-TASK)",
                                                     "metavar": "DIR"})
    overwrite: bool = field(default=False, metadata={"help": "replace an earlier evaluation in --out"})

    def __post_init__(self):
        if len(self.data) > len(self.task):
            raise ValueError(f"{len(self.data)} --data for {len(self.task)} --task: give one --data per task, in "
                             "order")


@dataclass
class JudgeConfig:
    """`lmforge eval judge`: LLM-as-judge through an OpenAI-compatible endpoint (eval/judge.py); the responses come
    from a field of the records or from a local model (`--model`, infer/load.py's options)."""

    data: str = field(default="", metadata={
        "help": "alpaca jsonl: instruction, input, output (the reference answer)", "required": True})
    response_field: str = field(default="model_response", metadata={
        "help": "the field holding the response to judge"})
    against: str | None = field(default=None, metadata={
        "help": "pairwise: a second file of responses (same items, in order)", "metavar": "FILE"})
    against_field: str = field(default="model_response", metadata={
        "help": "the field of --against's records holding its responses"})
    against_model: str | None = field(default=None, metadata={
        "help": "pairwise: generate the second responses with this model", "metavar": "DIR"})
    max_new_tokens: int = field(default=256, metadata={"help": "--model / --against-model: reply length"})
    endpoint: str = field(default="", metadata={"help": "the judge's OpenAI-compatible base URL (.../v1)",
                                                "required": True})
    judge_model: str = field(default="default", metadata={"help": "the model name sent to the endpoint"})
    api_key: str | None = field(default=None, metadata={"help": "bearer key (default: $OPENAI_API_KEY)"})
    out: str = field(default="", metadata={"help": "judge.jsonl (raw replies) and judge_summary.json",
                                           "metavar": "DIR", "required": True})

    @property
    def pairwise(self) -> bool:
        return bool(self.against or self.against_model)


@dataclass
class ContaminationConfig:
    """`lmforge eval contamination`: benchmark n-grams in a training corpus (eval/contamination.py)."""

    corpus: list[str] = field(default_factory=list, metadata={
        "help": "training files or folders (any format lmforge data reads)", "required": True,
        "metavar": "CORPUS"})
    task: str = field(default="", metadata={"help": "a built-in task or TASK.yaml", "required": True})
    data: str | None = field(default=None, metadata={"help": "the task's file or directory"})
    text_field: str = field(default="text", metadata={"help": "the text field of jsonl / parquet corpus records"})
    ngram: int = field(default=13, metadata={"help": "n-gram length in words (characters for Chinese items)"})
    threshold: float = field(default=0.5, metadata={"help": "share of an item's n-grams that flags it"})
    out: str | None = field(default=None, metadata={"help": "write contamination.json there", "metavar": "DIR"})


def eval_run_directory(out: str | None, model: str, tasks: str, overwrite: bool) -> Path:
    """Where `eval run` writes: `out`, else runs/eval/MODEL-TASKS (MODEL: the model directory's name). One that
    already holds an evaluation (results.json) is refused unless `overwrite`."""
    path = Path(out) if out else Path("runs") / "eval" / f"{Path(model).resolve().name}-{tasks}"
    if (path / "results.json").exists() and not overwrite:
        raise RunDirectoryError(f"{path} already holds an evaluation (results.json); pass --overwrite to replace it "
                                "or --out DIR for another")
    return path
