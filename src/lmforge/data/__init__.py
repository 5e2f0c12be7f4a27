"""Data stage: documents, corpus sources (files, directories, globs, built-in corpora)."""

from lmforge.data.document import Document
from lmforge.data.sources import CorpusError, iter_documents, iter_text_chunks, resolve_inputs

__all__ = ["Document", "CorpusError", "iter_documents", "iter_text_chunks", "resolve_inputs"]
