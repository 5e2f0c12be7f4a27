"""The adapter protocol: what every parameter-efficient method provides, and the functions that dispatch through it.

A method (LoRA / DoRA / QLoRA in lora.py, bottleneck adapters, prompt tuning, prefix tuning, or one of your own) is
an `Adapter` (torchtune's `AdapterModule` and litgpt's lora.py are the models): an nn.Module that `apply_adapter`
registers on the model it adapts as the child `peft`, after `attach` has put the method's modules into the model.
It says which parameters train, gives its tensors under its directory format's names and takes them back, writes
and reads its `adapter_config.json` (peft's format where peft has the method, else lmforge's own `peft_type`),
merges into the weights where it can, and says what inference needs (`virtual_tokens`: the KV cache slots its
virtual tokens take, written by `prefill`).

Everything else calls the functions below and names no method: the Trainer's checkpoints (`adapter_of`,
`save_adapter`, `load_adapter`), `lmforge export merge` (`merge`), the generation engine (`virtual_tokens`,
`prefill`). A new method is a subclass registered with `register_adapter`; the loop needs no change (tested).

An adapter directory is `adapter_config.json` (with `peft_type` and `base_model_name_or_path`) and
`adapter_model.safetensors`; every tensor is checked for name and shape before any is copied in.
"""

from __future__ import annotations

import abc
import importlib
import json
import os
import re
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from lmforge.config import ConfigError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
CHILD = "peft"  # the adapter's name as a child module of the model it adapts

# the built-in methods, imported when a directory names their peft_type
_BUILTIN = {"LORA": "lmforge.peft.lora", "LMFORGE_BOTTLENECK": "lmforge.peft.bottleneck",
            "PROMPT_TUNING": "lmforge.peft.prompt", "PREFIX_TUNING": "lmforge.peft.prefix"}
_TYPES: dict[str, type[Adapter]] = {}


class Adapter(nn.Module, abc.ABC):
    """One parameter-efficient method applied to one model. `config` is the method's settings (a dataclass);
    `type(adapter)(adapter.config)` is a new, unattached adapter of the same shape (the Trainer's FSDP replica)."""

    #: adapter_config.json's "peft_type"
    peft_type: ClassVar[str]
    #: whether `merge` can fold the method into the weights; else `not_mergeable` says why (a one-line error)
    mergeable: ClassVar[bool] = False
    not_mergeable: ClassVar[str] = "this adapter cannot be merged into the weights"

    def __init__(self, config: Any):
        super().__init__()
        self.config = config

    # --- modules and parameters --------------------------------------------------------------------------------
    @abc.abstractmethod
    def attach(self, model: nn.Module) -> None:
        """Put the method's modules into `model` (in place; `apply_adapter` has frozen the model before)."""

    @abc.abstractmethod
    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """The parameters that train (everything else stays frozen)."""

    # --- the adapter directory ---------------------------------------------------------------------------------
    @abc.abstractmethod
    def adapter_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The trained tensors under the directory's names (peft's where peft has the method)."""

    @abc.abstractmethod
    def load_adapter_state(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        """Copy `tensors` into the model; their names and shapes are those of `adapter_state` (checked)."""

    @abc.abstractmethod
    def adapter_config(self, model: nn.Module) -> dict:
        """adapter_config.json's fields but `peft_type` and `base_model_name_or_path` (added by save_adapter)."""

    @classmethod
    @abc.abstractmethod
    def from_adapter_config(cls, raw: dict, where: str) -> Adapter:
        """The adapter an adapter_config.json describes (not attached); what lmforge cannot express is a
        ConfigError naming `where`."""

    # --- merging ----------------------------------------------------------------------------------------------
    def merge(self, model: nn.Module) -> None:
        """Fold the method into the weights and put plain modules back (only where `mergeable`)."""
        raise ConfigError(self.not_mergeable)

    def set_merged(self, model: nn.Module, merged: bool) -> None:
        """Fold the method into the weights for fast inference, or take it out again, keeping its modules."""
        raise ConfigError(self.not_mergeable)

    # --- inference --------------------------------------------------------------------------------------------
    def virtual_tokens(self) -> int:
        """How many KV cache slots the method's virtual tokens take before every sequence (0: none)."""
        return 0

    def prefill(self, model: nn.Module, cache) -> None:
        """Write the virtual tokens' keys and values into an empty KV cache (nothing for most methods)."""


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    """Make `load_adapter` and `read_adapter_config` know a method by its peft_type (a class decorator)."""
    _TYPES[cls.peft_type] = cls
    return cls


def adapter_type(peft_type: str, where: str = "adapter_config.json") -> type[Adapter]:
    if peft_type not in _TYPES and peft_type in _BUILTIN:
        importlib.import_module(_BUILTIN[peft_type])
    if peft_type not in _TYPES:
        known = sorted(set(_BUILTIN) | set(_TYPES))
        raise ConfigError(f"{where}: peft_type {peft_type!r}; lmforge loads {', '.join(known)}")
    return _TYPES[peft_type]


# --- finding and applying ---------------------------------------------------------------------------------------

def _attached(model: nn.Module) -> tuple[nn.Module, Adapter] | None:
    """(the module the adapter adapts, the adapter), searching `model` and its children (a classifier's backbone,
    DDP's module)."""
    for module in model.modules():
        child = module._modules.get(CHILD)
        if isinstance(child, Adapter):
            return module, child
    return None


