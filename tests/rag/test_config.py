"""`lmforge rag index`'s settings are the index's own: the command's defaults build the default IndexConfig, and a
flag lands in the field of the config it names."""

from __future__ import annotations

from lmforge.cli import build_parser
from lmforge.config import config_from_args
from lmforge.rag.config import AnalyzerConfig, ChunkerConfig, IndexCommand, IndexConfig


def _index_command(*argv: str) -> IndexCommand:
    return config_from_args(IndexCommand, build_parser().parse_args(["rag", "index", *argv]))


def test_the_commands_defaults_are_the_index_configs():
    assert _index_command().index_config() == IndexConfig() == IndexCommand().index_config()
    got = _index_command("--chunker", "markdown", "--size", "300", "--overlap", "0", "--chinese", "bigram",
                         "--no-stem", "--k1", "1.2", "--embedder", "enc", "--no-dense").index_config()
    assert got == IndexConfig(embedder="enc", chunker=ChunkerConfig(kind="markdown", size=300, overlap=0),
                              analyzer=AnalyzerConfig(stem=False, chinese="bigram"), k1=1.2, dense=False,
                              embedder_languages=[])  # another embedder is trusted with every language
    assert _index_command("--embedder-languages", "en", "zh").index_config().embedder_languages == ["en", "zh"]
