"""The settings of the RAG stage: how documents are chunked and analysed, how an index is built, how a question is
answered, and `lmforge rag index`'s command settings drawn from them. Apart from the code that uses them (numpy,
jieba, FAISS) so that the CLI builds its flags from them at start-up."""

from __future__ import annotations

from dataclasses import dataclass, field

from lmforge.config import field_of
from lmforge.data.sources import encoding_field, on_error_field


@dataclass
class ChunkerConfig:
    """How rag/chunking.py cuts documents."""

    kind: str = field(default="recursive", metadata={"help": "how documents are cut", "choices": [
        "none", "fixed", "recursive", "markdown", "semantic"]})
    # characters, or tokens when the Chunker is given a tokenizer
    size: int = field(default=800, metadata={"help": "chunk size in characters", "check": (lambda v: v > 0, "> 0")})
    overlap: int = field(default=100, metadata={"help": "chunk overlap in characters",
                                                "check": (lambda v: v >= 0, ">= 0")})
    # semantic
    breakpoint: str = field(default="percentile", metadata={"choices": ["percentile", "stddev", "iqr"]})
    breakpoint_amount: float | None = None  # percentile 95, stddev 3, iqr 1.5 when None
    window: int = 1  # sentences on each side of a boundary that are embedded together
    max_size: int = 1500


@dataclass
class AnalyzerConfig:
    """How rag/sparse.py turns text into BM25 terms."""

    # Snowball English stemming (PyStemmer) of Latin-script words; Chinese words are left as jieba cut them. On by
    # default: it helps BM25 on the built-in questions (docs/benchmarks.md), as the peers' SciFact recipe (bm25s +
    # Snowball) does better than plain words
    stem: bool = field(default=True, metadata={"help": "English stemming (Snowball) for BM25; Chinese words are kept "
                                                       "as jieba cuts them (--no-stem: plain words)"})
    stop_words: bool = True
    chinese: str = field(default="jieba", metadata={"help": "Chinese BM25 terms", "choices": ["jieba", "bigram"]})


@dataclass
class IndexConfig:
    """What a RagIndex (rag/index.py) is built with; saved in its manifest and read back when it is opened."""

    embedder: str = field(default="default", metadata={
        "help": "sentence-transformers / HF encoder directory, or 'default': all-MiniLM-L6-v2, shipped offline"})
    chunker: ChunkerConfig = field(default_factory=ChunkerConfig)
    analyzer: AnalyzerConfig = field(default_factory=AnalyzerConfig)
    k1: float = field(default=1.5, metadata={"help": "BM25 term-frequency saturation"})
    b: float = field(default=0.75, metadata={"help": "BM25 length normalisation"})
    bm25_method: str = "lucene"
    vector_index: str = field(default="flat", metadata={"help": "exact (flat) or HNSW vector search",
                                                        "choices": ["flat", "hnsw"]})
    hnsw_m: int = 32
    dense: bool = field(default=True, metadata={"help": "embed chunks for vector search (--no-dense: BM25 only)"})
    batch_size: int = 64
    # languages the embedder understands; a hybrid query in another script (Chinese) uses BM25 alone,
    # because fusing an embedder that cannot read the query only adds noise. Empty: trust the embedder.
    embedder_languages: list[str] = field(default_factory=lambda: ["en"])


@dataclass
class AskConfig:
    """How rag/answer.py answers a question from an index."""

    k: int = field(default=5, metadata={"help": "sources retrieved"})
    mode: str = field(default="hybrid", metadata={"choices": ["sparse", "dense", "hybrid"]})
    min_similarity: float = field(default=0.3, metadata={
        "help": "dense cosine a source needs; below it for all sources the answer is 'I don't know'"})
    min_bm25: float = 0.0  # sparse-only indexes: BM25 score a source needs
    max_new_tokens: int = field(default=200, metadata={"help": "answer length at most"})
    temperature: float = 0.0
    context_tokens: int | None = None  # default: the model's max_seq_len
    # how the sources reach the model (rag/marginal.py): not --mode, which already names the retriever
    rag: str = field(default="stuff", metadata={
        "help": "stuff: one prompt holding every source; sequence: RAG-Sequence (an answer per source, ranked by "
                "its probability marginalised over the sources); token: RAG-Token (one answer, each token from "
                "the sources' next-token distributions mixed by their prior)", "choices": ["stuff", "sequence", "token"]})
    prior_temperature: float = field(default=0.1, metadata={
        "help": "--rag sequence/token: the sources' prior is softmax(score / this), the score being the dense cosine "
                "(or BM25 relative to the best hit for a BM25-only search), so in cosine units",
        "check": (lambda v: v > 0, "> 0")})
    cite: bool = field(default=True, metadata={
        "help": "every answer sentence carries its sources: one without [n] gets its best-supporting source by word "
                "overlap, or is marked unsupported (--no-cite: the model's answer as written)"})
    abstain: float | None = field(default=None, metadata={
        "help": "answer 'not in the documents' when the answer's support (the mean over its sentences of the "
                "share of their content words found in their sources, 0..1) is below this (default: never)",
        "check": (lambda v: 0 <= v <= 1, "between 0 and 1")})


@dataclass
class IndexCommand:
    """`lmforge rag index` settings: flags, or keys of a --config file (the flag names with underscores). The index's
    own settings come from IndexConfig, ChunkerConfig and AnalyzerConfig (their defaults and help)."""

    out: str = field(default="", metadata={"help": "index directory, or postgresql://user:pw@host/db#table (pgvector)"})
    input: list[str] = field(default_factory=list, metadata={
        "help": "files, directories, globs, builtin:python-docs, BEIR corpus.jsonl"})
    chunker: str = field_of(ChunkerConfig, "kind")
    size: int = field_of(ChunkerConfig, "size")
    overlap: int = field_of(ChunkerConfig, "overlap")
    embedder: str = field_of(IndexConfig, "embedder")
    # None here (IndexConfig's default is ["en"]): the default embedder reads English, another one is trusted
    embedder_languages: list[str] | None = field(default=None, metadata={
        "help": "languages the embedder reads (default: en for the default embedder, all for another); hybrid "
                "queries in other scripts (Chinese) use BM25 alone"})
    dense: bool = field_of(IndexConfig, "dense")
    vector_index: str = field_of(IndexConfig, "vector_index")
    stem: bool = field_of(AnalyzerConfig, "stem")
    chinese: str = field_of(AnalyzerConfig, "chinese")
    k1: float = field_of(IndexConfig, "k1")
    b: float = field_of(IndexConfig, "b")
    delete: list[str] = field(default_factory=list, metadata={"help": "document ids to remove"})
    text_field: str = field(default="text", metadata={"help": "text field of jsonl/csv/parquet input"})
    encoding: str = encoding_field()
    on_error: str = on_error_field()
    json: bool = field(default=False, metadata={"help": "print the result as JSON"})

    # the settings a new index is built with (an existing index keeps its own)
    BUILD_SETTINGS = ("chunker", "size", "overlap", "embedder", "dense", "stem", "chinese", "k1", "b", "vector_index")

    def index_config(self) -> IndexConfig:
        """The IndexConfig a new index gets from these settings."""
        languages = self.embedder_languages
        if languages is None:
            languages = ["en"] if self.embedder == "default" else []
        return IndexConfig(embedder=self.embedder,
                           chunker=ChunkerConfig(kind=self.chunker, size=self.size, overlap=self.overlap),
                           analyzer=AnalyzerConfig(stem=self.stem, chinese=self.chinese), k1=self.k1, b=self.b,
                           vector_index=self.vector_index, dense=self.dense, embedder_languages=languages)
