"""The portable path: a decoder that transformers can build, and lmforge's native decoder cannot, run by
transformers' own modeling code behind the interface of lmforge's `Transformer`.

LLaMA-Factory reaches a hundred families by running transformers' modules; this gives lmforge the same reach as
a fallback, while the native families (model/hf.py: SUPPORTED) stay on lmforge's own decoder. `load_hf_model` takes
this path for a `model_type` outside SUPPORTED and for a native family whose config.json uses a feature the native
decoder does not implement (model/hf.py: `UnsupportedFeature`), and says so in one line.

`PortableModel` answers what the Trainer, the objectives, evaluation's scoring, the scheduler (infer/scheduler.py,
the one step loop) and the server ask of a model:

- `forward(input_ids, positions, attention_mask, cache, segment_ids)` -> the final-norm hidden states (B, T, d);
  `logits(hidden)` and `loss(hidden, targets, mask)` apply the head. The head runs through the causal-LM class's
  own forward (its logit scaling or soft-capping included: Granite divides by `logits_scaling`, Cohere multiplies
  by `logit_scale`), with the base model swapped for the given hidden states.
- The KV cache is lmforge's `KVCache` (preallocated rows x slots per layer), which transformers writes through
  `SlotCache`, a transformers `Cache` whose layers store into it. So the scheduler's row management (admitting and
  evicting rows mid-flight, shifting them, copying a prompt's slots to its group's rows, the prefix cache) works on
  the portable path unchanged: it moves the same tensors it moves for the native decoder.
- `segment_ids` (packed training rows) become positions that restart at each segment with no attention mask: the
  form transformers itself reads as packed sequences (masking_utils.find_packed_sequence_indices).

What it does not do (each refused with one line where a user asks for it): the static cache of `--compile`,
lmforge's packed CPU kernels and int8 / int4 weights (transformers' modules call their own linear layers), GGUF
export, prompt / prefix tuning, bottleneck adapters and `--method freeze` (they work on lmforge's own blocks),
classification heads, and models whose cache is not keys and values of one shape per layer (state-space and hybrid
layers, MLA's unequal key and value widths), which the load probe finds.
"""

from __future__ import annotations

import functools
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.model.config import ModelConfig
from lmforge.model.transformer import KVCache

_HEAD_LOCK = threading.Lock()  # (a module's: a model's own lock would not survive copy.deepcopy)


class PortableError(ValueError):
    """A model the portable path cannot run either (raised as model/hf.py's CheckpointError by its callers)."""


@functools.cache
def _cache_classes():
    """`SlotCache`, defined on first use (transformers is heavy to import) and once."""
    from transformers.cache_utils import Cache, CacheLayerMixin

    class SlotLayer(CacheLayerMixin):
        """One layer of an lmforge `KVCache` seen as a transformers cache layer: keys and values are written at the
        cache's fill position (every layer of a forward at the same one; the model advances it after the forward)
        and the filled slots are returned."""

        is_sliding = False  # every slot is kept; a sliding layer's mask limits what it reads

        def __init__(self, kv: KVCache, layer: int):
            super().__init__()
            self.kv, self.layer = kv, layer
            self.is_initialized = True

        def lazy_initialization(self, key_states, value_states) -> None:
            pass

        def update(self, key_states, value_states, *args, **kwargs):
            kv, start = self.kv, self.kv.length
            end = start + key_states.shape[-2]
            if end > kv.max_len:
                raise ValueError(f"KV cache is full: {end} > {kv.max_len} positions")
            kv.k[self.layer][:, :, start:end] = key_states
            kv.v[self.layer][:, :, start:end] = value_states
            self.keys, self.values = kv.k[self.layer][:, :, :end], kv.v[self.layer][:, :, :end]
            return self.keys, self.values

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return self.kv.length + query_length, 0

        def get_seq_length(self) -> int:
            return self.kv.length

        def get_max_length(self) -> int:
            return self.kv.max_len

    class SlotCache(Cache):
        """transformers' view of an lmforge `KVCache`: one `SlotLayer` per layer."""

        def __init__(self, kv: KVCache):
            super().__init__(layers=[SlotLayer(kv, i) for i in range(len(kv.k))])

    return SlotCache


