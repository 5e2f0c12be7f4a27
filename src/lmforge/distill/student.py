"""Students cut from a teacher: the teacher's HF directory with only some of its blocks (DistilBERT's every other
layer, Minitron's depth pruning), the embeddings, final norm and head kept. The cut works on the checkpoint's
names (`...layers.N.` / GPT-2's `...h.N.`), so it is the same for every family transformers loads; the config's
per-layer lists (layer_types, ...) keep the chosen layers' entries. The result loads in transformers and lmforge
and starts distillation close to the teacher."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from lmforge.config import ConfigError

#: the config key of the number of blocks, by family (Llama-style, GPT-2, a few others)
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
_BLOCK = re.compile(r"^(.*?\.(?:layers|h|blocks))\.(\d+)\.(.+)$")
#: files of a model directory that are not its weights or config: copied as they are
_WEIGHTS = re.compile(r"^(model.*\.safetensors(\.index\.json)?|pytorch_model.*\.bin(\.index\.json)?|config\.json)$")


def layer_count(config: dict, where: str = "config.json") -> tuple[str, int]:
    """(the key, the number of blocks) of an HF config."""
    for key in LAYER_COUNT_KEYS:
        if isinstance(config.get(key), int):
            return key, config[key]
    text = config.get("text_config")
    if isinstance(text, dict):
        raise ConfigError(f"{where}: a multimodal model (text_config); cut its language model's directory instead")
    raise ConfigError(f"{where}: no {' / '.join(LAYER_COUNT_KEYS)}: not a decoder lmforge can cut")


def choose_layers(n_layers: int, layers: list[int] | None = None, keep_every: int = 0) -> list[int]:
    """The teacher's blocks the student keeps, in order: `layers` as given, or every `keep_every`-th from block 0
    (0, k, 2k, ...: DistilBERT's choice for k = 2)."""
    if bool(layers) == bool(keep_every):
        raise ConfigError("layers: give either --layers 0,2,4 or --keep-every K")
    if keep_every:
        if keep_every < 1:
            raise ConfigError(f"keep_every: {keep_every} is not >= 1")
        return list(range(0, n_layers, keep_every))
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad:
        raise ConfigError(f"layers: {', '.join(map(str, bad))} not in 0..{n_layers - 1} (the teacher's blocks)")
    if sorted(set(layers)) != list(layers):
        raise ConfigError(f"layers: {','.join(map(str, layers))} must be increasing and without repeats")
    return list(layers)


def cut_student(teacher: str | Path, out: str | Path, layers: list[int] | None = None, keep_every: int = 0) -> dict:
    """Write a student model directory to `out`: the teacher's blocks `layers` (or every `keep_every`-th),
    renumbered 0..k-1, with everything else of the teacher. Returns {"layers", "teacher_layers", "parameters",
    "teacher_parameters"}."""
    from lmforge.files import StagedDirectory, save_tensors, write_json
    from lmforge.model.hf import read_state_dict, resolve_model_dir

    teacher = resolve_model_dir(teacher)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"out: {out} is not empty; give a new directory for the student")
    config = json.loads((teacher / "config.json").read_text(encoding="utf-8"))
    key, n = layer_count(config, str(teacher / "config.json"))
    keep = choose_layers(n, layers, keep_every)
    new_index = {old: new for new, old in enumerate(keep)}
    tensors = read_state_dict(teacher)
    student = {}
    for name, tensor in tensors.items():
        m = _BLOCK.match(name)
        if m is None:
            student[name] = tensor
        elif int(m.group(2)) in new_index:
            student[f"{m.group(1)}.{new_index[int(m.group(2))]}.{m.group(3)}"] = tensor
    if not any(_BLOCK.match(name) for name in tensors):
        raise ConfigError(f"{teacher}: no tensors named like ...layers.N. or ...h.N.; cannot tell its blocks apart")
    config[key] = len(keep)
    for field, value in list(config.items()):  # per-layer lists (layer_types, ...) keep the chosen layers' entries
        if isinstance(value, list) and len(value) == n and field not in ("architectures",):
            config[field] = [value[i] for i in keep]
    with StagedDirectory(out) as stage:
        save_tensors({k: v.contiguous() for k, v in student.items()}, stage.path("model.safetensors"),
                     metadata={"format": "pt"})
        for f in sorted(teacher.iterdir()):
            if f.is_file() and not _WEIGHTS.match(f.name):
                shutil.copy(f, stage.path(f.name))
        write_json(stage.path("config.json"), config)
    return {"layers": len(keep), "teacher_layers": n, "kept": keep,
            "parameters": sum(t.numel() for t in student.values()),
            "teacher_parameters": sum(t.numel() for t in tensors.values())}
