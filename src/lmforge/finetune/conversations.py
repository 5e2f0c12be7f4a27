"""Every instruction-data format users bring, read into one `Conversation` type.

Formats (`format=`):

- **alpaca**: `instruction`, optional `input` (appended to the instruction after a newline, as LLaMA-Factory and
  Stanford Alpaca do), `output`, optional `system` and `history` ([[user, assistant], ...] turns before it);
- **sharegpt**: a list of turns under `conversations`, each `{"from": ..., "value": ...}` with the roles
  `human` / `gpt` / `system` / `function_call` / `observation` (every tag configurable), optional `system` and
  `tools` columns;
- **openai**: `messages` as the OpenAI chat API takes them (`role`, `content` as a string or text parts,
  `tool_calls`), optional `tools`;
- **pairs**: a prompt and a response column (`prompt`/`response` by default: context/response, question/answer);
- **text**: plain text for continued pretraining (the `text` column, or .txt files);
- **auto**: decided from the first record's keys.

Files: .jsonl(.gz), .json (an array), .csv/.tsv (a header row; `columns` maps the format's fields onto it),
.parquet, .txt. A LLaMA-Factory `dataset_info.json` entry loads as it ships: `DIR/dataset_info.json#NAME` reads
its file_name, formatting, columns and tags.

Every bad record (missing field, non-string content, empty turn, wrong role order, unknown role) is an error
naming file:line and field, or with `on_error="skip"` goes to the reject log with that reason.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.config import ConfigError
from lmforge.data.sources import CorpusError, OnBad, iter_records

FORMATS = ("auto", "alpaca", "sharegpt", "openai", "pairs", "text")
ROLES = ("system", "user", "assistant", "tool")

# LLaMA-Factory's defaults (data/README.md of LLaMA-Factory: dataset_info.json)
ALPACA_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "system": "system",
                  "history": "history"}
SHAREGPT_COLUMNS = {"messages": "conversations", "system": "system", "tools": "tools"}
SHAREGPT_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                 "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}
OPENAI_COLUMNS = {"messages": "messages", "tools": "tools"}
PAIRS_COLUMNS = {"prompt": "prompt", "response": "response", "system": "system"}
TEXT_COLUMNS = {"text": "text"}

log = logging.getLogger(__name__)


class DataFormatError(ValueError):
    """A record that does not fit its format; the message names file:line and the field."""


@dataclass
class Conversation:
    """One training example: chat messages ({"role", "content"[, "tool_calls"]}) and tools, or plain `text`."""

    messages: list[dict] = field(default_factory=list)
    tools: list | None = None
    text: str | None = None  # continued pretraining: no roles, the whole text is trained on
    where: str = ""  # file:line it came from


@dataclass
class DataSpec:
    """How to read one dataset: its files, format, column mapping and sharegpt tags."""

    files: list[str]
    format: str = "auto"
    columns: dict = field(default_factory=dict)
    tags: dict = field(default_factory=dict)
    name: str = ""
    lines: bool = False  # a .txt file holds one document per line (LLaMA-Factory's pretraining files), not one


# --- locating the data ----------------------------------------------------------------------------------------

def resolve_spec(data: str, format: str = "auto", columns: dict | None = None, tags: dict | None = None,
                 ranking: bool = False) -> DataSpec:
    """A file, a folder of data files, or `DIR/dataset_info.json#NAME` (LLaMA-Factory's registry)."""
    if format not in FORMATS:
        raise ConfigError(f"format: {format!r} is not one of {', '.join(FORMATS)}")
    from lmforge.data.hf_datasets import is_dataset_source

    if is_dataset_source(data):  # a datasets directory (or DIR#SPLIT, hf:REPO): its rows are the records
        return DataSpec([data], format, dict(columns or {}), dict(tags or {}))
    path, _, name = data.partition("#")
    if Path(path).name == "dataset_info.json" or name:
        return _from_dataset_info(Path(path), name, columns, tags, ranking)
    p = Path(path)
    if p.is_dir():
        files = sorted(str(f) for f in p.rglob("*") if f.is_file() and _is_data_file(str(f)))
        if not files:
            raise CorpusError(f"{p}: no data files (.jsonl, .json, .csv, .tsv, .parquet, .txt) in it")
    elif p.exists():
        files = [str(p)]
    else:
        from lmforge.hub import missing_path_error

        raise CorpusError(missing_path_error(p, "data file"))
    return DataSpec(files, format, dict(columns or {}), dict(tags or {}))


def _is_data_file(path: str) -> bool:
    return path.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz", ".csv", ".tsv", ".parquet", ".txt"))


def _from_dataset_info(path: Path, name: str, columns: dict | None, tags: dict | None,
                       ranking: bool = False) -> DataSpec:
    if not path.exists():
        raise CorpusError(f"{path}: not found (a LLaMA-Factory dataset registry is DIR/dataset_info.json#NAME)")
    try:
        registry = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CorpusError(f"{path}:{e.lineno}: malformed JSON: {e.msg}") from None
    if not name:
        raise ConfigError(f"{path}: name the dataset as {path}#NAME; it lists {', '.join(sorted(registry))}")
    if name not in registry:
        import difflib

        close = difflib.get_close_matches(name, registry, n=1)
        raise ConfigError(f"{path}: no dataset '{name}'" + (f"; did you mean '{close[0]}'?" if close else
                                                            f" (it lists {', '.join(sorted(registry))})"))
    entry = registry[name]
    where = f"{path}#{name}"
    for remote in ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name"):
        if remote in entry and "file_name" not in entry:
            raise ConfigError(f"{where}: the dataset is remote ({remote}: {entry[remote]}); lmforge reads local "
                              "files: download it and give file_name")
    if "file_name" not in entry:
        raise ConfigError(f"{where}: no file_name")
    if bool(entry.get("ranking")) != ranking:
        raise ConfigError(f"{where}: a ranking (preference) dataset; train it with --objective dpo (or ipo, orpo, "
                          "simpo), not SFT" if entry.get("ranking") else
                          f"{where}: not a ranking dataset (no \"ranking\": true); preference tuning needs chosen and "
                          "rejected replies")
    formatting = entry.get("formatting", "alpaca")
    if formatting not in ("alpaca", "sharegpt", "openai"):
        raise ConfigError(f"{where}: formatting {formatting!r} is not alpaca, sharegpt or openai")
    media = [k for k in ("images", "videos", "audios") if k in entry.get("columns", {})]
    if media:
        raise ConfigError(f"{where}: a multimodal dataset (its {media[0]} column); lmforge fine-tunes text-only "
                          "models, and training on its text alone would teach the model to answer unseen media")
    target = path.parent / entry["file_name"]
    if formatting == "alpaca" and set(entry.get("columns", {})) == {"prompt"} and not columns:
        # LLaMA-Factory's pretraining entries (c4_demo, wiki_demo, fineweb...) name only a prompt column: its `pt`
        # stage reads that column as plain text, and a .txt file as one document per line (datasets' text builder)
        spec = resolve_spec(str(target), "text", {"text": entry["columns"]["prompt"]})
        spec.lines, spec.name = True, name
        return spec
    spec = resolve_spec(str(target), "sharegpt" if formatting == "openai" else formatting,
                        {**entry.get("columns", {}), **(columns or {})}, {**entry.get("tags", {}), **(tags or {})})
    if formatting == "openai" and not entry.get("tags"):  # LLaMA-Factory's openai = sharegpt with OpenAI tags
        spec.tags = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
                     "system_tag": "system", "observation_tag": "tool", "function_tag": "function_call",
                     **spec.tags}
        spec.columns.setdefault("messages", "messages")
    spec.name = name
    return spec


