"""`lmforge generate` and `lmforge chat`."""

from __future__ import annotations

import argparse
import sys

from lmforge.config import add_config_args, config_from_args
from lmforge.infer.sampling import SamplingConfig


def _load(args: argparse.Namespace):
    import torch

    from lmforge.model import load_hf_model, pack_for_cpu, quantize_int4, quantize_int8
    from lmforge.tokenizer import load_tokenizer

    model = load_hf_model(args.model, dtype={"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype])
    tokenizer = load_tokenizer(args.model)
    if args.quantize == "int8":
        quantize_int8(model)
    elif args.quantize == "int4":
        quantize_int4(model)
    elif args.pack and args.dtype == "float32":
        pack_for_cpu(model)  # same float32 math in lmforge's CPU kernels (model/packed.py)
    return model, tokenizer


def cmd_generate(args: argparse.Namespace) -> int:
    from lmforge.infer.engine import stream

    cfg = config_from_args(SamplingConfig, args)
    model, tokenizer = _load(args)
    for piece in stream(model, tokenizer, args.prompt, cfg, compile=args.compile):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _use_template(tokenizer, choice: str) -> None:
    """--chat-template: a built-in name or a Jinja file; a warning when it is not the model's own (for a model
    lmforge fine-tuned, the template it was trained with)."""
    from pathlib import Path

    from lmforge.finetune.templates import BUILTIN_TEMPLATES, template_hash

    if choice in BUILTIN_TEMPLATES:
        text = BUILTIN_TEMPLATES[choice]
    elif Path(choice).is_file():
        text = Path(choice).read_text(encoding="utf-8")
    else:
        from lmforge.config import ConfigError

        raise ConfigError(f"--chat-template: {choice!r} is neither a built-in ({', '.join(BUILTIN_TEMPLATES)}) nor a "
                          "file")
    own = tokenizer.chat_template
    if own and text != own:
        print(f"lmforge: warning: --chat-template {choice} (sha {template_hash(text)}) is not the model's own chat "
              f"template (sha {template_hash(own)}), the one a fine-tuned model learned: replies may not stop or may "
              "drift", file=sys.stderr)
    tokenizer.chat_template = text
    tokenizer.chat_templates = None


def cmd_chat(args: argparse.Namespace) -> int:
    from lmforge.infer.engine import ChatSession

    cfg = config_from_args(SamplingConfig, args)
    model, tokenizer = _load(args)
    if args.chat_template:
        _use_template(tokenizer, args.chat_template)
    if not tokenizer.chat_template:
        print("(this tokenizer has no chat template: turns are joined as plain text)", file=sys.stderr)
    session = ChatSession(model, tokenizer, cfg, system=args.system, context=args.context, compile=args.compile)
    print(f"chat: {session.context}-token context; empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            user = input("you> ")
        except EOFError:
            break
        if not user.strip():
            break
        dropped = session.dropped_turns
        sys.stdout.write("model> ")
        try:
            for piece in session.reply(user):
                sys.stdout.write(piece)
                sys.stdout.flush()
        except ValueError as e:  # the message alone does not fit the context
            print(f"\n(not sent: {e})", file=sys.stderr)
            continue
        sys.stdout.write("\n")
        if session.dropped_turns > dropped:
            print(f"(the oldest turns were left out to fit the {session.context}-token context)", file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", required=True, metavar="DIR",
                        help="HF-layout model directory (config.json, model.safetensors, tokenizer.json)")
    common.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="weights and activations dtype")
    common.add_argument("--quantize", default="none", choices=["none", "int8", "int4"],
                        help="int8: weight-only int8 matrices (4x less memory; on CPU 1.3-1.6x faster decoding than "
                             "unpacked float32, fastest with --compile); int4: llama.cpp's Q4_0 blocks (7x less memory, "
                             "dequantized per call, slower); outputs differ slightly from the float model")
    common.add_argument("--pack", action="store_true",
                        help="float32 on CPU: lmforge's own kernels, packed matmul and KV-cache decode attention (built once "
                             "per machine, ~30 s); same results; with --compile the fastest float32 decoding (docs/model.md)")
    common.add_argument("--compile", action="store_true",
                        help="torch.compile the one-token decode step (static KV cache): compiling takes from seconds "
                             "to minutes once per shape; pays off for long generations, most with --pack or --quantize int8")
    g = sub.add_parser("generate", parents=[common], help="complete a prompt with a model (streams text)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  lmforge generate --model runs/m --prompt 'def main():' --temperature 0\n"
                              "  lmforge generate --model runs/m --prompt '从前' --top-p 0.9 --seed 1 --max-new-tokens 64")
    g.add_argument("--prompt", required=True, help="text to continue")
    add_config_args(g, SamplingConfig)
    g.set_defaults(func=cmd_generate, _parser=g)
    c = sub.add_parser("chat", parents=[common], help="interactive chat using the tokenizer's chat template",
                       epilog="example: lmforge chat --model runs/sft --temperature 0.7")
    c.add_argument("--system", help="system message")
    c.add_argument("--chat-template", metavar="NAME|FILE",
                   help="a built-in template (chatml, qwen, llama-3, mistral, phi-3, alpaca, plain) or a Jinja file "
                        "instead of the model's own (a warning says when they differ)")
    c.add_argument("--context", type=int, metavar="N",
                   help="tokens of conversation kept, the reply included (default: the model's max_seq_len); "
                        "older turns are left out beyond it")
    add_config_args(c, SamplingConfig)
    c.set_defaults(func=cmd_chat, _parser=c)
