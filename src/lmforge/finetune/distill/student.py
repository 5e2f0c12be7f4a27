"""Students cut from a teacher: the teacher's HF directory with only some of its blocks (DistilBERT's every other
layer, Minitron's depth pruning), the embeddings, final norm and head kept, and optionally narrower MLPs (Minitron's
width pruning of the intermediate neurons, ranked by their weights or by their activations over calibration text).
The cut works on the checkpoint's
names (`...layers.N.` / GPT-2's `...h.N.`), so it is the same for every family transformers loads; the config's
per-layer lists (layer_types, ...) keep the chosen layers' entries. The result loads in transformers and lmforge
and starts distillation close to the teacher."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from functools import partial
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


# the MLP of a block, by the checkpoint's names: (input projections, output projection, layout)
#   glu:   gate_proj / up_proj (F, D) and down_proj (D, F) — Llama, Qwen, Mistral, Gemma, SmolLM3, OLMo 2
#   fused: gate_up_proj (2F, D), gate rows first, and down_proj (D, F) — Phi-3
#   conv:  GPT-2's Conv1D c_fc (D, F) and c_proj (F, D)
_MLPS = {"glu": (("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj"), "fused": (("mlp.gate_up_proj",), "mlp.down_proj"),
         "conv": (("mlp.c_fc",), "mlp.c_proj")}
_WIDTH_KEYS = ("intermediate_size", "n_inner")


def _neuron_importance(tensors: dict, block: str, layout: str, width: int):
    """Each intermediate neuron's weight-based importance: the norm of its input row(s) times the norm of its output
    column, so a neuron that reads or writes nothing scores 0 (Minitron ranks by activations over calibration data;
    the weights stand in for them here, with no data needed)."""
    ins, out = _MLPS[layout]
    if layout == "conv":
        read = tensors[f"{block}.{ins[0]}.weight"].float().norm(dim=0)
        write = tensors[f"{block}.{out}.weight"].float().norm(dim=1)
    elif layout == "fused":
        w = tensors[f"{block}.{ins[0]}.weight"].float()
        read = w[:width].norm(dim=1) * w[width:].norm(dim=1)
        write = tensors[f"{block}.{out}.weight"].float().norm(dim=0)
    else:
        read = tensors[f"{block}.{ins[0]}.weight"].float().norm(dim=1) * tensors[f"{block}.{ins[1]}.weight"].float().norm(dim=1)
        write = tensors[f"{block}.{out}.weight"].float().norm(dim=0)
    return read * write


#: how --d-ff ranks the intermediate neurons: by their weights (no data) or by their activations (--calib-data)
PRUNE_BY = ["weight", "activation"]
#: calibration tokens of --prune-by activation (Minitron measures on about this order of tokens; more costs a forward
#: pass of the student per row and changes little in which neurons rank highest)
CALIB_TOKENS = 8192
#: the longest calibration row (one document's first tokens), within the model's own context
CALIB_ROW = 512
# the input of a block's MLP output projection is the intermediate activation: lmforge's down_proj (every dense
# family), or transformers' own module names on the portable path (down_proj, GPT-2's c_proj)
_DOWN = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.mlp\.(?:down_proj|c_proj)$")


def activation_importance(model_dir: str | Path, calib_data: list[str], calib_tokens: int = CALIB_TOKENS,
                          text_field: str = "text", tokenizer_dir: str | Path | None = None) -> dict:
    """Minitron's activation-based importance of every block's intermediate MLP neurons: the mean |activation| at the
    input of the MLP's output projection, over the first `calib_tokens` tokens of the documents in `calib_data`
    (each document one row of at most CALIB_ROW tokens, or the model's context if shorter; the last row cut to what
    is left). Returns {block index: (d_ff,) float64 tensor}."""
    import torch

    from lmforge.data.sources import iter_documents
    from lmforge.model import load_hf_model
    from lmforge.tokenizer import load_tokenizer

    model = load_hf_model(model_dir).eval()
    tok = load_tokenizer(tokenizer_dir or model_dir)
    window = min(CALIB_ROW, getattr(model.cfg, "max_seq_len", CALIB_ROW) or CALIB_ROW)
    sums: dict[int, torch.Tensor] = {}

    def record(block: int, module, inputs) -> None:
        a = inputs[0].detach().abs().double()
        sums[block] = sums.get(block, 0) + a.reshape(-1, a.shape[-1]).sum(0)

    hooks = [m.register_forward_pre_hook(partial(record, int(found.group(1))))
             for name, m in model.named_modules() if (found := _DOWN.search(name))]
    if not hooks:
        raise ConfigError(f"{model_dir}: no MLP output projections (down_proj / c_proj) to measure activations at")
    seen = 0
    try:
        with torch.no_grad():
            for doc in iter_documents(calib_data, text_field=text_field):
                ids = tok.encode_for_model([doc.text], max_length=min(window, calib_tokens - seen))[0]
                if ids:
                    model(torch.tensor([ids]))
                    seen += len(ids)
                if seen >= calib_tokens:
                    break
    finally:
        for h in hooks:
            h.remove()
    if not seen:
        raise ConfigError(f"calib_data: {', '.join(map(str, calib_data))} holds no text to measure activations on")
    return {block: total / seen for block, total in sums.items()}


def _prune_width(tensors: dict, config: dict, d_ff: int, where: str, importance: dict | None = None) -> dict:
    """The checkpoint with every block's MLP cut to its `d_ff` most important intermediate neurons (kept in their
    order), and the config's width set to `d_ff`. `importance`: {block index: a score per neuron}
    (`activation_importance`); without it, the weights' `_neuron_importance`."""
    import torch

    key = next((k for k in _WIDTH_KEYS if k in config), None)
    width = config.get(key) if key else None
    if key == "n_inner" and width is None:
        width = 4 * config["n_embd"]  # GPT-2's default
    if not isinstance(width, int):
        raise ConfigError(f"{where}: no intermediate_size (or GPT-2's n_inner) to narrow")
    if not 0 < d_ff <= width:
        raise ConfigError(f"d_ff: {d_ff} is not in 1..{width} (the teacher's MLP width)")
    blocks = sorted({m.group(1) + "." + m.group(2) for name in tensors if (m := _BLOCK.match(name))})
    pruned = dict(tensors)
    for block in blocks:
        layout = next((k for k, (ins, _) in _MLPS.items() if f"{block}.{ins[0]}.weight" in tensors), None)
        if layout is None:
            experts = any(name.startswith(f"{block}.") and "expert" in name for name in tensors)
            raise ConfigError(f"{where}: {block} has " + ("experts: --d-ff narrows dense MLPs only" if experts else
                              "no MLP lmforge can narrow (gate_proj/up_proj/down_proj, gate_up_proj, c_fc/c_proj)"))
        score = (_neuron_importance(tensors, block, layout, width) if importance is None else
                 importance[int(block.rsplit(".", 1)[1])])
        keep = score.topk(d_ff).indices.sort().values
        ins, out = _MLPS[layout]
        for name in ins:
            rows = keep if layout != "fused" else torch.cat([keep, keep + width])
            for suffix in ("weight", "bias"):
                full = f"{block}.{name}.{suffix}"
                if full in tensors:
                    t = tensors[full]
                    pruned[full] = t[:, rows] if layout == "conv" and t.dim() == 2 else t[rows]
        down = f"{block}.{out}.weight"
        pruned[down] = tensors[down][keep] if layout == "conv" else tensors[down][:, keep]
    config[key] = d_ff
    return pruned


