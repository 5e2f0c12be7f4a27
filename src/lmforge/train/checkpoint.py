"""Training checkpoints: written so that a crash never loses the last good one, read back at any world size.

Two formats. "full" (the default for one process and DDP) holds no pickle: the model is an HF directory
(config.json, generation_config.json, model.safetensors), the optimizer, EMA and RNG states are safetensors, the
rest is JSON. "sharded" (the default under FSDP) has every process write its own shard of the model, optimizer
and EMA with torch.distributed.checkpoint, so nothing is gathered on one host during training; best/ and last/
get HF weights once, at the end (`export_checkpoint`).

A checkpoint is written whole into `.NAME.tmp`, then swapped in: the old NAME is renamed to `.NAME.old`, the new
one to NAME, latest.json is rewritten, and the old one deleted. At every moment a complete checkpoint exists
under NAME or `.NAME.old`, and `resolve_checkpoint` finds it.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist

from lmforge import peft
from lmforge.files import save_tensors, write_json
from lmforge.model import CheckpointError, Transformer, load_hf_model, save_hf_model
from lmforge.model.hf import config_to_hf


class Run(Protocol):
    """What checkpoints read and restore of a training run (the Trainer is one): this module needs no more."""

    cfg: object  # a TrainConfig (saved in trainer_state.json; cfg.model names an adapter's base)
    out: Path  # the run directory
    model: torch.nn.Module  # the model being trained (FSDP-sharded, never DDP-wrapped)
    optimizer: torch.optim.Optimizer
    loader: object  # state_dict() / load_state_dict()
    ema: list[torch.Tensor] | None  # the weight average of the trainable parameters
    ema_names: list[str]
    step: int
    best_val: float
    bad_evals: int
    world: int
    is_main: bool
    fsdp: bool
    sharded: bool  # per-rank shards (torch.distributed.checkpoint), else one full checkpoint written by rank 0
    device: torch.device
    tokenizer_dir: Path | None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def rng_states() -> dict[str, torch.Tensor]:
    states = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["rng.cuda"] = torch.cuda.get_rng_state()
    return states


def restore_rng_states(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["rng.cpu"])
    if "rng.cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["rng.cuda"])


def swap_into_place(tmp: Path, final: Path) -> None:
    """Make the complete directory `tmp` the checkpoint `final` (see the module docstring)."""
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    write_json(final.parent / "latest.json", {"checkpoint": final.name,
                                              "step": json.loads((final / "trainer_state.json").read_text())["step"]})
    shutil.rmtree(old, ignore_errors=True)


def resolve_checkpoint(out: Path) -> Path | None:
    """The run's latest checkpoint directory, or None. A crash between the two renames of a swap left it at
    `.NAME.old`: it is moved back."""
    latest = out / "latest.json"
    if not latest.exists():
        return None
    try:
        name = json.loads(latest.read_text())["checkpoint"]
    except (json.JSONDecodeError, KeyError, OSError) as e:
        raise CheckpointError(f"{latest}: unreadable ({e}); delete it to start over") from None
    final, old = out / name, out / f".{name}.old"
    if not (final / "trainer_state.json").exists() and (old / "trainer_state.json").exists():
        shutil.rmtree(final, ignore_errors=True)
        os.replace(old, final)
    return final if (final / "trainer_state.json").exists() else None


def copy_tokenizer(source: Path | None, directory: Path) -> None:
    if source is None:
        return
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy(source / name, directory / name)


def _barrier(trainer: Run) -> None:
    if trainer.world > 1:
        dist.barrier()


def save_checkpoint(trainer: Run, name: str) -> Path:
    """Full: rank 0 writes (FSDP first gathers every tensor to it). Sharded: every rank writes its own part."""
    final = trainer.out / name
    if trainer.sharded:
        _write_sharded(trainer, name, final)
        return final
    full = _gather_full_state(trainer) if trainer.fsdp else None  # a collective: every rank takes part
    if trainer.is_main:
        _write_full(trainer, name, final, full)
    _barrier(trainer)
    return final


def _trainer_state(trainer: Run) -> dict:
    return {"step": trainer.step, "best_val": trainer.best_val, "bad_evals": trainer.bad_evals,
            "loader": trainer.loader.state_dict(), "config": asdict(trainer.cfg)}


def _training_state(trainer: Run, with_ema: bool) -> dict:
    """Model, optimizer and EMA keyed by parameter name: this rank's DTensor shards under FSDP, whole tensors
    otherwise. torch.distributed.checkpoint saves either and loads into any sharding (another world size)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state = {"model": get_model_state_dict(trainer.model),
             "optimizer": get_optimizer_state_dict(trainer.model, trainer.optimizer)}
    if with_ema:
        state["ema"] = dict(zip(trainer.ema_names, trainer.ema))
    return state


