"""`Document`: the unit that flows through every data step."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Document:
    """One text with a stable id and free-form metadata (source file, offsets, language, ...)."""

    id: str
    text: str
    meta: dict[str, Any] = field(default_factory=dict)
