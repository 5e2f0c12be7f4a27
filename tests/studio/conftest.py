"""A workspace as a user has one: token shards, a tiny model, instruction data, and runs made by the real CLI."""

from __future__ import annotations

import json

import pytest

QA = [("北京是哪个国家的首都？", "北京是中国的首都。"), ("What is two plus two?", "Two plus two is four."),
      ("上海在哪里？", "上海在中国东部的长江口。"), ("Name a primary colour.", "Red is a primary colour.")]


@pytest.fixture(scope="session")
def workspace(trained_dir, tmp_path_factory):
    """ROOT with tokens/ (the built-in corpus), model/ (a tiny Llama over a real lmforge tokenizer), qa.jsonl
    (alpaca records, Chinese and English) and runs/: `pt-done` (a finished pretraining run) and `ft-done` (a
    finished LoRA fine-tuning run), both written by `lmforge.cli.main` as a user's command writes them."""
    from lmforge.cli import main
    from lmforge.tokenizer.shards import TokenizeConfig, tokenize_corpus
    from tests.models import tiny_llama

    root = tmp_path_factory.mktemp("workspace")
    tokenize_corpus(TokenizeConfig(input=["builtin:python-docs"], tokenizer=str(trained_dir), out=str(root / "tokens"),
                                   val_fraction=0.1, progress=False))
    tiny_llama(root / "model", trained_dir, max_positions=256)
    rows = [{"instruction": q, "input": "", "output": a} for q, a in QA * 4]
    (root / "qa.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    assert main(["pretrain", "--data", str(root / "tokens"), "--out", str(root / "runs" / "pt-done"), "--max-length",
                 "16", "--batch-size", "2", "--max-steps", "4", "--eval-every", "2", "--eval-batches", "1",
                 "--warmup-steps", "1", "--lr", "0.01", "--no-progress"]) == 0
    assert main(["finetune", "--model", str(root / "model"), "--data", str(root / "qa.jsonl"), "--out",
                 str(root / "runs" / "sft" / "ft-done"), "--method", "lora", "--max-steps", "2", "--batch-size", "2",
                 "--max-length", "64", "--eval-every", "0", "--samples", "0", "--no-progress"]) == 0
    return root


@pytest.fixture(scope="session")
def parsers():
    """The launchable commands' parsers, from the lmforge command's own parser."""
    from lmforge.cli import build_parser
    from lmforge.studio.commands import LAUNCHABLE, subcommand_parser

    root = build_parser()
    return {c: subcommand_parser(root, c) for c in LAUNCHABLE}
