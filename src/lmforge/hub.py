"""Where a model or tokenizer comes from: a local directory, or (online, on request) the Hugging Face Hub.

A hub download happens only for `hf:ORG/NAME`, or for a bare `ORG/NAME` that cannot be a local path: it does not
exist, does not start with `.`, `/` or `~`, has exactly one `/`, and its first part is not a local directory or a
near miss of one (`runz/pt` next to `runs/` is a typo, not a hub id). Everything else is local, and a local path
that does not exist is an immediate error with a suggestion, never a network wait. `HF_HUB_OFFLINE=1` turns the hub
off altogether; downloads need `huggingface_hub` (pip install 'lmforge[hub]').
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path

HUB_PREFIX = "hf:"
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class SourceError(ValueError):
    """A model or tokenizer location that does not exist locally and is not a hub id (the message suggests one)."""


def _near_local_dir(name: str, base: Path) -> str | None:
    try:
        dirs = [p.name for p in base.iterdir() if p.is_dir()]
    except OSError:
        return None
    close = difflib.get_close_matches(name, dirs, n=1, cutoff=0.75)
    return close[0] if close else None


def hub_repo_id(spec: str | os.PathLike) -> str | None:
    """The repo id when `spec` names the Hugging Face Hub (see the module docstring), else None."""
    text = str(spec)
    if text.startswith(HUB_PREFIX):
        return text[len(HUB_PREFIX):]
    if Path(text).exists() or text.startswith((".", "/", "~")) or not _REPO_ID.fullmatch(text):
        return None
    first = text.split("/", 1)[0]
    if Path(first).is_dir() or _near_local_dir(first, Path(".")):
        return None
    return text


def missing_path_error(path: Path, what: str) -> SourceError:
    """A one-line error for a local path that does not exist, with the nearest existing one."""
    parts = path.parts
    # the first part that does not exist, and the existing directory that is closest to it
    for i in range(len(parts)):
        here = Path(*parts[:i + 1])
        if here.exists():
            continue
        base = Path(*parts[:i]) if i else Path(".")
        near = _near_local_dir(parts[i], base) if base.is_dir() else None
        if near:
            guess = Path(*parts[:i], near, *parts[i + 1:])
            return SourceError(f"{path}: no such {what}; did you mean {guess}?")
        break
    return SourceError(f"{path}: no such {what}")


def run_directory_hint(path: Path) -> str:
    """For a training run directory given where a model is expected: where its models are."""
    models = [str(path / n) for n in ("best", "last") if (path / n / "config.json").exists()]
    return f"; {path} is a training run: its models are {' and '.join(models)}" if models else ""


def download(repo_id: str, allow_patterns: list[str] | None = None) -> Path:
    """Fetch a repository snapshot from the Hub (needs huggingface_hub and a network)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise SourceError(f"'{repo_id}' is not a local path, and HF_HUB_OFFLINE is set: no download is attempted")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise SourceError(f"'{repo_id}' is not a local path; to fetch it from the Hugging Face Hub install "
                          "huggingface_hub (pip install 'lmforge[hub]') and be online") from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=allow_patterns))
    except Exception as e:  # the library's network and repository errors
        raise SourceError(f"'{repo_id}' is not a local path and the Hugging Face Hub download failed: {e}") from None
