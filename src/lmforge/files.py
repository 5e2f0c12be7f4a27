"""Writing files so that a crash never leaves a half-written artifact behind.

Every artifact lmforge writes goes to a temporary name in the same directory and is
renamed into place only when complete; `os.replace` is atomic on POSIX and Windows.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates files readable by their owner only (0600); an artifact gets the permissions any new file gets
_FILE_MODE = 0o666 & ~_umask()


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temporary file beside `path`; on success rename it onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    """Write `obj` as UTF-8 JSON (non-ASCII kept readable), atomically."""
    with atomic_write(path) as f:
        json.dump(obj, f, ensure_ascii=False, indent=indent)
        f.write("\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path) as f:
        f.write(text)


def save_tensors(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """torch tensors as a safetensors file, atomically and with normal permissions (safetensors alone writes 0600)."""
    from safetensors.torch import save

    with atomic_write(path, "wb") as f:
        f.write(save(tensors, metadata=metadata))


class StagedDirectory:
    """Files that land in `directory` together: written under a temporary directory, then moved in at once.

    A directory that does not exist yet is created whole by one rename. Into an existing one (a model directory that
    already holds a tokenizer) the staged files are renamed in, back to back, in the order they were staged: stage the
    file that says the unit is complete (config.json, tokenizer_config.json) last.

        with StagedDirectory(out) as stage:
            save_tensors(tensors, stage.path("model.safetensors"))
            write_json(stage.path("config.json"), config)
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.order: list[str] = []

    def __enter__(self) -> StagedDirectory:
        d = self.directory
        self.fresh = not d.exists()
        parent = d.parent if self.fresh else d
        parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{d.name}.", suffix=".tmp", dir=parent))
        return self

    def path(self, name: str) -> Path:
        if name not in self.order:
            self.order.append(name)
        return self.tmp / name

    def __exit__(self, kind, value, tb) -> None:
        if kind is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        if self.fresh:
            os.chmod(self.tmp, 0o777 & ~_umask())  # mkdtemp makes it owner-only
            os.replace(self.tmp, self.directory)
            return
        for name in self.order:
            os.replace(self.tmp / name, self.directory / name)
        shutil.rmtree(self.tmp, ignore_errors=True)
