"""LoRA and DoRA on lmforge's transformer, in PEFT's format: the `Lora` adapter (peft/adapter.py's protocol).

LoRA (Hu et al. 2021) adds `scale * B @ A` to a frozen weight W, with A (r x in) and B (out x r), B starting at zero
so training starts from the base model; `scale = alpha / r`, or `alpha / sqrt(r)` with rsLoRA (Kalajdzievski
2023). DoRA (Liu et al. 2024) also learns a magnitude per output row: W' = m * (W + scale B A) / ||W + scale B A||,
the norm taken per row and treated as a constant in the backward pass (the paper's section 4.3, as peft does).

lmforge fuses q/k/v into `qkv_proj` and gate/up into `gate_up_proj`; an adapter targets a *slice* of the fused
output, so "q_proj and v_proj only" works and adapters save under the separate HF names
(`model.layers.0.self_attn.q_proj.lora_A.weight`) that peft, vLLM and llama.cpp's converter read. Targets use
the HF module names, as peft's `target_modules` does: a list of names (a module matches when its HF name ends
with `.NAME`), a regular expression (matched against the whole HF name), or "all-linear".
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.config import ConfigError
from lmforge.peft.adapter import Adapter, apply_adapter, register_adapter

ALL_LINEAR = "all-linear"


@dataclass
class LoraConfig:
    r: int = field(default=8, metadata={"help": "rank of the update", "check": (lambda v: v > 0, "> 0")})
    alpha: float = field(default=16.0, metadata={"help": "scale = alpha / r (alpha / sqrt(r) with rslora)"})
    dropout: float = field(default=0.05, metadata={"help": "dropout on the adapter's input",
                                                   "check": (lambda v: 0 <= v < 1, "in [0, 1)")})
    targets: list | str = field(default=ALL_LINEAR, metadata={
        "help": "HF module names (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj; GPT-2: c_attn, "
                "c_proj, c_fc), a regular expression over full HF names, or all-linear"})
    rslora: bool = field(default=False, metadata={"help": "rank-stabilised scale alpha / sqrt(r)"})
    dora: bool = field(default=False, metadata={"help": "weight-decomposed LoRA (a learned magnitude per row)"})
    lora_plus_ratio: float = field(default=0.0, metadata={
        "help": "LoRA+: B's learning rate = this x the learning rate (0: off; the paper suggests 16)",
        "check": (lambda v: v >= 0, ">= 0")})

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


# --- where adapters can go: lmforge module, output slice, HF module name ----------------------------------------

@dataclass(frozen=True)
class Site:
    module: str  # lmforge module path, e.g. layers.0.attn.qkv_proj
    start: int  # output rows [start, end) of that module's weight
    end: int
    hf_name: str  # e.g. model.layers.0.self_attn.q_proj


def adapter_sites(cfg) -> list[Site]:
    """Every linear layer (or fused slice of one) an adapter may target, with its HF name."""
    sites = []
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    if cfg.n_experts:
        raise ConfigError("LoRA on mixture-of-experts models is not supported yet")
    for i in range(cfg.n_layers):
        if cfg.arch == "gpt2":
            h = f"transformer.h.{i}"
            sites += [Site(f"layers.{i}.attn.qkv_proj", 0, q + 2 * kv, f"{h}.attn.c_attn"),
                      Site(f"layers.{i}.attn.o_proj", 0, cfg.d_model, f"{h}.attn.c_proj"),
                      Site(f"layers.{i}.mlp.up_proj", 0, cfg.d_ff, f"{h}.mlp.c_fc"),
                      Site(f"layers.{i}.mlp.down_proj", 0, cfg.d_model, f"{h}.mlp.c_proj")]
            continue
        h = f"model.layers.{i}"
        sites += [Site(f"layers.{i}.attn.qkv_proj", 0, q, f"{h}.self_attn.q_proj"),
                  Site(f"layers.{i}.attn.qkv_proj", q, q + kv, f"{h}.self_attn.k_proj"),
                  Site(f"layers.{i}.attn.qkv_proj", q + kv, q + 2 * kv, f"{h}.self_attn.v_proj"),
                  Site(f"layers.{i}.attn.o_proj", 0, cfg.d_model, f"{h}.self_attn.o_proj")]
        if cfg.mlp == "swiglu":
            sites += [Site(f"layers.{i}.mlp.gate_up_proj", 0, cfg.d_ff, f"{h}.mlp.gate_proj"),
                      Site(f"layers.{i}.mlp.gate_up_proj", cfg.d_ff, 2 * cfg.d_ff, f"{h}.mlp.up_proj")]
        else:
            sites.append(Site(f"layers.{i}.mlp.up_proj", 0, cfg.d_ff, f"{h}.mlp.up_proj"))
        sites.append(Site(f"layers.{i}.mlp.down_proj", 0, cfg.d_model, f"{h}.mlp.down_proj"))
    return sites


def select_sites(cfg, targets: list | str) -> list[Site]:
    """The sites `targets` names, peft's matching rules; an unknown name is an error naming the valid ones."""
    sites = adapter_sites(cfg)
    if targets == ALL_LINEAR:
        return sites
    if isinstance(targets, str):
        pattern = re.compile(targets)
        chosen = [s for s in sites if pattern.fullmatch(s.hf_name)]
        if not chosen:
            raise ConfigError(f"lora.targets: the pattern {targets!r} matches no module (they are named like "
                              f"{sites[0].hf_name})")
        return chosen
    names = [str(t) for t in targets]
    leaves = sorted({s.hf_name.rsplit(".", 1)[1] for s in sites})
    unknown = [t for t in names if not any(s.hf_name == t or s.hf_name.endswith("." + t) for s in sites)]
    if unknown:
        raise ConfigError(f"lora.targets: {', '.join(unknown)} is not a module of this model; its linear modules "
                          f"are {', '.join(leaves)} (or all-linear)")
    return [s for s in sites if any(s.hf_name == t or s.hf_name.endswith("." + t) for t in names)]


