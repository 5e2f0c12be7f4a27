from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field

import pytest
import yaml

from lmforge.config import ConfigError, add_config_args, config_from_args, load_config, save_config


@dataclass
class Inner:
    lr: float = 1e-3


@dataclass
class Cfg:
    vocab_size: int = 100
    name: str = "x"
    inputs: list[str] = field(default_factory=lambda: ["a"])
    fast: bool = True
    mode: str = field(default="strict", metadata={"choices": ["strict", "replace"]})
    optim: Inner = field(default_factory=Inner)
    workers: int | None = None


def test_unknown_key_names_nearest(tmp_path):
    (tmp_path / "c.yaml").write_text("vocab_sise: 5\n")
    with pytest.raises(ConfigError, match=r"c.yaml: unknown key 'vocab_sise'. Did you mean 'vocab_size'\?"):
        load_config(Cfg, tmp_path / "c.yaml")
    (tmp_path / "n.yaml").write_text("optim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"optim: unknown key 'lrr'. Did you mean 'lr'\?"):
        load_config(Cfg, tmp_path / "n.yaml")
    with pytest.raises(ConfigError, match="Valid keys"):
        load_config(Cfg, overrides={"zzzzzz": 1})


@pytest.mark.parametrize("data,match", [
    ({"vocab_size": "ten"}, "vocab_size: expected an integer"),
    ({"vocab_size": True}, "vocab_size: expected an integer"),
    ({"fast": "maybe"}, "fast: expected true/false"),
    ({"mode": "lenient"}, "mode: 'lenient' is not one of strict, replace"),
    ({"inputs": {"a": 1}}, "inputs: expected a list"),
    ({"optim": 3}, "optim: expected a mapping"),
])
def test_bad_values_name_the_field(data, match):
    with pytest.raises(ConfigError, match=match):
        load_config(Cfg, overrides=data)


def test_precedence_and_resolved_config(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"vocab_size": 7, "name": "from-file", "optim": {"lr": 0.5}}))
    parser = argparse.ArgumentParser()
    add_config_args(parser, Cfg)
    args = parser.parse_args(["--config", str(tmp_path / "c.json"), "--name", "from-flag", "--no-fast",
                              "--inputs", "p", "q"])
    cfg = config_from_args(Cfg, args)
    assert (cfg.vocab_size, cfg.name, cfg.fast, cfg.inputs, cfg.optim.lr) == (7, "from-flag", False, ["p", "q"], 0.5)
    path = save_config(cfg, tmp_path / "out")
    assert yaml.safe_load(path.read_text()) == {"vocab_size": 7, "name": "from-flag", "inputs": ["p", "q"],
                                                 "fast": False, "mode": "strict", "optim": {"lr": 0.5},
                                                 "workers": None}
    assert load_config(Cfg, path) == cfg  # the saved config reproduces the run


def test_unreadable_or_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(Cfg, tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(Cfg, tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(Cfg, tmp_path / "list.yaml")


def test_shipped_recipes_load_and_unknown_ones_are_named():
    from lmforge.train.trainer import TrainConfig

    cfg = load_config(TrainConfig, "recipe:pretrain-tiny-cpu", {"max_steps": 7})
    assert cfg.model == "tiny-llama" and cfg.model_overrides["d_model"] == 256 and cfg.max_steps == 7
    for name in ("pretrain-gpt2-124m", "pretrain-smollm-135m"):  # every shipped recipe is a valid TrainConfig
        assert load_config(TrainConfig, f"recipe:{name}").precision == "bf16"
    with pytest.raises(ConfigError, match="unknown recipe 'pretrain-tiny'. Did you mean 'pretrain-tiny-cpu'"):
        load_config(TrainConfig, "recipe:pretrain-tiny")


@dataclass
class Command:
    task: list[str] = field(default_factory=list, metadata={"help": "a task (repeatable)", "append": True,
                                                            "required": True, "metavar": "NAME"})
    out: str | None = None


def test_repeated_flags_required_fields_and_metavars(tmp_path):
    parser = argparse.ArgumentParser()
    add_config_args(parser, Command)
    args = parser.parse_args(["--task", "arc_easy", "--task", "mmlu"])
    assert config_from_args(Command, args).task == ["arc_easy", "mmlu"]  # appended, not the last one only
    assert "--task NAME" in parser.format_help()
    with pytest.raises(ConfigError, match=r"^--task is required"):
        config_from_args(Command, parser.parse_args(["--out", "x"]))
    (tmp_path / "c.yaml").write_text("task: [gsm8k]\n")  # a required field may come from the file
    assert config_from_args(Command, parser.parse_args(["--config", str(tmp_path / "c.yaml")])).task == ["gsm8k"]


def test_a_commands_fields_taken_from_a_library_config():
    from lmforge.config import add_field_arg, field_of

    @dataclass
    class Library:
        size: int = field(default=800, metadata={"help": "chunk size", "check": (lambda v: v > 0, "> 0")})
        kind: str = field(default="recursive", metadata={"choices": ["fixed", "recursive"]})

    @dataclass
    class Settings:
        size: int = field_of(Library, "size")
        chunker: str = field_of(Library, "kind", help="how documents are cut")

    assert (Settings().size, Settings().chunker) == (800, "recursive")
    parser = argparse.ArgumentParser()
    add_config_args(parser, Settings)
    assert "chunk size (default: 800)" in " ".join(parser.format_help().split())
    with pytest.raises(ConfigError, match="size: 0 is out of range"):  # the library's check travels with it
        config_from_args(Settings, parser.parse_args(["--size", "0"]))
    with pytest.raises(SystemExit):
        parser.parse_args(["--chunker", "semantic"])
    plain = argparse.ArgumentParser()
    add_field_arg(plain, Library, "size", "--chunk-size", dest="chunk_size")
    assert plain.parse_args([]).chunk_size == 800 and plain.parse_args(["--chunk-size", "5"]).chunk_size == 5
    with pytest.raises(AttributeError):
        field_of(Library, "sise")
