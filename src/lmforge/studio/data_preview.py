"""A data file as `lmforge finetune` sees it: read by the fine-tuning format reader (finetune/conversations.py, the
same format detection, column mapping and per-record errors), rendered through the chosen chat template, and split
into the runs of text the loss trains on and the rest (chat/masks.py), with token counts. Records the reader
refuses are listed with their file:line and reason instead of stopping the preview.
"""

from __future__ import annotations

from pathlib import Path


def preview_data(data: str | Path, tokenizer_dir: str | Path, template: str | None = None, format: str = "auto",
                 mask: str = "assistant", start: int = 0, limit: int = 10, max_length: int | None = None) -> dict:
    """Examples `start` .. `start + limit` of `data`: {"template": where the template came from, "examples":
    [{"where", "runs": [[text, trained], ...], "tokens", "trained_tokens", "truncated"}], "rejects": [{"where",
    "reason"}], "scanned": records read}. `tokenizer_dir`: a model or tokenizer directory (its tokenizer and its
    own chat template); `template`: None / "model" for that one, else a built-in name, a file or Jinja text, as
    --template takes it; `mask`: assistant | last | all, as finetune's --mask."""
    from lmforge.chat.masks import IGNORE, encode_example, masked_runs
    from lmforge.chat.stops import eos_ids
    from lmforge.chat.templates import resolve_template
    from lmforge.finetune.conversations import read_conversations, resolve_spec
    from lmforge.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(tokenizer_dir))
    text, source = resolve_template(tokenizer, template or None, required=False)
    rejects = []

    def on_bad(where: str, reason: str, raw: str) -> None:
        rejects.append({"where": where, "reason": reason})

    spec = resolve_spec(str(data), format)
    eos = (eos_ids(tokenizer) or [None])[0]  # what plain-text examples end with (finetune adds the model's too)
    examples, scanned = [], 0
    for i, conv in enumerate(read_conversations(spec, on_bad)):
        scanned = i + 1
        if i < start:
            continue
        if len(examples) >= limit:
            break
        if conv.text is None and text is None:
            from lmforge.config import ConfigError

            raise ConfigError("template: the tokenizer has no chat template of its own; choose a built-in one")
        enc = encode_example(tokenizer, text, conv, mask, max_length=max_length, eos_id=eos)
        runs = masked_runs(tokenizer, enc)
        examples.append({"where": conv.where, "runs": [[t, trained] for t, trained in runs],
                         "tokens": len(enc.input_ids) + 1, "trained_tokens": sum(label != IGNORE for label in enc.labels),
                         "truncated": enc.truncated})
    return {"template": source, "format": spec.format, "examples": examples, "rejects": rejects, "scanned": scanned}
