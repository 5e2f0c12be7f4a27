"""Deduplication as pipeline steps. Both are global: each map task computes a small per-
document record (a 64-bit key, or a MinHash signature, plus length and score; with
verification also the document's shingle hashes), the pipeline gathers them (never the
texts) and `decide` returns which documents to keep and the cluster of each.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from lmforge.config import field_of
from lmforge.data import dedup
from lmforge.data.config import MinHashSettings
from lmforge.data.step import Decision, GlobalStep, Signatures, register


@register("exact_dedup")
@dataclass
class ExactDedup(GlobalStep):
    """Documents whose normalised text (NFKC, lower case, punctuation and spacing ignored) is identical."""

    keep: str = field_of(MinHashSettings, "keep")
    score_field: str = "quality_score"

    def setup(self) -> None:
        dedup.code_point_tables()

    def signatures(self, texts: Sequence[str]) -> Signatures:
        return Signatures(dedup.exact_keys(texts)[:, None])

    def decide(self, rows: np.ndarray, lengths: np.ndarray, scores: np.ndarray,
               sets: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] | None) -> Decision:
        keys = rows[:, 0]
        _, labels = np.unique(keys, return_inverse=True)
        # relabel each group by its smallest member so labels are node indices
        first = np.full(labels.max() + 1 if len(labels) else 0, len(labels), np.int64)
        np.minimum.at(first, labels, np.arange(len(labels)))
        kept, cluster = dedup.choose_kept(first[labels], self.keep, lengths, scores)
        return Decision(kept, cluster, {"duplicates": int((~kept).sum())})


@register("minhash_dedup")
@dataclass
class MinHashDedup(MinHashSettings, GlobalStep):
    """Near-duplicates by MinHash + LSH (see lmforge.data.dedup); the parameters and their defaults are
    data/config.py's MinHashSettings (shared with `lmforge data dedup`)."""

    score_field: str = "quality_score"
    seed: int = 1

    def __post_init__(self):
        if (self.bands is None) != (self.rows is None):
            from lmforge.config import ConfigError

            raise ConfigError("minhash_dedup: give both bands and rows, or neither")
        if self.bands is None:  # with verification: favour recall, verification removes false positives
            self.bands, self.rows = dedup.lsh_params(self.threshold, self.num_perm,
                                                     min_recall=dedup.VERIFIED_RECALL if self.verify else None)
        self._hasher = None

    def setup(self) -> None:
        dedup.code_point_tables()

    def signatures(self, texts: Sequence[str]) -> Signatures:
        if self._hasher is None:
            self._hasher = dedup.MinHasher(self.num_perm, self.ngram, self.unit, self.seed)
        hashes, offsets = dedup.shingle_hashes(texts, self.ngram, self.unit)
        rows = self._hasher.signatures_from_hashes(hashes, offsets)
        # the shingle hashes themselves (4 bytes per shingle) let decide() check candidates without the texts
        return Signatures(rows, hashes, offsets) if self.verify else Signatures(rows)

    def decide(self, rows: np.ndarray, lengths: np.ndarray, scores: np.ndarray,
               sets: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] | None) -> Decision:
        pairs = dedup.candidate_pairs(rows, self.bands, self.rows, skip=dedup.is_empty(rows))
        n_candidates = len(pairs)
        if self.verify and len(pairs):
            if sets is None:
                raise ValueError("minhash_dedup: verification needs the shingle sets of the signature pass")
            # the likeliest duplicates first: they join the clusters early, so fewer pairs inside them are checked
            pairs = pairs[np.argsort(-dedup.estimated_jaccards(rows, pairs), kind="stable")]
            involved = dedup._sorted_unique(pairs.ravel())
            shingles = sets(involved)
            _, confirmed, checked = dedup.verified_components(
                len(involved), np.searchsorted(involved, pairs),
                lambda p: dedup.verify_pairs([], p, self.threshold, self.ngram, self.unit, shingles=shingles))
            pairs = involved[confirmed]
        else:
            checked = 0
        labels = dedup.connected_components(len(rows), pairs)
        kept, cluster = dedup.choose_kept(labels, self.keep, lengths, scores)
        # duplicate_pairs: the confirmed pairs that joined clusters (pairs inside a joined cluster are not checked)
        return Decision(kept, cluster, {"candidate_pairs": int(n_candidates), "checked_pairs": int(checked),
                                        "duplicate_pairs": int(len(pairs)),
                                        "bands": self.bands, "rows": self.rows, "duplicates": int((~kept).sum())})