def _write_sharded(trainer: Run, name: str, final: Path) -> None:
    import torch.distributed.checkpoint as dcp

    tmp = trainer.out / f".{name}.tmp"
    if trainer.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier(trainer)
    dcp.save(_training_state(trainer, trainer.ema is not None), checkpoint_id=tmp / "shards",
             no_dist=not dist.is_initialized())
    if trainer.is_main:  # dcp.save returns on rank 0 after every rank's files and the metadata are written
        save_tensors(rng_states(), tmp / "rng.safetensors")
        write_json(tmp / "config.json", config_to_hf(trainer.model.cfg))
        write_json(tmp / "trainer_state.json", {"format": "sharded", "world_size": trainer.world,
                                                "ema": trainer.ema is not None, "ema_names": trainer.ema_names,
                                                **_trainer_state(trainer)})
        copy_tokenizer(trainer.tokenizer_dir, tmp)
        swap_into_place(tmp, final)
    _barrier(trainer)


def _gather_full_state(trainer: Run) -> tuple[dict, dict, list | None]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    # the EMA shadows the sharded parameters (DTensors): gathering it is a collective too
    ema = [e.full_tensor().cpu() for e in trainer.ema] if trainer.ema is not None else None
    return (get_model_state_dict(trainer.model, options=options),
            get_optimizer_state_dict(trainer.model, trainer.optimizer, options=options), ema)


def _write_full(trainer: Run, name: str, final: Path, full: tuple[dict, dict, list | None] | None = None) -> None:
    tmp = trainer.out / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if full is None and hasattr(trainer.model, "save_pretrained"):  # a task model (model/heads.py): its HF layout
        _save_task_model(trainer.model, tmp)
        opt = trainer.optimizer.state_dict()
    elif full is None and peft.adapter_of(trainer.model) is not None:
        _save_adapter_checkpoint(trainer, tmp)
        opt = trainer.optimizer.state_dict()
    elif full is None:
        save_hf_model(trainer.model, tmp)
        opt = trainer.optimizer.state_dict()
    else:  # FSDP: the gathered full weights go through an unsharded CPU replica
        replica = _replica(trainer)
        replica.load_state_dict(full[0])
        if peft.adapter_of(replica) is not None:
            _save_adapter_checkpoint(trainer, tmp, replica)
        else:
            save_hf_model(replica, tmp)
        opt = full[1]
    tensors = {}
    for idx, state in opt["state"].items():
        for key, value in state.items():
            # a nested dict (bitsandbytes' 8-bit state) is stored as KEY/SUBKEY
            for name, v in (value.items() if isinstance(value, dict) else [(None, value)]):
                full_key = f"state.{idx}.{key}" + (f"/{name}" if name is not None else "")
                tensors[full_key] = v.detach().cpu().contiguous() if torch.is_tensor(v) else torch.tensor(v)
    groups = [dict(g) for g in opt["param_groups"]]
    if trainer.ema is not None:
        ema = full[2] if full is not None else trainer.ema
        for i, e in enumerate(ema):
            tensors[f"ema.{i}"] = e.detach().cpu().contiguous()
        _save_ema_model(trainer, tmp / "ema", ema if full is not None else None, full[0] if full is not None else None)
    tensors.update(rng_states())
    save_tensors(tensors, tmp / "optimizer.safetensors")
    write_json(tmp / "trainer_state.json", {**_trainer_state(trainer), "param_groups": groups})
    copy_tokenizer(trainer.tokenizer_dir, tmp)
    swap_into_place(tmp, final)


