"""`TrainConfig` and the errors of a training run, apart from the loop so that the CLI reads them without torch."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TrainConfig:
    data: str = field(default="runs/tokens", metadata={"help": "token shard directory (lmforge data tokenize)"})
    out: str = field(default="runs/pretrain", metadata={"help": "run directory"})
    model: str = field(default="tiny-llama", metadata={"help": "a preset name or an HF model directory to start from"})
    model_overrides: dict = field(default_factory=dict, metadata={
        "help": "ModelConfig fields to change (YAML mapping); for an HF directory only max_seq_len, rope_theta, "
                "rope_scaling and sliding_window"})
    dataset: str = field(default="sliding", metadata={
        "help": "sliding: consecutive windows over all tokens (documents separated by EOS); packed: windows start at "
                "document starts (the tail of a longer document is dropped unless allow_mid_doc); random: nanoGPT offsets",
        "choices": ["sliding", "packed", "random"]})
    allow_mid_doc: bool = field(default=False, metadata={"help": "packed: continue long documents in the next window"})
    max_length: int = field(default=256, metadata={"help": "tokens per training example", "check": (lambda v: v > 0, "> 0")})
    batch_size: int = field(default=16, metadata={"help": "global batch size (examples per optimizer step)",
                                                  "check": (lambda v: v > 0, "> 0")})
    micro_batch_size: int = field(default=0, metadata={"help": "examples per forward pass (0: = batch_size)",
                                                       "check": (lambda v: v >= 0, ">= 0")})
    max_steps: int = field(default=1000, metadata={"help": "optimizer steps", "check": (lambda v: v >= 0, ">= 0")})
    lr: float = field(default=3e-3, metadata={"help": "peak learning rate", "check": (lambda v: v > 0, "> 0")})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "final learning rate as a fraction of lr",
                                                       "check": (lambda v: 0 <= v <= 1, "in [0, 1]")})
    warmup_steps: int = field(default=50, metadata={"help": "linear warmup steps", "check": (lambda v: v >= 0, ">= 0")})
    schedule: str = field(default="cosine", metadata={"help": "decay after warmup", "choices": ["cosine", "linear", "wsd"]})
    decay_fraction: float = field(default=0.2, metadata={"help": "wsd: final share of steps spent decaying",
                                                         "check": (lambda v: 0 <= v <= 1, "in [0, 1]")})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW decoupled weight decay (matrices only)"})
    optimizer: str = field(default="adamw", metadata={
        "help": "adamw (torch), adamw8bit (bitsandbytes: both moments in 8 bits, 4x less optimizer memory), "
                "paged_adamw8bit (the same, paged to host memory under GPU memory pressure)",
        "choices": ["adamw", "adamw8bit", "paged_adamw8bit"]})
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm (0: off)", "check": (lambda v: v >= 0, ">= 0")})
    precision: str = field(default="fp32", metadata={"help": "autocast precision", "choices": ["fp32", "bf16", "fp16"]})
    eval_every: int = field(default=100, metadata={"help": "steps between evaluations (0: only at the end)"})
    eval_batches: int = field(default=20, metadata={"help": "validation batches per evaluation",
                                                    "check": (lambda v: v > 0, "> 0")})
    patience: int = field(default=0, metadata={"help": "stop after this many evaluations without improvement (0: off)"})
    save_every: int = field(default=0, metadata={"help": "steps between checkpoints (0: only at the end)"})
    moe_aux_weight: float | None = field(default=None, metadata={
        "help": "weight of the MoE load-balancing loss (default: the checkpoint's router_aux_loss_coef, e.g. "
                "Qwen3-MoE 0.001, Mixtral 0.02; 0.01 for a model lmforge builds)",
        "check": (lambda v: v is None or v >= 0, ">= 0")})
    ema_decay: float = field(default=0.0, metadata={"help": "keep an exponential moving average of the weights "
                                                            "with this decay, e.g. 0.999 (0: off); saved as ema/",
                                                    "check": (lambda v: 0 <= v < 1, "in [0, 1)")})
    tensorboard: bool = field(default=False, metadata={"help": "also log scalars for TensorBoard in <out>/tensorboard "
                                                                "(pip install tensorboard)"})
    seed: int = 0
    resume: bool = field(default=False, metadata={"help": "continue the run in --out from its latest checkpoint"})
    overwrite: bool = field(default=False, metadata={"help": "start over in an --out that holds an earlier run "
                                                             "(its checkpoints and metrics are deleted)"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model"})
    peak_tflops: float = field(default=0.0, metadata={
        "help": "the hardware's peak dense TFLOP/s at this precision, the denominator of MFU (0: a known GPU's "
                "datasheet value, else this machine's measured matmul speed)"})
    distributed: str = field(default="ddp", metadata={
        "help": "under torchrun: ddp (a replica per process) or fsdp (FSDP2 fully_shard: parameters, gradients and "
                "optimizer state sharded across processes)", "choices": ["ddp", "fsdp"]})
    checkpoint_format: str = field(default="auto", metadata={
        "help": "full: rank 0 writes an HF model dir + optimizer file (FSDP gathers every tensor to it); sharded: each "
                "process writes its own shard (torch.distributed.checkpoint), HF weights are exported at the end; "
                "auto: sharded under FSDP, else full", "choices": ["auto", "full", "sharded"]})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})


class TrainingStopped(RuntimeError):
    """Training stopped early on bad numbers (NaN/inf loss); the message says what and where."""


class RunDirectoryError(ValueError):
    """The run directory and the request disagree (an earlier run there, nothing to resume, another config)."""
