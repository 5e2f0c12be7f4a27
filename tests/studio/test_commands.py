"""studio/commands.py: the forms are the CLI's own flags (every field of the stage's config dataclass, a flag added
to a parser appears with no studio code), and a form's values become an argv that argparse parses back into them."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from lmforge.studio.commands import LAUNCHABLE, FormError, build_argv, command_of_config, options


def test_every_launchable_command_has_a_form_with_its_config_fields(parsers):
    from lmforge.classify.run import ClassifyConfig
    from lmforge.finetune.run import FinetuneConfig
    from lmforge.train.config import TrainConfig

    assert set(parsers) == set(LAUNCHABLE)
    for command, cls in (("pretrain", TrainConfig), ("finetune", FinetuneConfig), ("classify train", ClassifyConfig)):
        form = {o.dest: o for o in options(parsers[command])}
        fields = {f.name: f for f in dataclasses.fields(cls) if f.metadata.get("cli") is not False}
        assert set(fields) - {"resume"} <= set(form), command  # resume is the studio's own button
        for name, f in fields.items():
            if name == "resume":
                continue
            if f.type in (bool, "bool"):
                assert form[name].kind == "bool", name
            if f.default not in (dataclasses.MISSING, None, "", []) and not isinstance(f.default, bool):
                assert form[name].default == str(f.default), name  # the default the CLI applies
            if f.metadata.get("choices"):
                assert form[name].choices == [str(c) for c in f.metadata["choices"]]
    ev = {o.dest: o for o in options(parsers["eval run"])}
    assert ev["task"].kind == "repeat" and ev["task"].required and ev["batch_tokens"].default == "8192"
    assert {o.dest for o in options(parsers["data run"])} >= {"pipeline", "output", "executor"}
    assert next(o for o in options(parsers["data run"]) if o.dest == "pipeline").flag == ""  # a positional


def test_a_new_flag_appears_in_the_form_without_studio_code():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    assert [o.dest for o in options(parser)] == ["out"]
    parser.add_argument("--warp-factor", type=float, default=1.5, help="how fast")
    parser.add_argument("--engine", choices=["ion", "warp"], default="ion")
    form = {o.dest: o for o in options(parser)}
    assert (form["warp_factor"].flag, form["warp_factor"].kind, form["warp_factor"].default) == ("--warp-factor",
                                                                                                   "float", "1.5")
    assert form["engine"].choices == ["ion", "warp"] and form["warp_factor"].help == "how fast"


def test_form_values_become_an_argv_argparse_parses_back(parsers):
    values = {"data": "runs/tokens", "out": "runs/x y", "max_steps": "50", "compile": False, "tensorboard": True,
              "dataset": "packed", "model_overrides": "{n_layers: 4}"}
    argv = build_argv(parsers["pretrain"], values)
    args = parsers["pretrain"].parse_args(argv)
    assert (args.data, args.out, args.max_steps, args.compile, args.tensorboard, args.dataset) == (
        "runs/tokens", "runs/x y", "50", False, True, "packed")
    assert args.model_overrides == "{n_layers: 4}"
    ev = build_argv(parsers["eval run"], {"model": "runs/ft/best", "task": "arc_easy hellaswag", "limit": "20"})
    args = parsers["eval run"].parse_args(ev)
    assert args.task == ["arc_easy", "hellaswag"]  # a repeatable flag, once per value
    from lmforge.config import config_from_args  # a config-backed flag: the stage's config converts its text

    assert config_from_args(parsers["eval run"].config_class, args).limit == 20
    dr = build_argv(parsers["data run"], {"pipeline": "p.yaml", "output": "runs/clean", "input": "a.txt b.txt"})
    args = parsers["data run"].parse_args(dr)
    assert (args.pipeline, args.output, args.input) == ("p.yaml", "runs/clean", ["a.txt", "b.txt"])


def test_bad_form_values_are_named(parsers):
    with pytest.raises(FormError, match="--dataset"):
        build_argv(parsers["pretrain"], {"dataset": "shuffled"})
    with pytest.raises(FormError, match="--limit"):
        build_argv(parsers["eval run"], {"model": "m", "task": "arc_easy", "limit": "ten"})
    with pytest.raises(FormError, match="required: .*task"):
        build_argv(parsers["eval run"], {"model": "m"})
    with pytest.raises(FormError, match="unknown option.*max_stepz"):
        build_argv(parsers["pretrain"], {"max_stepz": "3"})
    with pytest.raises(FormError, match="--compile"):
        build_argv(parsers["pretrain"], {"compile": "yes"})


def test_which_command_wrote_a_config(parsers):
    from lmforge.classify.run import ClassifyConfig
    from lmforge.finetune.run import FinetuneConfig
    from lmforge.train.config import TrainConfig

    # a fine-tuning config holds every pretraining field and more: each goes to its own command
    for cls, command in ((TrainConfig, "pretrain"), (FinetuneConfig, "finetune"), (ClassifyConfig, "classify train")):
        fields = {f.name: None for f in dataclasses.fields(cls)}
        assert command_of_config(fields, parsers) == command
    assert command_of_config({"something": 1, "else": 2}, parsers) is None
