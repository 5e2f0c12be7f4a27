"""Inference: one generation engine (KV cache, per-request sampling, stop strings, streaming text), chat sessions."""

from lmforge.infer.detokenize import IncrementalDetokenizer, decode_generated
from lmforge.infer.generate import (
    ChatSession,
    Decoder,
    Request,
    TextEvent,
    default_stop_ids,
    generate,
    generate_ids,
    generate_stream,
    stream,
    turn_end_ids,
)
from lmforge.infer.sampling import SamplingConfig, process_logits, sample_tokens

__all__ = ["ChatSession", "Decoder", "IncrementalDetokenizer", "Request", "SamplingConfig", "TextEvent",
           "decode_generated", "default_stop_ids", "generate", "generate_ids", "generate_stream", "process_logits",
           "sample_tokens", "stream", "turn_end_ids"]
