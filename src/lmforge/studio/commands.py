"""The CLI's own option definitions as forms: each launchable command's argparse parser read action by action (flag,
type, default, choices, help, repeatable), so a flag added to the CLI appears in the studio's form with no code
here; a form's values turned back into the exact argv the command takes, checked as argparse would check them; a
run's resolved config turned into the command line that reproduces it.

The parsers come from `lmforge.cli.build_parser()`, handed down by the studio's CLI module (this package sits
below the command line and does not import it).
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
from dataclasses import dataclass, field

# the commands the studio may start, as the words after `lmforge`; nothing else is ever launched
LAUNCHABLE = ("pretrain", "finetune", "classify train", "eval run", "data run")
# flags a form never offers: the studio sets them itself (resume), or they only print (help)
HIDDEN_DESTS = frozenset({"help", "resume", "_parser", "func"})
DEFAULT_IN_HELP = re.compile(r"\(default: (.*)\)\s*$", re.S)


class FormError(ValueError):
    """A form value the command would refuse; the message names the flag."""


@dataclass
class Option:
    """One flag or positional of a command, as the form shows it. `kind`: bool | choice | int | float | text |
    list (one flag, several values) | repeat (the flag given once per value); `default`: what the CLI uses when the
    flag is left out, as text ("" when none or unknown)."""
    dest: str
    flag: str  # "--max-steps", or "" for a positional
    kind: str
    help: str = ""
    default: str = ""
    choices: list[str] = field(default_factory=list)
    required: bool = False
    metavar: str = ""

    def to_json(self) -> dict:
        return dict(self.__dict__)


def subcommand_parser(root: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    """The parser of `command` ("classify train") under the `lmforge` parser `root`."""
    parser = root
    for word in command.split():
        sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        if sub is None or word not in sub.choices:
            raise KeyError(f"no command {command!r} in the lmforge parser")
        parser = sub.choices[word]
    return parser


def _default_text(action: argparse.Action) -> str:
    if action.default is not argparse.SUPPRESS and action.default is not None:
        if isinstance(action.default, list):
            return " ".join(map(str, action.default))
        return str(action.default)
    found = DEFAULT_IN_HELP.search(action.help or "")  # config flags keep their default in the help text
    return found.group(1) if found else ""


def _config_field(parser: argparse.ArgumentParser, action: argparse.Action) -> tuple[type | None, bool]:
    """(scalar type, required) of the config field behind a flag that config.add_config_args made (its type and
    required-ness live in the stage's dataclass, not in argparse); (None, False) for any other flag."""
    from lmforge.config import field_kind

    cls = getattr(parser, "config_class", None)
    return field_kind(cls, action.dest) if cls is not None else (None, False)


def _kind(action: argparse.Action, parser: argparse.ArgumentParser | None = None) -> str:
    if isinstance(action, (argparse.BooleanOptionalAction, argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return "bool"
    if isinstance(action, argparse._AppendAction):
        return "repeat"
    if action.nargs in ("+", "*"):
        return "list"
    if action.choices:
        return "choice"
    kind = action.type if action.type is not None or parser is None else _config_field(parser, action)[0]
    if kind is int:
        return "int"
    if kind is float:
        return "float"
    return "text"


def options(parser: argparse.ArgumentParser) -> list[Option]:
    """Every option of a command's parser that a form offers, in the parser's order."""
    out = []
    for action in parser._actions:
        if action.dest in HIDDEN_DESTS or isinstance(action, (argparse._HelpAction, argparse._VersionAction,
                                                               argparse._SubParsersAction)):
            continue
        if action.help == argparse.SUPPRESS:
            continue
        flags = [s for s in action.option_strings if s.startswith("--") and not s.startswith("--no-")]
        help_text = DEFAULT_IN_HELP.sub("", action.help or "").strip()
        out.append(Option(dest=action.dest, flag=flags[0] if flags else "", kind=_kind(action, parser),
                          help=help_text % {"default": action.default} if "%(" in help_text else help_text,
                          default=_default_text(action), choices=[str(c) for c in action.choices or []],
                          required=(bool(action.required) or not action.option_strings
                                    or _config_field(parser, action)[1]),
                          metavar=action.metavar if isinstance(action.metavar, str) else ""))
    return out


def _check(action: argparse.Action, value: str, flag: str, parser: argparse.ArgumentParser | None = None) -> None:
    """Refuse a value as argparse would (its type, its choices) or, for a config-backed flag, as the stage's config
    would (config.field_value), naming the flag."""
    cls = getattr(parser, "config_class", None)
    if cls is not None and action.type is None and _config_field(parser, action)[0] is not None:
        from lmforge.config import ConfigError, field_value

        try:
            field_value(cls, action.dest, value, flag)
        except ConfigError as e:
            raise FormError(str(e)) from None
        return
    try:
        converted = action.type(value) if callable(action.type) else value
    except (ValueError, TypeError, argparse.ArgumentTypeError) as e:
        raise FormError(f"{flag}: {value!r} is not a valid {getattr(action.type, '__name__', 'value')} ({e})") from None
    if action.choices and converted not in action.choices:
        raise FormError(f"{flag}: {value!r} is not one of {', '.join(map(str, action.choices))}")


def build_argv(parser: argparse.ArgumentParser, values: dict) -> list[str]:
    """The argv (after the command's words) for the form's `values` {dest: value}: only the options given (a
    blank leaves the CLI's default), each checked against its action. Bools are True/False (BooleanOptionalAction
    writes --no-X for False), lists are lists of strings or one string split like a shell."""
    known = {a.dest: a for a in parser._actions}
    unknown = sorted(set(values) - set(known) - {"resume"})
    if unknown:
        raise FormError(f"unknown option(s): {', '.join(unknown)}")
    positionals, argv = [], []
    for action in parser._actions:
        if action.dest not in values or action.dest in HIDDEN_DESTS:
            continue
        value = values[action.dest]
        if value is None or value == "" or value == []:
            continue
        flag = next((s for s in action.option_strings if s.startswith("--") and not s.startswith("--no-")), "")
        name = flag or action.dest
        kind = _kind(action, parser)
        if kind == "bool":
            if not isinstance(value, bool):
                raise FormError(f"{name}: true or false, not {value!r}")
            if isinstance(action, argparse.BooleanOptionalAction):
                argv.append(flag if value else "--no-" + flag[2:])
            elif value == isinstance(action, argparse._StoreTrueAction):
                argv.append(flag)
            continue
        items = value if isinstance(value, list) else shlex.split(value) if kind in ("list", "repeat") else [value]
        items = [str(v) for v in items]
        for item in items:
            _check(action, item, name, parser)
        if not flag:
            positionals += items
        elif kind == "repeat":
            for item in items:
                argv += [flag, item]
        else:
            argv += [flag, *items]
    missing = [a.dest for a in parser._actions if (a.required or (not a.option_strings and a.nargs != "?")
                                                   or _config_field(parser, a)[1])
               and a.dest not in HIDDEN_DESTS and values.get(a.dest) in (None, "", [])]
    if missing:
        raise FormError(f"required: {', '.join(missing)}")
    return positionals + argv


def out_option(parser: argparse.ArgumentParser) -> argparse.Action | None:
    """The action of the command's output directory (`--out`, whatever its dest)."""
    return next((a for a in parser._actions if "--out" in a.option_strings), None)


def config_command(command: str, parser: argparse.ArgumentParser, config: dict) -> list[str]:
    """The argv (`lmforge COMMAND ...`) that reproduces a run from its resolved config.yaml: every field whose value
    differs from the CLI's default, as its flag (resume / overwrite left out)."""
    argv = ["lmforge", *command.split()]
    by_dest = {a.dest: a for a in parser._actions if a.option_strings}
    for key, value in config.items():
        action = by_dest.get(key)
        if action is None or key in HIDDEN_DESTS or key == "overwrite" or value is None:
            continue
        flag = next(s for s in action.option_strings if s.startswith("--") and not s.startswith("--no-"))
        kind = _kind(action, parser)
        default = _default_text(action)
        if kind == "bool":
            if str(value) != default:
                argv.append(flag if value else "--no-" + flag[2:])
            continue
        if isinstance(value, dict):
            if value or default not in ("", "{}"):
                argv += [flag, json.dumps(value, ensure_ascii=False)]
            continue
        items = [str(v) for v in value] if isinstance(value, list) else [str(value)]
        if " ".join(items) == default or (not items and default == ""):
            continue
        if kind == "repeat":
            for item in items:
                argv += [flag, item]
        elif items:
            argv += [flag, *items]
    return argv


def command_of_config(config: dict, parsers: dict[str, argparse.ArgumentParser]) -> str | None:
    """Which command wrote a config.yaml: the one whose flags cover all its keys with the fewest others (a
    fine-tuning config holds every pretraining field and more; a pretraining one fits both, pretrain more tightly)."""
    keys = set(config) - {"resume", "overwrite", "progress"}
    best = None
    for command, parser in parsers.items():
        dests = {a.dest for a in parser._actions}
        # fields a command keeps off its command line (metadata cli=False) are in the file too: most keys must match
        score = (len(keys & dests), -len(dests - keys))
        if keys and score[0] >= 0.8 * len(keys) and (best is None or score > best[0]):
            best = (score, command)
    return best[1] if best else None
