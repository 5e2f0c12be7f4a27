"""`lmforge export merge | gguf | hf | int8 | int4`."""

from __future__ import annotations

import argparse
import sys


def cmd_export_merge(args: argparse.Namespace) -> int:
    from lmforge.export.merge import merge_adapter

    out = merge_adapter(args.model, args.out, args.base, args.dtype)
    print(f"merged model -> {out} (loads with transformers' AutoModelForCausalLM.from_pretrained)", file=sys.stderr)
    return 0


def cmd_export_gguf(args: argparse.Namespace) -> int:
    from lmforge.export.gguf import export_gguf

    out = export_gguf(args.model, args.out, dtype=args.type, name=args.name)
    size = out.stat().st_size / 2**20
    print(f"wrote {out} ({size:.1f} MiB, {args.type}); llama.cpp: llama-cli -m {out} -cnv; ollama: a Modelfile with "
          f"'FROM ./{out.name}' (docs/export.md)", file=sys.stderr)
    return 0


def cmd_export_int8(args: argparse.Namespace) -> int:
    from lmforge.model.quantize import QUANTIZED_WEIGHTS, save_quantized

    out = save_quantized(args.model, args.out, bits=args.bits)
    print(f"wrote {out} ({(out / QUANTIZED_WEIGHTS).stat().st_size / 2**20:.1f} MiB of weights); lmforge generate / chat / "
          f"serve --model {out} load it", file=sys.stderr)
    return 0


def cmd_export_hf(args: argparse.Namespace) -> int:
    from lmforge.export.gguf import import_gguf
    from lmforge.infer.load import DTYPE_ALIASES

    short = {name: alias for alias, name in DTYPE_ALIASES.items()}  # import_gguf's Python API spells fp32 / bf16 / fp16
    out = import_gguf(args.model, args.out, dtype=short[args.dtype])
    size = sum(f.stat().st_size for f in out.iterdir()) / 2**20
    print(f"wrote {out} ({size:.1f} MiB, {args.dtype}); lmforge generate / chat / serve / finetune --model {out} "
          "load it, as does transformers' AutoModelForCausalLM.from_pretrained", file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from lmforge.infer.load import add_dtype_arg

    e = sub.add_parser("export", help="export a model: merge (base + LoRA -> a full HF model), gguf (llama.cpp / ollama), "
                                         "hf (a GGUF file -> an HF model directory), int8, int4")
    esub = e.add_subparsers(dest="export_command", metavar="FORMAT", required=True)
    m = esub.add_parser("merge", help="merge a PEFT adapter into its base model",
                        description="Merge a LoRA/DoRA adapter (a checkpoint of `lmforge finetune`, or any PEFT LoRA "
                                    "adapter directory) into its base model and write a full HF model directory with "
                                    "the tokenizer, chat template and generation_config.json.")
    m.add_argument("--model", required=True, help="the adapter directory (holds adapter_config.json)")
    m.add_argument("--out", required=True, help="output model directory")
    m.add_argument("--base", help="the base model (default: the adapter's base_model_name_or_path)")
    add_dtype_arg(m, default=None, help="weight dtype (default: the base's; fp32, bf16, fp16 also accepted)")
    m.set_defaults(func=cmd_export_merge, _parser=m)
    g = esub.add_parser("gguf", help="write a GGUF file for llama.cpp / ollama",
                        description="Write a GGUF file (tensors, hyper-parameters, the byte-level BPE tokenizer with "
                                    "its pre-tokenizer type, the chat template and end-of-turn token) from an HF model "
                                    "directory, in llama.cpp's own architecture for each family lmforge loads. See "
                                    "docs/export.md.",
                        epilog="example: lmforge export gguf --model runs/sft-merged --out runs/sft.gguf --type q8_0")
    g.add_argument("--model", required=True, metavar="DIR", help="HF-layout model directory (merge adapters first)")
    g.add_argument("--out", required=True, metavar="FILE", help="the .gguf file to write")
    g.add_argument("--type", default="f16", choices=["f32", "f16", "q8_0", "q4_0"],
                   help="tensor type (1-D tensors stay f32)")
    g.add_argument("--name", help="general.name in the file (default: the directory's name)")
    g.set_defaults(func=cmd_export_gguf, _parser=g)
    h = esub.add_parser("hf", help="turn a GGUF file into an HF model directory (the reverse of `export gguf`)",
                        description="Read a GGUF file (llama, qwen2 or gpt2 architecture, byte-level BPE vocabulary, "
                                    "any tensor type the gguf package dequantizes) and write an HF model directory: "
                                    "weights dequantized to --dtype, tokenizer.json, the chat template and the stop "
                                    "tokens. lmforge and transformers load it; fine-tune or serve it like any model.",
                        epilog="example: lmforge export hf --model SmolLM2-135M-Instruct.Q4_1.gguf --out runs/smollm2")
    h.add_argument("--model", required=True, metavar="FILE", help="the .gguf file to read")
    h.add_argument("--out", required=True, metavar="DIR", help="output model directory")
    add_dtype_arg(h, help="weight dtype (default float32: the values the file encodes; fp32, bf16, fp16 also "
                          "accepted)")
    h.set_defaults(func=cmd_export_hf, _parser=h)
    q = esub.add_parser("int8", help="weight-only int8 model directory for lmforge's own engine",
                        description="Quantize the matrices to int8 (one scale per output channel, as "
                                    "--quantize int8 does at load time) and write a directory that lmforge "
                                    "generate / chat / serve load directly. See docs/export.md.")
    q.add_argument("--model", required=True, metavar="DIR", help="HF-layout model directory")
    q.add_argument("--out", required=True, metavar="DIR")
    q.set_defaults(func=cmd_export_int8, _parser=q, bits="int8")
    f = esub.add_parser("int4", help="weight-only int4 (Q4_0 blocks) model directory for lmforge's own engine",
                        description="Quantize the matrices to llama.cpp's Q4_0 blocks (32 weights, one float16 "
                                    "scale; 7x less than float32) and write a directory that lmforge generate / chat "
                                    "/ serve load directly. Saves memory, not time (dequantized per call).")
    f.add_argument("--model", required=True, metavar="DIR", help="HF-layout model directory")
    f.add_argument("--out", required=True, metavar="DIR")
    f.set_defaults(func=cmd_export_int8, _parser=f, bits="int4")
