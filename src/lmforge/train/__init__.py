"""Training: datasets over token shards (the shared training loop lands here next)."""

from lmforge.train.datasets import (
    BatchLoader,
    PackedDataset,
    RandomOffsetBatches,
    SlidingWindowDataset,
    TokenStream,
)

__all__ = ["BatchLoader", "PackedDataset", "RandomOffsetBatches", "SlidingWindowDataset", "TokenStream"]
