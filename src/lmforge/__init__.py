"""lmforge: from raw documents to a served, retrieval-augmented, fine-tuned language model."""

__version__ = "0.1.0"


def lazy_exports(namespace: dict, exports: dict[str, str]):
    """A package `__getattr__` (PEP 562) that imports each exported name from its module on first use, so importing
    the package (and `lmforge --help`) never pulls torch. `exports`: name -> module."""
    def __getattr__(name: str):
        if name in exports:
            import importlib

            value = getattr(importlib.import_module(exports[name]), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {namespace['__name__']!r} has no attribute {name!r}")

    return __getattr__
