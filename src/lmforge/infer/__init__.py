"""Inference: one step loop (infer/scheduler.py: KV cache, per-request sampling, stop strings, streaming text,
continuous batching) behind generate / stream / ChatSession and the server, one scoring function for
log-probabilities, and one way to load a model for it (load_for_inference)."""

from lmforge import lazy_exports

# names load on first use: `lmforge --help` and torch-free commands never import torch
_EXPORTS = {
    "IncrementalDetokenizer": "lmforge.infer.detokenize",
    "decode_generated": "lmforge.infer.detokenize",
    "ChatSession": "lmforge.infer.engine",
    "Request": "lmforge.infer.engine",
    "TextEvent": "lmforge.infer.engine",
    "generate": "lmforge.infer.engine",
    "generate_ids": "lmforge.infer.engine",
    "generate_stream": "lmforge.infer.engine",
    "stream": "lmforge.infer.engine",
    "Loaded": "lmforge.infer.load",
    "load_for_inference": "lmforge.infer.load",
    "SamplingConfig": "lmforge.infer.sampling",
    "process_logits": "lmforge.infer.sampling",
    "sample_tokens": "lmforge.infer.sampling",
    "ContextLimit": "lmforge.infer.scheduler",
    "Scheduler": "lmforge.infer.scheduler",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(globals(), _EXPORTS)
