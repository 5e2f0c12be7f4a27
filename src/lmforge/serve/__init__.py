"""`lmforge serve`: the OpenAI-compatible HTTP API and web chat over the continuous batcher (infer/batching.py)."""
