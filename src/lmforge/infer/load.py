"""Load a model for inference: one path from a model directory (or Hub id) to what generation needs, and the options
every inference command adds the same way.

    loaded = load_for_inference("runs/sft-merged", dtype="bfloat16", quantize="int8", template="qwen")
    generate(loaded.model, loaded.tokenizer, prompt)      # stops at loaded.stop_ids (EOS and the end of turn)
    print(loaded.description)                             # one line for logs: what was loaded and done

`generate`, `chat`, `serve`, `eval run | ppl | judge`, `rag ask`, `prompt` / `synth` (EngineClient) all load through
`load_for_inference`, and their `--model --dtype --quantize --pack --compile --template` come from
`add_inference_args`: dtype is spelled float32 | bfloat16 | float16 (fp32 | bf16 | fp16 are accepted as the same),
`--chat-template` is `--template`'s older name. Weights come from model/hf.py's `load_hf_model` (local paths and Hub
ids through hub.py), the template from chat/templates.py's one order, the stop ids from chat/stops.py.
"""

from __future__ import annotations

import argparse
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.config import ConfigError

DTYPES = ("float32", "bfloat16", "float16")
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
QUANTIZE = ("none", "int8", "int4")


def dtype_name(text: str) -> str:
    """The dtype's one spelling (float32, bfloat16, float16) for it or its short alias (fp32, bf16, fp16)."""
    name = DTYPE_ALIASES.get(text, text)
    if name not in DTYPES:
        raise ConfigError(f"dtype {text!r}: one of {', '.join(DTYPES)} (or {', '.join(DTYPE_ALIASES)})")
    return name


def torch_dtype(text: str):
    """The torch dtype of a dtype name or alias."""
    import torch

    return getattr(torch, dtype_name(text))


