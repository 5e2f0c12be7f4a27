"""Export: GGUF for llama.cpp / ollama (export/gguf.py); merged LoRA models come from `lmforge export merge`."""