# --- reading ------------------------------------------------------------------------------------------------------

def read_conversations(spec: DataSpec, on_bad: OnBad | None = None, encoding: str = "utf-8",
                       errors: str = "strict") -> Iterator[Conversation]:
    """Every valid Conversation of the spec's files, in order; a bad record raises DataFormatError naming it, or
    goes to `on_bad(where, reason, raw)` when given."""
    kto = spec.columns.get("kto_tag")
    undesirable = 0
    for path in spec.files:
        if path.endswith(".txt") and Path(path).is_file():
            text = Path(path).read_text(encoding=encoding if encoding != "auto" else "utf-8")
            if spec.lines:
                for i, line in enumerate(text.splitlines(), 1):
                    if line.strip():
                        yield Conversation(text=line, where=f"{path}:{i}")
            elif text.strip():
                yield Conversation(text=text, where=path)
            continue
        fmt = spec.format
        for where, rec in iter_records(path, on_bad, encoding, errors):
            if fmt == "auto":
                fmt = detect_format(rec, spec.columns, where)
            if kto:  # a KTO set marks each reply desirable or not; SFT learns only the desirable ones
                tag = rec.get(kto)
                if not isinstance(tag, bool):
                    e = DataFormatError(f"{where}: field '{kto}' (kto_tag) is not true or false ({tag!r})")
                    if on_bad is None:
                        raise e
                    on_bad(where, str(e).split(": ", 1)[1], json.dumps(rec, ensure_ascii=False, default=str)[:2000])
                    continue
                if not tag:
                    undesirable += 1
                    continue
            try:
                conv = parse_record(rec, fmt, spec.columns, spec.tags, where)
            except DataFormatError as e:
                if on_bad is None:
                    raise
                on_bad(where, str(e).split(": ", 1)[1], json.dumps(rec, ensure_ascii=False, default=str)[:2000])
                continue
            yield conv
    if undesirable:
        log.warning("%s: %d examples are undesirable replies (%s false) and are not trained: lmforge does not "
                    "train KTO, so SFT learns the desirable ones only", spec.name or spec.files[0], undesirable, kto)


