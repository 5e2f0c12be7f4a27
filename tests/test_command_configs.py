"""Commands whose flags are built from a config dataclass (prompt cot / agent / auto-cot / eval / tot / chain, data
dedup / train-classifier, serve's batching flags): the flags reach the settings, a config file written from those
settings gives the same settings back through --config, and the library's keyword defaults are the flags' defaults
(one copy of each default)."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from lmforge.config import config_from_args, save_config

COMMANDS = {
    ("prompt", "cot"): ("lmforge.prompting.config:CotCommand", [], [
        "--question", "A pen costs 3 dollars. How much do 4 pens cost?", "--samples", "3", "--temperature", "0.5",
        "--rule", "letter", "--demos", "demos.jsonl"]),
    ("prompt", "agent"): ("lmforge.prompting.config:AgentCommand", [], [
        "--question", "17 * 23?", "--tools", "calculator,python", "--tool-module", "a:f", "--tool-module", "b.py:g,h",
        "--mode", "openai", "--max-steps", "3", "--trace", "t.jsonl"]),
    ("prompt", "auto-cot"): ("lmforge.prompting.config:AutoCotCommand", [], [
        "--questions", "q.jsonl", "--clusters", "4", "--out", "demos.jsonl"]),
    ("prompt", "eval"): ("lmforge.prompting.config:EvalCommand", [], [
        "--data", "gsm8k.jsonl", "--methods", "greedy,cot", "--samples", "7", "--temperature", "0.3", "--limit", "20",
        "--out", "r.json"]),
    ("prompt", "tot"): ("lmforge.prompting.config:TotCommand", [], [
        "--puzzle", "4 9 10 13", "--ranks", "901,905", "--search", "dfs", "--breadth", "2", "--evaluate-samples", "3",
        "--temperature", "0.2", "--max-states", "7", "--compare-cot", "--trace", "tot.jsonl"]),
    ("prompt", "chain"): ("lmforge.prompting.config:ChainCommand", ["chain.yaml"], [
        "--inputs", "in.jsonl", "--out", "out.jsonl", "--batch-size", "4"]),
    ("data", "dedup"): ("lmforge.data.config:DedupCommand", [], [
        "--input", "a/", "b.jsonl", "--output", "runs/d", "--threshold", "0.7", "--ngram", "3", "--unit", "char",
        "--num-perm", "64", "--bands", "8", "--rows", "8", "--no-verify", "--keep", "longest", "--no-exact",
        "--text-field", "body", "--workers", "2", "--on-error", "skip", "--output-format", "parquet",
        "--encoding", "gb18030", "--errors", "replace", "--overwrite"]),
    ("data", "train-classifier"): ("lmforge.data.config:TrainClassifierCommand", [], [
        "--positive", "good/", "--negative", "bad/", "crawl/", "--out", "runs/q", "--epochs", "2", "--bits", "12",
        "--ngrams", "1", "3", "--heldout", "0.2", "--max-docs", "100", "--text-field", "body"]),
}


def _class(spec: str):
    import importlib

    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


@pytest.fixture(scope="module")
def root():
    from lmforge.cli import build_parser

    return build_parser()


@pytest.mark.parametrize("command", list(COMMANDS), ids=" ".join)
def test_flags_reach_the_settings_and_a_config_file_gives_them_back(command, root, tmp_path):
    cls, positional, flags = COMMANDS[command]
    cls = _class(cls)
    given = config_from_args(cls, root.parse_args([*command, *positional, *flags]))
    defaults = cls()
    # every field the flags name differs from its default: the flag was read, not dropped
    named = {a.lstrip("-").replace("-", "_").removeprefix("no_") for a in flags if a.startswith("--")}
    assert named <= {f.name for f in dataclasses.fields(cls)}
    for name in named:
        assert getattr(given, name) != getattr(defaults, name), name
    path = save_config(given, tmp_path)
    again = config_from_args(cls, root.parse_args([*command, *positional, "--config", str(path)]))
    assert again == given
    # a flag beside the file wins over the file's value
    first = next(f for f in dataclasses.fields(cls) if f.type in ("int", int) and f.name in named)
    over = config_from_args(cls, root.parse_args([*command, *positional, "--config", str(path),
                                                  "--" + first.name.replace("_", "-"), "9"]))
    assert getattr(over, first.name) == 9 and dataclasses.replace(over, **{first.name: getattr(given, first.name)}) \
        == given


def test_a_required_setting_is_named_when_missing(root):
    from lmforge.config import ConfigError

    with pytest.raises(ConfigError, match=r"^--question is required"):
        from lmforge.prompting.config import CotCommand

        config_from_args(CotCommand, root.parse_args(["prompt", "cot", "--samples", "2"]))
    with pytest.raises(ConfigError, match=r"--out is required"):
        from lmforge.data.config import DedupCommand

        config_from_args(DedupCommand, root.parse_args(["data", "dedup", "--input", "a"]))


def _default(function, name):
    return inspect.signature(function).parameters[name].default


def test_the_library_defaults_are_the_flags_defaults(root):
    """What `lmforge prompt tot` does with no flags is what TreeOfThoughts() does: the same values, read from the
    parser (argparse's view) and from the library's signatures."""
    from lmforge.data.classifier import train_classifier
    from lmforge.data.dedup import near_duplicates
    from lmforge.data.dedup_step import MinHashDedup
    from lmforge.infer.batching import ContinuousBatcher
    from lmforge.prompting.agent import ReActAgent
    from lmforge.prompting.chain import run_chain
    from lmforge.prompting.reasoning import auto_cot, self_consistency
    from lmforge.prompting.tot import TreeOfThoughts, builtin_puzzles
    from lmforge.serve.server import Server

    def parsed(*argv):
        return config_from_args(_class(COMMANDS[argv][0]), root.parse_args([*argv, *COMMANDS[argv][1]]))

    tot = parsed("prompt", "tot")
    for name in ("search", "breadth", "evaluate_samples", "temperature", "max_states"):
        assert _default(TreeOfThoughts, name) == getattr(tot, name), name
    assert _default(builtin_puzzles, "ranks") == tot.ranks
    agent = config_from_args(_class(COMMANDS[("prompt", "agent")][0]),
                             root.parse_args(["prompt", "agent", "--question", "q"]))
    assert (_default(ReActAgent, "mode"), _default(ReActAgent, "max_steps")) == (agent.mode, agent.max_steps)
    cot = config_from_args(_class(COMMANDS[("prompt", "cot")][0]), root.parse_args(["prompt", "cot", "--question", "q"]))
    assert (_default(self_consistency, "temperature"), _default(self_consistency, "rule")) == (cot.temperature, cot.rule)
    assert _default(auto_cot, "n_clusters") == config_from_args(
        _class(COMMANDS[("prompt", "auto-cot")][0]),
        root.parse_args(["prompt", "auto-cot", "--questions", "q", "--out", "o"])).clusters
    assert _default(run_chain, "batch_size") == config_from_args(
        _class(COMMANDS[("prompt", "chain")][0]),
        root.parse_args(["prompt", "chain", "c.yaml", "--inputs", "i", "--out", "o"])).batch_size
    dedup = config_from_args(_class(COMMANDS[("data", "dedup")][0]),
                             root.parse_args(["data", "dedup", "--input", "a", "--out", "o"]))
    step = MinHashDedup()
    assert {k: getattr(step, k) for k in ("threshold", "num_perm", "ngram", "unit", "verify", "keep")} == \
        {k: getattr(dedup, k) for k in ("threshold", "num_perm", "ngram", "unit", "verify", "keep")}
    assert [_default(near_duplicates, k) for k in ("threshold", "num_perm", "ngram", "unit", "keep")] == \
        [getattr(dedup, k) for k in ("threshold", "num_perm", "ngram", "unit", "keep")]
    clf = config_from_args(_class(COMMANDS[("data", "train-classifier")][0]),
                           root.parse_args(["data", "train-classifier", "--positive", "p", "--negative", "n", "--out",
                                            "o"]))
    assert [_default(train_classifier, k) for k in ("bits", "epochs", "heldout_fraction")] == \
        [clf.bits, clf.epochs, clf.heldout] and list(_default(train_classifier, "ngrams")) == list(clf.ngrams)
    serve = root.parse_args(["serve", "--model", "m"])
    for name in ("max_batch", "max_queue", "max_prefill_tokens"):
        assert _default(Server, name) == _default(ContinuousBatcher, name) == getattr(serve, name), name
