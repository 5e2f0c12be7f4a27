"""Inference: KV-cache generation, sampling, streaming."""

from lmforge.infer.generate import IncrementalDetokenizer, SamplingConfig, generate, generate_ids, process_logits, stream

__all__ = ["IncrementalDetokenizer", "SamplingConfig", "generate", "generate_ids", "process_logits", "stream"]
