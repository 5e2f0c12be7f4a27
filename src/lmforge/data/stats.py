"""Pipeline statistics: per step documents and characters in and out, reasons, length histograms."""

from __future__ import annotations

from collections import Counter

import numpy as np
import regex

_NUMBER = regex.compile(r"\d+(?:\.\d+)?")
LENGTH_BINS = [0] + [2 ** i for i in range(4, 25)]  # characters, log-spaced up to 16M


def reason_key(reason: str) -> str:
    """A reason with its numbers masked, so equal rules count together."""
    return _NUMBER.sub("#", reason)


def histogram(lengths: list[int]) -> list[int]:
    return np.histogram(lengths, bins=LENGTH_BINS + [2 ** 62])[0].tolist() if lengths else [0] * len(LENGTH_BINS)


class StepStats:
    def __init__(self, name: str):
        self.name = name
        self.docs_in = self.docs_out = self.chars_in = self.chars_out = 0
        self.reasons: Counter = Counter()

    def as_dict(self) -> dict:
        return {"step": self.name, "docs_in": self.docs_in, "docs_out": self.docs_out, "chars_in": self.chars_in,
                "chars_out": self.chars_out, "reasons": dict(self.reasons.most_common())}


def merge_stats(parts: list[dict]) -> dict:
    """Sum per-shard stats (same steps in the same order)."""
    if not parts:
        return {"steps": [], "lengths_in": [0] * len(LENGTH_BINS), "lengths_out": [0] * len(LENGTH_BINS)}
    steps = []
    for i, first in enumerate(parts[0]["steps"]):
        merged = {"step": first["step"], "docs_in": 0, "docs_out": 0, "chars_in": 0, "chars_out": 0, "reasons": Counter()}
        for p in parts:
            s = p["steps"][i]
            for k in ("docs_in", "docs_out", "chars_in", "chars_out"):
                merged[k] += s[k]
            merged["reasons"].update(s["reasons"])
        merged["reasons"] = dict(merged["reasons"].most_common())
        steps.append(merged)
    return {"steps": steps,
            "lengths_in": np.sum([p["lengths_in"] for p in parts], axis=0).tolist(),
            "lengths_out": np.sum([p["lengths_out"] for p in parts], axis=0).tolist()}


