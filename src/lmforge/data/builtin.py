"""Corpora that ship with every Python install, so lmforge runs fully offline.

`builtin:python-docs` is `pydoc_data.topics`: the Python language reference, about
80 topics and 0.47 MB of real English prose with code samples.
"""

from __future__ import annotations

from collections.abc import Iterator

from lmforge.data.document import Document

PREFIX = "builtin:"


def _python_docs() -> Iterator[Document]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield Document(id=f"python-docs/{name}", text=topics[name], meta={"source": "builtin:python-docs"})


BUILTIN_CORPORA = {"python-docs": _python_docs}


def is_builtin(spec: str) -> bool:
    return spec.startswith(PREFIX)


def builtin_documents(spec: str) -> Iterator[Document]:
    """Documents of the built-in corpus named `builtin:NAME`."""
    name = spec[len(PREFIX):]
    if name not in BUILTIN_CORPORA:
        raise KeyError(f"unknown built-in corpus '{spec}'; available: "
                       + ", ".join(PREFIX + n for n in BUILTIN_CORPORA))
    return BUILTIN_CORPORA[name]()
