"""Stage configuration: one dataclass per stage, filled from a YAML/JSON file and CLI flags.

Precedence is defaults < config file < flags given on the command line. Unknown keys are
an error that names the key and the nearest valid one, and the resolved config is
written into the stage's output directory so every run can be reproduced.

A field's `metadata` may carry `help` (shown by --help), `choices`, `flag` (the CLI
name when it should differ from `--field-name`), `metavar` (the value's name in --help),
`append` (a list given as a repeated flag, `--task a --task b`, rather than `--task a b`),
`required` (the run needs a value, from a flag or the config file), `aliases` (more flag
names, e.g. ["--output"] beside --out) and `cli: False` (no flag: the field keeps its default
or the file's value).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from lmforge.files import atomic_write

C = TypeVar("C")


class ConfigError(ValueError):
    """A config file or flag that cannot be used; the message names the key."""


def did_you_mean(key: str, valid: list[str]) -> str:
    """The end of an unknown-key error: the nearest valid key, or the valid keys."""
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f" Did you mean '{close[0]}'?" if close else f" Valid keys: {', '.join(sorted(valid))}."


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check `value` against the type hint, converting only where it is lossless."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if origin is dict or hint is dict:
        return parse_mapping(value, where)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return from_dict(hint, value, where)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if hint is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def parse_mapping(value: Any, where: str) -> dict:
    """A mapping from a config file, or from a flag's text: YAML / JSON such as "{d_model: 256}"."""
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"{where}: not a YAML mapping: {e}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping such as '{{key: value}}', got {value!r}")
    return dict(value)


def from_dict(cls: type[C], data: dict, where: str = "config") -> C:
    """Build dataclass `cls` from a mapping; unknown keys and bad values raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys to values, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in fields:
            raise ConfigError(f"{where}: unknown key '{key}'.{did_you_mean(name, list(fields))}")
        f = fields[name]
        value = _coerce(value, hints[name], f"{where}.{name}")
        choices = f.metadata.get("choices")
        if choices is not None and value not in choices:
            raise ConfigError(f"{where}.{name}: {value!r} is not one of {', '.join(map(str, choices))}")
        kwargs[name] = value
    for name, value in kwargs.items():  # a field's own range ("check": (predicate, "what it must be"))
        check = fields[name].metadata.get("check")
        if check is not None and value is not None and not check[0](value):
            raise ConfigError(f"{where}.{name}: {value!r} is out of range: must be {check[1]}")
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field with no default
        raise ConfigError(f"{where}: {e}") from None
    except ValueError as e:  # the dataclass's own validation (__post_init__), whose messages name the field
        raise ConfigError(f"{where}: {e}") from None


RECIPE_PREFIX = "recipe:"


def resolve_config_path(path: str | os.PathLike) -> Path:
    """A file path, or `recipe:NAME` for a recipe shipped in lmforge/recipes/NAME.yaml."""
    if str(path).startswith(RECIPE_PREFIX):
        from importlib import resources

        name = str(path)[len(RECIPE_PREFIX):]
        recipes = resources.files("lmforge").joinpath("recipes")
        available = sorted(p.name.removesuffix(".yaml") for p in recipes.iterdir() if p.name.endswith(".yaml"))
        if name not in available:
            raise ConfigError(f"unknown recipe '{name}'.{did_you_mean(name, available)}")
        return Path(str(recipes.joinpath(f"{name}.yaml")))
    return Path(path)


def read_config_file(path: str | os.PathLike) -> dict:
    """Read a YAML or JSON config file (or `recipe:NAME`) into a dict, with errors that name the file."""
    path = resolve_config_path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values")
    return data


def load_config(cls: type[C], path: str | os.PathLike | None = None, overrides: dict | None = None) -> C:
    """Defaults, then the file at `path`, then `overrides` (e.g. CLI flags)."""
    data = read_config_file(path) if path else {}
    where = str(path) if path else "config"
    cfg = from_dict(cls, data, where)
    if overrides:
        merged = {**dataclasses.asdict(cfg), **overrides}
        cfg = from_dict(cls, merged, "command line")
    return cfg


def save_config(cfg: Any, out_dir: str | os.PathLike, name: str = "config.yaml") -> Path:
    """Write the resolved config as YAML into the stage's output directory."""
    path = Path(out_dir) / name
    with atomic_write(path) as f:
        yaml.safe_dump(dataclasses.asdict(cfg), f, allow_unicode=True, sort_keys=False)
    return path


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag", "--" + f.name.replace("_", "-"))


