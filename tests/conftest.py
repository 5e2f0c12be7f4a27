from __future__ import annotations

import os
import sys

import pytest
from hypothesis import settings

from tests import corpora

# property tests draw the same examples on every run: the suite never fails at random (CI or not);
# HYPOTHESIS_PROFILE=explore searches with fresh random examples when hunting for bugs
settings.register_profile("deterministic", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))


def _check_environment() -> None:
    """One line instead of 80 collection errors when pytest runs outside the set-up venv."""
    import importlib.util

    missing = [m for m in ("lmforge", "torch", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        raise pytest.UsageError(f"{', '.join(missing)} not importable by {sys.executable}: the tests run in the "
                                "set-up venv: bash scripts/setup.sh --dev && .venv/bin/python -m pytest")


@pytest.fixture(scope="session")
def mixed_corpus_dir(tmp_path_factory):
    """A small English + Chinese corpus on disk, as a user would have it."""
    d = tmp_path_factory.mktemp("corpus")
    (d / "en.txt").write_text(corpora.english(150_000), encoding="utf-8")
    (d / "zh.md").write_text(corpora.chinese_news(60_000), encoding="utf-8")
    return d


@pytest.fixture(scope="session")
def trained(mixed_corpus_dir):
    """One tokenizer trained on the mixed corpus, shared by the tests that only read it."""
    from lmforge.tokenizer import train_tokenizer

    return train_tokenizer([str(mixed_corpus_dir)], vocab_size=3000, show_progress=False)


@pytest.fixture(scope="session")
def trained_dir(trained, tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    trained.save(d)
    return d


REAL_TOKENIZERS = str(corpora.REAL_TOKENIZERS)


@pytest.fixture(scope="session")
def real_tokenizers(tmp_path_factory):
    """Real models' tokenizer folders (tests/fixtures/tokenizers, see its README), tokenizer.json unzipped:
    {"qwen2.5-instruct": Path, ...}."""
    from pathlib import Path

    root = tmp_path_factory.mktemp("real_tokenizers")
    out = {}
    for src in sorted(Path(REAL_TOKENIZERS).iterdir()):
        if not src.is_dir():
            continue
        dst = corpora.real_tokenizer(src.name, root / src.name)
        out[src.name] = dst
    return out


# --- test tiers -------------------------------------------------------------------------------------------------------
# The default run (the README's test command) is the fast tier: every package's tests except the end-to-end ones
# marked @pytest.mark.slow. `pytest --tier slow` runs only those, `--tier all` both; .ci/run runs both tiers.
# A test named on the command line (path::name) runs whatever its tier.

def pytest_addoption(parser):
    parser.addoption("--tier", choices=("fast", "slow", "all"), default=os.environ.get("LMFORGE_TEST_TIER", "fast"),
                     help="fast (default): all but the end-to-end tests marked slow; slow: only those; all: both")


def pytest_report_header(config):
    return f"lmforge test tier: {config.getoption('--tier')} (--tier fast | slow | all)"


def pytest_collection_modifyitems(config, items):
    tier = config.getoption("--tier")
    if tier == "all" or any("::" in str(a) for a in config.args):
        return
    keep, drop = [], []
    for item in items:
        slow = item.get_closest_marker("slow") is not None
        (keep if slow == (tier == "slow") else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_configure(config):
    _check_environment()
