"""Hugging Face `datasets` data as records: the way most users of transformers keep their data.

Where lmforge reads structured records (finetune, classify, the data stage) it also accepts:
  DIR               a `Dataset.save_to_disk` directory (state.json + data-*.arrow), or a `DatasetDict` one
                    (dataset_dict.json + one directory per split), or a folder of `.arrow` / `.parquet` files laid
                    out as the Hub stores them (`data/train-00000-of-00001.parquet`, `train/0000.parquet`, ...)
  DIR#SPLIT         one split of those; without `#SPLIT` a set with several splits gives its `train` split
  FILE.arrow        one Arrow file as `datasets` writes it (the IPC stream format)
  hf:REPO[:CONFIG][#SPLIT]   a dataset on the Hub, loaded with `datasets.load_dataset` (online only, on request:
                    nothing else here touches the network, and a local path that does not exist is an error at once)

The files are read with pyarrow, a batch at a time, without `datasets` itself (whose loaders write a cache). A
ClassLabel column (or a list of ClassLabels, as NER tags are kept) is given as its label names, read from the
features `datasets` stores in the Arrow schema, so `label: 0` reads as `pos` and `ner_tags: [3, 4]` as
`["B-LOC", "I-LOC"]`: the names are what lmforge's heads save in config.json.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

from lmforge.data.sources import CorpusError
from lmforge.hub import HUB_PREFIX

_SPLIT_WORDS = ("train", "validation", "valid", "dev", "test")
_SPLIT_IN_NAME = re.compile(r"^(?:.*[/_-])?(train|validation|valid|dev|test)(?:[._-]|$)")


class DatasetSourceError(CorpusError):
    """A datasets directory, split or hub id that cannot be read (the message names it)."""


# --- what counts as a datasets source ---------------------------------------------------------------------------

def _split_spec(spec: str) -> tuple[str, str | None]:
    path, sep, split = str(spec).rpartition("#")
    return (path, split or None) if sep else (str(spec), None)


def _data_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix in (".arrow", ".parquet")
                  and not any(part.startswith(".") for part in p.relative_to(directory).parts))


def _is_dataset_dir(directory: Path) -> bool:
    if (directory / "dataset_dict.json").is_file() or (directory / "state.json").is_file():
        return True
    if not directory.is_dir():
        return False
    # a Hub-style folder: data files are arrow/parquet only (README.md and the like may sit beside them)
    files = [p for p in directory.rglob("*") if p.is_file() and not p.name.startswith(".")]
    data = [p for p in files if p.suffix in (".arrow", ".parquet")]
    others = [p for p in files if p.suffix not in (".arrow", ".parquet", ".md", ".json", ".yaml", ".yml", ".lock")]
    return bool(data) and not others


def is_dataset_source(spec: str | os.PathLike) -> bool:
    """Whether `spec` names `datasets` data (see the module docstring) rather than a plain file or folder."""
    text = str(spec)
    if text.startswith(HUB_PREFIX):
        return True
    path, split = _split_spec(text)
    p = Path(path)
    if p.is_file():
        return p.suffix == ".arrow" and split is None
    if p.is_dir():
        return _is_dataset_dir(p) and (split is None or "/" not in split)
    return False


# --- reading --------------------------------------------------------------------------------------------------

def _features_of(schema) -> dict:
    """The `datasets` features a file's Arrow schema carries (empty for a file `datasets` did not write)."""
    meta = (schema.metadata or {}).get(b"huggingface")
    if not meta:
        return {}
    try:
        return json.loads(meta).get("info", {}).get("features", {}) or {}
    except (json.JSONDecodeError, AttributeError):
        return {}


def _label_decoder(feature):
    """A function mapping a stored value to its ClassLabel name(s), or None when the feature has no ClassLabel."""
    if not isinstance(feature, dict):
        if isinstance(feature, list) and feature:  # the old `[feature]` spelling of a list
            inner = _label_decoder(feature[0])
            return (lambda v: None if v is None else [inner(x) for x in v]) if inner else None
        return None
    kind = feature.get("_type")
    if kind == "ClassLabel" and feature.get("names"):
        names = feature["names"]

        def name(v):
            # -1 is datasets' "no label" (a test split without gold labels)
            return None if v is None or v == -1 else names[v] if 0 <= v < len(names) else v
        return name
    if kind in ("Sequence", "List", "LargeList"):
        inner = _label_decoder(feature.get("feature"))
        return (lambda v: None if v is None else [inner(x) for x in v]) if inner else None
    return None


def label_names_decoder(schema):
    """For an Arrow schema that `datasets` wrote: a function giving a row with its ClassLabel values as names (None
    when no column is a ClassLabel)."""
    decoders = {k: d for k, f in _features_of(schema).items() if (d := _label_decoder(f)) is not None}
    if not decoders:
        return None

    def decode(row: dict) -> dict:
        return {k: (decoders[k](v) if k in decoders else v) for k, v in row.items()}
    return decode