def add_config_args(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add `--config FILE` and one flag per field of `cls` (only given flags override)."""
    parser.add_argument("--config", metavar="FILE", help="YAML or JSON config file, or recipe:NAME for a shipped "
                                                         "recipe; flags override its values")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("cli") is False:  # a field this command does not use (its default stays)
            continue
        hint = hints[f.name]
        if typing.get_origin(hint) in (typing.Union, types.UnionType):
            hint = next(a for a in typing.get_args(hint) if a is not type(None))
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS}
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        help_text = f.metadata.get("help", "")
        if default not in (None, [], (), ""):
            shown = (("on" if default else "off") if isinstance(default, bool) else
                     " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default)
            help_text += f" (default: {shown})"
        if f.metadata.get("required"):  # not argparse's required: the value may come from --config instead
            help_text = (help_text + " (required: this flag or the key in --config)").lstrip()
        kwargs["help"] = help_text
        if hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(hint) is dict or hint is dict:
            kwargs["metavar"] = "'{KEY: VALUE, ...}'"
        elif typing.get_origin(hint) in (list, tuple):
            if f.metadata.get("append"):
                kwargs["action"] = "append"
            else:
                kwargs["nargs"] = "+"
            kwargs["metavar"] = f.name.upper().rstrip("S") if f.name.endswith("s") else f.name.upper()
        else:
            kwargs["metavar"] = f.name.upper()
            if f.metadata.get("choices"):
                kwargs["choices"] = f.metadata["choices"]
                kwargs["metavar"] = "|".join(map(str, f.metadata["choices"]))
        if "metavar" in f.metadata and hint is not bool:
            kwargs["metavar"] = f.metadata["metavar"]
        parser.add_argument(_flag(f), *f.metadata.get("aliases", ()), **kwargs)
    parser.config_class = cls  # what readers of the parser (the studio's forms) check a flag's value against


def field_value(cls: type, name: str, value: Any, where: str | None = None) -> Any:
    """`value` as field `name` of dataclass `cls` takes it from a flag or a config file: converted losslessly and
    checked (choices, range), or a ConfigError naming `where` (default: the field's flag)."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    where = where or _flag(f)
    value = _coerce(value, typing.get_type_hints(cls)[name], where)
    choices = f.metadata.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, choices))}")
    check = f.metadata.get("check")
    if check is not None and value is not None and not check[0](value):
        raise ConfigError(f"{where}: {value!r} is out of range: must be {check[1]}")
    return value


def field_kind(cls: type, name: str) -> tuple[type | None, bool]:
    """(the field's scalar type — int, float, str, bool — or None for lists and mappings, whether it is required)."""
    f = next((f for f in dataclasses.fields(cls) if f.name == name), None)
    if f is None:
        return None, False
    hint = typing.get_type_hints(cls)[name]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return (hint if hint in (int, float, str, bool) else None), bool(f.metadata.get("required"))


def field_of(cls: type, name: str, **metadata: Any) -> Any:
    """Field `name` of dataclass `cls` for another dataclass: the same default and metadata (help, choices, check),
    plus `metadata`. A command's settings take a library config's defaults and help this way instead of repeating
    them (rag/config.py's IndexCommand from IndexConfig)."""
    f = next((f for f in dataclasses.fields(cls) if f.name == name), None)
    if f is None:
        raise AttributeError(f"{cls.__name__} has no field {name!r}")
    merged = {**f.metadata, **metadata}
    if f.default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=f.default_factory, metadata=merged)
    return dataclasses.field(default=f.default, metadata=merged)


def add_field_arg(parser: argparse.ArgumentParser, cls: type, name: str, flag: str | None = None,
                  **overrides: Any) -> None:
    """One plain flag (`--name`, or `flag`) from field `name` of dataclass `cls`: its default, type, choices and
    help (`overrides`: argparse keywords that differ, e.g. another help text). For commands that take a few of a
    library config's settings without a --config file (`rag ask`'s --k from AskConfig)."""
    f = next((f for f in dataclasses.fields(cls) if f.name == name), None)
    if f is None:
        raise AttributeError(f"{cls.__name__} has no field {name!r}")
    hint = typing.get_type_hints(cls)[name]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    kwargs: dict[str, Any] = {"dest": name, "default": f.default, "help": f.metadata.get("help")}
    if hint in (int, float, str):
        kwargs["type"] = hint
    if f.metadata.get("choices"):
        kwargs["choices"] = f.metadata["choices"]
    kwargs = {**kwargs, **overrides}
    shown = kwargs["default"] not in (None, "", False) and kwargs["help"] != argparse.SUPPRESS
    if shown and "%(default)" not in (kwargs["help"] or ""):
        # argparse fills it in; a parser whose formatter adds defaults itself (ArgumentDefaultsHelpFormatter) sees
        # it there and does not add a second one
        kwargs["help"] = ((kwargs["help"] or "") + " (default: %(default)s)").lstrip()
    parser.add_argument(flag or "--" + name.replace("_", "-"), **kwargs)


def config_from_args(cls: type[C], args: argparse.Namespace) -> C:
    """Resolve the config for a parsed command line built with `add_config_args`."""
    names = {f.name for f in dataclasses.fields(cls)}
    overrides = {k: v for k, v in vars(args).items() if k in names}
    cfg = load_config(cls, getattr(args, "config", None), overrides)
    for f in dataclasses.fields(cls):
        if f.metadata.get("required") and getattr(cfg, f.name) in (None, "", []):
            raise ConfigError(f"{_flag(f)} is required (a flag, or the key {f.name} in --config)")
    return cfg
