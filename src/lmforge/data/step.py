"""The contract every pipeline step follows, the registry of steps by name, and the text
statistics (words, lines, sentences) that cleaners and filters share.

A step is a dataclass whose fields are its parameters (so a YAML pipeline is validated
like any config: unknown keys name the nearest valid one) with one method:

    apply(doc) -> Document        the (possibly changed) document goes on
               -> str             the document is rejected; the string is the reason
               -> list[Document]  the document and new ones made from it go on (augmentation)

Steps are registered under a name with `@register("name")`; `build_step("name", {...})`
makes one from a pipeline file. Global steps (deduplication) need every document before
deciding; they subclass `GlobalStep` and the pipeline runs them between map stages.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from lmforge.config import ConfigError, did_you_mean, from_dict
from lmforge.data.document import Document
from lmforge.text import is_mostly_cjk

if TYPE_CHECKING:  # (numpy only in annotations: `lmforge --help` imports this module and stays numpy-free)
    import numpy as np

STEPS: dict[str, type[Step]] = {}


class Step:
    name: ClassVar[str] = ""
    kind: ClassVar[str] = "filter"  # "cleaner" or "filter": shown in docs and stats

    def apply(self, doc: Document) -> Document | str | list[Document]:
        raise NotImplementedError

    def setup(self) -> None:
        """Load models etc. once per worker process (called before the first document)."""


class GlobalStep(Step):
    """A step that must see every document first (exact and near-duplicate removal).

    Map tasks call `signatures(texts)` on each batch of documents that reach the step; the pipeline keeps only
    those (never the texts) and calls `decide` once over every shard's. The texts are not read again: what
    `decide` needs to confirm a decision (MinHash's exact Jaccard check) travels as `Signatures.sets`."""

    def signatures(self, texts: Sequence[str]) -> Signatures:
        raise NotImplementedError

    def decide(self, rows: np.ndarray, lengths: np.ndarray, scores: np.ndarray,
               sets: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] | None) -> Decision:
        """rows: every document's signature row, in pipeline order; lengths in characters; scores NaN where the
        document has none; sets(indices) -> (values, offsets) of those documents' sets, read on demand (None when
        the step keeps no sets)."""
        raise NotImplementedError


@dataclass
class Signatures:
    """What a global step keeps of a batch of documents."""

    rows: np.ndarray  # [documents, width]: a fixed-width row each (a 64-bit key, a MinHash signature)
    sets: np.ndarray | None = None  # optional variable-size set per document (shingle hashes), concatenated
    set_offsets: np.ndarray | None = None  # document i owns sets[set_offsets[i]:set_offsets[i + 1]]


@dataclass
class Decision:
    keep: np.ndarray  # bool per document
    cluster: np.ndarray  # int64: global index of the kept member of the document's cluster, -1 if none
    stats: dict = field(default_factory=dict)


def register(name: str):
    def wrap(cls):
        cls.name = name
        STEPS[name] = cls
        return cls
    return wrap


def build_step(name: str, params: dict | None, where: str = "steps") -> Step:
    _load_all()
    if name not in STEPS:
        raise ConfigError(f"{where}: unknown step '{name}'.{did_you_mean(name, sorted(STEPS))}")
    return from_dict(STEPS[name], params or {}, f"{where}.{name}")


def _load_all() -> None:
    from lmforge.data import augment, clean, dedup_step, filters  # noqa: F401  (registration side effects)


# ----- text statistics shared by cleaners and filters (the script rules themselves: lmforge/text.py) -----------

def language_of(doc: Document) -> str:
    """The language a step should assume: `meta["language"]` when a language-id step set it,
    otherwise "zh" for text that is mostly CJK and "en" for the rest."""
    lang = doc.meta.get("language")
    if isinstance(lang, str) and lang:
        return lang
    return "zh" if is_mostly_cjk(doc.text) else "en"


def ngram_counts(words: list[str], n: int) -> Counter:
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
