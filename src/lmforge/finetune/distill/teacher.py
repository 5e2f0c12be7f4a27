"""The teacher of a distillation run: loaded frozen, and checked to share the student's tokenizer (the two
distributions are compared id by id, so the ids must mean the same tokens)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from lmforge.config import ConfigError


def vocabulary(tokenizer) -> list[str]:
    """The tokens of a tokenizer in id order (special tokens included)."""
    return [tokenizer.id_to_token(i) for i in range(tokenizer.vocab_size)]


def describe_vocabulary(tokens: list[str]) -> str:
    """A short name of a vocabulary: its size and a hash of its tokens in order."""
    digest = hashlib.sha256("\n".join(tokens).encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{len(tokens):,} tokens, sha256 {digest}"


def check_same_tokenizer(teacher_dir: str | Path, teacher_tokenizer, student_dir: str | Path, student_tokenizer) -> None:
    """A ConfigError naming both vocabularies (and the first id where they differ) unless they are equal."""
    a, b = vocabulary(teacher_tokenizer), vocabulary(student_tokenizer)
    if a == b:
        return
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    shown = (f"id {first} is {a[first]!r} in the teacher, {b[first]!r} in the student" if first < min(len(a), len(b))
             else f"they agree up to id {first - 1}")
    raise ConfigError(f"teacher: {teacher_dir} has another vocabulary than the student {student_dir} (teacher "
                      f"{describe_vocabulary(a)}; student {describe_vocabulary(b)}; {shown}); distillation compares "
                      "their next-token distributions id by id, so the student needs the teacher's tokenizer")


#: the teacher's weights: float types, or lmforge's weight-only int8 (4x less memory than float32)
TEACHER_DTYPES = ["float32", "bfloat16", "float16", "int8"]


def frozen_teacher(teacher_dir: str | Path, dtype: str = "float32"):
    """The teacher's decoder, eval mode, no gradients, in `dtype` (TEACHER_DTYPES; int8: float32 activations over
    int8 weights, model/quantize.py)."""
    from lmforge.infer.load import torch_dtype
    from lmforge.model import load_hf_model

    if dtype not in TEACHER_DTYPES:
        raise ConfigError(f"teacher_dtype: {dtype!r} is not one of {', '.join(TEACHER_DTYPES)}")
    model = load_hf_model(teacher_dir, dtype=torch_dtype("float32" if dtype == "int8" else dtype))
    if dtype == "int8":
        from lmforge.model import quantize_int8

        quantize_int8(model)
    return model.eval().requires_grad_(False)


def load_teacher(teacher: str | Path, student_dir: str | Path, student_tokenizer, dtype: str = "float32"):
    """The teacher model (`frozen_teacher` in `dtype`), after checking its tokenizer equals the student's."""
    from lmforge.model.hf import resolve_model_dir
    from lmforge.tokenizer import load_tokenizer

    if not teacher:
        raise ConfigError("teacher: give the teacher model (--teacher DIR) or its cache (--teacher-cache DIR)")
    teacher_dir = resolve_model_dir(teacher)
    if not (teacher_dir / "tokenizer.json").exists():
        raise ConfigError(f"teacher: {teacher_dir} has no tokenizer.json; distillation checks that the teacher and "
                          "the student share a tokenizer")
    check_same_tokenizer(teacher_dir, load_tokenizer(teacher_dir), student_dir, student_tokenizer)
    return frozen_teacher(teacher_dir, dtype)
