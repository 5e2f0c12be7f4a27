"""Inference: one generation engine (KV cache, per-request sampling, stop strings, streaming text), chat sessions."""

from lmforge import lazy_exports

# names load on first use: `lmforge --help` and torch-free commands never import torch
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
__getattr__ = lazy_exports(globals(), _EXPORTS)