def detect_format(rec: dict, columns: dict, where: str) -> str:
    keys = set(rec)
    if ({columns.get("messages", "conversations"), "conversations"} & keys) and isinstance(
            rec.get(columns.get("messages", "conversations"), rec.get("conversations")), list):
        return "sharegpt"
    if "messages" in keys:
        return "openai"
    if columns.get("prompt", "instruction") in keys and columns.get("response", "output") in keys:
        return "alpaca"
    for p, r in (("prompt", "response"), ("context", "response"), ("question", "answer"), ("input", "output")):
        if p in keys and r in keys:
            return "pairs"
    if "text" in keys:
        return "text"
    raise DataFormatError(f"{where}: cannot tell the format from the fields {sorted(keys)}; pass --format "
                          f"({', '.join(FORMATS[1:])}) and --columns")


def parse_record(rec: dict, fmt: str, columns: dict, tags: dict, where: str) -> Conversation:
    if fmt == "alpaca":
        return _alpaca(rec, {**ALPACA_COLUMNS, **columns}, where)
    if fmt == "sharegpt":
        return _sharegpt(rec, {**SHAREGPT_COLUMNS, **columns}, {**SHAREGPT_TAGS, **tags}, where)
    if fmt == "openai":
        return _openai(rec, {**OPENAI_COLUMNS, **columns}, where)
    if fmt == "pairs":
        return _pairs(rec, columns, where)
    if fmt == "text":
        col = {**TEXT_COLUMNS, **columns}["text"]
        return Conversation(text=_string(rec, col, where), where=where)
    raise ConfigError(f"format: {fmt!r} is not one of {', '.join(FORMATS)}")


def _string(rec: dict, key: str, where: str, required: bool = True, allow_empty: bool = False) -> str | None:
    value = rec.get(key)
    if value is None:
        if required:
            raise DataFormatError(f"{where}: field '{key}' is missing")
        return None
    if not isinstance(value, str):
        raise DataFormatError(f"{where}: field '{key}' is not a string ({type(value).__name__})")
    if not value.strip() and required and not allow_empty:
        raise DataFormatError(f"{where}: field '{key}' is empty")
    return value


