"""Training: one loop (trainer) for every objective, its schedules and checkpoints, datasets over token shards."""

# names load on first use (PEP 562): `lmforge --help` and torch-free commands never import torch
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


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
