"""Preference pairs (a prompt, a chosen and a rejected reply) for DPO / IPO / ORPO / SimPO, and their batches.

Formats (`format=`, or decided from the first record):
- **alpaca**: `instruction`, optional `input` / `system` / `history`, and `chosen` / `rejected` strings (LLaMA-Factory's
  alpaca ranking data);
- **sharegpt**: `conversations` (the prompt turns) with `chosen` / `rejected` turns `{"from": "gpt", "value": ...}`
  (LLaMA-Factory's dpo_en_demo / dpo_zh_demo);
- **openai**: `messages` (the prompt turns) with `chosen` / `rejected` as an assistant message, a list holding one, or
  a string;
- **pairs**: trl's `prompt` / `chosen` / `rejected` strings (or `prompt` as a list of messages).
A LLaMA-Factory `dataset_info.json` entry with `"ranking": true` loads as it ships. Each side becomes a whole
Conversation (prompt turns + that reply) parsed and validated by the SFT readers, so every bad record names file:line
and field; a pair whose two replies are the same is a bad record too (it has no preference to learn).

Each side is rendered through the chat template with the loss mask on its last reply (chat/masks.py). A batch
is B chosen rows then B rejected rows, right-padded; DPO and IPO also carry the reference model's summed reply
log-probabilities, computed once before training by `reference_logps` (the model as it starts: the base model for
adapter methods, whose adapters start as the identity; the initial weights for full fine-tuning).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from lmforge.data.sources import CorpusError, OnBad
from lmforge.finetune.conversations import (
    ALPACA_COLUMNS,
    SHAREGPT_COLUMNS,
    SHAREGPT_TAGS,
    Conversation,
    DataFormatError,
    _alpaca,
    _openai,
    _sharegpt,
    iter_records,
    resolve_spec,
)
from lmforge.finetune.sft import SFTExamples, build_examples, collate_padded


@dataclass
class PreferencePair:
    chosen: Conversation  # the prompt turns + the chosen reply
    rejected: Conversation  # the same prompt turns + the rejected reply
    where: str = ""
    margin: float | None = None  # how much better chosen is (a `margin` column; reward models: Llama 2's margin loss)


def detect_preference_format(rec: dict, columns: dict, where: str) -> str:
    keys = set(rec)
    if not {columns.get("chosen", "chosen"), columns.get("rejected", "rejected")} <= keys:
        raise DataFormatError(f"{where}: a preference record needs 'chosen' and 'rejected' fields (it has "
                              f"{', '.join(sorted(map(str, keys))[:8])})")
    if columns.get("messages", "conversations") in keys or "conversations" in keys:
        return "sharegpt" if "conversations" in keys or "messages" not in keys else "openai"
    if "messages" in keys:
        return "openai"
    if columns.get("prompt", "instruction") in keys or "instruction" in keys:
        return "alpaca" if "instruction" in keys or columns.get("prompt") in keys else "pairs"
    if "prompt" in keys:
        return "pairs"
    raise DataFormatError(f"{where}: cannot tell the format (no instruction, prompt, conversations or messages field)")


def _reply_text(value, where: str, key: str) -> str:
    if isinstance(value, list) and len(value) == 1:  # trl's conversational form: [{"role": "assistant", ...}]
        value = value[0]
    if isinstance(value, dict):
        value = value.get("content", value.get("value"))
    if not isinstance(value, str):
        raise DataFormatError(f"{where}: field '{key}' is not a reply (a string or an assistant message)")
    if not value.strip():
        raise DataFormatError(f"{where}: field '{key}' is empty")
    return value


def parse_pair(rec: dict, fmt: str, columns: dict, tags: dict, where: str) -> PreferencePair:
    ck, rk = columns.get("chosen", "chosen"), columns.get("rejected", "rejected")
    sides = []
    for key in (ck, rk):
        if key not in rec:
            raise DataFormatError(f"{where}: field '{key}' is missing")
        if fmt == "alpaca":
            cols = {**ALPACA_COLUMNS, **{k: v for k, v in columns.items() if k in ALPACA_COLUMNS}}
            sides.append(_alpaca({**rec, "__reply": _reply_text(rec[key], where, key)}, {**cols, "response": "__reply"},
                                 where))
        elif fmt == "sharegpt":
            cols = {**SHAREGPT_COLUMNS, **{k: v for k, v in columns.items() if k in SHAREGPT_COLUMNS}}
            t = {**SHAREGPT_TAGS, **tags}
            turn = rec[key]
            if isinstance(turn, str):
                turn = {t["role_tag"]: t["assistant_tag"], t["content_tag"]: turn}
            if not isinstance(turn, dict):
                raise DataFormatError(f"{where}: field '{key}' is not a turn ({t['role_tag']}, {t['content_tag']})")
            prompt = rec.get(cols["messages"])
            if not isinstance(prompt, list):
                raise DataFormatError(f"{where}: field '{cols['messages']}' is not a list of turns")
            sides.append(_sharegpt({**rec, cols["messages"]: prompt + [turn]}, cols, t, where))
        elif fmt in ("openai", "pairs"):
            key_m = columns.get("messages", "messages") if fmt == "openai" else columns.get("prompt", "prompt")
            prompt = rec.get(key_m)
            if isinstance(prompt, str):
                if not prompt.strip():
                    raise DataFormatError(f"{where}: field '{key_m}' is empty")
                prompt = [{"role": "user", "content": prompt}]
            if not isinstance(prompt, list):
                raise DataFormatError(f"{where}: field '{key_m}' is " + ("missing" if prompt is None else
                                                                           "not a string or a list of messages"))
            system = rec.get(columns.get("system", "system"))
            if isinstance(system, str) and system.strip() and not (prompt and prompt[0].get("role") == "system"):
                prompt = [{"role": "system", "content": system}] + prompt
            reply = {"role": "assistant", "content": _reply_text(rec[key], where, key)}
            sides.append(_openai({"messages": prompt + [reply], "tools": rec.get(columns.get("tools", "tools"))},
                                 {"messages": "messages", "tools": "tools"}, where))
        else:
            raise DataFormatError(f"{where}: format {fmt!r} has no preference form (alpaca, sharegpt, openai, pairs)")
    chosen, rejected = sides
    if chosen.messages[-1]["content"] == rejected.messages[-1]["content"]:
        raise DataFormatError(f"{where}: fields '{ck}' and '{rk}' are the same reply (nothing to prefer)")
    return PreferencePair(chosen, rejected, where, _margin(rec, columns.get("margin", "margin"), where))


def _margin(rec: dict, key: str, where: str) -> float | None:
    value = rec.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise DataFormatError(f"{where}: field '{key}' is {value!r}, not a number")
    return float(value)


def load_pairs(data: str, format: str = "auto", columns: dict | None = None, tags: dict | None = None,
               on_bad: OnBad | None = None, encoding: str = "utf-8", errors: str = "strict") -> list[PreferencePair]:
    """Every valid pair of a file, folder or `DIR/dataset_info.json#NAME` (ranking) entry."""
    spec = resolve_spec(os.fspath(data), format, columns, tags, ranking=True)
    out = []
    for path in spec.files:
        fmt = spec.format
        for where, rec in iter_records(path, on_bad, encoding, errors):
            try:
                if fmt == "auto":
                    fmt = detect_preference_format(rec, spec.columns, where)
                out.append(parse_pair(rec, fmt, spec.columns, spec.tags, where))
            except DataFormatError as e:
                if on_bad is None:
                    raise
                on_bad(where, str(e).split(": ", 1)[1], json.dumps(rec, ensure_ascii=False, default=str)[:2000])
    if not out:
        raise CorpusError(f"{data}: no valid preference pairs")
    return out


# --- examples and batches -----------------------------------------------------------------------------------------

@dataclass
class PreferenceExamples:
    chosen: SFTExamples
    rejected: SFTExamples
    ref_logps: np.ndarray | None = None  # (n, 2): the reference model's summed reply log-probabilities
    margins: np.ndarray | None = None  # (n,): each pair's margin, when the data has them (reward models use them)
    stats: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.chosen)


def build_pairs(tokenizer, template: str, pairs: list[PreferencePair], max_length: int, on_bad=None,
                progress: bool = False, variables: dict | None = None) -> PreferenceExamples:
    """Both sides of every pair, masked to their last reply; a pair loses both sides when either has no trained
    token after truncation (reported). `variables`: the template's own."""
    c_ok = _trained_flags(tokenizer, template, [p.chosen for p in pairs], max_length, variables)
    r_ok = _trained_flags(tokenizer, template, [p.rejected for p in pairs], max_length, variables)
    kept = [p for p, a, b in zip(pairs, c_ok, r_ok) if a and b]
    dropped = len(pairs) - len(kept)
    if on_bad is not None:
        for p, a, b in zip(pairs, c_ok, r_ok):
            if not (a and b):
                on_bad(p.where, f"the prompt fills max_length {max_length}: no reply token left", "")
    if not kept:
        raise CorpusError(f"none of the {len(pairs)} pairs has a reply token within max_length {max_length}: "
                          "raise max_length")
    chosen = build_examples(tokenizer, template, [p.chosen for p in kept], "last", max_length, None, None, progress,
                            "tokenize chosen", variables)
    rejected = build_examples(tokenizer, template, [p.rejected for p in kept], "last", max_length,
                              variables=variables)
    stats = {"pairs": len(kept), "left_out": dropped, "chosen": chosen.stats, "rejected": rejected.stats}
    with_margin = [p for p in kept if p.margin is not None]
    if with_margin and len(with_margin) < len(kept):
        missing = next(p for p in kept if p.margin is None)
        raise DataFormatError(f"{missing.where}: no margin, where {len(with_margin)} other pairs have one: give every "
                              "pair a margin or none")
    margins = np.array([p.margin for p in kept], np.float32) if with_margin else None
    return PreferenceExamples(chosen, rejected, stats=stats, margins=margins)