def _alpaca(rec: dict, cols: dict, where: str) -> Conversation:
    prompt = _string(rec, cols["prompt"], where)
    query = _string(rec, cols["query"], where, required=False) if cols.get("query") else None
    response = _string(rec, cols["response"], where)
    system = _string(rec, cols["system"], where, required=False) if cols.get("system") else None
    messages = [{"role": "system", "content": system}] if system else []
    history = rec.get(cols["history"]) if cols.get("history") else None
    if history:
        if not isinstance(history, list):
            raise DataFormatError(f"{where}: field '{cols['history']}' is not a list of [user, assistant] pairs")
        for k, turn in enumerate(history):
            if not (isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
                raise DataFormatError(f"{where}: field '{cols['history']}[{k}]' is not a [user, assistant] pair of "
                                      "strings")
            if not turn[0].strip() or not turn[1].strip():
                raise DataFormatError(f"{where}: field '{cols['history']}[{k}]' has an empty turn")
            messages += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
    content = f"{prompt}\n{query}" if query and query.strip() else prompt
    messages += [{"role": "user", "content": content}, {"role": "assistant", "content": response}]
    return Conversation(messages, where=where)


def _pairs(rec: dict, columns: dict, where: str) -> Conversation:
    if "prompt" in columns or "response" in columns:
        p, r = columns.get("prompt", "prompt"), columns.get("response", "response")
    else:
        p, r = next(((a, b) for a, b in (("prompt", "response"), ("context", "response"), ("question", "answer"),
                                         ("input", "output")) if a in rec and b in rec), ("prompt", "response"))
    system = _string(rec, columns.get("system", "system"), where, required=False)
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": "user", "content": _string(rec, p, where)},
                 {"role": "assistant", "content": _string(rec, r, where)}]
    return Conversation(messages, where=where)


def _tools(rec: dict, key: str | None, where: str) -> list | None:
    if not key or rec.get(key) in (None, "", []):
        return None
    tools = rec[key]
    if isinstance(tools, str):  # LLaMA-Factory stores tools as a JSON string
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise DataFormatError(f"{where}: field '{key}' is not valid JSON ({e.msg})") from None
    if isinstance(tools, dict):
        tools = [tools]
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise DataFormatError(f"{where}: field '{key}' is not a list of tool definitions")
    # the OpenAI form {"type": "function", "function": {...}} is what chat templates expect
    return [t if "function" in t else {"type": "function", "function": t} for t in tools]


def _turns(rec: dict, key: str, where: str) -> list:
    turns = rec.get(key)
    if turns is None:
        raise DataFormatError(f"{where}: field '{key}' is missing")
    if not isinstance(turns, list):
        raise DataFormatError(f"{where}: field '{key}' is not a list of turns")
    return turns


def _sharegpt(rec: dict, cols: dict, tags: dict, where: str) -> Conversation:
    key = cols["messages"]
    turns = _turns(rec, key, where)
    role_of = {tags["user_tag"]: "user", tags["assistant_tag"]: "assistant", tags["system_tag"]: "system",
               tags["observation_tag"]: "tool", tags["function_tag"]: "function_call"}
    messages = []
    system = _string(rec, cols["system"], where, required=False) if cols.get("system") else None
    if system:
        messages.append({"role": "system", "content": system})
    for k, turn in enumerate(turns):
        here = f"'{key}[{k}]'"
        if not isinstance(turn, dict):
            raise DataFormatError(f"{where}: {here} is not an object")
        tag = turn.get(tags["role_tag"])
        if tag not in role_of:
            raise DataFormatError(f"{where}: {here} has role {tag!r} ({tags['role_tag']}); expected one of "
                                  f"{', '.join(map(repr, role_of))}")
        content = turn.get(tags["content_tag"])
        if not isinstance(content, str):
            raise DataFormatError(f"{where}: {here}.{tags['content_tag']} is "
                                  + ("missing" if content is None else f"not a string ({type(content).__name__})"))
        role = role_of[tag]
        if role == "system":
            if k != 0 or system:
                raise DataFormatError(f"{where}: {here} is a system turn after the start")
            messages.append({"role": "system", "content": content})
            continue
        if not content.strip():
            raise DataFormatError(f"{where}: {here} is an empty {role} turn")
        if role == "function_call":
            messages.append(_function_call(content, where, here))
        else:
            messages.append({"role": role, "content": content})
    _check_order(messages, where, key)
    return Conversation(messages, _tools(rec, cols.get("tools"), where), where=where)


def _function_call(content: str, where: str, here: str) -> dict:
    """A sharegpt function_call turn (JSON {"name", "arguments"}, or a list of them) as an assistant tool call."""
    try:
        calls = json.loads(content)
    except json.JSONDecodeError as e:
        raise DataFormatError(f"{where}: {here} is a function_call whose value is not JSON ({e.msg})") from None
    calls = calls if isinstance(calls, list) else [calls]
    out = []
    for c in calls:
        if not isinstance(c, dict) or "name" not in c:
            raise DataFormatError(f"{where}: {here} is a function_call without a name")
        args = c.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                pass
        out.append({"type": "function", "function": {"name": c["name"], "arguments": args}})
    return {"role": "assistant", "content": "", "tool_calls": out}


