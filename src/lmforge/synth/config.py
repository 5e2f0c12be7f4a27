"""The settings of self-instruct and Evol-Instruct, apart from their code (numpy, the model clients) so that
`lmforge synth` takes its flags' defaults and help from them at start-up."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SelfInstructConfig:
    num: int = field(default=100, metadata={"help": "new instructions to keep"})
    prompts_per_round: int = field(default=4, metadata={"help": "generation prompts per round (sent together)"})
    seeds_per_prompt: int = 6
    machine_per_prompt: int = 2
    novelty_threshold: float = 0.7
    max_rounds: int = field(default=1000, metadata={"help": "stop after this many rounds even short of --num"})
    # a model that cannot do it keeps nothing, round after round
    stall_rounds: int = field(default=10, metadata={
        "help": "stop, naming the most common reject reasons, after this many rounds in a row that keep nothing "
                "(0: never)"})
    max_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 0.5
    seed: int = 0
    classification_shots: int = 12
    instance_shots: int = 3
    eval_data: str | None = None  # a held-out set: generated items overlapping it are rejected (contamination)
    progress: bool = True


@dataclass
class EvolConfig:
    rounds: int = 4
    num: int = field(default=0, metadata={"help": "stop once this many evolved instructions are kept (0: all rounds)"})
    breadth_share: float = 1 / 6  # the paper draws one of 5 depth methods or breadth uniformly
    max_tokens: int = 512
    temperature: float = 0.7
    seed: int = 0
    novelty_threshold: float = 0.7  # an evolution this close (ROUGE-L) to an instruction already kept is a duplicate
    eval_data: str | None = None
    progress: bool = True
