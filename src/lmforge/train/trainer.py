"""The training loop, one for every objective (pretraining now; SFT, classification, preference tuning next):
read it top to bottom.

`Trainer(cfg).fit()` pretrains on token shards. `Trainer(cfg, objective=..., model=..., train_data=...,
eval_data=...)` trains any lmforge model on any dict batches (train/objectives.py says what a batch holds):
gradient accumulation from a global batch size, weighted by each micro-batch's number of loss terms; bf16
autocast (fp16 with a scaler); gradient clipping; an EMA of the weights; evaluation that keeps the best
checkpoint and stops early; DDP or FSDP under torchrun. Schedules live in train/schedule.py, checkpoints in
train/checkpoint.py.

A run directory belongs to one run: starting into one that holds a run needs `overwrite` (start over) or
`resume` (continue it: the config must agree on everything that shapes the trajectory, and metrics.jsonl is cut
back to the checkpoint's step). Ctrl-C or SIGTERM stops after the current step and saves a resumable last/.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from lmforge import run_status
from lmforge.files import atomic_write
from lmforge.model import Transformer, load_hf_model, preset
from lmforge.model.hf import config_to_hf
from lmforge.peft import adapter_of
from lmforge.progress import progress
from lmforge.train import checkpoint
from lmforge.train.checkpoint import export_checkpoint  # noqa: F401  (users import it from here)
from lmforge.train.config import RunDirectoryError, TrainConfig, TrainingStopped  # noqa: F401
from lmforge.train.datasets import BatchLoader, PackedDataset, RandomOffsetBatches, SlidingWindowDataset, TokenStream
from lmforge.train.objectives import CausalLM, Objective
from lmforge.train.schedule import build_optimizer, learning_rate, trainable_parameters

# what a resumed run must share with the checkpoint: a different value would give another trajectory (or shapes
# the saved state does not fit); the rest (max_steps, evaluation, logging, micro_batch_size) may change
RESUME_MUST_MATCH = ("data", "model", "model_overrides", "dataset", "allow_mid_doc", "max_length", "batch_size", "lr",
                     "min_lr_ratio", "warmup_steps", "schedule", "decay_fraction", "weight_decay", "optimizer", "beta1",
                     "beta2", "grad_clip", "precision", "moe_aux_weight", "ema_decay", "seed")
# ModelConfig fields an HF model directory may be loaded with changed (none of them changes a weight's shape)
HF_MODEL_OVERRIDES = ("max_seq_len", "rope_theta", "rope_scaling", "sliding_window")
RUN_FILES = ("metrics.jsonl", "latest.json", "loss.png", "best", "last", "tensorboard", ".best.tmp", ".last.tmp",
             ".best.old", ".last.old")


# --- MFU ---------------------------------------------------------------------------------------------------------

# dense (no sparsity) bf16/fp16 tensor-core peaks from the datasheets, TFLOP/s; matched against the device name
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0,
                   "A10": 125.0, "V100": 125.0, "T4": 65.0}


@functools.lru_cache(maxsize=8)
def measure_matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32, n: int | None = None,
                        seconds: float = 0.3) -> float:
    """This machine's achieved dense matmul FLOP/s for (n x n) @ (n x n): the denominator of MFU where no
    datasheet value is known.

    Best of three rounds of about seconds/3 each, so that a moment of contention on a shared machine does not
    lower the peak (and inflate MFU past 1). The size grows from 128 to n (default 4096 on CUDA, 1024 on CPU)
    and stops growing once one product passes 20 ms: a dtype without a fast kernel on this device (fp16 on
    most CPUs) is measured in a second, not a minute. Measured once per process."""
    n = n or (4096 if device.type == "cuda" else 1024)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    size = min(128, n)
    # a generator of its own: drawing from the global one would make a run's dropout masks depend on whether the
    # peak was already measured in this process (the first run measures, later ones reuse the cached value)
    gen = torch.Generator(device=device).manual_seed(0)
    while True:
        a = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
        b = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
        a @ b  # warm-up
        sync()
        t0 = time.perf_counter()
        a @ b
        sync()
        if size >= n or time.perf_counter() - t0 > 0.02:
            break
        size = min(2 * size, n)
    best = 0.0
    for _ in range(3):
        iters, t0 = 0, time.perf_counter()
        while iters == 0 or time.perf_counter() - t0 < seconds / 3:
            a @ b
            sync()
            iters += 1
        best = max(best, 2 * size**3 * iters / (time.perf_counter() - t0))
    return best


def training_flops_per_token(model: torch.nn.Module, seq_len: int) -> int:
    """Training FLOPs per token of what a decoder computes: per matmul weight 2 in the forward pass and 2 for the
    input's gradient, and 2 more for the weight's own gradient only where it trains (LoRA's frozen base skips it),
    plus attention (Kaplan et al. 2020). Full training gives the usual 6N + attention; LoRA about 4N. Other models
    (task heads): their config's 6N count."""
    if not isinstance(model, Transformer):
        return model.cfg.flops_per_token(seq_len)
    cfg = model.cfg
    weights = trained = 0
    for name, p in model.named_parameters():
        if p.dim() < 2 or name in ("embed.weight", "pos_embed.weight"):  # lookups, not matmuls
            continue
        weights += p.numel()
        trained += p.numel() if p.requires_grad else 0
    for m in model.modules():
        if type(m).__name__ == "NF4Linear":  # QLoRA's frozen base is NF4 codes, not a Parameter
            weights += m.in_features * m.out_features
    if model.lm_head is None:  # tied: the head is the embedding matrix
        weights += cfg.vocab_size * cfg.d_model
        trained += cfg.vocab_size * cfg.d_model if model.embed.weight.requires_grad else 0
    return 4 * weights + 2 * trained + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len


def peak_flops(device: torch.device, dtype: torch.dtype, stated_tflops: float = 0.0) -> tuple[float, str]:
    """(peak FLOP/s, where it comes from): the stated value, a known GPU's datasheet, or a measurement."""
    if stated_tflops > 0:
        return stated_tflops * 1e12, "stated (peak_tflops)"
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        name = torch.cuda.get_device_name(device)
        for key in sorted(GPU_PEAK_TFLOPS, key=len, reverse=True):
            if key in name:
                return GPU_PEAK_TFLOPS[key] * 1e12, f"datasheet ({key}, dense {str(dtype).removeprefix('torch.')})"
    return measure_matmul_peak(device, dtype), f"measured matmul on this {device.type} ({str(dtype).removeprefix('torch.')})"


# --- the trainer -------------------------------------------------------------------------------------------------

class Trainer:
    """`Trainer(cfg).fit()`. Defaults: the causal-LM objective on cfg.data's token shards, the model from
    cfg.model. Pass `objective`, `model`, `train_data` (an object with `next_batch() -> dict`, `state_dict()`
    and `load_state_dict()`, whose batches are per-process micro-batches) and `eval_data` (an iterable of dict
    batches, or a function returning one, the same every time) to train anything else; `tokenizer_dir` is copied
    into every checkpoint (default: the shards' tokenizer, or cfg.model's directory); `after_eval(trainer,
    metrics)` runs on rank 0 after every evaluation, the one before training included."""

    def __init__(self, cfg: TrainConfig, objective: Objective | None = None, model: Transformer | None = None,
                 train_data=None, eval_data: Iterable[dict] | Callable[[], Iterable[dict]] | None = None,
                 tokenizer_dir: str | os.PathLike | None = None, device: str | None = None,
                 after_eval: Callable[[Trainer, dict], None] | None = None):
        self.cfg = cfg
        self.after_eval = after_eval  # called on rank 0 after each evaluation; metrics it adds to the dict are logged
        # and may be the objective's best_metric (fine-tuning adds val_rougeL / val_exact_match of held-out replies)
        self._run_dir_ready = False
        self.objective = objective or CausalLM()
        # under torchrun (WORLD_SIZE > 1): one process per device, DDP, each rank reads its own slice of every batch
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if device is None and torch.cuda.is_available():
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        self.device = torch.device(device or "cpu")
        if self.device.type == "cpu":
            # denormal floats (below 1.2e-38, e.g. in decaying Adam moments) take a slow microcode path on x86:
            # a plain nanoGPT loop slowed several-fold within a few steps (docs/benchmarks.md). Flushing them to zero
            # changes nothing measurable in training. Process-wide: the CPU's FTZ/DAZ flags.
            torch.set_flush_denormal(True)
        self.is_main = self.rank == 0
        self.out = Path(cfg.out)
        torch.manual_seed(cfg.seed)
        self.manifest = None
        if train_data is None:
            manifest = Path(cfg.data) / "manifest.json"
            if not manifest.exists():
                from lmforge.data.sources import CorpusError

                raise CorpusError(f"{cfg.data}: no manifest.json; create token shards with `lmforge data tokenize`")
            self.manifest = json.loads(manifest.read_text())
        self.model = model if model is not None else self._build_model()
        if self.manifest is not None and self.model.cfg.vocab_size < self.manifest["vocab_size"]:
            raise ValueError(f"the model's vocabulary ({self.model.cfg.vocab_size}) is smaller than the data's "
                             f"({self.manifest['vocab_size']})")
        self.model.to(self.device)
        # the MoE load-balancing loss weight: the user's, else the one the checkpoint was trained with
        # (router_aux_loss_coef: Qwen3-MoE 0.001, Mixtral 0.02), else 0.01 (Switch Transformer's)
        model_cfg = self.model.cfg
        checkpoint_coef = getattr(model_cfg, "router_aux_coef", None)
        self.moe_aux_weight = (0.0 if not getattr(model_cfg, "n_experts", 0) else cfg.moe_aux_weight
                               if cfg.moe_aux_weight is not None else checkpoint_coef if checkpoint_coef is not None
                               else 0.01)
        self.ddp = None
        self.fsdp = self.world > 1 and cfg.distributed == "fsdp"
        if self.fsdp:
            from torch.distributed.fsdp import fully_shard

            for layer in self.model.layers:  # one all-gather per block, then the embeddings/head at the root
                fully_shard(layer)
            fully_shard(self.model)
        elif self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.ddp = DistributedDataParallel(self.model, broadcast_buffers=False)
        wrapped = self.ddp or self.model
        self.forward = torch.compile(wrapped) if cfg.compile else wrapped
        self.optimizer = build_optimizer(self.model, cfg)
        micro = cfg.micro_batch_size or cfg.batch_size // self.world  # examples per forward, per process
        if micro <= 0 or cfg.batch_size % (micro * self.world):
            raise ValueError(f"batch_size {cfg.batch_size} is not a multiple of micro_batch_size {micro} x "
                             f"{self.world} processes")
        self.accum = cfg.batch_size // (micro * self.world)
        self.val = None
        if train_data is None:
            train = TokenStream.open(cfg.data, "train")
            if self.manifest["splits"]["val"]["tokens"] > cfg.max_length + 1:
                self.val = TokenStream.open(cfg.data, "val")
            self.loader = self._loader(train, micro * self.world)
        else:
            self.loader = train_data
        self.eval_data = eval_data
        self.autocast_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.precision]
        self.scaler = torch.amp.GradScaler(self.device.type) if cfg.precision == "fp16" else None
        self.step, self.bad_evals = 0, 0
        self.best_val = float("-inf") if self.objective.higher_is_better else float("inf")
        self.last_tokens = 0  # real (non-padding) tokens of the last step, all processes
        if not 0 <= cfg.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {cfg.ema_decay}")
        # the average covers what trains: a frozen parameter's average is the parameter itself
        trainable = trainable_parameters(self.model)
        self.ema_names = [name for name, _ in trainable]
        self.ema = [p.detach().clone().float() for _, p in trainable] if cfg.ema_decay else None
        # FSDP writes sharded checkpoints by default, but adapters are small and their checkpoint is an adapter
        # directory: gathered to rank 0 instead
        self.sharded = cfg.checkpoint_format == "sharded" or (cfg.checkpoint_format == "auto" and self.fsdp
                                                              and adapter_of(self.model) is None)
        # the tokenizer that belongs with the weights: a model directory's own, else the one the shards were made with
        model_dir = Path(cfg.model) if (Path(cfg.model) / "tokenizer.json").exists() else None
        source = tokenizer_dir or model_dir or (self.manifest or {}).get("tokenizer")
        self.tokenizer_dir = Path(source) if source else None
        self.interrupted: str | None = None

    def _build_model(self) -> Transformer:
        """An HF model directory to continue from (with the overrides its weights allow), or a preset sized to the
        data's vocabulary."""
        cfg = self.cfg
        from lmforge.config import ConfigError, from_dict
        from lmforge.model import PRESETS, ModelConfig

        if not Path(cfg.model).is_dir() and cfg.model not in PRESETS:
            import difflib

            from lmforge.hub import missing_path_error

            if "/" in cfg.model or Path(cfg.model).suffix:
                raise ConfigError(f"model: {missing_path_error(Path(cfg.model), 'model directory')}")
            close = difflib.get_close_matches(cfg.model, PRESETS, n=1)
            raise ConfigError(f"model: '{cfg.model}' is neither a model directory nor a preset"
                              + (f"; did you mean '{close[0]}'?" if close else f" ({', '.join(PRESETS)})"))
        if Path(cfg.model).is_dir():
            bad = sorted(set(cfg.model_overrides) - set(HF_MODEL_OVERRIDES))
            if bad:
                raise ConfigError(f"model_overrides: {', '.join(bad)} cannot change for the pretrained model in "
                                  f"{cfg.model} (its weights fix them); allowed: {', '.join(HF_MODEL_OVERRIDES)}")
            model = load_hf_model(cfg.model)
            if cfg.model_overrides:
                model = _with_overrides(model, cfg.model_overrides)
            return model.train()
        from_dict(ModelConfig, dict(cfg.model_overrides), "model_overrides")  # unknown keys / bad values: clear errors
        # sized to the data, and told its tokenizer's BOS/EOS ids (exported configs need eos_token_id, or
        # transformers' generate never stops)
        data = {"vocab_size": self.manifest["vocab_size"], "max_seq_len": max(cfg.max_length, 128),
                "bos_token_id": self.manifest.get("bos_id"), "eos_token_id": self.manifest.get("eos_id")}
        try:
            return Transformer(preset(cfg.model, **{**data, **cfg.model_overrides}))
        except ValueError as e:  # an override the preset cannot take (n_heads that d_model does not divide, ...)
            raise ConfigError(f"model_overrides: {e}") from None

    def _loader(self, stream: TokenStream, micro: int):
        cfg = self.cfg
        if cfg.dataset == "random":
            return RandomOffsetBatches(stream, cfg.max_length, micro, seed=cfg.seed, rank=self.rank, world_size=self.world)
        ds = PackedDataset(stream, cfg.max_length, cfg.allow_mid_doc) if cfg.dataset == "packed" \
            else SlidingWindowDataset(stream, cfg.max_length)
        if len(ds) < micro:  # packing needs documents as long as a window; fall back to sliding windows
            ds = SlidingWindowDataset(stream, cfg.max_length)
        return BatchLoader(ds, micro, seed=cfg.seed, rank=self.rank, world_size=self.world)

    def _autocast(self):
        if self.autocast_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _to_device(self, batch) -> dict:
        if isinstance(batch, (tuple, list)):  # (input_ids, labels) windows of the token loaders
            batch = {"input_ids": batch[0], "labels": batch[1]}
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}

    # --- evaluation -----------------------------------------------------------------------------------------
    def _token_eval_batches(self) -> Iterable[dict]:
        """Fixed, evenly spaced validation windows (the same every time)."""
        n = len(self.val) - self.cfg.max_length - 1
        starts = torch.linspace(0, n, self.cfg.eval_batches * 4).long().view(self.cfg.eval_batches, 4)
        for row in starts:
            chunks = [torch.from_numpy(self.val.slice(int(s), self.cfg.max_length + 1)) for s in row]
            batch = torch.stack(chunks).to(self.device)
            yield {"input_ids": batch[:, :-1], "labels": batch[:, 1:]}

    @torch.no_grad()
    def evaluate(self) -> dict:
        """The objective's metrics on the evaluation batches ({} without any)."""
        if self.eval_data is not None:
            batches = self.eval_data() if callable(self.eval_data) else self.eval_data
            batches = (self._to_device(b) for b in batches)
        elif self.val is not None:
            batches = self._token_eval_batches()
        else:
            return {}
        self.model.eval()
        with self._autocast():
            metrics = self.objective.evaluate(self.model, batches)  # the bare model: no collective inside evaluation
        self.model.train()
        return metrics

    def _improved(self, metrics: dict) -> bool:
        value = metrics.get(self.objective.best_metric)
        if value is None:
            return False
        return value > self.best_val if self.objective.higher_is_better else value < self.best_val

    # --- one optimizer step ---------------------------------------------------------------------------------
    def train_step(self) -> float:
        """One optimizer step over the global batch; returns its loss."""
        loss = self.accumulate_gradients()
        self.optimizer_step()
        return loss

    def accumulate_gradients(self) -> float:
        """Forward and backward over every micro-batch of one global batch: the loss of the whole batch, each
        micro-batch weighted by its share of the loss terms (equal shares: the plain mean)."""
        micro_batches = [self._to_device(self.loader.next_batch()) for _ in range(self.accum)]
        counts = [self.objective.count(b) for b in micro_batches]
        # the step's real tokens (padding left out), all processes: what tokens/s and MFU count
        self.last_tokens = sum(_real_tokens(b) for b in micro_batches) * self.world
        stats = torch.tensor([float(sum(counts)), float(min(counts)), float(-max(counts))], device=self.device)
        if self.world > 1:  # the global number of loss terms, and whether every micro-batch everywhere has the same
            dist.all_reduce(stats[:1])
            dist.all_reduce(stats[1:], op=dist.ReduceOp.MIN)
        total_count, equal = stats[0].item(), stats[1].item() == -stats[2].item()
        total = torch.zeros((), device=self.device)
        for i, batch in enumerate(micro_batches):
            # DDP: gradients are averaged across processes on the last micro-batch only
            sync = self.ddp is None or i == self.accum - 1
            if self.fsdp:
                self.model.set_requires_gradient_sync(i == self.accum - 1)
            with contextlib.nullcontext() if sync else self.ddp.no_sync():
                with self._autocast():
                    loss, _ = self.objective.loss(self.forward, batch)
                    if self.moe_aux_weight:
                        loss = loss + self.moe_aux_weight * self.model.aux_loss()
                bad = torch.tensor(0.0 if torch.isfinite(loss) else 1.0, device=self.device)
                if self.world > 1:  # every process stops together, none waits forever in a collective
                    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
                if bad.item():
                    raise TrainingStopped(f"loss is {loss.item()} at step {self.step}; lower the learning rate or use "
                                          f"fp32. The last good checkpoint is in {self.out} (if one was saved)")
                # equal shares: the mean over micro-batches; else this micro-batch's share of the global loss terms
                # (times the world size: DDP averages the gradients over processes)
                scaled = loss / self.accum if equal else loss * (counts[i] * self.world / total_count)
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            total += loss.detach().float() / self.accum if equal else loss.detach().float() * (counts[i] / total_count)
        if self.world > 1:
            dist.all_reduce(total)
            if equal:
                total /= self.world
        return total.item()

    def optimizer_step(self) -> None:
        cfg = self.cfg
        lr = learning_rate(cfg, self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        params = [p for _, p in trainable_parameters(self.model)]
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:  # ema <- decay * ema + (1 - decay) * weights
            with torch.no_grad():
                for e, p in zip(self.ema, params):
                    e.lerp_(p.detach().float(), 1 - cfg.ema_decay)
        self.step += 1
        if hasattr(norm, "full_tensor"):  # FSDP2 returns a DTensor
            norm = norm.full_tensor()
        self.last_grad_norm, self.last_lr = float(norm), lr

    # --- checkpoints (train/checkpoint.py) --------------------------------------------------------------------
    def save_checkpoint(self, name: str) -> Path:
        return checkpoint.save_checkpoint(self, name)

    def load_checkpoint(self, directory: Path) -> None:
        checkpoint.load_checkpoint(self, directory)

    # --- the run directory --------------------------------------------------------------------------------------
    def prepare_run_dir(self) -> None:
        """Start, resume or refuse (see the module docstring); on rank 0 the directory's files change. fit() calls
        it; call it first to write files of your own into the run directory after the check."""
        if not self._run_dir_ready:
            self._prepare_run_dir()
            self._run_dir_ready = True

    def _prepare_run_dir(self) -> None:
        cfg, out = self.cfg, self.out
        latest = checkpoint.resolve_checkpoint(out) if out.exists() else None
        if cfg.resume and cfg.overwrite:
            raise RunDirectoryError("resume and overwrite exclude each other: continue the run, or start over")
        if cfg.resume:
            if latest is None:
                raise RunDirectoryError(f"resume: {out} has no checkpoint to continue from (no latest.json); "
                                        f"start a run there without --resume")
            self._check_resumable(latest)
            self.load_checkpoint(latest)
            if self.is_main:
                _truncate_metrics(out / "metrics.jsonl", self.step)
            return
        earlier = latest is not None or (out / "metrics.jsonl").exists()
        if earlier and not cfg.overwrite:
            step = json.loads((latest / "trainer_state.json").read_text())["step"] if latest else "?"
            raise RunDirectoryError(f"{out} already holds a training run (checkpoint at step {step}); pass --resume to "
                                    f"continue it or --overwrite to start over (its checkpoints and metrics go)")
        if self.is_main:
            if earlier:
                for name in RUN_FILES:
                    target = out / name
                    if target.is_dir():
                        shutil.rmtree(target)
                    elif target.exists():
                        target.unlink()
            out.mkdir(parents=True, exist_ok=True)
            from lmforge.config import save_config

            save_config(self.cfg, out)
        if self.world > 1:
            dist.barrier()

    def _check_resumable(self, directory: Path) -> None:
        """Every difference that would change the trajectory, named; the model's shape too."""
        saved = json.loads((directory / "trainer_state.json").read_text()).get("config", {})
        now = asdict(self.cfg)
        keys = RESUME_MUST_MATCH + getattr(self.cfg, "resume_extra", ())
        diffs = [f"{k}: {saved[k]!r} in the checkpoint, {now[k]!r} now" for k in keys
                 if k in saved and saved[k] != now[k]]
        if (directory / "config.json").exists() and not hasattr(self.model, "save_pretrained"):
            from lmforge.model.hf import config_from_hf

            theirs = asdict(config_from_hf(json.loads((directory / "config.json").read_text())))
            ours = asdict(self.model.cfg)
            diffs += [f"model {k}: {theirs[k]!r} in the checkpoint, {ours[k]!r} now" for k in ours
                      if k in theirs and theirs[k] != ours[k] and k not in ("init_std",)]
        if diffs:
            raise RunDirectoryError(f"cannot resume {directory}: the run was started with another config:\n  "
                                    + "\n  ".join(diffs) + "\nresume with the original settings, or start a new run "
                                    "(another --out, or --overwrite)")

    # --- the loop -------------------------------------------------------------------------------------------
    def fit(self, until_step: int | None = None, time_budget_s: float | None = None) -> dict:
        """Train to cfg.max_steps (the schedule's length); `until_step` or `time_budget_s` stop earlier, with a
        checkpoint, and a later run with resume=True continues the same trajectory. Ctrl-C / SIGTERM: the same,
        after the current step (summary["interrupted"] names the signal; a second Ctrl-C stops at once)."""
        cfg = self.cfg
        started = time.perf_counter()
        self.prepare_run_dir()
        if self.is_main:  # status.json: running / finished / stopped / failed, for readers of the run directory
            run_status.mark_running(self.out, self.step, max_steps=cfg.max_steps, best_metric=self.objective.best_metric,
                                    higher_is_better=self.objective.higher_is_better)
        # only rank 0 writes metrics; the others write to nowhere
        metrics = open(self.out / "metrics.jsonl" if self.is_main else os.devnull, "a", encoding="utf-8")  # noqa: SIM115
        tb = None
        if cfg.tensorboard and self.is_main:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ImportError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
            tb = SummaryWriter(str(self.out / "tensorboard"))
        flops_per_token = training_flops_per_token(self.model, cfg.max_length)
        peak, peak_source = peak_flops(self.device, self.autocast_dtype or torch.float32, cfg.peak_tflops)
        remeasured = False
        initial = self.evaluate() if self.step == 0 else {}
        if initial:
            if self.after_eval is not None and self.is_main:  # before writing: the hook may add metrics
                self.after_eval(self, initial)
            metrics.write(json.dumps({"step": 0, **initial}) + "\n")
        bar = progress(total=cfg.max_steps, initial=self.step, desc="train", unit="step",
                       enabled=cfg.progress and self.is_main)
        summary = {"initial": initial}
        last_eval = (self.step, initial) if initial else (-1, {})
        self.model.train()
        with _stop_on_signals(self):
            try:
                while self.step < cfg.max_steps:
                    t0 = time.perf_counter()
                    loss = self.train_step()
                    seconds = time.perf_counter() - t0
                    flops_per_step = flops_per_token * self.last_tokens / self.world
                    if flops_per_step / seconds > peak and peak_source.startswith("measured") and not remeasured:
                        # the first measurement ran while the machine was busy (MFU read 243% so): measure again
                        # now, and never report more than the rate the training itself reached
                        remeasured = True
                        measure_matmul_peak.cache_clear()
                        peak = max(peak_flops(self.device, self.autocast_dtype or torch.float32)[0],
                                   flops_per_step / seconds)
                        peak_source += " (measured again: the first measurement ran on a busy machine)"
                    record = {"step": self.step, "loss": round(loss, 5), "lr": self.last_lr,
                              "grad_norm": round(self.last_grad_norm, 4), "step_s": round(seconds, 4),
                              "tokens_per_s": round(self.last_tokens / seconds, 1),
                              "flops_per_s": round(flops_per_step / seconds),
                              "mfu": round(flops_per_step / seconds / peak, 4)}
                    # figures of the step that only the data source or the objective knows (RL: rewards, sampling
                    # speed, clip fraction, KL)
                    if hasattr(self.loader, "step_metrics"):
                        record.update(self.loader.step_metrics(record))
                    if hasattr(self.objective, "step_metrics"):
                        record.update(self.objective.step_metrics())
                    if getattr(self.model.cfg, "n_experts", 0):
                        # how evenly the step's last micro-batch was routed (router_max_load 1.0: even)
                        record.update({k: round(v, 4) for k, v in self.model.router_balance().items()})
                    bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{record['tokens_per_s']:.0f}", mfu=f"{record['mfu']:.1%}")
                    bar.update(1)
                    out_of_time = time_budget_s is not None and time.perf_counter() - started > time_budget_s
                    interrupted = self.interrupted is not None
                    if self.world > 1:  # clocks and signals differ: stop when any process is out of time or stopped
                        flags = torch.tensor([float(out_of_time), float(interrupted)], device=self.device)
                        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
                        out_of_time, interrupted = bool(flags[0].item()), bool(flags[1].item())
                    stop_here = (until_step is not None and self.step >= until_step) or out_of_time or interrupted
                    last = self.step == cfg.max_steps or stop_here
                    if ((cfg.eval_every and self.step % cfg.eval_every == 0) or last) and not interrupted:
                        ev = self.evaluate()
                        if ev and self.after_eval is not None and self.is_main:
                            self.after_eval(self, ev)  # may add metrics (val_rougeL ...) that pick the best
                        last_eval = (self.step, ev)
                        record.update(ev)
                        if self._improved(ev):
                            self.best_val, self.bad_evals = ev[self.objective.best_metric], 0
                            self.save_checkpoint("best")
                        elif ev:
                            self.bad_evals += 1
                    metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
                    if tb is not None:
                        for key, value in record.items():
                            if key != "step" and value is not None:
                                tb.add_scalar(key, value, self.step)
                    if (cfg.save_every and self.step % cfg.save_every == 0) or last:
                        self.save_checkpoint("last")
                    if cfg.patience and self.bad_evals >= cfg.patience:
                        summary["early_stopped_at"] = self.step
                        self.save_checkpoint("last")
                        break
                    if stop_here:
                        summary["stopped_at"] = self.step
                        if interrupted:
                            summary["interrupted"] = self.interrupted or "another process"
                        break
            except BaseException as e:
                if self.is_main:
                    run_status.mark_ended(self.out, "failed", self.step, f"{type(e).__name__}: {e}")
                raise
            finally:
                bar.close()
                metrics.close()
                if tb is not None:
                    tb.close()
        if self.sharded:
            checkpoint.export_sharded_checkpoints(self)
        summary.update({"steps": self.step, "best_" + self.objective.best_metric: self.best_val,
                        "peak_flops": peak, "peak_source": peak_source,
                        # the last step's evaluation when there was one (with the hook's metrics), not a second pass
                        "final": {} if "interrupted" in summary else
                        last_eval[1] if last_eval[0] == self.step and last_eval[1] else self.evaluate(),
                        "hf_config": self.model.hf_architecture() if hasattr(self.model, "hf_architecture")
                        else config_to_hf(self.model.cfg)["architectures"][0]})
        if self.is_main:
            from lmforge.plots import plot_training

            summary["plot"] = str(plot_training(self.out / "metrics.jsonl", self.out / "loss.png", self.out.name))
            # stopped: resumable (a signal, until_step, the time budget); early stopping is the run's own end
            reason = summary.get("interrupted") or ("step or time limit" if "stopped_at" in summary else
                                                    "early stopping" if "early_stopped_at" in summary else "")
            stopped = "stopped_at" in summary and self.step < cfg.max_steps
            run_status.mark_ended(self.out, "stopped" if stopped else "finished", self.step, reason)
        return summary


def _with_overrides(model: Transformer, overrides: dict) -> Transformer:
    """The loaded model with config fields that no weight depends on changed (HF_MODEL_OVERRIDES)."""
    import dataclasses

    model.cfg = dataclasses.replace(model.cfg, **overrides)
    for layer in model.layers:
        layer.attn.cfg = model.cfg
    if model.rotary is not None:
        model.rotary = type(model.rotary)(model.cfg)
    return model


def _real_tokens(batch: dict) -> int:
    """Tokens of a batch that are not padding (attention_mask, or segment 0 of packed rows, marks padding)."""
    if torch.is_tensor(batch.get("attention_mask")):
        return int(batch["attention_mask"].sum())
    if torch.is_tensor(batch.get("segment_ids")):
        return int((batch["segment_ids"] > 0).sum())
    return batch["input_ids"].numel()


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop the records after `step` (written after the checkpoint a run resumes from), so steps never repeat."""
    if not path.exists():
        return
    keep = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line if line.endswith("\n") else line + "\n")
            except json.JSONDecodeError:  # a line cut by a crash
                continue
    with atomic_write(path) as f:
        f.writelines(keep)


@contextlib.contextmanager
def _stop_on_signals(trainer: Trainer):
    """Ctrl-C and SIGTERM set trainer.interrupted: the loop stops after its step and saves last/. A second Ctrl-C
    raises KeyboardInterrupt at once. Only the main thread can take signals; elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if trainer.interrupted is not None:
            raise KeyboardInterrupt
        trainer.interrupted = signal.Signals(signum).name
        if trainer.is_main:
            print(f"\nlmforge: {trainer.interrupted}: stopping after this step and saving {trainer.out / 'last'} "
                  "(resume with --resume; Ctrl-C again to stop at once)", file=sys.stderr)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
