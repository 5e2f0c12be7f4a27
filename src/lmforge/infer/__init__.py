"""Inference: one generation engine (KV cache, per-request sampling, stop strings, streaming text), chat sessions."""

# names load on first use (PEP 562): `lmforge --help` and torch-free commands never import torch
_EXPORTS = {
    "IncrementalDetokenizer": "lmforge.infer.detokenize",
    "decode_generated": "lmforge.infer.detokenize",
    "ChatSession": "lmforge.infer.engine",
    "Decoder": "lmforge.infer.engine",
    "Request": "lmforge.infer.engine",
    "TextEvent": "lmforge.infer.engine",
    "default_stop_ids": "lmforge.infer.engine",
    "generate": "lmforge.infer.engine",
    "generate_ids": "lmforge.infer.engine",
    "generate_stream": "lmforge.infer.engine",
    "stream": "lmforge.infer.engine",
    "turn_end_ids": "lmforge.infer.engine",
    "SamplingConfig": "lmforge.infer.sampling",
    "process_logits": "lmforge.infer.sampling",
    "sample_tokens": "lmforge.infer.sampling",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