class _GivenHidden(nn.Module):
    """Stands in for a causal-LM class's base model so that its own forward computes the head over given hidden
    states (see `PortableModel.logits`)."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__()
        self.hidden = hidden

    def forward(self, *args, **kwargs):
        return _head_input_class()(last_hidden_state=self.hidden)


@functools.cache
def _head_input_class():
    """A base-model output with every field a causal-LM class may read after its base model: GPT-BigCode reads
    cross_attentions, the mixture-of-experts classes router_logits."""
    from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions

    @dataclass
    class HeadInput(BaseModelOutputWithPastAndCrossAttentions):
        router_logits: tuple | None = None

    return HeadInput


@dataclass
class PortableConfig(ModelConfig):
    """lmforge's description of a transformers model's shape (what the scheduler, the trainer's figures and the
    stop ids read: sizes, the context, the special ids) and, in `hf_config`, its own config.json (what
    model/hf.py's `config_to_hf` gives back for it: an adapter checkpoint records its base's config)."""

    hf_config: dict = field(default_factory=dict, repr=False)


def portable_config(hf_config, heads: tuple[int, int], architecture: str) -> PortableConfig:
    """The PortableConfig of a transformers config; `heads` = (kv heads, head dim) as its cache holds them."""
    text = hf_config.get_text_config()
    d_model, n_heads = text.hidden_size, text.num_attention_heads
    kv_heads, head_dim = heads
    eos = getattr(text, "eos_token_id", None)
    return PortableConfig(hf_config={**hf_config.to_dict(), "architectures": [architecture]},
                          arch=hf_config.model_type, vocab_size=text.vocab_size, n_layers=text.num_hidden_layers,
                          d_model=d_model, n_heads=n_heads if n_heads % kv_heads == 0 else kv_heads,
                          n_kv_heads=kv_heads, head_dim=head_dim,
                          d_ff=getattr(text, "intermediate_size", None) or 4 * d_model,
                          max_seq_len=getattr(text, "max_position_embeddings", None) or 2048, pos="learned",
                          tie_embeddings=bool(getattr(text, "tie_word_embeddings", False)),
                          bos_token_id=getattr(text, "bos_token_id", None),
                          eos_token_id=eos[0] if isinstance(eos, list) and eos else eos, **_moe_fields(text))


def _moe_fields(text) -> dict:
    """n_experts / experts_top_k / router_aux_coef of a mixture-of-experts config (transformers spells the expert
    count num_local_experts or num_experts, the top-k num_experts_per_tok); {} for a dense model."""
    n = getattr(text, "num_local_experts", None) or getattr(text, "num_experts", None) or 0
    top_k = getattr(text, "num_experts_per_tok", None)
    if not n or not top_k:
        return {}
    return {"n_experts": int(n), "experts_top_k": int(top_k),
            "router_aux_coef": getattr(text, "router_aux_loss_coef", None)}


def _balancing_loss_func(hf: nn.Module):
    """The `load_balancing_loss_func` of the model's own modeling module (transformers defines one per MoE family),
    or None where the family has none (no balancing loss is added then)."""
    return getattr(sys.modules.get(type(hf).__module__), "load_balancing_loss_func", None)


class PortableModel(nn.Module):
    """A transformers causal LM (`hf`) behind lmforge's decoder interface (see the module docstring). `why`: the
    reason it is on the portable path, for the one line that says so."""

    portable = True

    def __init__(self, hf: nn.Module, why: str = ""):
        super().__init__()
        self.hf = hf
        self.why = why
        # the base model, held outside the module tree (no second name in the state dict): `logits` swaps it out of
        # `hf` for a moment, under _HEAD_LOCK (the server scores prompts on other threads while the engine steps)
        self._base = (getattr(hf, hf.base_model_prefix),)
        self.inference_only: str | None = None
        self._routing: tuple | None = None  # (router logits per MoE layer, attention mask) of the last training forward
        self.cfg = portable_config(hf.config, _cache_heads(hf), type(hf).__name__)

    # --- what callers read ----------------------------------------------------------------------------------------
    @property
    def embed(self) -> nn.Module:
        """The token embedding (its weight's device and dtype are the model's)."""
        return self.hf.get_input_embeddings()

    @property
    def hf_class(self) -> str:
        return type(self.hf).__name__

    def output_weight(self) -> torch.Tensor:
        return self.hf.get_output_embeddings().weight

    def aux_loss(self) -> torch.Tensor:
        """The load-balancing loss of the last training forward, computed by the model's own modeling module
        (`load_balancing_loss_func` over the router logits transformers recorded, as its causal-LM class computes
        `aux_loss`); 0 for a dense model or before a training forward."""
        balancing = _balancing_loss_func(self.hf)
        if balancing is None or self._routing is None:
            return torch.zeros((), device=self.embed.weight.device)
        router_logits, attention_mask = self._routing
        top_k = self.cfg.experts_top_k
        return balancing(router_logits, self.cfg.n_experts, top_k, attention_mask)

    def router_balance(self) -> dict[str, float]:
        """How evenly the last training forward routed its tokens (the native decoder's `router_max_load`: the
        busiest expert's share of the routed tokens times the expert count, 1.0 = even), over all MoE layers."""
        if self._routing is None or not self.cfg.n_experts:
            return {}
        with torch.no_grad():
            counts = sum(torch.bincount(layer.float().topk(self.cfg.experts_top_k, dim=-1).indices.flatten(),
                                        minlength=self.cfg.n_experts) for layer in self._routing[0])
        return {"router_max_load": (counts.max() * self.cfg.n_experts / counts.sum()).item()}

    # --- the forward pass -----------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, cache: KVCache | None = None,
                segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Final-norm hidden states (B, T, d_model), with the meaning of `Transformer.forward`'s arguments:
        positions (B, T) default to the slots after what `cache` holds (each row's real tokens counted where
        attention_mask (B, cache + T) marks left padding); segment_ids (B, T) keep packed sequences apart."""
        B, T = input_ids.shape
        device = input_ids.device
        if cache is not None and cache.static:
            raise ValueError("the portable path decodes with the dynamic KV cache (--compile's static cache is for "
                             "lmforge's native decoder)")
        if segment_ids is not None and cache is not None:
            raise ValueError("segment_ids are for packed training sequences, not for decoding with a KV cache")
        start = cache.length if cache is not None else 0
        if segment_ids is not None:
            if attention_mask is not None:
                raise ValueError("segment_ids and attention_mask together are not supported on the portable path")
            # each segment counts from 0: transformers reads restarting positions without a mask as packed rows
            slots = torch.arange(T, device=device).expand(B, T)
            first = torch.ones_like(segment_ids, dtype=torch.bool)
            first[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
            positions = slots - torch.cummax(torch.where(first, slots, torch.zeros_like(slots)), dim=1).values
        elif positions is None:
            slots = (start + torch.arange(T, device=device)).expand(B, T)
            positions = ((attention_mask.long().cumsum(-1) - 1).clamp(min=0).gather(1, slots)
                         if attention_mask is not None else slots)
        # a training forward of a mixture-of-experts model asks transformers for the router logits, which
        # `aux_loss` turns into the balancing loss (the Trainer adds it when the model has experts)
        routing = self.training and self.cfg.n_experts > 0 and _balancing_loss_func(self.hf) is not None
        extra = {"output_router_logits": True} if routing else {}
        out = self._base[0](input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                            cache=_cache_classes()(cache) if cache is not None else None, use_cache=cache is not None,
                            **extra)
        self._routing = (out.router_logits, attention_mask) if routing else None
        if cache is not None:
            cache.advance(T)
        return out.last_hidden_state

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The causal-LM class's head over hidden states (..., d_model) -> (..., vocab): its own forward, with the
        base model replaced for the call by one that returns `hidden`, so whatever the class does after its
        base model (logit scaling, soft-capping) is done as transformers does it."""
        shape = hidden.shape[:-1]
        flat = hidden.reshape(1, -1, hidden.shape[-1])
        prefix = self.hf.base_model_prefix
        with _HEAD_LOCK:
            self.hf._modules[prefix] = _GivenHidden(flat)
            try:
                out = self.hf(input_ids=torch.zeros(flat.shape[:2], dtype=torch.long, device=flat.device),
                              use_cache=False)
            finally:
                self.hf._modules[prefix] = self._base[0]
        return out.logits.reshape(*shape, -1)

    def loss(self, hidden: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Mean next-token cross entropy of hidden states (..., d_model) against `targets` (...) (-100: no loss);
        `mask` keeps only the positions where it is True (`Transformer.loss`)."""
        if mask is not None:
            hidden, targets = hidden[mask], targets[mask]
        logits = self.logits(hidden)
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))

    # --- saving ---------------------------------------------------------------------------------------------------
    def save(self, directory: Path, dtype: torch.dtype | None = None) -> None:
        """transformers' own save_pretrained (config.json, model.safetensors, generation_config.json) into
        `directory`; `dtype` converts a copy's weights first."""
        model = self.hf
        if dtype is not None and dtype != self.embed.weight.dtype:
            import copy

            model = copy.deepcopy(model).to(dtype)
        model.save_pretrained(directory)


def _cache_heads(hf: nn.Module) -> tuple[int, int]:
    """(kv heads, head dim) of a model's cache, read from one probe step: every layer must cache keys and values
    of one shape, as lmforge's KVCache holds them; anything else is a PortableError naming what differs."""
    from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

    base = getattr(hf, hf.base_model_prefix)
    cache = DynamicCache()
    device = hf.get_input_embeddings().weight.device
    try:
        with torch.no_grad():
            base(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device), cache=cache, use_cache=True)
    except Exception as e:  # a model that needs something a plain decoder step does not give it
        raise PortableError(f"its modeling code does not take a plain decoder step with a key/value cache "
                            f"({type(e).__name__}: {_first_line(e)})") from None
    layers = cache.layers if isinstance(cache, Cache) else []
    n_layers = hf.config.get_text_config().num_hidden_layers
    if len(layers) != n_layers or not all(type(x) is DynamicLayer and x.keys is not None for x in layers):
        raise PortableError(f"its cache is not keys and values in each of its {n_layers} layers (state-space or "
                            "hybrid layers are not supported)")
    shapes = {(tuple(x.keys.shape[1:4:2]), tuple(x.values.shape[1:4:2])) for x in layers}
    if len(shapes) != 1 or len({*next(iter(shapes))}) != 1:
        raise PortableError(f"its layers cache keys and values of different shapes ({sorted(shapes)}); lmforge's "
                            "KV cache holds one (heads, head_dim) for all")
    kv_heads, head_dim = next(iter(shapes))[0]
    return kv_heads, head_dim


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [""])[0]