def _save_task_model(model, directory: Path) -> None:
    """A task model's HF directory. With an adapter, the directory holds the merged weights (merged in a copy, the
    model unchanged) and resuming needs the adapter and head as they train (trainable.safetensors); the frozen base
    is the one the run loads."""
    _merged(model).save_pretrained(directory)
    if peft.adapter_of(model) is not None:
            save_tensors({n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad},
                     directory / "trainable.safetensors")


def _merged(model):
    """The model, or a copy with its adapter merged into the weights (the model itself unchanged)."""
    return model if peft.adapter_of(model) is None else peft.merge(copy.deepcopy(model))


def _replica(trainer: Run) -> Transformer:
    """An unsharded CPU model shaped like the trainer's (with a new adapter like its own), for FSDP's gathered
    weights."""
    replica = Transformer(trainer.model.cfg)
    adapter = peft.adapter_of(trainer.model)
    if adapter is not None:
        peft.apply_adapter(replica, type(adapter)(adapter.config))
    return replica


def _save_adapter_checkpoint(trainer: Run, directory: Path, model=None) -> None:
    """An adapter run's checkpoint: the adapter directory (what trains), the base model's config.json (its shape,
    for the resume check) and generation_config.json; the frozen base stays where it was loaded from."""
    from lmforge.model.hf import generation_config

    base = Path(trainer.cfg.model)
    base_name = str(base.resolve()) if base.is_dir() else trainer.cfg.model
    model = trainer.model if model is None else model
    peft.save_adapter(model, directory, base_name)
    write_json(directory / "config.json", config_to_hf(model.cfg))
    write_json(directory / "generation_config.json", generation_config(model.cfg))


def _save_ema_model(trainer: Run, directory: Path, full_ema: list | None = None,
                    full_state: dict | None = None) -> None:
    """The averaged weights as their own HF model directory (FSDP: from the gathered EMA). Frozen parameters have
    no average: they are saved as they are."""
    if full_ema is None and hasattr(trainer.model, "save_pretrained"):
        params = dict(trainer.model.named_parameters())
        live = {n: params[n].detach().clone() for n in trainer.ema_names}
        with torch.no_grad():
            for n, e in zip(trainer.ema_names, trainer.ema):
                params[n].copy_(e)
            _merged(trainer.model).save_pretrained(directory)
            for n, w in live.items():
                params[n].copy_(w)
    elif full_ema is not None:
        replica = Transformer(trainer.model.cfg)
        replica.load_state_dict({**full_state, **dict(zip(trainer.ema_names, full_ema))})
        save_hf_model(replica, directory)
    else:
        params = dict(trainer.model.named_parameters())
        live = {n: params[n].detach().clone() for n in trainer.ema_names}
        with torch.no_grad():
            for n, e in zip(trainer.ema_names, trainer.ema):
                params[n].copy_(e)
            save_hf_model(trainer.model, directory)
            for n, w in live.items():
                params[n].copy_(w)
    copy_tokenizer(trainer.tokenizer_dir, directory)