def cut_student(teacher: str | Path, out: str | Path, layers: list[int] | None = None, keep_every: int = 0,
                d_ff: int | None = None, prune_by: str = PRUNE_BY[0], calib_data: list[str] | None = None,
                calib_tokens: int = CALIB_TOKENS, text_field: str = "text") -> dict:
    """Write a student model directory to `out`: the teacher's blocks `layers` (or every `keep_every`-th; all of
    them when neither is given and `d_ff` is), renumbered 0..k-1, with everything else of the teacher; with `d_ff`,
    each block's MLP keeps its `d_ff` most important intermediate neurons: by their weights (`prune_by` "weight",
    `_neuron_importance`) or by their mean |activation| over `calib_tokens` tokens of `calib_data` in the
    depth-cut student (`prune_by` "activation", `activation_importance`). Returns {"layers", "teacher_layers",
    "kept", "parameters", "teacher_parameters", "d_ff", "prune_by"}."""
    from lmforge.files import StagedDirectory, save_tensors, write_json
    from lmforge.model.hf import read_state_dict, resolve_model_dir

    if prune_by not in PRUNE_BY:
        raise ConfigError(f"prune_by: {prune_by!r} is not one of {', '.join(PRUNE_BY)}")
    if prune_by == "activation" and not d_ff:
        raise ConfigError("prune_by: activation ranks the MLP neurons --d-ff keeps; give --d-ff N too")
    if prune_by == "activation" and not calib_data:
        raise ConfigError("calib_data: --prune-by activation measures activations on text; give --calib-data FILE")
    if calib_tokens < 1:
        raise ConfigError(f"calib_tokens: {calib_tokens} is not >= 1")
    teacher = resolve_model_dir(teacher)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"out: {out} is not empty; give a new directory for the student")
    config = json.loads((teacher / "config.json").read_text(encoding="utf-8"))
    key, n = layer_count(config, str(teacher / "config.json"))
    keep = choose_layers(n, layers, keep_every or (1 if d_ff and not layers else 0))
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
    importance = None
    if d_ff and prune_by == "activation":  # measured in the student as cut so far: its blocks see what they will
        with tempfile.TemporaryDirectory(prefix="lmforge-student-") as tmp:
            save_tensors({k: v.contiguous() for k, v in student.items()}, Path(tmp) / "model.safetensors",
                         metadata={"format": "pt"})
            write_json(Path(tmp) / "config.json", config)
            importance = activation_importance(tmp, calib_data, calib_tokens, text_field, tokenizer_dir=teacher)
    if d_ff:
        student = _prune_width(student, config, d_ff, str(teacher / "config.json"), importance)
    with StagedDirectory(out) as stage:
        save_tensors({k: v.contiguous() for k, v in student.items()}, stage.path("model.safetensors"),
                     metadata={"format": "pt"})
        for f in sorted(teacher.iterdir()):
            if f.is_file() and not _WEIGHTS.match(f.name):
                shutil.copy(f, stage.path(f.name))
        write_json(stage.path("config.json"), config)
    return {"layers": len(keep), "teacher_layers": n, "kept": keep, "d_ff": d_ff,
            "prune_by": prune_by if d_ff else None,
            "parameters": sum(t.numel() for t in student.values()),
            "teacher_parameters": sum(t.numel() for t in tensors.values())}
