"""LoRA and DoRA on lmforge's transformer, in PEFT's format: the `Lora` adapter (peft/adapter.py's protocol).

LoRA (Hu et al. 2021) adds `scale * B @ A` to a frozen weight W, with A (r x in) and B (out x r), B starting at zero
so training starts from the base model; `scale = alpha / r`, or `alpha / sqrt(r)` with rsLoRA (Kalajdzievski
2023). DoRA (Liu et al. 2024) also learns a magnitude per output row: W' = m * (W + scale B A) / ||W + scale B A||,
the norm taken per row and treated as a constant in the backward pass (the paper's section 4.3, as peft does).

Where adapters go, and under which names, follows the transformers model peft adapts (`adapter_sites`):

- Llama-like families (Llama, Mistral, Qwen2/3, SmolLM3, OLMo 2, Gemma 2/3): lmforge fuses q/k/v into `qkv_proj`
  and gate/up into `gate_up_proj` (Gemma's GeGLU too); an adapter targets a *slice* of the fused output, so
  "q_proj and v_proj only" works and adapters save under the separate HF names
  (`model.layers.0.self_attn.q_proj.lora_A.weight`) that peft, vLLM and llama.cpp's converter read.
- Phi-3 / Phi-4-mini: transformers keeps `self_attn.qkv_proj` and `mlp.gate_up_proj` fused, so peft adapts the
  fused modules (one A and B each), and so does lmforge.
- Mixture of experts (Qwen3-MoE, Mixtral): attention as above; each MoE layer's experts are two stacked parameters,
  `mlp.experts.gate_up_proj` (experts, 2 x width, d_model) and `mlp.experts.down_proj` (experts, d_model, width), in
  transformers 5 as in lmforge. They take adapters the way peft's `target_parameters` gives them (its
  `ParamWrapper`): every expert its own rank-r A and B, the update folded into the stacked weight, no dropout, no
  DoRA. "all-linear" covers attention and experts; the router (HF `mlp.gate`, lmforge `mlp.router`) only when
  named ("gate"): a changed router moves tokens to other experts. peft's names for transformers 4's per-expert
  modules (gate_proj + up_proj; Mixtral's w1 + w3, w2) mean the stacked experts, as peft converts them (the fused
  gate_up_proj then has rank 2r and alpha 2 alpha). lmforge's own targets give the dense MLP layers of a model
  that mixes dense and MoE layers no adapters (peft < 0.22 maps those names to the experts only); an adapter from
  peft >= 0.22, which keeps them on the dense layers as well, loads with them (`LoraConfig.parameters`).

Targets use the HF names, as peft's `target_modules` / `target_parameters` do: a list of names (a site matches
when its HF name ends with `.NAME`), a regular expression (matched against the whole HF name), or "all-linear".
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
    dropout: float = field(default=0.05, metadata={"help": "dropout on the adapter's input (not on experts)",
                                                   "check": (lambda v: 0 <= v < 1, "in [0, 1)")})
    targets: list | str = field(default=ALL_LINEAR, metadata={
        "help": "HF module names (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj; Phi-3: qkv_proj, "
                "gate_up_proj; GPT-2: c_attn, c_proj, c_fc; MoE experts: gate_up_proj, down_proj; a router: gate), "
                "a regular expression over full HF names, or all-linear"})
    rslora: bool = field(default=False, metadata={"help": "rank-stabilised scale alpha / sqrt(r)"})
    dora: bool = field(default=False, metadata={"help": "weight-decomposed LoRA (a learned magnitude per row)"})
    lora_plus_ratio: float = field(default=0.0, metadata={
        "help": "LoRA+: B's learning rate = this x the learning rate (0: off; the paper suggests 16)",
        "check": (lambda v: v >= 0, ">= 0")})
    # peft's target_parameters as an adapter_config.json gives them (None: `targets` names modules and expert
    # parameters alike). Given, `targets` names linear modules only (peft's target_modules, so on a model mixing
    # dense and MoE layers the dense layers' gate_proj / up_proj / down_proj, as peft >= 0.22 writes them) and this
    # list the stacked expert parameters and routers
    parameters: list | None = field(default=None, metadata={"cli": False})
    # peft's per-site rank and alpha (regular expressions over HF names -> value); lmforge takes them for expert
    # parameters, which is where peft's own conversion of MoE adapters writes them
    rank_pattern: dict = field(default_factory=dict, metadata={"cli": False})
    alpha_pattern: dict = field(default_factory=dict, metadata={"cli": False})

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    def rank_and_scale(self, hf_name: str) -> tuple[int, float]:
        """The rank and scale of the adapter at `hf_name` (peft's rank_pattern / alpha_pattern rule)."""
        r = next((v for k, v in self.rank_pattern.items() if _pattern_matches(k, hf_name)), self.r)
        alpha = next((v for k, v in self.alpha_pattern.items() if _pattern_matches(k, hf_name)), self.alpha)
        return int(r), alpha / (math.sqrt(r) if self.rslora else r)


def _pattern_matches(key: str, name: str) -> bool:
    return re.match(rf"(.*\.)?({key})$", name) is not None  # peft.utils.other.get_pattern_key


# --- where adapters can go: lmforge module, output slice, HF name ------------------------------------------------

@dataclass(frozen=True)
class Site:
    module: str  # lmforge module path, e.g. layers.0.attn.qkv_proj (experts: layers.0.mlp.experts)
    start: int  # output rows [start, end) of that module's weight
    end: int
    hf_name: str  # the HF module (model.layers.0.self_attn.q_proj), or for experts the parameter
    # (model.layers.0.mlp.experts.gate_up_proj)
    # peft's target_parameters entry when peft adapts it as a parameter (experts: "mlp.experts.gate_up_proj"; a
    # router, which transformers 5 keeps as a parameter of its own module: "mlp.gate.weight"); None: target_modules
    parameter: str | None = None

    @property
    def experts(self) -> bool:
        """A stacked expert parameter (experts, out, in), not a linear layer."""
        return self.parameter is not None and self.module.endswith(".experts")

    @property
    def leaf(self) -> str:
        return self.hf_name.rsplit(".", 1)[1]

    def matches(self, name: str) -> bool:
        """peft's rule for a target name: equal to the HF name or its end after a dot (a router also by its
        parameter, gate.weight)."""
        names = (self.hf_name, self.hf_name + ".weight") if self.parameter and not self.experts else (self.hf_name,)
        return any(n == name or n.endswith("." + name) for n in names)


# peft's names for transformers 4's per-expert modules, which its conversion maps to the stacked experts
_EXPERT_ALIASES = {"qwen3_moe": {"gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"},
                   "mixtral": {"w1": "gate_up_proj", "w3": "gate_up_proj", "w2": "down_proj"}}


def adapter_sites(cfg, routers: bool = False, dense_moe: bool = False) -> list[Site]:
    """Every linear layer (or fused slice of one) and stacked expert parameter an adapter may target, with its HF
    name; MoE routers only with `routers`; the MLP of a MoE model's dense layers only with `dense_moe`."""
    sites = []
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    for i in range(cfg.n_layers):
        if cfg.arch == "gpt2":
            h = f"transformer.h.{i}"
            sites += [Site(f"layers.{i}.attn.qkv_proj", 0, q + 2 * kv, f"{h}.attn.c_attn"),
                      Site(f"layers.{i}.attn.o_proj", 0, cfg.d_model, f"{h}.attn.c_proj"),
                      Site(f"layers.{i}.mlp.up_proj", 0, cfg.d_ff, f"{h}.mlp.c_fc"),
                      Site(f"layers.{i}.mlp.down_proj", 0, cfg.d_model, f"{h}.mlp.c_proj")]
            continue
        h, ours = f"model.layers.{i}", f"layers.{i}"
        if cfg.arch == "phi3":  # transformers keeps Phi-3's fused projections: one adapter on each
            sites += [Site(f"{ours}.attn.qkv_proj", 0, q + 2 * kv, f"{h}.self_attn.qkv_proj"),
                      Site(f"{ours}.attn.o_proj", 0, cfg.d_model, f"{h}.self_attn.o_proj"),
                      Site(f"{ours}.mlp.gate_up_proj", 0, 2 * cfg.d_ff, f"{h}.mlp.gate_up_proj"),
                      Site(f"{ours}.mlp.down_proj", 0, cfg.d_model, f"{h}.mlp.down_proj")]
            continue
        sites += [Site(f"{ours}.attn.qkv_proj", 0, q, f"{h}.self_attn.q_proj"),
                  Site(f"{ours}.attn.qkv_proj", q, q + kv, f"{h}.self_attn.k_proj"),
                  Site(f"{ours}.attn.qkv_proj", q + kv, q + 2 * kv, f"{h}.self_attn.v_proj"),
                  Site(f"{ours}.attn.o_proj", 0, cfg.d_model, f"{h}.self_attn.o_proj")]
        if cfg.is_moe(i):
            ff = cfg.moe_d_ff or cfg.d_ff
            sites += [Site(f"{ours}.mlp.experts", 0, 2 * ff, f"{h}.mlp.experts.gate_up_proj",
                           "mlp.experts.gate_up_proj"),
                      Site(f"{ours}.mlp.experts", 0, cfg.d_model, f"{h}.mlp.experts.down_proj",
                           "mlp.experts.down_proj")]
            if routers:
                sites.append(Site(f"{ours}.mlp.router", 0, cfg.n_experts, f"{h}.mlp.gate", "mlp.gate.weight"))
        elif cfg.n_experts and not dense_moe:
            continue  # a dense layer of a MoE model: lmforge's own targets give its names to the experts
        elif cfg.mlp in ("swiglu", "geglu"):  # gated: gate and up are slices of lmforge's fused gate_up_proj
            sites += [Site(f"{ours}.mlp.gate_up_proj", 0, cfg.d_ff, f"{h}.mlp.gate_proj"),
                      Site(f"{ours}.mlp.gate_up_proj", cfg.d_ff, 2 * cfg.d_ff, f"{h}.mlp.up_proj")]
        else:
            sites.append(Site(f"{ours}.mlp.up_proj", 0, cfg.d_ff, f"{h}.mlp.up_proj"))
        if not cfg.is_moe(i):
            sites.append(Site(f"{ours}.mlp.down_proj", 0, cfg.d_model, f"{h}.mlp.down_proj"))
    return sites


def model_sites(model: nn.Module, routers: bool = False, dense_moe: bool = False) -> list[Site]:
    """`adapter_sites` of the model's config, or on the portable path (model/portable.py) `portable_sites`."""
    if getattr(model, "portable", False):
        return portable_sites(model)
    return adapter_sites(model.cfg, routers, dense_moe)


def portable_sites(model: nn.Module) -> list[Site]:
    """Where LoRA / DoRA may go on a portable model: every nn.Linear of its transformers model but the output head
    (peft's "all-linear" rule; QLoRA's NF4 layers in their place), under its transformers name."""
    from lmforge.peft.nf4 import NF4Linear

    head = model.hf.get_output_embeddings()
    return [Site(f"hf.{name}", 0, m.out_features, name) for name, m in model.hf.named_modules()
            if isinstance(m, (nn.Linear, NF4Linear)) and m is not head]


def linear_modules(cfg, model: nn.Module | None = None) -> list[str]:
    """The linear layers adapters may sit on (what QLoRA stores in NF4), of `model` where it names its own sites:
    experts and routers stay in float."""
    sites = model_sites(model) if model is not None else adapter_sites(cfg)
    return sorted({s.module for s in sites if s.parameter is None})


def _expert_aliases(cfg, names: list[str]) -> tuple[list[str], dict]:
    """peft's per-expert names (gate_proj + up_proj, Mixtral's w1 + w3 and w2) as the stacked parameters they
    became, and the rank / alpha factors peft's conversion gives a fused pair (x2); one of a fused pair alone is an
    error, as in peft."""
    aliases = _EXPERT_ALIASES.get(cfg.arch, {}) if cfg.n_experts else {}
    used = [n for n in names if n in aliases]
    if not used:
        return names, {}
    for fused in sorted({aliases[n] for n in used}):
        parts = sorted(n for n, f in aliases.items() if f == fused)
        missing = [p for p in parts if p not in names]
        if missing:
            raise ConfigError(f"lora.targets: {', '.join(p for p in parts if p in names)} without {', '.join(missing)}: "
                              f"the experts keep them fused in {fused} (name {fused}, or both)")
    factors = {aliases[n]: sum(1 for m in aliases.values() if m == aliases[n]) for n in used}
    return [aliases.get(n, n) for n in names], factors


def select_sites(cfg, targets: list | str, model: nn.Module | None = None,
                 parameters: list | None = None) -> list[Site]:
    """The sites `targets` names (among `model`'s own where it names them, else cfg's), peft's matching rules; an
    unknown name is an error naming the valid ones. With `parameters` (an adapter_config.json's
    target_parameters), `targets` selects linear modules and `parameters` expert parameters and routers."""
    if parameters is not None:
        return _select_split(cfg, targets, parameters, model)
    routers = targets != ALL_LINEAR
    sites = model_sites(model, routers) if model is not None else adapter_sites(cfg, routers)
    if targets == ALL_LINEAR:
        return sites
    if isinstance(targets, str):
        pattern = re.compile(targets)
        chosen = [s for s in sites if pattern.fullmatch(s.hf_name)]
        if not chosen:
            raise ConfigError(f"lora.targets: the pattern {targets!r} matches no module (they are named like "
                              f"{sites[0].hf_name})")
        return chosen
    names, _ = _expert_aliases(cfg, [str(t) for t in targets])
    leaves = sorted({s.leaf for s in sites})
    unknown = [t for t in names if not any(s.matches(t) for s in sites)]
    if unknown:
        raise ConfigError(f"lora.targets: {', '.join(unknown)} is not a module of this model; its linear modules "
                          f"are {', '.join(leaves)} (or all-linear)")
    return [s for s in sites if any(s.matches(t) for t in names)]


def _select_split(cfg, modules: list, parameters: list, model: nn.Module | None) -> list[Site]:
    """peft's saved form: target_modules over linear modules (every layer's, a MoE model's dense layers included:
    peft >= 0.22 keeps a dense gate_proj / up_proj / down_proj a module when it converts an adapter), and
    target_parameters over the stacked experts and routers."""
    sites = model_sites(model, True, True) if model is not None else adapter_sites(cfg, True, True)
    linear = [s for s in sites if s.parameter is None]
    unknown = [t for t in modules if not any(s.matches(t) for s in linear)]
    if unknown:
        raise ConfigError(f"target_modules: {', '.join(map(str, unknown))} is not a linear module of this model; "
                          f"they are {', '.join(sorted({s.leaf for s in linear}))}")
    chosen = [s for s in linear if any(s.matches(t) for t in modules)]
    stacked = [s for s in sites if s.parameter is not None]
    unknown = [p for p in parameters if not any(s.matches(p) for s in stacked)]
    if unknown:
        raise ConfigError(f"target_parameters: {', '.join(map(str, unknown))} is not an expert parameter or router of "
                          f"this model; they are {', '.join(sorted({s.parameter for s in stacked})) or 'none'}")
    return chosen + [s for s in stacked if any(s.matches(p) for p in parameters)]


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


# --- the adapted expert stacks --------------------------------------------------------------------------------

class ExpertsLora(nn.Module):
    """LoRA on a stacked expert parameter (experts, out, in), registered on it as a torch parametrization: reading
    the parameter gives W_e + scale * B_e @ A_e for every expert e, so the grouped dispatch runs unchanged. As
    peft's ParamWrapper (which registers the same update as a parametrization for the forward): no dropout, no
    DoRA. `lora_A` (experts, r, in) and `lora_B` (experts, out, r), B starting at zero."""

    def __init__(self, weight: torch.Tensor, r: int, scale: float, hf_name: str):
        super().__init__()
        n, out, inp = weight.shape
        a = torch.empty(n * r, inp, device=weight.device, dtype=weight.dtype)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # peft's init of its (experts x r, in) lora_A
        self.lora_A = nn.Parameter(a.view(n, r, inp))
        self.lora_B = nn.Parameter(torch.zeros(n, out, r, device=weight.device, dtype=weight.dtype))
        self.r, self.scale, self.hf_name = r, scale, hf_name
        self.merged = False

    def delta(self) -> torch.Tensor:
        return self.scale * torch.bmm(self.lora_B, self.lora_A)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight if self.merged else weight + self.delta().to(weight.dtype)

    # peft's layout: lora_A (experts x r, in) expert by expert; lora_B (out, r x experts) with the expert index
    # varying fastest (ParamWrapper.get_delta_weight reshapes it to (out, r, experts))
    def peft_tensors(self) -> dict[str, torch.Tensor]:
        n, r, inp = self.lora_A.shape
        return {"lora_A.weight": self.lora_A.detach().reshape(n * r, inp),
                "lora_B.weight": self.lora_B.detach().permute(1, 2, 0).reshape(self.lora_B.shape[1], r * n)}

    def load_peft_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        n, r, inp = self.lora_A.shape
        self.lora_A.copy_(tensors["lora_A.weight"].reshape(n, r, inp))
        self.lora_B.copy_(tensors["lora_B.weight"].reshape(-1, r, n).permute(2, 0, 1))


def expert_layers(model: nn.Module) -> list[tuple[nn.Module, str, ExpertsLora]]:
    """(experts module, parameter name, its adapter) for every adapted expert stack."""
    out = []
    for module in model.modules():
        for name, chain in getattr(module, "parametrizations", {}).items():
            out += [(module, name, p) for p in chain if isinstance(p, ExpertsLora)]
    return out


def _peft_expert_keys(model: nn.Module) -> dict[ExpertsLora, str]:
    """The key prefix peft gives each adapted expert stack: its module's name, with `.base_layer` for the inner of
    two nested ParamWrappers (peft wraps the module once per parameter, in the module's parameter order:
    gate_up_proj inside, down_proj outside)."""
    by_module: dict[str, list[ExpertsLora]] = {}
    for _, _, p in expert_layers(model):
        by_module.setdefault(p.hf_name.rsplit(".", 1)[0], []).append(p)
    keys = {}
    for module, adapters in by_module.items():
        order = sorted(adapters, key=lambda p: p.hf_name.endswith("down_proj"))  # gate_up_proj first (innermost)
        for depth, p in enumerate(order):
            keys[p] = module + ".base_layer" * (len(order) - 1 - depth)
    return keys


# --- the method ---------------------------------------------------------------------------------------------------

def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def lora_layers(model: nn.Module) -> list[tuple[str, LoraLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLinear)]


def resolve_config(cfg, lora: LoraConfig) -> LoraConfig:
    """`lora` with peft's per-expert target names turned into the stacked parameters they mean, with the rank and
    alpha peft's conversion gives the fused pair; a setting the sites cannot take is a ConfigError."""
    import dataclasses

    if isinstance(lora.targets, str) or lora.parameters is not None:  # (peft's saved form names the experts itself)
        return lora
    names, factors = _expert_aliases(cfg, [str(t) for t in lora.targets])
    if not factors:
        return lora
    if lora.rslora:
        raise ConfigError("lora.rslora: peft cannot give its per-expert names (gate_proj, up_proj) a fused rank with "
                          "rsLoRA; name gate_up_proj instead")
    ranks, alphas = dict(lora.rank_pattern), dict(lora.alpha_pattern)
    for fused, k in factors.items():
        ranks.setdefault(rf".*\.{fused}", lora.r * k)
        alphas.setdefault(rf".*\.{fused}", lora.alpha * k)
    return dataclasses.replace(lora, targets=list(dict.fromkeys(names)), rank_pattern=ranks, alpha_pattern=alphas)


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
        from torch.nn.utils import parametrize

        lora = self.config = resolve_config(model.cfg, self.config)
        self.sites = select_sites(model.cfg, lora.targets, model, lora.parameters)
        for key in [*lora.rank_pattern, *lora.alpha_pattern]:
            if any(_pattern_matches(key, s.hf_name) for s in self.sites if not s.experts):
                raise ConfigError(f"lora: a per-module rank or alpha ({key!r}) is supported on expert parameters "
                                  "only")
        experts = [s for s in self.sites if s.experts]
        if experts and lora.dora:
            raise ConfigError("lora.dora: DoRA on the experts' stacked parameters is not supported (nor by peft); "
                              "target the attention only (q_proj k_proj v_proj o_proj), or use LoRA")
        by_module: dict[str, list[tuple[int, int, str]]] = {}
        for s in self.sites:
            if not s.experts:
                by_module.setdefault(s.module, []).append((s.start, s.end, s.hf_name))
        for path, slices in by_module.items():
            base = model.get_submodule(path)
            # the new dropout follows the model's mode: adapters added to a model in eval() do not drop out
            _set(model, path, LoraLinear(base, lora, slices).train(base.training))
        for s in experts:
            module = model.get_submodule(s.module)
            r, scale = lora.rank_and_scale(s.hf_name)
            parametrize.register_parametrization(module, s.leaf, ExpertsLora(getattr(module, s.leaf), r, scale,
                                                                              s.hf_name))
        for _, layer in lora_layers(model):
            for p in layer.lora_B:
                p.lr_scale = lora.lora_plus_ratio or 1.0  # LoRA+: build_optimizer gives B its own group
        for _, _, layer in expert_layers(model):
            layer.lora_B.lr_scale = lora.lora_plus_ratio or 1.0

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return ([p for _, layer in lora_layers(model) for p in [*layer.lora_A, *layer.lora_B, *layer.magnitude]]
                + [p for _, _, layer in expert_layers(model) for p in (layer.lora_A, layer.lora_B)])

    def adapter_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The adapters under peft's names: base_model.model.<hf module>.lora_A.weight / lora_B.weight /
        lora_magnitude_vector (experts: under their module's name, as peft's ParamWrapper)."""
        out = {}
        for _, layer in lora_layers(model):
            for k, (_, _, hf_name) in enumerate(layer.slices):
                for name, param in self._named(layer, k):
                    out[f"base_model.model.{hf_name}.{name}"] = param.detach().contiguous()
        for layer, key in _peft_expert_keys(model).items():
            for name, t in layer.peft_tensors().items():
                out[f"base_model.model.{key}.{name}"] = t.contiguous()
        return out

    def load_adapter_state(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        for _, layer in lora_layers(model):
            for k, (_, _, hf_name) in enumerate(layer.slices):
                for name, param in self._named(layer, k):
                    param.copy_(tensors[f"base_model.model.{hf_name}.{name}"])
        for layer, key in _peft_expert_keys(model).items():
            layer.load_peft_tensors({name: tensors[f"base_model.model.{key}.{name}"]
                                     for name in ("lora_A.weight", "lora_B.weight")})

    def _named(self, layer: LoraLinear, k: int) -> list[tuple[str, nn.Parameter]]:
        named = [("lora_A.weight", layer.lora_A[k]), ("lora_B.weight", layer.lora_B[k])]
        return named + ([("lora_magnitude_vector", layer.magnitude[k])] if self.config.dora else [])

    def adapter_config(self, model: nn.Module) -> dict:
        """peft's LoraConfig fields. With "all-linear" (and on MoE models always) the config lists the module and
        parameter names, so peft targets exactly the same layers."""
        lora = self.config
        modules = sorted({s.leaf for s in self.sites if s.parameter is None})
        parameters = sorted({s.parameter for s in self.sites if s.parameter is not None})
        plain = isinstance(lora.targets, str) and lora.targets != ALL_LINEAR and not model.cfg.n_experts
        return {"task_type": "CAUSAL_LM", "r": lora.r, "lora_alpha": lora.alpha,
                # peft's ParamWrapper refuses any dropout (an expert's update is folded into its weight)
                "lora_dropout": 0.0 if parameters else lora.dropout,
                "target_modules": lora.targets if plain else (modules or None),
                "target_parameters": parameters or None, "use_rslora": lora.rslora, "use_dora": lora.dora,
                "fan_in_fan_out": model.cfg.arch == "gpt2", "bias": "none", "modules_to_save": None,
                "inference_mode": True, "init_lora_weights": True, "rank_pattern": dict(lora.rank_pattern),
                "alpha_pattern": dict(lora.alpha_pattern), "layers_to_transform": None, "layers_pattern": None}

    @classmethod
    def from_adapter_config(cls, raw: dict, where: str) -> Lora:
        """A peft LoRA adapter_config.json (lmforge's or peft's); anything peft can express that lmforge cannot is
        a one-line error."""
        for key in ("layers_to_transform", "modules_to_save", "trainable_token_indices"):
            if raw.get(key):
                raise ConfigError(f"{where}: {key} is not supported yet")
        if raw.get("bias", "none") != "none" or raw.get("lora_bias"):
            raise ConfigError(f"{where}: trained biases (bias={raw.get('bias')!r}) are not supported yet")
        parameters = raw.get("target_parameters") or None
        targets = raw.get("target_modules") or ([] if parameters else ALL_LINEAR)
        if isinstance(targets, list):
            targets = sorted(targets)
        elif parameters:
            raise ConfigError(f"{where}: target_parameters with a pattern or all-linear as target_modules is not "
                              "supported yet")
        return cls(LoraConfig(r=int(raw["r"]), alpha=float(raw.get("lora_alpha", 8)),
                              dropout=float(raw.get("lora_dropout", 0)), targets=targets,
                              parameters=sorted(parameters) if parameters else None,
                              rslora=bool(raw.get("use_rslora")), dora=bool(raw.get("use_dora")),
                              rank_pattern=dict(raw.get("rank_pattern") or {}),
                              alpha_pattern=dict(raw.get("alpha_pattern") or {})))

    def merge(self, model: nn.Module) -> None:
        """Fold every adapter into its weight and put plain nn.Linear layers and parameters back."""
        from torch.nn.utils import parametrize

        for path, layer in lora_layers(model):
            layer.merge()
            _set(model, path, layer.plain())
        for module, name, layer in expert_layers(model):
            with torch.no_grad():
                original = module.parametrizations[name].original
                if not layer.merged:
                    original.copy_((original.float() + layer.delta().float()).to(original.dtype))
                layer.merged = True
            parametrize.remove_parametrizations(module, name, leave_parametrized=True)

    def set_merged(self, model: nn.Module, merged: bool) -> None:
        for _, layer in lora_layers(model):
            layer.merge() if merged else layer.unmerge()
        for module, name, layer in expert_layers(model):
            if layer.merged != merged:
                with torch.no_grad():
                    original = module.parametrizations[name].original
                    sign = 1.0 if merged else -1.0
                    original.copy_((original.float() + sign * layer.delta().float()).to(original.dtype))
                layer.merged = merged


def apply_lora(model: nn.Module, lora: LoraConfig) -> list[Site]:
    """Freeze the model and add adapters on the sites `lora.targets` names (apply_adapter with a Lora); returns
    them."""
    return apply_adapter(model, Lora(lora)).sites