def load_checkpoint(trainer: Run, directory: Path) -> None:
    from safetensors.torch import load_file

    state = json.loads((directory / "trainer_state.json").read_text())
    if state.get("format") == "sharded":
        _load_sharded(trainer, directory, state)
        return
    if (directory / "trainable.safetensors").exists():  # a task model with LoRA: adapters and head
        trainable = load_file(str(directory / "trainable.safetensors"))
        params = dict(trainer.model.named_parameters())
        with torch.no_grad():
            for name, value in trainable.items():
                params[name].copy_(value)
        weights = None
    elif hasattr(trainer.model, "load_state_from"):
        trainer.model.load_state_from(directory)
        weights = None
    elif (directory / "adapter_config.json").exists():  # an adapter run: the adapter into the adapted model
        if trainer.fsdp:  # into an unsharded replica; its adapter tensors then go to every rank's shards
            replica = _replica(trainer)
            peft.load_adapter(replica, directory)
            weights = {n: p.detach() for n, p in replica.named_parameters() if p.requires_grad}
        else:
            peft.load_adapter(trainer.model, directory)
            weights = None
    else:
        weights = load_hf_model(directory).state_dict()
    tensors = load_file(str(directory / "optimizer.safetensors"))
    opt_state: dict = {}
    for key, value in tensors.items():
        if key.startswith("ema.") and trainer.ema is not None:
            e = trainer.ema[int(key[4:])]
            if hasattr(e, "device_mesh"):  # FSDP: keep this rank's shard of the full average
                from torch.distributed.tensor import distribute_tensor

                value = distribute_tensor(value.to(e.dtype), e.device_mesh, e.placements)
            e.copy_(value)
        elif key.startswith("state."):
            param, name = key[len("state."):].rsplit(".", 1)
            param = int(param) if param.isdigit() else param  # index (plain/DDP) or parameter name (FSDP)
            value = value.to(trainer.device) if name != "step" else value
            if "/" in name:  # a nested dict's entry (bitsandbytes' 8-bit state)
                outer, inner = name.split("/", 1)
                opt_state.setdefault(param, {}).setdefault(outer, {})[inner] = value
            else:
                opt_state.setdefault(param, {})[name] = value
    full_opt = {"state": opt_state, "param_groups": state["param_groups"]}
    if trainer.fsdp:  # every rank reads the full files and keeps its own shard (any world size)
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True)
        if weights is not None:  # (an adapter checkpoint holds the adapters only: the base is the one loaded)
            set_model_state_dict(trainer.model, weights, options=StateDictOptions(
                full_state_dict=True, strict=peft.adapter_of(trainer.model) is None))
        set_optimizer_state_dict(trainer.model, trainer.optimizer, full_opt, options=options)
    else:
        if weights is not None:
            trainer.model.load_state_dict(weights)
        trainer.optimizer.load_state_dict(full_opt)
    restore_rng_states(tensors)
    _restore_progress(trainer, state)


def _restore_progress(trainer: Run, state: dict) -> None:
    trainer.loader.load_state_dict(state["loader"])
    trainer.step, trainer.best_val, trainer.bad_evals = state["step"], state["best_val"], state["bad_evals"]


def _load_sharded(trainer: Run, directory: Path, state: dict) -> None:
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    if trainer.ema is not None and not state["ema"]:
        raise CheckpointError(f"{directory} has no weight average to resume with ema_decay={trainer.cfg.ema_decay}")
    current = _training_state(trainer, with_ema=trainer.ema is not None)  # the EMA tensors themselves: loaded in place
    dcp.load(current, checkpoint_id=directory / "shards", no_dist=not dist.is_initialized())
    set_model_state_dict(trainer.model, current["model"])
    set_optimizer_state_dict(trainer.model, trainer.optimizer, current["optimizer"])
    restore_rng_states(load_file(str(directory / "rng.safetensors")))
    _restore_progress(trainer, state)


def export_sharded_checkpoints(trainer: Run) -> None:
    """End of training: best/ and last/ get HF weights (rank 0 reads the shards; the others wait)."""
    _barrier(trainer)
    if trainer.is_main:
        for name in ("best", "last"):
            if (trainer.out / name / "shards").is_dir():
                export_checkpoint(trainer.out / name)
    _barrier(trainer)


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
    stored = {k.removeprefix("model.") for k in dcp.FileSystemReader(str(d / "shards")).read_metadata()
              .state_dict_metadata if k.startswith("model.")}
    extra = sorted(stored - set(weights["model"]))
    if extra:  # e.g. adapters: exporting the base model alone would drop what was trained
        raise CheckpointError(f"{d}: the shards hold tensors a plain model has no place for ({extra[:3]}); this "
                              "export writes full models only")
    # without a process group: planning and reading happen in this process alone
    dcp.load(weights, checkpoint_id=d / "shards", no_dist=True)
    save_hf_model(model, d)
    if state["ema"]:
        params = dict(model.named_parameters())
        names = state.get("ema_names") or list(params)
        ema = {"ema": {n: torch.empty_like(params[n], dtype=torch.float32) for n in names}}
        dcp.load(ema, checkpoint_id=d / "shards", no_dist=True)
        with torch.no_grad():
            for n in names:
                params[n].copy_(ema["ema"][n])
        save_hf_model(model, d / "ema")
        copy_tokenizer(d, d / "ema")
    return d