def _trained_flags(tokenizer, template: str, convs: list[Conversation], max_length: int,
                   variables: dict | None = None) -> list[bool]:
    from lmforge.chat.masks import IGNORE, encode_example

    return [any(label != IGNORE for label in encode_example(tokenizer, template, c, "last", max_length,
                                                            variables=variables).labels)
            for c in convs]


def collate_pairs(examples: PreferenceExamples, members: list[int], pad_id: int) -> dict:
    n = len(examples.chosen)
    both = SFTExamples(examples.chosen.input_ids + examples.rejected.input_ids,
                       examples.chosen.labels + examples.rejected.labels)
    batch = collate_padded(both, list(members) + [n + i for i in members], pad_id)
    if examples.ref_logps is not None:
        ref = examples.ref_logps[members]
        batch["ref_logps"] = torch.from_numpy(np.concatenate([ref[:, 0], ref[:, 1]]).astype(np.float32))
    if examples.margins is not None:
        batch["margin"] = torch.from_numpy(examples.margins[members])
    return batch


@torch.no_grad()
def reference_logps(model, examples: PreferenceExamples, pad_id: int, batch_size: int = 8, device=None,
                    progress: bool = False, dtype: torch.dtype | None = None) -> np.ndarray:
    """(n, 2) summed reply log-probabilities of both sides under `model` as it is now (the reference)."""
    from lmforge.progress import progress as progress_bar
    from lmforge.train.objectives import sequence_logps

    was = model.training
    model.eval()
    out = np.zeros((len(examples), 2), np.float64)
    order = sorted(range(len(examples)), key=lambda i: len(examples.chosen.input_ids[i]))
    try:
        for s in progress_bar(range(0, len(order), batch_size), desc="reference log-probs", unit="batch",
                           enabled=progress):
            members = order[s:s + batch_size]
            batch = collate_pairs(PreferenceExamples(examples.chosen, examples.rejected), members, pad_id)
            batch = {k: v.to(device) if device is not None else v for k, v in batch.items()}
            with torch.autocast(batch["input_ids"].device.type, dtype=dtype, enabled=dtype is not None):
                logps, _ = sequence_logps(model, batch)
            B = len(members)
            out[members, 0] = logps[:B].double().cpu().numpy()
            out[members, 1] = logps[B:].double().cpu().numpy()
    finally:
        model.train(was)
    return out


def preference_batches(examples: PreferenceExamples, micro_batch_size: int, pad_id: int, seed: int = 0, rank: int = 0,
                       world: int = 1):
    """The Trainer's train_data for pairs: shuffled epochs, this process's share (rank / world), resumable."""
    from lmforge.train.datasets import ShuffledBatches

    return ShuffledBatches(len(examples), micro_batch_size, lambda members: collate_pairs(examples, members, pad_id),
                           seed, rank, world)


def pair_eval_batches(examples: PreferenceExamples, batch_size: int, pad_id: int) -> list[dict]:
    return [collate_pairs(examples, list(range(s, min(s + batch_size, len(examples)))), pad_id)
            for s in range(0, len(examples), batch_size)]
