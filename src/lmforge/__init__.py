"""lmforge: from raw documents to a served, retrieval-augmented, fine-tuned language model."""

__version__ = "0.1.0"
