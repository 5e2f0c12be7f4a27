"""The settings of the data stage apart from the code that runs them (numpy, the readers, the executors), so that the
CLI builds its flags at start-up without loading it: a pipeline (`PipelineConfig`, data/pipeline.py), near-duplicate
removal (`MinHashSettings`, the `minhash_dedup` step of data/dedup_step.py), the quality classifier's training
(`ClassifierSettings`, data/classifier.py), the training split's augmentation that finetune and classify share
(`AugmentSettings`), and the commands `lmforge data dedup` and `lmforge data train-classifier`
drawn from them (their flags and --config keys)."""

from __future__ import annotations

from dataclasses import dataclass, field

from lmforge.config import field_of


@dataclass
class AugmentSettings:
    """How `finetune --augment` and `classify train --augment` augment the training split (data/augment.py; the
    model-written operations through synth/augment.py). Both commands' configs take these fields (`field_of`); each
    declares its own `augment` list, whose help says what it augments."""

    augment_per_record: int = field(default=1, metadata={"help": "augment: new examples per example",
                                                         "check": (lambda v: v > 0, "> 0")})
    augment_alpha: float = field(default=0.1, metadata={"help": "augment: share of words changed",
                                                        "check": (lambda v: 0 < v <= 1, "in (0, 1]")})
    augment_synonyms: str = field(default="auto", metadata={
        "help": "augment: auto (WordNet for English, Cilin for Chinese), wordnet, cilin, none, or a synonym file"})
    augment_model: str = field(default="", metadata={
        "help": "augment backtranslate / paraphrase: the model that writes them, a directory run in this process"})
    augment_endpoint: str = field(default="", metadata={
        "help": "augment backtranslate / paraphrase: or an OpenAI-compatible URL (key: $OPENAI_API_KEY)"})
    augment_served_model: str = field(default="default", metadata={"help": "augment: the model name the endpoint "
                                                                           "expects"})
    augment_pivot: str = field(default="auto", metadata={
        "help": "augment backtranslate: the language in between (auto: zh for English text, en otherwise)"})
    augment_cache: str = field(default="", metadata={
        "help": "augment backtranslate / paraphrase: the model's replies, reused by a rerun (default: "
                "OUT/augment_replies.jsonl)"})


#: which member of a cluster of duplicates survives (score: the documents' meta quality_score)
KEEP = ["first", "longest", "score"]


@dataclass
class PipelineConfig:
    """A pipeline (data/pipeline.py): its inputs, output directory, steps in order and how it runs."""

    input: list[str] = field(default_factory=list, metadata={"help": "files, directories, globs, builtin:python-docs"})
    output: str = field(default="", metadata={"help": "output directory"})
    steps: list = field(default_factory=list, metadata={"help": "step names, or {name: {param: value}} mappings"})
    text_field: str = field(default="text", metadata={"help": "text field/column of jsonl, csv and parquet input"})
    errors: str = field(default="strict", metadata={"choices": ["strict", "replace"],
                                                    "help": "undecodable bytes: a bad record, or replaced by U+FFFD"})
    encoding: str = field(default="utf-8", metadata={
        "help": "text encoding of the inputs (utf-8, gb18030, gbk, big5, utf-16, latin-1, ...) or auto (a byte-order "
                "mark, else UTF-8, else GB18030, else Latin-1; documents read otherwise than as UTF-8 carry meta "
                "encoding)"})
    on_error: str = field(default="fail", metadata={"choices": ["fail", "skip"],
                                                    "help": "bad input record: stop, or write it to rejects and go on"})
    executor: str = field(default="local", metadata={"help": "a local process pool or a Ray cluster",
                                                     "choices": ["local", "ray"]})
    workers: int = field(default=0, metadata={"help": "worker processes for the local executor (0: all cores)"})
    ray_address: str | None = field(default=None, metadata={"help": "Ray cluster address (default: a local instance)"})
    output_format: str = field(default="jsonl.gz", metadata={"help": "the kept documents' file format",
                                                              "choices": ["jsonl.gz", "parquet"]})
    split_by: str | None = field(default=None, metadata={"help": "meta field whose value names an output subfolder "
                                                                  "(e.g. language)"})
    keep_rejected_text: bool = field(default=True, metadata={"help": "store the text of removed documents in rejects"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})


