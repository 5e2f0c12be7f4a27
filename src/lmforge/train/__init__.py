"""Training: one loop (trainer) for every objective, its schedules and checkpoints, datasets over token shards."""

from lmforge import lazy_exports

# names load on first use: `lmforge --help` and torch-free commands never import torch
_EXPORTS = {
    "BatchLoader": "lmforge.train.datasets",
    "PackedDataset": "lmforge.train.datasets",
    "RandomOffsetBatches": "lmforge.train.datasets",
    "SlidingWindowDataset": "lmforge.train.datasets",
    "TokenStream": "lmforge.train.datasets",
    "TrainConfig": "lmforge.train.config",
    "TrainingStopped": "lmforge.train.config",
    "RunDirectoryError": "lmforge.train.config",
    "Objective": "lmforge.train.objectives",
    "CausalLM": "lmforge.train.objectives",
    "Trainer": "lmforge.train.trainer",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(globals(), _EXPORTS)
