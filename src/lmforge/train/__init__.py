"""Training: one loop (trainer) for every objective, its schedules and checkpoints, datasets over token shards."""

from lmforge.train.datasets import (
    BatchLoader,
    PackedDataset,
    RandomOffsetBatches,
    SlidingWindowDataset,
    TokenStream,
)

__all__ = ["BatchLoader", "PackedDataset", "RandomOffsetBatches", "SlidingWindowDataset", "TokenStream"]
