"""One load for inference (infer/load.py): the same options in every command, dtype spelled one way (the other
accepted silently), and the model, tokenizer, template and stop ids it gives."""

from __future__ import annotations

import argparse
import warnings

import pytest
import torch

from lmforge.infer.load import add_inference_args, load_for_inference

# every command that loads a model to generate with (subcommand path in `lmforge`)
COMMANDS = [("generate",), ("chat",), ("serve",), ("eval", "run"), ("eval", "ppl"), ("eval", "judge"),
            ("rag", "ask"), ("prompt", "cot"), ("prompt", "agent"), ("synth", "self-instruct")]


def _subparser(parser: argparse.ArgumentParser, path: tuple[str, ...]) -> argparse.ArgumentParser:
    for name in path:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    return parser


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {s: a for a in parser._actions for s in a.option_strings}


def test_every_inference_command_has_the_same_options():
    from lmforge.cli import build_parser

    root = build_parser()
    reference = _options(_subparser(root, ("chat",)))
    for path in COMMANDS:
        options = _options(_subparser(root, path))
        for flag in ("--model", "--dtype", "--quantize", "--pack"):
            assert flag in options, (path, flag)
            mine, ref = options[flag], reference[flag]
            assert (mine.type, mine.choices, mine.default, mine.nargs) == (ref.type, ref.choices, ref.default,
                                                                            ref.nargs), (path, flag)
        if "--template" in options:  # the older name of the same option
            assert options["--chat-template"] is options["--template"]
    # the export commands that write weights spell dtype the same way
    for path in (("export", "merge"), ("export", "hf")):
        assert _options(_subparser(root, path))["--dtype"].type is reference["--dtype"].type


def test_dtype_one_spelling_the_other_accepted_without_a_warning(capsys):
    parser = argparse.ArgumentParser()
    add_inference_args(parser)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for given, want in (("float32", "float32"), ("fp32", "float32"), ("bf16", "bfloat16"),
                            ("bfloat16", "bfloat16"), ("fp16", "float16")):
            assert parser.parse_args(["--model", "m", "--dtype", given]).dtype == want
    assert capsys.readouterr().err == ""
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", "m", "--dtype", "half"])
    assert "'half': one of float32, bfloat16, float16 (or fp32, bf16, fp16)" in capsys.readouterr().err
    args = parser.parse_args(["--model", "m", "--chat-template", "qwen"])
    assert args.template == "qwen" and args.quantize == "none" and args.pack is None and not args.compile
    assert parser.parse_args(["--model", "m", "--no-pack"]).pack is False


def test_load_for_inference_gives_the_model_its_options_ask_for(trained_dir, tmp_path):
    import transformers

    from lmforge.chat.templates import BUILTIN_TEMPLATES
    from lmforge.model import Int8Linear, PackedInt8Linear, PackedLinear
    from tests.models import tiny_llama

    d = tiny_llama(tmp_path / "m", trained_dir)
    ids = torch.tensor([[5, 17, 300, 42, 7]])
    with torch.no_grad():
        want = transformers.AutoModelForCausalLM.from_pretrained(d).eval()(ids).logits
        loaded = load_for_inference(d)  # float32 on a CPU: lmforge's packed kernels by default, the same logits
        assert not loaded.model.training and any(isinstance(m, PackedLinear) for m in loaded.model.modules())
        assert (loaded.model.logits(loaded.model(ids)) - want).abs().max() < 1e-4 and "packed (the default" in \
            loaded.description
        plain = load_for_inference(d, pack=False)
        assert not any(isinstance(m, PackedLinear) for m in plain.model.modules())
        assert (plain.model.logits(plain.model(ids)) - want).abs().max() < 1e-4
        assert loaded.template == loaded.tokenizer.chat_template and loaded.template_source == "the model's chat template"
        assert loaded.reasoning is None and "float32" in loaded.description
        half = load_for_inference(d, dtype="bf16")
        assert half.model.embed.weight.dtype == torch.bfloat16 and "bfloat16" in half.description
        # int8 weights of a float32 model: packed as int8 panels for lmforge's kernel, the same integers
        int8 = load_for_inference(d, quantize="int8")
        assert any(isinstance(m, PackedInt8Linear) for m in int8.model.modules()) and "int8 weights, packed" in \
            int8.description
        int8_plain = load_for_inference(d, quantize="int8", pack=False)
        assert any(isinstance(m, Int8Linear) for m in int8_plain.model.modules())
        # 10 tokens: past 8 rows Int8Linear multiplies the dequantized integers in float32, as the panels do
        rows = ids.repeat(1, 2)
        assert (int8.model.logits(int8.model(rows)) - int8_plain.model.logits(int8_plain.model(rows))).abs().max() < 1e-5
        packed = load_for_inference(d, pack=True)
        assert any(isinstance(m, PackedLinear) for m in packed.model.modules())
        assert (packed.model.logits(packed.model(ids)) - want).abs().max() < 1e-4
        assert not any(isinstance(m, PackedLinear) for m in load_for_inference(d, "bfloat16", pack=True).model.modules())
    # a chosen template becomes the tokenizer's (one warning: it is not the model's own), its stop ids follow it
    with pytest.warns(UserWarning, match="is not the model's own chat template"):
        phi = load_for_inference(d, template="phi-3")
    assert phi.template == phi.tokenizer.chat_template == BUILTIN_TEMPLATES["phi-3"]
    assert phi.template_source == "built-in phi-3"
    assert phi.stop_ids == [phi.tokenizer.special_tokens["<|endoftext|>"]]  # <|end|> is not in this vocabulary
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_for_inference(d, template="model")  # the model's own: no warning
