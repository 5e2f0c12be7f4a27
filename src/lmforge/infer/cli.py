"""`lmforge generate` and `lmforge chat`."""

from __future__ import annotations

import argparse
import sys

from lmforge.config import add_config_args, config_from_args
from lmforge.infer.sampling import SamplingConfig


def cmd_generate(args: argparse.Namespace) -> int:
    from lmforge.cli import UserError
    from lmforge.infer.engine import stream
    from lmforge.infer.load import load_from_args
    from lmforge.infer.scheduler import ContextLimit

    cfg = config_from_args(SamplingConfig, args)
    loaded = load_from_args(args)
    try:
        for piece in stream(loaded.model, loaded.tokenizer, args.prompt, cfg, compile=loaded.compile):
            sys.stdout.write(piece)
            sys.stdout.flush()
    except ContextLimit as e:
        raise UserError(f"--prompt: {e}") from None
    sys.stdout.write("\n")
    return 0


DIM, RESET = "\033[2m", "\033[0m"


class ReplyPrinter:
    """Writes a reply as it streams: a reasoning model's thinking dimmed on a terminal (with a "(thinking)" prefix
    elsewhere), then its answer on a line of its own; any other model's text as it comes."""

    def __init__(self, out, markers=None, inside: bool = False, tty: bool | None = None):
        from lmforge.chat.reasoning import ReasoningStream

        self.out = out
        self.tty = out.isatty() if tty is None else tty
        self.split = ReasoningStream(markers, inside) if markers is not None else None
        self.thinking = False

    def write(self, piece: str) -> None:
        if self.split is None:
            self._emit("", piece)
        else:
            self._emit(*self.split.push(piece))

    def close(self) -> None:
        if self.split is not None:
            self._emit(*self.split.flush())
        if self.thinking:  # a reply cut off while thinking
            self.out.write(RESET if self.tty else "")
        self.out.write("\n")
        self.out.flush()

    def _emit(self, reasoning: str, content: str) -> None:
        if reasoning:
            if not self.thinking:
                self.out.write(DIM if self.tty else "(thinking) ")
                self.thinking = True
            self.out.write(reasoning)
        if content:
            if self.thinking:  # the answer starts on its own line, undimmed
                self.out.write((RESET if self.tty else "") + "\n")
                self.thinking = False
            self.out.write(content)
        self.out.flush()


def cmd_chat(args: argparse.Namespace) -> int:
    from lmforge.chat.reasoning import opens_reasoning
    from lmforge.infer.engine import ChatSession
    from lmforge.infer.load import load_from_args

    cfg = config_from_args(SamplingConfig, args)
    loaded = load_from_args(args)
    if loaded.template is None:
        print("(this tokenizer has no chat template: turns are joined as plain text)", file=sys.stderr)
    session = ChatSession(loaded.model, loaded.tokenizer, cfg, system=args.system, context=args.context,
                          compile=loaded.compile, variables=loaded.template_kwargs)
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
        printer = None
        try:
            for piece in session.reply(user):
                if printer is None:  # the prompt is rendered by now: it may have opened the reasoning block
                    printer = ReplyPrinter(sys.stdout, loaded.reasoning,
                                           opens_reasoning(session.prompt_text, loaded.reasoning))
                printer.write(piece)
        except ValueError as e:  # the message alone does not fit the context
            print(f"\n(not sent: {e})", file=sys.stderr)
            continue
        if printer is not None:
            printer.close()
        else:
            sys.stdout.write("\n")
        if session.dropped_turns > dropped:
            print(f"(the oldest turns were left out to fit the {session.context}-token context)", file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from lmforge.infer.load import add_inference_args

    common = argparse.ArgumentParser(add_help=False)
    add_inference_args(common)
    g = sub.add_parser("generate", parents=[common], help="complete a prompt with a model (streams text)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  lmforge generate --model runs/m --prompt 'def main():' --temperature 0\n"
                              "  lmforge generate --model runs/m --prompt '从前' --top-p 0.9 --seed 1 --max-new-tokens 64")
    g.add_argument("--prompt", required=True, help="text to continue")
    add_config_args(g, SamplingConfig)
    g.set_defaults(func=cmd_generate, _parser=g)
    c = sub.add_parser("chat", parents=[common], help="interactive chat using the tokenizer's chat template (a "
                                                      "reasoning model's thinking shown dimmed)",
                       epilog="example: lmforge chat --model runs/sft --temperature 0.7")
    c.add_argument("--system", help="system message")
    c.add_argument("--context", type=int, metavar="N",
                   help="tokens of conversation kept, the reply included (default: the model's max_seq_len); "
                        "older turns are left out beyond it")
    add_config_args(c, SamplingConfig)
    c.set_defaults(func=cmd_chat, _parser=c)