def _openai(rec: dict, cols: dict, where: str) -> Conversation:
    key = cols["messages"]
    msgs = _turns(rec, key, where)
    messages = []
    for k, m in enumerate(msgs):
        here = f"'{key}[{k}]'"
        if not isinstance(m, dict):
            raise DataFormatError(f"{where}: {here} is not an object")
        role = m.get("role")
        if role == "developer":
            role = "system"
        if role not in ROLES:
            raise DataFormatError(f"{where}: {here}.role is {role!r}; expected one of {', '.join(ROLES)}")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            texts = []
            for part in content:
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise DataFormatError(f"{where}: {here}.content has a {kind!r} part; only text parts are "
                                          "supported")
                texts.append(part["text"])
            content = "".join(texts)
        tool_calls = m.get("tool_calls")
        if content is None and tool_calls:
            content = ""
        if not isinstance(content, str):
            raise DataFormatError(f"{where}: {here}.content is "
                                  + ("missing" if content is None else f"not a string ({type(content).__name__})"))
        if not content.strip() and not tool_calls and role != "system":
            raise DataFormatError(f"{where}: {here} is an empty {role} turn")
        msg = {"role": role, "content": content}
        if tool_calls:
            if not isinstance(tool_calls, list):
                raise DataFormatError(f"{where}: {here}.tool_calls is not a list")
            calls = []
            for c in tool_calls:
                fn = c.get("function", c) if isinstance(c, dict) else None
                if not isinstance(fn, dict) or "name" not in fn:
                    raise DataFormatError(f"{where}: {here}.tool_calls has a call without function.name")
                args = fn.get("arguments", {})
                if isinstance(args, str):  # the API sends arguments as a JSON string; templates want an object
                    try:
                        args = json.loads(args)
                    except json.JSONDecodeError:
                        pass
                calls.append({"type": "function", "function": {"name": fn["name"], "arguments": args},
                              **({"id": c["id"]} if isinstance(c, dict) and "id" in c else {})})
            msg["tool_calls"] = calls
        for extra in ("name", "tool_call_id", "reasoning_content"):
            if extra in m:
                msg[extra] = m[extra]
        messages.append(msg)
    _check_order(messages, where, key)
    return Conversation(messages, _tools(rec, cols.get("tools"), where), where=where)


def _check_order(messages: list[dict], where: str, key: str) -> None:
    """After an optional system turn: user (or tool results) and assistant turns alternate, starting with the user
    and ending with the assistant (whose turns are what SFT learns)."""
    turns = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if not turns:
        raise DataFormatError(f"{where}: field '{key}' has no turns")
    prompt_side = ("user", "tool")
    if turns[0]["role"] not in prompt_side:
        raise DataFormatError(f"{where}: field '{key}' starts with a '{turns[0]['role']}' turn; the first turn after "
                              "the system prompt must be the user's")
    for a, b in zip(turns, turns[1:]):
        if (a["role"] in prompt_side) == (b["role"] in prompt_side) and not (a["role"] == "tool" and b["role"] == "tool"):
            raise DataFormatError(f"{where}: field '{key}' has two {a['role']}/{b['role']} turns in a row; user and "
                                  "assistant turns must alternate")
    if turns[-1]["role"] != "assistant":
        raise DataFormatError(f"{where}: field '{key}' ends with a '{turns[-1]['role']}' turn; the last turn must be "
                              "the assistant's (the part that is learned)")


def load_conversations(data: str, format: str = "auto", columns: dict | None = None, tags: dict | None = None,
                       on_bad: OnBad | None = None, encoding: str = "utf-8", errors: str = "strict") -> list[Conversation]:
    """All conversations of `data` (see resolve_spec); raises CorpusError when none is valid."""
    spec = resolve_spec(os.fspath(data), format, columns, tags)
    out = list(read_conversations(spec, on_bad, encoding, errors))
    if not out:
        raise CorpusError(f"{data}: no valid examples" + (" (every record was rejected; see the rejects)"
                                                          if on_bad is not None else ""))
    return out
