"""The `lmforge` command. Each stage package contributes its subcommands through `register`."""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import re
import sys
import warnings

from lmforge import __version__

# Stage modules that add subcommands; each has `register(subparsers)`.
STAGES = ["lmforge.data.cli", "lmforge.tokenizer.cli", "lmforge.train.cli", "lmforge.finetune.cli",
          "lmforge.finetune.distill.cli", "lmforge.classify.cli",
          "lmforge.prompting.cli", "lmforge.synth.cli", "lmforge.eval.cli",
          "lmforge.export.cli", "lmforge.infer.cli", "lmforge.serve.cli", "lmforge.rag.cli", "lmforge.quickstart",
          "lmforge.studio.cli"]

EPILOG = """examples:
  lmforge quickstart                                   run the whole chain offline on the built-in corpus
  lmforge tokenizer train --input builtin:python-docs --vocab-size 8192 --out runs/tok
  echo "你好, world" | lmforge tokenizer encode --tokenizer runs/tok
  lmforge tokenizer inspect --tokenizer runs/tok --text "Tokenizers split text 成为 tokens"
"""


class ArgumentParser(argparse.ArgumentParser):
    """argparse that suggests the nearest flag or command for a mistyped one."""

    def error(self, message: str):
        if message.startswith("unrecognized arguments:"):
            known = [s for a in self._actions for s in a.option_strings if s.startswith("--")]
            hints = []
            for arg in message.split(":", 1)[1].split():
                close = difflib.get_close_matches(arg.split("=")[0], known, n=1, cutoff=0.6)
                if close:
                    hints.append(f"'{arg}' -> did you mean '{close[0]}'?")
            if hints:
                message += "\n  " + "\n  ".join(hints)
        choice = re.match(r"argument (\S+): invalid choice: '([^']*)'", message)
        commands = [c for a in self._actions if isinstance(a, argparse._SubParsersAction) for c in a.choices]
        if choice and commands and not choice.group(1).startswith("-"):  # a subcommand (an option's value: argparse
            # lists the allowed values itself)
            name = choice.group(2)
            close = difflib.get_close_matches(name, commands, n=1, cutoff=0.6)
            message = f"unknown command '{name}'" + (f"; did you mean '{close[0]}'?" if close else "") \
                + f" (commands: {', '.join(commands)})"
        super().error(message)


class UserError(Exception):
    """An error to report to the user as one line, without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = ArgumentParser(prog="lmforge", description="From raw documents to a served, fine-tuned LM.",
                            epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"lmforge {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    for module in STAGES:
        importlib.import_module(module).register(sub)
    # `lmforge eval rag` is `rag eval --generate` where users look for it; wired here because a stage's CLI imports
    # no other stage's CLI (tests/test_layers.py)
    eval_actions = next(a for a in sub.choices["eval"]._actions if isinstance(a, argparse._SubParsersAction))
    importlib.import_module("lmforge.rag.cli").add_eval_rag(eval_actions)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    from lmforge.chat.render import TemplateError
    from lmforge.config import ConfigError
    from lmforge.data.sources import CorpusError
    from lmforge.eval.judge import JudgeError
    from lmforge.eval.tasks import TaskError
    from lmforge.finetune.conversations import DataFormatError
    from lmforge.hub import SourceError
    from lmforge.infer.client import ClientError
    from lmforge.model import CheckpointError
    from lmforge.tokenizer import TokenizerError, TokenizerFormatError, TrainingError
    from lmforge.train.config import RunDirectoryError, TrainingStopped

    # the errors lmforge raises about input (each message names the file, line or field); anything else is a bug
    # and keeps its traceback. PermissionError is the environment's (an output directory not writable).
    return (UserError, ConfigError, CorpusError, CheckpointError, TrainingError, TokenizerFormatError, TokenizerError,
            TemplateError, TrainingStopped, RunDirectoryError, SourceError, DataFormatError, TaskError, JudgeError,
            ClientError, PermissionError)


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"lmforge: warning: {message}", file=sys.stderr if file is None else file)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # report on the subcommand's parser, which knows the flags to suggest
        getattr(args, "_parser", parser).error(f"unrecognized arguments: {' '.join(extra)}")
    # lmforge reports through its own lines; libraries' INFO/DEBUG logging (jieba, faiss, httpx) only with -v
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        warnings.showwarning = _show_warning
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args) or 0
    except _user_errors() as e:
        print(f"lmforge: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lmforge: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `lmforge ... | head` closed the pipe: stop quietly, as other Unix tools do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
