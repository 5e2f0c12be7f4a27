"""The training loop, one for pretraining now and for fine-tuning later: read it top to bottom.

AdamW with decoupled weight decay on matrices only (Loshchilov & Hutter 2019); warmup then cosine,
linear or warmup-stable-decay; gradient clipping; gradient accumulation from a global batch size;
bf16 autocast (fp16 with a scaler on GPUs without bf16); evaluation with perplexity, the best
checkpoint kept and early stopping; checkpoints that resume the exact same trajectory; metrics.jsonl.

Checkpoints come in two formats. "full" (the default for one process and DDP) holds no pickle: the
model is an HF directory (config.json + model.safetensors), the optimizer and RNG states are
safetensors, the rest is JSON. "sharded" (the default under FSDP) has every process write its own
shard of the model, optimizer and EMA with torch.distributed.checkpoint, so nothing is gathered on
one host during training; best/ and last/ get HF weights once, at the end (`export_checkpoint`).
Both resume at any world size. Each is written to a temporary directory and renamed, so a crash
never leaves a half-written checkpoint.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from lmforge.files import write_json
from lmforge.model import CheckpointError, Transformer, load_hf_model, preset, save_hf_model
from lmforge.model.hf import config_to_hf
from lmforge.train.datasets import BatchLoader, PackedDataset, RandomOffsetBatches, SlidingWindowDataset, TokenStream


@dataclass
class TrainConfig:
    data: str = field(default="runs/tokens", metadata={"help": "token shard directory (lmforge data tokenize)"})
    out: str = field(default="runs/pretrain", metadata={"help": "run directory"})
    model: str = field(default="tiny-llama", metadata={"help": "a preset name or an HF model directory to start from"})
    model_overrides: dict = field(default_factory=dict, metadata={"help": "ModelConfig fields to change (YAML mapping)"})
    dataset: str = field(default="sliding", metadata={
        "help": "sliding: consecutive windows over all tokens (documents separated by EOS); packed: windows start at "
                "document starts (the tail of a longer document is dropped unless allow_mid_doc); random: nanoGPT offsets",
        "choices": ["sliding", "packed", "random"]})
    allow_mid_doc: bool = field(default=False, metadata={"help": "packed: continue long documents in the next window"})
    max_length: int = field(default=256, metadata={"help": "tokens per training example"})
    batch_size: int = field(default=16, metadata={"help": "global batch size (examples per optimizer step)"})
    micro_batch_size: int = field(default=0, metadata={"help": "examples per forward pass (0: = batch_size)"})
    max_steps: int = field(default=1000, metadata={"help": "optimizer steps"})
    lr: float = field(default=3e-3, metadata={"help": "peak learning rate"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "final learning rate as a fraction of lr"})
    warmup_steps: int = field(default=50, metadata={"help": "linear warmup steps"})
    schedule: str = field(default="cosine", metadata={"help": "decay after warmup", "choices": ["cosine", "linear", "wsd"]})
    decay_fraction: float = field(default=0.2, metadata={"help": "wsd: final share of steps spent decaying"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW decoupled weight decay (matrices only)"})
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm (0: off)"})
    precision: str = field(default="fp32", metadata={"help": "autocast precision", "choices": ["fp32", "bf16", "fp16"]})
    eval_every: int = field(default=100, metadata={"help": "steps between evaluations (0: only at the end)"})
    eval_batches: int = field(default=20, metadata={"help": "validation batches per evaluation"})
    patience: int = field(default=0, metadata={"help": "stop after this many evaluations without improvement (0: off)"})
    save_every: int = field(default=0, metadata={"help": "steps between checkpoints (0: only at the end)"})
    moe_aux_weight: float = field(default=0.01, metadata={"help": "weight of the MoE load-balancing loss"})
    ema_decay: float = field(default=0.0, metadata={"help": "keep an exponential moving average of the weights "
                                                            "with this decay, e.g. 0.999 (0: off); saved as ema/"})
    tensorboard: bool = field(default=False, metadata={"help": "also log scalars for TensorBoard in <out>/tensorboard "
                                                                "(pip install tensorboard)"})
    seed: int = 0
    resume: bool = field(default=False, metadata={"help": "continue from the latest checkpoint in --out"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model"})
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


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """The learning rate before optimizer step `step` (0-based)."""
    low = cfg.lr * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "wsd":  # warmup-stable-decay (Hu et al. 2024): flat, then linear decay at the end
        decay_start = int(cfg.max_steps * (1 - cfg.decay_fraction))
        if step < decay_start:
            return cfg.lr
        frac = (step - decay_start) / max(1, cfg.max_steps - decay_start)
        return cfg.lr - (cfg.lr - low) * min(frac, 1.0)
    frac = min((step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps), 1.0)
    if cfg.schedule == "linear":
        return cfg.lr - (cfg.lr - low) * frac
    return low + 0.5 * (cfg.lr - low) * (1 + math.cos(math.pi * frac))


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices (dim >= 2) only, never on norms and biases."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = next(model.parameters()).is_cuda
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused or None)


@functools.lru_cache(maxsize=8)
def measure_matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32, n: int | None = None,
                        seconds: float = 0.3) -> float:
    """This machine's achieved dense matmul FLOP/s for (n x n) @ (n x n): the denominator of MFU.

    Best of three rounds of about seconds/3 each, so that a moment of contention on a shared machine does not
    lower the peak (and inflate MFU past 1). The size grows from 128 to n (default 4096 on CUDA, 1024 on CPU)
    and stops early where one product already takes 20 ms: a dtype without a fast kernel on this device (fp16
    on most CPUs runs at ~1 GFLOP/s) is measured in a second, not a minute. Measured once per process."""
    n = n or (4096 if device.type == "cuda" else 1024)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    size = min(128, n)
    while True:
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
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


def _rng_states() -> dict[str, torch.Tensor]:
    states = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["rng.cuda"] = torch.cuda.get_rng_state()
    return states


def _restore_rng_states(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["rng.cpu"])
    if "rng.cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["rng.cuda"])


def default_loss(logits: torch.Tensor, targets: torch.Tensor, batch: dict) -> torch.Tensor:
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)


class Trainer:
    """`Trainer(cfg).fit()`; pass `loss_fn(logits, targets, batch) -> loss` for a custom objective."""

    def __init__(self, cfg: TrainConfig, loss_fn: Callable = default_loss, device: str | None = None):
        self.cfg, self.loss_fn = cfg, loss_fn
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
            # a plain nanoGPT loop slowed from 6 s to 21 s per step within 6 steps here. Flushing them to zero
            # changes nothing measurable in training. Process-wide: the CPU's FTZ/DAZ flags.
            torch.set_flush_denormal(True)
        self.is_main = self.rank == 0
        self.out = Path(cfg.out)
        torch.manual_seed(cfg.seed)
        self.manifest = json.loads((Path(cfg.data) / "manifest.json").read_text()) \
            if (Path(cfg.data) / "manifest.json").exists() else None
        if self.manifest is None:
            raise FileNotFoundError(f"{cfg.data}: no manifest.json; create token shards with `lmforge data tokenize`")
        self.model = self._build_model()
        if self.model.cfg.vocab_size < self.manifest["vocab_size"]:
            raise ValueError(f"the model's vocabulary ({self.model.cfg.vocab_size}) is smaller than the data's "
                             f"({self.manifest['vocab_size']})")
        self.model.to(self.device)
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
        if cfg.batch_size % (micro * self.world):
            raise ValueError(f"batch_size {cfg.batch_size} is not a multiple of micro_batch_size {micro} x "
                             f"{self.world} processes")
        self.accum = cfg.batch_size // (micro * self.world)
        train = TokenStream.open(cfg.data, "train")
        self.val = TokenStream.open(cfg.data, "val") if self.manifest["splits"]["val"]["tokens"] > cfg.max_length + 1 else None
        self.loader = self._loader(train, micro * self.world)
        self.autocast_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.precision]
        self.scaler = torch.amp.GradScaler(self.device.type) if cfg.precision == "fp16" else None
        self.step, self.best_val, self.bad_evals = 0, float("inf"), 0
        self.tokens_per_step = cfg.batch_size * cfg.max_length
        if not 0 <= cfg.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {cfg.ema_decay}")
        self.ema = [p.detach().clone().float() for p in self.model.parameters()] if cfg.ema_decay else None
        self.sharded = cfg.checkpoint_format == "sharded" or (cfg.checkpoint_format == "auto" and self.fsdp)

    def _build_model(self) -> Transformer:
        """An HF model directory to continue from, or a preset sized to the data's vocabulary."""
        cfg = self.cfg
        if Path(cfg.model).is_dir():
            return load_hf_model(cfg.model)
        from lmforge.config import from_dict
        from lmforge.model import ModelConfig

        from_dict(ModelConfig, dict(cfg.model_overrides), "model_overrides")  # unknown keys / bad values: clear errors
        sizes = {"vocab_size": self.manifest["vocab_size"], "max_seq_len": max(cfg.max_length, 128)}
        return Transformer(preset(cfg.model, **{**sizes, **cfg.model_overrides}))

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

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean validation loss and perplexity over fixed, evenly spaced windows (the same every time)."""
        if self.val is None:
            return {}
        self.model.eval()
        n = len(self.val) - self.cfg.max_length - 1
        starts = torch.linspace(0, n, self.cfg.eval_batches * 4).long().view(self.cfg.eval_batches, 4)
        losses = []
        for row in starts:
            chunks = [torch.from_numpy(self.val.slice(int(s), self.cfg.max_length + 1)) for s in row]
            batch = torch.stack(chunks).to(self.device)
            with self._autocast():
                logits = self.model(batch[:, :-1])  # the bare model: no collective inside evaluation
            losses.append(F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)).item())
        self.model.train()
        loss = sum(losses) / len(losses)
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50))}

    def train_step(self) -> float:
        """One optimizer step over the global batch; returns its mean loss."""
        loss = self.accumulate_gradients()
        self.optimizer_step()
        return loss

    def accumulate_gradients(self) -> float:
        """Forward and backward over every micro-batch of one global batch (the mean, as one large batch)."""
        cfg = self.cfg
        total = torch.zeros((), device=self.device)
        for i in range(self.accum):
            x, y = (t.to(self.device) for t in self.loader.next_batch())
            # DDP: gradients are averaged across processes on the last micro-batch only
            sync = self.ddp is None or i == self.accum - 1
            if self.fsdp:
                self.model.set_requires_gradient_sync(i == self.accum - 1)
            with contextlib.nullcontext() if sync else self.ddp.no_sync():
                with self._autocast():
                    logits = self.forward(x)
                    loss = self.loss_fn(logits, y, {"input_ids": x, "labels": y})
                    if self.model.cfg.n_experts:
                        loss = loss + cfg.moe_aux_weight * self.model.aux_loss()
                bad = torch.tensor(0.0 if torch.isfinite(loss) else 1.0, device=self.device)
                if self.world > 1:  # every process stops together, none waits forever in a collective
                    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
                if bad.item():
                    raise TrainingStopped(f"loss is {loss.item()} at step {self.step}; lower the learning rate or use "
                                          f"fp32. The last good checkpoint is in {self.out} (if one was saved)")
                scaled = loss / self.accum  # mean over micro-batches = the loss of the whole batch
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            total += loss.detach().float() / self.accum
        if self.world > 1:
            dist.all_reduce(total)
            total /= self.world
        return total.item()

    def optimizer_step(self) -> None:
        cfg = self.cfg
        lr = learning_rate(cfg, self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:  # ema <- decay * ema + (1 - decay) * weights
            with torch.no_grad():
                for e, p in zip(self.ema, self.model.parameters()):
                    e.lerp_(p.detach().float(), 1 - cfg.ema_decay)
        self.step += 1
        if hasattr(norm, "full_tensor"):  # FSDP2 returns a DTensor
            norm = norm.full_tensor()
        self.last_grad_norm, self.last_lr = float(norm), lr

    # --- checkpoints ----------------------------------------------------------------------
    def save_checkpoint(self, name: str) -> Path:
        """Full: rank 0 writes (FSDP first gathers every tensor to it). Sharded: every rank writes its own part."""
        final = self.out / name
        if self.sharded:
            self._write_sharded_checkpoint(name, final)
            return final
        full = self._gather_full_state() if self.fsdp else None  # a collective: every rank takes part
        if self.is_main:
            self._write_checkpoint(name, final, full)
        self._barrier()
        return final

    def _barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def _training_state(self, with_ema: bool) -> dict:
        """Model, optimizer and EMA keyed by parameter name: this rank's DTensor shards under FSDP, whole tensors
        otherwise. torch.distributed.checkpoint saves either and loads into any sharding (another world size)."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        state = {"model": get_model_state_dict(self.model), "optimizer": get_optimizer_state_dict(self.model, self.optimizer)}
        if with_ema:
            state["ema"] = dict(zip((name for name, _ in self.model.named_parameters()), self.ema))
        return state

    def _write_sharded_checkpoint(self, name: str, final: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from safetensors.torch import save_file

        tmp = self.out / f".{name}.tmp"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self._barrier()
        dcp.save(self._training_state(self.ema is not None), checkpoint_id=tmp / "shards",
                 no_dist=not dist.is_initialized())
        if self.is_main:  # dcp.save returns on rank 0 after every rank's files and the metadata are written
            save_file(_rng_states(), str(tmp / "rng.safetensors"))
            write_json(tmp / "config.json", config_to_hf(self.model.cfg))
            write_json(tmp / "trainer_state.json", {
                "format": "sharded", "world_size": self.world, "ema": self.ema is not None, "step": self.step,
                "best_val": self.best_val, "bad_evals": self.bad_evals, "loader": self.loader.state_dict(),
                "config": asdict(self.cfg)})
            self._copy_tokenizer(tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            write_json(self.out / "latest.json", {"checkpoint": name, "step": self.step})
        self._barrier()

    def _gather_full_state(self) -> tuple[dict, dict, list | None]:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        # the EMA shadows the sharded parameters (DTensors): gathering it is a collective too
        ema = [e.full_tensor().cpu() for e in self.ema] if self.ema is not None else None
        return (get_model_state_dict(self.model, options=options),
                get_optimizer_state_dict(self.model, self.optimizer, options=options), ema)

    def _write_checkpoint(self, name: str, final: Path, full: tuple[dict, dict, list | None] | None = None) -> None:
        from safetensors.torch import save_file

        tmp = self.out / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        if full is None:
            save_hf_model(self.model, tmp)
            opt = self.optimizer.state_dict()
        else:  # FSDP: the gathered full weights go through an unsharded CPU replica
            replica = Transformer(self.model.cfg)
            replica.load_state_dict(full[0])
            save_hf_model(replica, tmp)
            opt = full[1]
        tensors, groups = {}, []
        for idx, state in opt["state"].items():
            for key, value in state.items():
                tensors[f"state.{idx}.{key}"] = value.detach().cpu().contiguous() if torch.is_tensor(value) \
                    else torch.tensor(value)
        groups = [{k: v for k, v in g.items()} for g in opt["param_groups"]]
        if self.ema is not None:
            ema = full[2] if full is not None else self.ema
            for i, e in enumerate(ema):
                tensors[f"ema.{i}"] = e.detach().cpu().contiguous()
            self._save_ema_model(tmp / "ema", ema if full is not None else None, full[0] if full is not None else None)
        tensors.update(_rng_states())
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        write_json(tmp / "trainer_state.json", {"step": self.step, "best_val": self.best_val, "bad_evals": self.bad_evals,
                                                "loader": self.loader.state_dict(), "param_groups": groups,
                                                "config": asdict(self.cfg)})
        self._copy_tokenizer(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        write_json(self.out / "latest.json", {"checkpoint": name, "step": self.step})

    def _save_ema_model(self, directory: Path, full_ema: list | None = None, full_state: dict | None = None) -> None:
        """The averaged weights as their own HF model directory (FSDP: from the gathered EMA)."""
        if full_ema is not None:
            replica = Transformer(self.model.cfg)
            names = [name for name, _ in self.model.named_parameters()]
            replica.load_state_dict({**full_state, **dict(zip(names, full_ema))})
            save_hf_model(replica, directory)
            self._copy_tokenizer(directory)
            return
        live = [p.detach().clone() for p in self.model.parameters()]
        with torch.no_grad():
            for p, e in zip(self.model.parameters(), self.ema):
                p.copy_(e)
            save_hf_model(self.model, directory)
            for p, w in zip(self.model.parameters(), live):
                p.copy_(w)
        self._copy_tokenizer(directory)

    def _copy_tokenizer(self, directory: Path) -> None:
        src = Path(self.manifest.get("tokenizer") or "")
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if (src / name).exists():
                shutil.copy(src / name, directory / name)

    def load_checkpoint(self, directory: Path) -> None:
        from safetensors.torch import load_file

        state = json.loads((directory / "trainer_state.json").read_text())
        if state.get("format") == "sharded":
            self._load_sharded_checkpoint(directory, state)
            return
        weights = load_hf_model(directory).state_dict()
        tensors = load_file(str(directory / "optimizer.safetensors"))
        opt_state: dict = {}
        for key, value in tensors.items():
            if key.startswith("ema.") and self.ema is not None:
                e = self.ema[int(key[4:])]
                if hasattr(e, "device_mesh"):  # FSDP: keep this rank's shard of the full average
                    from torch.distributed.tensor import distribute_tensor

                    value = distribute_tensor(value.to(e.dtype), e.device_mesh, e.placements)
                e.copy_(value)
            elif key.startswith("state."):
                param, name = key[len("state."):].rsplit(".", 1)
                param = int(param) if param.isdigit() else param  # index (plain/DDP) or parameter name (FSDP)
                opt_state.setdefault(param, {})[name] = value.to(self.device) if name != "step" else value
        full_opt = {"state": opt_state, "param_groups": state["param_groups"]}
        if self.fsdp:  # every rank reads the full files and keeps its own shard (any world size)
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            options = StateDictOptions(full_state_dict=True)
            set_model_state_dict(self.model, weights, options=options)
            set_optimizer_state_dict(self.model, self.optimizer, full_opt, options=options)
        else:
            self.model.load_state_dict(weights)
            self.optimizer.load_state_dict(full_opt)
        _restore_rng_states(tensors)
        self.loader.load_state_dict(state["loader"])
        self.step, self.best_val, self.bad_evals = state["step"], state["best_val"], state["bad_evals"]

    def _load_sharded_checkpoint(self, directory: Path, state: dict) -> None:
        import torch.distributed.checkpoint as dcp
        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        if self.ema is not None and not state["ema"]:
            raise CheckpointError(f"{directory} has no weight average to resume with ema_decay={self.cfg.ema_decay}")
        current = self._training_state(with_ema=self.ema is not None)  # the EMA tensors themselves: loaded in place
        dcp.load(current, checkpoint_id=directory / "shards", no_dist=not dist.is_initialized())
        set_model_state_dict(self.model, current["model"])
        set_optimizer_state_dict(self.model, self.optimizer, current["optimizer"])
        _restore_rng_states(load_file(str(directory / "rng.safetensors")))
        self.loader.load_state_dict(state["loader"])
        self.step, self.best_val, self.bad_evals = state["step"], state["best_val"], state["bad_evals"]

    def _export_sharded_checkpoints(self) -> None:
        """End of training: best/ and last/ get HF weights (rank 0 reads the shards; the others wait)."""
        self._barrier()
        if self.is_main:
            for name in ("best", "last"):
                if (self.out / name / "shards").is_dir():
                    export_checkpoint(self.out / name)
        self._barrier()

    # --- the loop -------------------------------------------------------------------------
    def fit(self, until_step: int | None = None, time_budget_s: float | None = None) -> dict:
        """Train to cfg.max_steps (the schedule's length); `until_step` or `time_budget_s` stop earlier,
        with a checkpoint, and a later run with resume=True continues the same trajectory."""
        cfg = self.cfg
        started = time.perf_counter()
        self.out.mkdir(parents=True, exist_ok=True)
        if cfg.resume and (self.out / "latest.json").exists():
            latest = json.loads((self.out / "latest.json").read_text())["checkpoint"]
            self.load_checkpoint(self.out / latest)
        # only rank 0 writes metrics; the others write to nowhere
        metrics = open(self.out / "metrics.jsonl" if self.is_main else os.devnull, "a", encoding="utf-8")  # noqa: SIM115
        tb = None
        if cfg.tensorboard and self.is_main:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ImportError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
            tb = SummaryWriter(str(self.out / "tensorboard"))
        flops_per_step = self.model.cfg.flops_per_token(cfg.max_length) * self.tokens_per_step / self.world
        peak = measure_matmul_peak(self.device, self.autocast_dtype or torch.float32)
        initial = self.evaluate() if self.step == 0 else {}
        if initial:
            metrics.write(json.dumps({"step": 0, **initial}) + "\n")
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc="train", unit="step",
                   disable=not (cfg.progress and self.is_main))
        summary = {"initial": initial}
        self.model.train()
        try:
            while self.step < cfg.max_steps:
                t0 = time.perf_counter()
                loss = self.train_step()
                seconds = time.perf_counter() - t0
                record = {"step": self.step, "loss": round(loss, 5), "lr": self.last_lr,
                          "grad_norm": round(self.last_grad_norm, 4), "tokens_per_s": round(self.tokens_per_step / seconds, 1),
                          "flops_per_s": round(flops_per_step / seconds),
                          "mfu": round(flops_per_step / seconds / peak, 4)}  # vs this process's measured matmul peak
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{record['tokens_per_s']:.0f}", mfu=f"{record['mfu']:.0%}")
                bar.update(1)
                out_of_time = time_budget_s is not None and time.perf_counter() - started > time_budget_s
                if self.world > 1 and time_budget_s is not None:  # clocks differ: stop when any process is out of time
                    flag = torch.tensor(float(out_of_time), device=self.device)
                    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                    out_of_time = bool(flag.item())
                stop_here = (until_step is not None and self.step >= until_step) or out_of_time
                last = self.step == cfg.max_steps or stop_here
                if (cfg.eval_every and self.step % cfg.eval_every == 0) or last:
                    ev = self.evaluate()
                    record.update(ev)
                    if ev and ev["val_loss"] < self.best_val:
                        self.best_val, self.bad_evals = ev["val_loss"], 0
                        self.save_checkpoint("best")
                    elif ev:
                        self.bad_evals += 1
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                if tb is not None:
                    for key, value in record.items():
                        if key != "step":
                            tb.add_scalar(key, value, self.step)
                if (cfg.save_every and self.step % cfg.save_every == 0) or last:
                    self.save_checkpoint("last")
                if cfg.patience and self.bad_evals >= cfg.patience:
                    summary["early_stopped_at"] = self.step
                    self.save_checkpoint("last")
                    break
                if stop_here:
                    summary["stopped_at"] = self.step
                    break
        finally:
            bar.close()
            metrics.close()
            if tb is not None:
                tb.close()
        if self.sharded:
            self._export_sharded_checkpoints()
        summary.update({"steps": self.step, "best_val_loss": self.best_val, "matmul_peak_flops": peak,
                        "final": self.evaluate(), "hf_config": config_to_hf(self.model.cfg)["architectures"][0]})
        if self.is_main:
            from lmforge.eval.plots import plot_training

            summary["plot"] = str(plot_training(self.out / "metrics.jsonl", self.out / "loss.png", self.out.name))
        return summary


def export_checkpoint(directory: str | os.PathLike) -> Path:
    """Write a sharded training checkpoint's weights into it in the HF layout (model.safetensors, and ema/ when it
    has a weight average), so that lmforge and transformers load it like any model directory. One process reads
    every shard: it needs the whole model in memory, once. `lmforge export-checkpoint DIR` runs this."""
    import torch.distributed.checkpoint as dcp

    from lmforge.model.hf import config_from_hf

    d = Path(directory)
    state_file = d / "trainer_state.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    if state.get("format") != "sharded":
        raise CheckpointError(f"{d} is not a sharded training checkpoint (no trainer_state.json with format 'sharded')")
    model = Transformer(config_from_hf(json.loads((d / "config.json").read_text())))
    weights = {"model": model.state_dict()}
    # without a process group: planning and reading happen in this process alone
    dcp.load(weights, checkpoint_id=d / "shards", no_dist=True)
    save_hf_model(model, d)
    if state["ema"]:
        ema = {"ema": {name: torch.empty_like(p, dtype=torch.float32) for name, p in model.named_parameters()}}
        dcp.load(ema, checkpoint_id=d / "shards", no_dist=True)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(ema["ema"][name])
        save_hf_model(model, d / "ema")
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if (d / name).exists():
                shutil.copy(d / name, d / "ema" / name)
    return d