def load_portable(d: Path, raw: dict, why: str, dtype: torch.dtype = torch.float32, device: str = "cpu",
                  announce: bool = True) -> PortableModel:
    """The transformers model of the local directory `d` (config.json `raw`), offline, as a PortableModel; one
    line on stderr says it runs on the portable path and why. What transformers cannot build is a PortableError
    naming the model_type."""
    import transformers

    model_type = raw.get("model_type")
    if raw.get("auto_map"):
        raise PortableError(f"model_type '{model_type}' needs the model's own Python code (auto_map); lmforge does "
                            "not run code from a model directory")
    try:
        config = transformers.AutoConfig.from_pretrained(str(d), local_files_only=True)
    except (ValueError, KeyError) as e:
        raise PortableError(f"model_type '{model_type}' is unknown to lmforge and to transformers "
                            f"{transformers.__version__} ({_first_line(e)})") from None
    except (TypeError, AttributeError) as e:  # a known type whose config.json transformers' class cannot take
        raise PortableError(f"model_type '{model_type}': transformers' config class cannot read this config.json "
                            f"({type(e).__name__}: {_first_line(e)})") from None
    if getattr(config, "is_encoder_decoder", False):
        raise PortableError(f"model_type '{model_type}' is an encoder-decoder; lmforge runs decoders")
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise PortableError(f"model_type '{model_type}': transformers {transformers.__version__} has no causal "
                            "language model for it")
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # one line says what loads (below), not transformers' per-tensor bar
    try:
        hf, info = transformers.AutoModelForCausalLM.from_pretrained(str(d), config=config, local_files_only=True,
                                                                     dtype=dtype, output_loading_info=True)
    except OSError as e:  # no weights file, or one transformers cannot read
        raise PortableError(f"transformers cannot read its weights ({_first_line(e)})") from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    # transformers leaves a tensor the checkpoint lacks at its random init, with a warning: refused here, by name
    for key, what in (("missing_keys", "lacks tensors"), ("unexpected_keys", "has tensors"),
                      ("mismatched_keys", "has tensors of other shapes")):
        names = sorted(str(k if isinstance(k, str) else k[0]) for k in info.get(key) or ())
        if names:
            raise PortableError(f"model_type '{model_type}': the checkpoint {what} than transformers' "
                                f"{type(hf).__name__} expects: {names[:5]}{' ...' if len(names) > 5 else ''}")
    try:
        model = PortableModel(hf.to(device).eval(), why)
    except PortableError as e:
        raise PortableError(f"model_type '{model_type}': {e}") from None
    if announce:
        print(f"lmforge: portable path (transformers' {model.hf_class}): {why}", file=sys.stderr)
    return model