def _file_rows(path: Path) -> Iterator[dict]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises several types for a corrupt file
            raise DatasetSourceError(f"{path}: not a readable parquet file: {e}") from None
        decode = label_names_decoder(pf.schema_arrow)
        batches = pf.iter_batches(batch_size=1024)
    else:
        import pyarrow as pa

        try:  # datasets writes the IPC stream format; an IPC file (random access) is read too
            reader = pa.ipc.open_stream(path)
        except pa.ArrowInvalid:
            try:
                reader = pa.ipc.open_file(path)
            except pa.ArrowInvalid as e:
                raise DatasetSourceError(f"{path}: not a readable Arrow file: {e}") from None
        decode = label_names_decoder(reader.schema)
        batches = reader if isinstance(reader, pa.ipc.RecordBatchStreamReader) else (
            reader.get_batch(i) for i in range(reader.num_record_batches))
    for batch in batches:
        for row in batch.to_pylist():
            yield decode(row) if decode else row


def _split_of(file: Path, root: Path) -> str:
    rel = file.relative_to(root).as_posix()
    for part in rel.split("/")[:-1]:  # a split folder (train/0000.parquet, default/test/0000.parquet)
        if part in _SPLIT_WORDS:
            return part
    m = _SPLIT_IN_NAME.match(file.name)  # data/train-00000-of-00001.parquet, test.parquet
    return m.group(1) if m else "train"  # what datasets calls files that name no split


def dataset_splits(directory: str | os.PathLike) -> dict[str, list[Path]]:
    """The data files of each split of a local datasets directory, in reading order."""
    root = Path(directory)
    if (root / "dataset_dict.json").is_file():
        try:
            names = json.loads((root / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DatasetSourceError(f"{root / 'dataset_dict.json'}: not a datasets DatasetDict file") from None
        return {name: _saved_files(root / name) for name in names}
    if (root / "state.json").is_file():
        return {"train": _saved_files(root)}
    splits: dict[str, list[Path]] = {}
    for f in _data_files(root):
        splits.setdefault(_split_of(f, root), []).append(f)
    return splits


def _saved_files(directory: Path) -> list[Path]:
    """The shards of one `save_to_disk` Dataset, in the order state.json lists them."""
    state = directory / "state.json"
    try:
        files = [directory / f["filename"] for f in json.loads(state.read_text(encoding="utf-8"))["_data_files"]]
    except FileNotFoundError:
        raise DatasetSourceError(f"{directory}: no state.json: not a datasets save_to_disk directory") from None
    except (json.JSONDecodeError, KeyError, TypeError):
        raise DatasetSourceError(f"{state}: not a datasets state file") from None
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise DatasetSourceError(f"{missing[0]}: listed in {state} but missing")
    return files


def _choose_split(splits: dict, where: str, split: str | None) -> str:
    if split is None:
        if len(splits) == 1:
            return next(iter(splits))
        if "train" in splits:
            return "train"
        raise DatasetSourceError(f"{where}: several splits ({', '.join(splits)}); name one as {where}#SPLIT")
    if split not in splits:
        raise DatasetSourceError(f"{where}: no split '{split}' (splits: {', '.join(splits)})")
    return split


def iter_dataset_records(spec: str | os.PathLike) -> Iterator[tuple[str, dict]]:
    """(where, record) of every row of a datasets source; `where` is "SOURCE[split]:row N" (1-based)."""
    text = str(spec)
    if text.startswith(HUB_PREFIX):
        yield from _hub_records(text)
        return
    path, split = _split_spec(text)
    p = Path(path)
    if p.is_file():
        files, label = [p], path
    else:
        splits = dataset_splits(p)
        if not splits:
            raise DatasetSourceError(f"{p}: no .arrow or .parquet files in it")
        chosen = _choose_split(splits, path, split)
        files, label = splits[chosen], f"{path}[{chosen}]"
    row = 0
    for f in files:
        for rec in _file_rows(f):
            row += 1
            yield f"{label}:row {row}", rec


def _hub_records(spec: str) -> Iterator[tuple[str, dict]]:
    repo, split = _split_spec(spec[len(HUB_PREFIX):])
    repo, _, config = repo.partition(":")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes") or os.environ.get(
            "HF_DATASETS_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise DatasetSourceError(f"{spec}: a Hub dataset, and the Hub is off (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE): "
                                 "save it with save_to_disk where you are online and pass the directory")
    try:
        import datasets
    except ImportError:
        raise DatasetSourceError(f"{spec}: reading a Hub dataset needs the 'datasets' package: "
                                 "pip install 'lmforge[hub]'") from None
    try:
        ds = datasets.load_dataset(repo, config or None, split=split or "train")
    except Exception as e:  # network, missing repo, missing config or split: datasets raises many types
        raise DatasetSourceError(f"{spec}: cannot load from the Hub: {str(e).splitlines()[0] if str(e) else e!r}") \
            from None
    features = ds.features
    decoders = {k: d for k, f in features.to_dict().items() if (d := _label_decoder(f)) is not None}
    for i, rec in enumerate(ds, 1):
        yield f"{spec}:row {i}", {k: (decoders[k](v) if k in decoders else v) for k, v in rec.items()}
