"""Training throughput: lmforge's Trainer vs a minimal nanoGPT-style loop, same shapes and batch, one process.

    .venv/bin/python benchmarks/train.py [--steps 8] [--shapes gpt2-124m quickstart] [--precisions fp32 bf16]

The baseline is written here: nanoGPT's GPT (fused c_attn, SDPA, LayerNorm, tanh GELU, learned
positions, tied head) for the GPT-2 shape, and lmforge's own Transformer in a bare loop for the
Llama-shaped quickstart model (nanoGPT has no Llama); both do forward, cross-entropy, backward,
clip, AdamW step. Both run with denormals flushed to zero (the Trainer sets it for the process on
CPU; without it the bare fp32 loop slowed down 3x within a few steps). The loops alternate step by
step. Prints JSON: tokens/s, achieved FLOP/s, MFU against this machine's measured matmul peak, and
the lmforge / baseline ratios (best step, and the median of the per-round ratios).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from lmforge.files import write_json  # noqa: E402
from lmforge.model import preset  # noqa: E402
from lmforge.model.transformer import Transformer  # noqa: E402
from lmforge.tokenizer.shards import _ShardWriter  # noqa: E402
from lmforge.train.trainer import TrainConfig, Trainer, measure_matmul_peak  # noqa: E402

SHAPES = {
    "gpt2-124m": {"model": "gpt2", "overrides": {}, "max_length": 256, "batch": 4},
    "quickstart": {"model": "tiny-llama", "overrides": {"d_model": 256, "n_layers": 4, "n_heads": 8, "n_kv_heads": 4,
                                                        "d_ff": 704, "vocab_size": 4096}, "max_length": 128, "batch": 16},
}


class NanoBlock(nn.Module):
    def __init__(self, d: int, h: int):
        super().__init__()
        self.h = h
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.c_fc, self.mlp_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.h, C // self.h).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.c_proj(y)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class NanoGPT(nn.Module):
    def __init__(self, vocab: int, ctx: int, d: int, layers: int, heads: int):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        self.h = nn.ModuleList(NanoBlock(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.h:
            x = block(x)
        return F.linear(self.ln_f(x), self.wte.weight)


class BaselineLoop:
    """The minimal loop: forward under autocast, cross-entropy in fp32, backward, clip, AdamW."""

    def __init__(self, model, batch, length, vocab, dtype):
        self.model, self.batch, self.length, self.vocab, self.dtype = model, batch, length, vocab, dtype
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
        self.g = torch.Generator().manual_seed(0)

    def train_step(self):
        x = torch.randint(0, self.vocab, (self.batch, self.length + 1), generator=self.g)
        with torch.autocast("cpu", dtype=self.dtype, enabled=self.dtype is not None):
            out = self.model(x[:, :-1])
            logits = self.model.logits(out) if isinstance(self.model, Transformer) else out  # lmforge: hidden states
        loss = F.cross_entropy(logits.float().reshape(-1, self.vocab), x[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def lmforge_trainer(shape, precision, steps, tmp):
    cfg_model = preset(shape["model"], **shape["overrides"])
    data = Path(tmp) / f"tokens-{cfg_model.vocab_size}"
    if not data.exists():
        data.mkdir()
        w = _ShardWriter(data, "train", np.dtype(np.uint16 if cfg_model.vocab_size <= 65536 else np.uint32), 1 << 30)
        w.add(np.random.default_rng(0).integers(0, cfg_model.vocab_size, 400_000).tolist())
        w.flush()
        write_json(data / "manifest.json", {"dtype": w.dtype.name, "vocab_size": cfg_model.vocab_size, "eos_id": 0,
                                            "bos_id": None, "splits": {"train": {"shards": w.shards, "tokens": 400_000},
                                                                       "val": {"shards": [], "tokens": 0}}})
    overrides = {k: v for k, v in shape["overrides"].items() if k != "vocab_size"}
    return Trainer(TrainConfig(data=str(data), out=str(Path(tmp) / "run"), model=shape["model"], model_overrides=overrides,
                               max_length=shape["max_length"], batch_size=shape["batch"], max_steps=steps + 1,
                               precision=precision, progress=False))


def interleaved_times(a, b, steps: int) -> tuple[list[float], list[float]]:
    """Step times of each, alternating a and b so that drift in a shared machine's speed hits both alike
    (timing one after the other moved the ratio by +-10% between runs). The first step of each is warm-up."""
    times: tuple[list[float], list[float]] = ([], [])
    for i in range(steps + 1):
        for j, loop in enumerate((a, b)):
            t0 = time.perf_counter()
            loop.train_step()
            if i:
                times[j].append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5, help="timed steps of each (after one warm-up)")
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES))
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    args = ap.parse_args()
    torch.set_flush_denormal(True)  # as the Trainer does; set before either loop runs
    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "torch": torch.__version__}, "date": time.strftime("%Y-%m-%d"), "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.shapes:
            shape = SHAPES[name]
            for precision in args.precisions:
                dtype = {"fp32": None, "bf16": torch.bfloat16}[precision]
                peak = measure_matmul_peak(torch.device("cpu"), dtype or torch.float32, n=1024)
                torch.manual_seed(0)
                trainer = lmforge_trainer(shape, precision, args.steps, tmp)
                cfg = trainer.model.cfg
                torch.manual_seed(0)
                if name == "gpt2-124m":
                    base = NanoGPT(cfg.vocab_size, cfg.max_seq_len, cfg.d_model, cfg.n_layers, cfg.n_heads)
                else:
                    base = Transformer(cfg)
                baseline = BaselineLoop(base, shape["batch"], shape["max_length"], cfg.vocab_size, dtype)
                ours_t, base_t = interleaved_times(trainer, baseline, args.steps)
                ours_s, base_s = min(ours_t), min(base_t)
                paired = sorted(b / a for a, b in zip(ours_t, base_t))  # each round's ratio: robust to drift
                del trainer, baseline, base
                tokens = shape["batch"] * shape["max_length"]
                flops = cfg.flops_per_token(shape["max_length"]) * tokens
                row = {"shape": name, "params_M": round(cfg.num_params() / 1e6, 1), "precision": precision,
                       "tokens_per_step": tokens, "matmul_peak_GFLOPs": round(peak / 1e9, 1),
                       "lmforge": {"tokens_per_s": round(tokens / ours_s, 1), "GFLOPs": round(flops / ours_s / 1e9, 1),
                                   "mfu": round(flops / ours_s / peak, 3)},
                       "baseline": {"tokens_per_s": round(tokens / base_s, 1), "GFLOPs": round(flops / base_s / 1e9, 1),
                                    "mfu": round(flops / base_s / peak, 3)},
                       "ratio_lmforge_over_baseline": round(base_s / ours_s, 3),
                       "ratio_median_of_rounds": round(paired[len(paired) // 2], 3)}
                print(json.dumps(row), file=sys.stderr)
                result["runs"].append(row)
    print(json.dumps(result, indent=2))
    assert math.isfinite(result["runs"][0]["ratio_lmforge_over_baseline"])


if __name__ == "__main__":
    main()