def _dtype_arg(text: str) -> str:
    try:
        return dtype_name(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_dtype_arg(parser: argparse.ArgumentParser, default: str | None = "float32", help: str | None = None) -> None:
    """--dtype in its one spelling (the short aliases accepted as the same)."""
    parser.add_argument("--dtype", type=_dtype_arg, default=default, choices=DTYPES, metavar="|".join(DTYPES),
                        help=help or "weights and activations dtype (fp32, bf16, fp16 also accepted)")


def add_inference_args(parser: argparse.ArgumentParser, *, model_required: bool = True, model_help: str | None = None,
                       compile: bool = True, template: bool = True) -> None:
    """The options of every command that loads a model to generate with: --model --dtype --quantize --pack, and
    --compile / --template where the command can use them (`load_from_args` reads them back)."""
    parser.add_argument("--model", required=model_required, metavar="DIR",
                        help=model_help or "HF-layout model directory (config.json, model.safetensors, tokenizer.json) "
                                           "or a Hugging Face Hub id")
    add_dtype_arg(parser)
    parser.add_argument("--quantize", default="none", choices=QUANTIZE,
                        help="int8: weight-only int8 matrices (4x less weight memory than float32); int4: llama.cpp's "
                             "Q4_0 blocks (7x less, dequantized per call, slower); outputs differ slightly from the "
                             "float model (speeds: docs/benchmarks.md)")
    parser.add_argument("--pack", action=argparse.BooleanOptionalAction, default=None,
                        help="lmforge's own float32 CPU kernels, packed matmul and KV-cache decode attention (built "
                             "once per machine; the same results up to float rounding, faster steps). Default: on "
                             "for float32 on a CPU; --no-pack for torch's matmul (docs/model.md)"),
    if compile:
        parser.add_argument("--compile", action="store_true",
                            help="torch.compile the one-token decode step (static KV cache): compiling takes from "
                                 "seconds to minutes once per shape; pays off for long generations")
    if template:
        parser.add_argument("--template", "--chat-template", dest="template", metavar="NAME|FILE",
                            help="the chat template instead of the model's own: a built-in (chatml, qwen, llama-3, "
                                 "mistral, phi-3, alpaca, plain), one of the model's named templates, or a Jinja file "
                                 "(a warning says when it differs from the model's own)")
        parser.add_argument("--chat-template-kwargs", type=_template_kwargs, default={}, metavar="MAPPING",
                            help="the chat template's own variables, as apply_chat_template's keyword arguments, "
                                 "e.g. '{enable_thinking: false}' (Qwen3 answers without thinking)")


def _template_kwargs(text: str) -> dict:
    """--chat-template-kwargs: a YAML / JSON mapping, e.g. '{enable_thinking: false}'."""
    from lmforge.config import parse_mapping

    try:
        return parse_mapping(text, "--chat-template-kwargs")
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--chat-template-kwargs: ")) from None


@dataclass
class Loaded:
    """A model ready to generate with. `template`: the chat template the tokenizer now renders with (None: the
    model has none; turns are joined as plain text); `stop_ids`: what every reply stops at (chat/stops.py);
    `reasoning`: the markers of the template's reasoning blocks, or None; `description`: one line for logs."""

    model: Any
    tokenizer: Any
    template: str | None
    template_source: str
    stop_ids: list[int]
    reasoning: Any = None
    compile: bool = False
    description: str = ""
    template_kwargs: dict = field(default_factory=dict)  # the template's own variables, for every conversation


def load_for_inference(path: str | Path, dtype: str = "float32", quantize: str | None = None, pack: bool | None = None,
                       compile: bool = False, template: str | None = None,
                       template_kwargs: dict | None = None) -> Loaded:
    """Load a model directory or Hub id for generation (see the module docstring): weights in `dtype`, then
    int8 / int4 weights (`quantize`; int8 in float32 on a CPU is packed as int8 panels unless pack=False) or, in
    float32, lmforge's packed CPU kernels (`pack`; None: packed when the
    model runs in float32 on a CPU, the fastest safe path, falling back to torch's matmul with one warning where the
    kernels cannot be built); the tokenizer with
    `template` (chat/templates.py `resolve_template`) as its chat template when one is given, and
    `template_kwargs` (checked: variables that template reads) to render every conversation with."""
    from lmforge.chat.reasoning import reasoning_markers
    from lmforge.chat.stops import stop_ids
    from lmforge.chat.templates import check_template_variables, resolve_template, template_hash, use_template
    from lmforge.model import load_hf_model
    from lmforge.tokenizer import load_tokenizer

    dtype = dtype_name(dtype)
    quantize = quantize or "none"
    if quantize not in QUANTIZE:
        raise ConfigError(f"quantize {quantize!r}: one of {', '.join(QUANTIZE)}")
    model = load_hf_model(path, dtype=torch_dtype(dtype)).eval()
    tokenizer = load_tokenizer(path)
    parameters = sum(p.numel() for p in model.parameters())
    done = [dtype]
    if getattr(model, "portable", False):  # transformers' modules (model/portable.py): lmforge's kernels do not apply
        for flag, asked in (("--quantize", quantize != "none"), ("--pack", pack), ("--compile", compile)):
            if asked:
                raise ConfigError(f"{flag}: not on the portable path ({model.hf_class} runs transformers' own "
                                  "modules); leave it out")
        pack = False
        done.append(f"portable path ({model.hf_class})")
    if quantize == "int8":
        from lmforge.model import quantize_int8

        quantize_int8(model)
        done.append("int8 weights")
        if pack is not False and dtype == "float32" and next(model.parameters()).device.type == "cpu":
            from lmforge.model import pack_for_cpu

            pack_for_cpu(model)  # the integers as int8 panels for lmforge's CPU kernel, float32 activations
            if model.inference_only == "int8, packed":
                done.append("packed")
    elif quantize == "int4":
        from lmforge.model import quantize_int4

        quantize_int4(model)
        done.append("int4 (Q4_0) weights")
    elif (pack or pack is None) and dtype == "float32" and next(model.parameters()).device.type == "cpu":
        from lmforge.model import pack_for_cpu

        pack_for_cpu(model)  # the same float32 math in lmforge's CPU kernels (model/packed.py); warns if unbuildable
        if model.inference_only:
            done.append("packed" if pack else "packed (the default on CPU; --no-pack for torch's matmul)")
    if compile:
        done.append("compiled decode step")
    own = tokenizer.chat_template
    text, source = resolve_template(tokenizer, template, required=False)
    if template is not None:
        if own and text != own:
            warnings.warn(f"--template {template} (sha {template_hash(text)}) is not the model's own chat template "
                          f"(sha {template_hash(own)}), the one a fine-tuned model learned: replies may not stop or "
                          "may drift", stacklevel=2)
        use_template(tokenizer, text)
    check_template_variables(template_kwargs or {}, text, source, where="--chat-template-kwargs")
    stops = stop_ids(tokenizer, model.cfg)
    markers = reasoning_markers(text, tokenizer.special_tokens_map())
    stop_text = " ".join(tokenizer.decode([i]) for i in stops) or "none"
    description = (f"{path}: {parameters / 1e6:.1f}M parameters, {', '.join(done)}; template: {source}"
                   + (f" (reasoning in {markers.start}...{markers.end})" if markers else "") + f"; stops at {stop_text}")
    return Loaded(model, tokenizer, text, source, stops, markers, compile, description, dict(template_kwargs or {}))


def load_from_args(args: argparse.Namespace, path: str | Path | None = None) -> Loaded:
    """`load_for_inference` with the options `add_inference_args` added (`path` instead of --model)."""
    return load_for_inference(path if path is not None else args.model, args.dtype, args.quantize, args.pack,
                              getattr(args, "compile", False), getattr(args, "template", None),
                              getattr(args, "chat_template_kwargs", None))