# --- the adapted linear layer -------------------------------------------------------------------------------------

def keep_mask(shape: torch.Size, p: float, device) -> torch.Tensor:
    """A bool mask, True with probability 1 - p (to 1/65536). On CPU the random numbers are drawn 64 bits at a time
    and cut into four 16-bit ones: torch's per-element Bernoulli costs several times as
    much there, which made dropout a visible share of a LoRA step (docs/benchmarks.md)."""
    if device.type != "cpu":
        return torch.empty(shape, dtype=torch.bool, device=device).bernoulli_(1 - p)
    n = math.prod(shape)
    bits = torch.randint(-2**63, 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64).view(torch.int16)[:n]
    return (bits < round((1 - p) * 65536) - 32768).view(shape)


class _MaskDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        keep = keep_mask(x.shape, p, x.device)
        ctx.save_for_backward(keep)
        ctx.scale = 1 / (1 - p)
        return torch.mul(x, keep).mul_(ctx.scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return torch.mul(grad, keep).mul_(ctx.scale), None


class MaskDropout(nn.Dropout):
    """nn.Dropout that keeps a bool mask for backward. On CPU torch's dropout multiplies by a float32 noise tensor
    and saves it: 4 bytes per element of every adapter input (0.8 GB at 4 x 512 tokens on a 30-layer 576-wide model,
    peft's too) where 1 byte does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if not torch.is_grad_enabled() or not x.requires_grad:
            return F.dropout(x, self.p, True)
        return _MaskDropout.apply(x, self.p)


class LoraLinear(nn.Linear):
    """An nn.Linear (the same frozen weight and bias, under the same names) plus adapters on output slices."""

    def __init__(self, base: nn.Module, lora: LoraConfig, slices: list[tuple[int, int, str]]):
        from lmforge.peft.nf4 import NF4Linear

        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        if isinstance(base, NF4Linear):  # QLoRA: the frozen base stays in NF4 and computes its own output
            self.register_parameter("weight", None)
            self.quantized = base
            dev, dtype = base.weight_nf4.packed.device, torch.float32
        else:
            self.weight = base.weight
            self.quantized = None
            dev, dtype = base.weight.device, base.weight.dtype
        self.bias = base.bias
        self.config = lora
        self.scale = lora.scale
        self.slices = sorted(slices)  # (start, end, hf_name)
        self.dropout = MaskDropout(lora.dropout) if lora.dropout else nn.Identity()
        self.lora_A = nn.ParameterList()
        self.lora_B = nn.ParameterList()
        self.magnitude = nn.ParameterList()
        for start, end, _ in self.slices:
            a = torch.empty(lora.r, self.in_features, device=dev, dtype=dtype)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # nn.Linear's init, as peft's default
            self.lora_A.append(nn.Parameter(a))
            self.lora_B.append(nn.Parameter(torch.zeros(end - start, lora.r, device=dev, dtype=dtype)))
            if lora.dora:
                self.magnitude.append(nn.Parameter(self.base_weight()[start:end].detach().float().norm(dim=1).to(dtype)))
        self.merged = False

    def base_weight(self) -> torch.Tensor:
        """The frozen weight (dequantized from NF4 for QLoRA)."""
        return self.quantized.weight if self.quantized is not None else self.weight

    def _delta(self, k: int) -> torch.Tensor:
        return self.scale * (self.lora_B[k] @ self.lora_A[k])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.quantized(x) if self.quantized is not None else F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        xd = self.dropout(x)
        if not self.config.dora:
            # every slice at once: x @ [A_1; A_2; ...]^T, then one matmul with the B's placed block-diagonally at
            # their output rows (zeros elsewhere); no split and concatenation of the layer's output
            a = self.lora_A[0] if len(self.lora_A) == 1 else torch.cat(list(self.lora_A))
            if len(self.slices) == 1 and self.slices[0][:2] == (0, self.out_features):
                b = self.lora_B[0]
            else:
                r = self.config.r
                b = a.new_zeros(self.out_features, r * len(self.slices))
                for k, (start, end, _) in enumerate(self.slices):
                    b[start:end, k * r:(k + 1) * r] = self.lora_B[k]
            return y + self.scale * F.linear(F.linear(xd, a), b)
        dropped = not isinstance(self.dropout, nn.Identity) and self.training
        pieces, pos = [], 0
        for k, (start, end, _) in enumerate(self.slices):
            if start > pos:
                pieces.append(y[..., pos:start])
            lora = F.linear(F.linear(xd, self.lora_A[k]), self.lora_B[k])
            ys = y[..., start:end]
            w = self.base_weight()[start:end]  # DoRA (peft's formulation, the norm detached)
            norm = (w + self._delta(k).detach()).norm(dim=1).detach()
            ratio = self.magnitude[k] / norm
            if dropped:  # peft: the base output of the dropped-out input
                base = F.linear(xd, w)
            elif self.bias is not None:
                base = ys - self.bias[start:end]
            else:
                base = ys
            ys = ys + (ratio - 1) * base + ratio * self.scale * lora
            pieces.append(ys)
            pos = end
        if pos < self.out_features:
            pieces.append(y[..., pos:])
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapters into the weight (exact up to rounding); `unmerge` takes them out again."""
        if self.merged:
            return
        if self.quantized is not None:
            # QLoRA merges into the dequantized base, kept in float: re-quantizing the merged weight would add a
            # second rounding error (peft#2105, transformers#31293)
            self.weight = nn.Parameter(self.quantized.weight.detach().clone(), requires_grad=False)
            self.quantized = None
        self._dora_ratio = []
        for k, (start, end, _) in enumerate(self.slices):
            w = self.weight[start:end]
            merged = w.float() + self._delta(k).float()
            if self.config.dora:
                ratio = self.magnitude[k].float() / merged.norm(dim=1)
                self._dora_ratio.append(ratio)  # unmerge divides by it again
                merged = merged * ratio[:, None]
            w.copy_(merged.to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        for k, (start, end, _) in enumerate(self.slices):
            w = self.weight[start:end]
            delta = self._delta(k).float()
            if self.config.dora:
                # W' = ratio * (W + d), ratio = m / ||W + d|| computed at merge time
                w.copy_((w.float() / self._dora_ratio[k][:, None] - delta).to(w.dtype))
            else:
                w.copy_((w.float() - delta).to(w.dtype))
        self.merged = False

    def plain(self) -> nn.Module:
        """An nn.Linear with the current (merged or base) weight and no adapters (the NF4 layer while unmerged)."""
        if self.quantized is not None:
            return self.quantized
        # built on the meta device, then given the weight: a merge draws nothing from the global RNG (a run that
        # merges a copy for its checkpoint keeps the dropout masks it would have had)
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        out.weight, out.bias = self.weight, self.bias
        return out


# --- the method ---------------------------------------------------------------------------------------------------

def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def lora_layers(model: nn.Module) -> list[tuple[str, LoraLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLinear)]


@register_adapter
class Lora(Adapter):
    """LoRA / DoRA / rsLoRA / LoRA+ on the sites `config.targets` names (QLoRA: on a model whose linear layers
    quantize_model put in NF4); saved as peft's LORA adapter directory."""

    peft_type = "LORA"
    mergeable = True

    def __init__(self, config: LoraConfig):
        super().__init__(config)
        self.sites: list[Site] = []

    def attach(self, model: nn.Module) -> None:
        lora = self.config
        self.sites = select_sites(model.cfg, lora.targets)
        by_module: dict[str, list[tuple[int, int, str]]] = {}
        for s in self.sites:
            by_module.setdefault(s.module, []).append((s.start, s.end, s.hf_name))
        for path, slices in by_module.items():
            base = model.get_submodule(path)
            # the new dropout follows the model's mode: adapters added to a model in eval() do not drop out
            _set(model, path, LoraLinear(base, lora, slices).train(base.training))
        for _, layer in lora_layers(model):
            for p in layer.lora_B:
                p.lr_scale = lora.lora_plus_ratio or 1.0  # LoRA+: build_optimizer gives B its own group

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return [p for _, layer in lora_layers(model) for p in [*layer.lora_A, *layer.lora_B, *layer.magnitude]]

    def adapter_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The adapters under peft's names: base_model.model.<hf module>.lora_A.weight / lora_B.weight /
        lora_magnitude_vector."""
        out = {}
        for _, layer in lora_layers(model):
            for k, (_, _, hf_name) in enumerate(layer.slices):
                for name, param in self._named(layer, k):
                    out[f"base_model.model.{hf_name}.{name}"] = param.detach().contiguous()
        return out

    def load_adapter_state(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        for _, layer in lora_layers(model):
            for k, (_, _, hf_name) in enumerate(layer.slices):
                for name, param in self._named(layer, k):
                    param.copy_(tensors[f"base_model.model.{hf_name}.{name}"])

    def _named(self, layer: LoraLinear, k: int) -> list[tuple[str, nn.Parameter]]:
        named = [("lora_A.weight", layer.lora_A[k]), ("lora_B.weight", layer.lora_B[k])]
        return named + ([("lora_magnitude_vector", layer.magnitude[k])] if self.config.dora else [])

    def adapter_config(self, model: nn.Module) -> dict:
        """peft's LoraConfig fields. With "all-linear" the config lists the module names, so peft targets exactly
        the same layers."""
        lora = self.config
        leaves = sorted({hf.rsplit(".", 1)[1] for _, layer in lora_layers(model) for *_, hf in layer.slices})
        return {"task_type": "CAUSAL_LM", "r": lora.r, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
                "target_modules": lora.targets if isinstance(lora.targets, str) and lora.targets != ALL_LINEAR
                else leaves, "use_rslora": lora.rslora, "use_dora": lora.dora,
                "fan_in_fan_out": model.cfg.arch == "gpt2", "bias": "none", "modules_to_save": None,
                "inference_mode": True, "init_lora_weights": True, "rank_pattern": {}, "alpha_pattern": {},
                "layers_to_transform": None, "layers_pattern": None}

    @classmethod
    def from_adapter_config(cls, raw: dict, where: str) -> Lora:
        """A peft LoRA adapter_config.json (lmforge's or peft's); anything peft can express that lmforge cannot is
        a one-line error."""
        for key in ("rank_pattern", "alpha_pattern"):
            if raw.get(key):
                raise ConfigError(f"{where}: {key} (per-module ranks) is not supported yet")
        for key in ("layers_to_transform", "modules_to_save", "trainable_token_indices"):
            if raw.get(key):
                raise ConfigError(f"{where}: {key} is not supported yet")
        if raw.get("bias", "none") != "none" or raw.get("lora_bias"):
            raise ConfigError(f"{where}: trained biases (bias={raw.get('bias')!r}) are not supported yet")
        targets = raw.get("target_modules") or ALL_LINEAR
        if isinstance(targets, list):
            targets = sorted(targets)
        return cls(LoraConfig(r=int(raw["r"]), alpha=float(raw.get("lora_alpha", 8)),
                              dropout=float(raw.get("lora_dropout", 0)), targets=targets,
                              rslora=bool(raw.get("use_rslora")), dora=bool(raw.get("use_dora"))))

    def merge(self, model: nn.Module) -> None:
        """Fold every adapter into its weight and put plain nn.Linear layers back."""
        for path, layer in lora_layers(model):
            layer.merge()
            _set(model, path, layer.plain())

    def set_merged(self, model: nn.Module, merged: bool) -> None:
        for _, layer in lora_layers(model):
            layer.merge() if merged else layer.unmerge()


def apply_lora(model: nn.Module, lora: LoraConfig) -> list[Site]:
    """Freeze the model and add adapters on the sites `lora.targets` names (apply_adapter with a Lora); returns
    them."""
    return apply_adapter(model, Lora(lora)).sites