def adapter_of(model: nn.Module) -> Adapter | None:
    """The adapter applied to `model` (or to a module inside it), or None."""
    found = _attached(model)
    return found[1] if found else None


def apply_adapter(model: nn.Module, adapter: Adapter) -> Adapter:
    """Freeze `model`, attach the adapter's modules and make exactly its parameters trainable; in place."""
    current = adapter_of(model)
    if current is not None:
        raise ValueError(f"the model already has an adapter ({current.peft_type})")
    for p in model.parameters():
        p.requires_grad_(False)
    adapter.attach(model)
    model.add_module(CHILD, adapter)
    for p in adapter.trainable_parameters(model):
        p.requires_grad_(True)
    return adapter


def parameter_counts(model: nn.Module) -> dict:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable, "trainable_percent": round(100 * trainable / max(total, 1), 4)}


# --- the adapter directory ---------------------------------------------------------------------------------------

def save_adapter(model: nn.Module, directory: str | os.PathLike, base_model_name_or_path: str | None = None) -> None:
    """adapter_config.json + adapter_model.safetensors of the model's adapter, written whole into place."""
    from lmforge.files import StagedDirectory, save_tensors, write_json

    found = _attached(model)
    if found is None:
        raise ValueError("the model has no adapter to save")
    owner, adapter = found
    config = {"peft_type": adapter.peft_type, **adapter.adapter_config(owner),
              "base_model_name_or_path": base_model_name_or_path}
    with StagedDirectory(directory) as stage:
        save_tensors(adapter.adapter_state(owner), stage.path(ADAPTER_WEIGHTS), metadata={"format": "pt"})
        write_json(stage.path(ADAPTER_CONFIG), config)


def read_adapter_config(directory: str | os.PathLike) -> tuple[Adapter, dict]:
    """The (unattached) adapter an adapter directory holds, and its raw adapter_config.json."""
    path = Path(directory) / ADAPTER_CONFIG
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{directory}: no {ADAPTER_CONFIG}; not a PEFT adapter directory") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    # peft writes LoRA configs with peft_type; a config without one is LoRA (peft's default)
    cls = adapter_type(raw.get("peft_type") or "LORA", str(path))
    return cls.from_adapter_config(raw, str(path)), raw


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from lmforge.model.hf import CheckpointError

    path = directory / ADAPTER_WEIGHTS
    if not path.exists():
        bin_path = directory / "adapter_model.bin"
        raise CheckpointError(f"{directory}: no {ADAPTER_WEIGHTS}" + (" (adapter_model.bin is a pickle lmforge "
                              "does not load; re-save it with safe_serialization=True)" if bin_path.exists() else ""))
    try:
        tensors = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file: one line naming it
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    return {re.sub(r"\.default(?=\.|$)", "", k): v for k, v in tensors.items()}  # peft's adapter-name infix


def _more(names: list[str]) -> str:
    return names[0] + (f" and {len(names) - 1} more" if len(names) > 1 else "")


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Put an adapter directory's adapter on `model` (a base model, or one with an adapter of the same kind whose
    tensors are replaced), in place; every tensor must fit. Returns the model."""
    from lmforge.model.hf import CheckpointError

    directory = Path(directory)
    adapter, _ = read_adapter_config(directory)
    found = _attached(model)
    if found is None:
        apply_adapter(model, adapter)
        owner = model
    else:
        owner, current = found
        if current.peft_type != adapter.peft_type:
            raise CheckpointError(f"{directory}: a {adapter.peft_type} adapter, but the model has a "
                                  f"{current.peft_type} one")
        adapter = current  # its tensors are replaced (a resumed run's adapter)
    tensors = _read_weights(directory)
    wanted = adapter.adapter_state(owner)
    missing, extra = sorted(set(wanted) - set(tensors)), sorted(set(tensors) - set(wanted))
    if missing or extra:
        raise CheckpointError(f"{directory / ADAPTER_WEIGHTS}: adapter tensors do not fit this model: "
                              + (f"missing {_more(missing)}" if missing else "") + ("; " if missing and extra else "")
                              + (f"unexpected {_more(extra)}" if extra else ""))
    for name, t in tensors.items():
        if t.shape != wanted[name].shape:
            raise CheckpointError(f"{directory / ADAPTER_WEIGHTS}: {name} has shape {tuple(t.shape)}, this model "
                                  f"needs {tuple(wanted[name].shape)}")
    with torch.no_grad():
        adapter.load_adapter_state(owner, tensors)
    return model


# --- merging and inference ----------------------------------------------------------------------------------------

def merge(model: nn.Module) -> nn.Module:
    """Fold the adapter into the weights and remove it (the model then saves as an HF model); in place."""
    found = _attached(model)
    if found is None:
        raise ValueError("the model has no adapter to merge")
    owner, adapter = found
    adapter.merge(owner)
    delattr(owner, CHILD)
    return model


def set_merged(model: nn.Module, merged: bool) -> None:
    """Merge the adapter for fast inference, or unmerge it, keeping its modules."""
    found = _attached(model)
    if found is not None:
        found[1].set_merged(found[0], merged)


def virtual_tokens(model: nn.Module) -> int:
    """The KV cache slots the model's adapter fills before any token (prompt / prefix tuning), else 0."""
    adapter = adapter_of(model)
    return adapter.virtual_tokens() if adapter is not None else 0


def prefill(model: nn.Module, cache) -> None:
    """Start an empty KV cache with the adapter's virtual tokens (nothing without them)."""
    found = _attached(model)
    if found is not None:
        found[1].prefill(found[0], cache)