@dataclass
class MinHashSettings:
    """Near-duplicates by MinHash + LSH (data/dedup.py): the `minhash_dedup` step's parameters."""

    threshold: float = field(default=0.8, metadata={"help": "Jaccard similarity",
                                                    "check": (lambda v: 0 < v <= 1, "in (0, 1]")})
    num_perm: int = field(default=128, metadata={"help": "MinHash permutations", "check": (lambda v: v >= 1, ">= 1")})
    ngram: int = field(default=5, metadata={"help": "shingle size in words or characters",
                                            "check": (lambda v: v >= 1, ">= 1")})
    unit: str = field(default="auto", metadata={"help": "shingle unit; auto = characters for CJK text, words otherwise",
                                                "choices": ["auto", "word", "char"]})
    # with rows: override the bands x rows derived from the threshold (and verify)
    bands: int | None = field(default=None, metadata={
        "help": "LSH bands (with --rows; default: derived from the threshold)"})
    rows: int | None = field(default=None, metadata={"help": "rows per band"})
    # check candidates' exact Jaccard: no LSH false positives, and bands tuned so a pair at the threshold is found
    # with probability >= 0.99. The default, as the most accurate setting (on near-duplicates of SciFact abstracts:
    # see docs/benchmarks.md); verify: false for plain LSH
    verify: bool = field(default=True, metadata={
        "help": "confirm candidates by exact Jaccard: no false positives, recall >= 0.99 at the threshold "
                "(--no-verify for plain LSH)"})
    keep: str = field(default="first", metadata={"help": "which member of a cluster survives (score: meta "
                                                         "quality_score)", "choices": KEEP})


@dataclass
class ClassifierSettings:
    """How data/classifier.py's hashed n-gram classifier is trained."""

    bits: int = field(default=20, metadata={"help": "2^bits hashed feature buckets",
                                            "check": (lambda v: 1 <= v <= 30, "in 1..30")})
    ngrams: tuple[int, ...] = field(default=(1, 2), metadata={"help": "n-gram sizes"})
    epochs: int = field(default=10, metadata={"help": "passes over the training documents"})
    lr: float = 0.05
    heldout: float = field(default=0.1, metadata={"help": "share held out for evaluation",
                                                  "check": (lambda v: 0 <= v < 1, "in [0, 1)")})


@dataclass
class DedupCommand:
    """`lmforge data dedup`: exact and near-duplicate removal as a two-step pipeline; flags, or keys of a --config
    file (the flag names with underscores)."""

    input: list[str] = field_of(PipelineConfig, "input", required=True)
    output: str = field_of(PipelineConfig, "output", required=True, flag="--out", aliases=["--output"])
    threshold: float = field_of(MinHashSettings, "threshold")
    ngram: int = field_of(MinHashSettings, "ngram")
    unit: str = field_of(MinHashSettings, "unit")
    num_perm: int = field_of(MinHashSettings, "num_perm")
    bands: int | None = field_of(MinHashSettings, "bands")
    rows: int | None = field_of(MinHashSettings, "rows")
    verify: bool = field_of(MinHashSettings, "verify")
    keep: str = field_of(MinHashSettings, "keep")
    exact: bool = field(default=True, metadata={"help": "remove exact duplicates (normalised text) first"})
    text_field: str = field_of(PipelineConfig, "text_field")
    executor: str = field_of(PipelineConfig, "executor")
    workers: int = field_of(PipelineConfig, "workers")
    ray_address: str | None = field_of(PipelineConfig, "ray_address")
    on_error: str = field_of(PipelineConfig, "on_error")
    output_format: str = field_of(PipelineConfig, "output_format")
    encoding: str = field_of(PipelineConfig, "encoding")
    errors: str = field_of(PipelineConfig, "errors")
    overwrite: bool = field(default=False, metadata={"help": "delete an existing output directory first"})

    def minhash(self) -> dict:
        """The `minhash_dedup` step's parameters."""
        return {name: getattr(self, name) for name in MinHashSettings.__dataclass_fields__}


@dataclass
class TrainClassifierCommand:
    """`lmforge data train-classifier`: the quality classifier from good and bad documents."""

    positive: list[str] = field(default_factory=list, metadata={"help": "inputs of good documents",
                                                                "required": True})
    negative: list[str] = field(default_factory=list, metadata={"help": "inputs of bad documents",
                                                                "required": True})
    out: str = field(default="", metadata={"help": "output directory for the model", "required": True})
    epochs: int = field_of(ClassifierSettings, "epochs")
    bits: int = field_of(ClassifierSettings, "bits")
    ngrams: tuple[int, ...] = field_of(ClassifierSettings, "ngrams")
    heldout: float = field_of(ClassifierSettings, "heldout")
    max_docs: int = field(default=0, metadata={"help": "use at most this many per class (0: all)"})
    text_field: str = field_of(PipelineConfig, "text_field")
