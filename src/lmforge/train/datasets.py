"""Training examples from token shards: sliding windows, random offsets, document-aligned packing.

Every example is (inputs, targets) of `max_length` tokens each, targets shifted by one. All three
are deterministic given a seed; `BatchLoader` (map-style datasets) and `RandomOffsetBatches` resume
mid-epoch from a small state dict, so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from lmforge.data.sources import CorpusError
from lmforge.tokenizer.shards import MANIFEST


class TokenStream:
    """One split of a token-shard directory, read as a single memory-mapped array with document starts."""

    def __init__(self, arrays: list[np.ndarray], doc_starts: list[np.ndarray]):
        self.arrays = arrays
        sizes = [len(a) for a in arrays]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.doc_starts = np.concatenate([s + o for s, o in zip(doc_starts, self.offsets[:-1])]) \
            if doc_starts else np.zeros(0, dtype=np.int64)

    @classmethod
    def open(cls, directory: str | os.PathLike, split: str = "train") -> TokenStream:
        d = Path(directory)
        try:
            manifest = json.loads((d / MANIFEST).read_text())
        except OSError:
            raise CorpusError(f"{d}: no {MANIFEST}; create shards with `lmforge data tokenize`") from None
        if split not in manifest["splits"]:
            raise CorpusError(f"{d}: no split '{split}' (have {', '.join(manifest['splits'])})")
        shards = manifest["splits"][split]["shards"]
        if not shards:
            raise ValueError(f"{d}: split '{split}' has no tokens")
        arrays = [np.memmap(d / s["file"], dtype=manifest["dtype"], mode="r") for s in shards]
        for a, s in zip(arrays, shards):
            if len(a) != s["tokens"]:
                raise ValueError(f"{d / s['file']}: {len(a)} tokens on disk, manifest says {s['tokens']} (truncated?)")
        return cls(arrays, [np.load(d / s["docs_file"]) for s in shards])

    @classmethod
    def from_array(cls, tokens, doc_starts=(0,)) -> TokenStream:
        return cls([np.asarray(tokens)], [np.asarray(doc_starts, dtype=np.int64)])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def slice(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) as int64, crossing shard boundaries as needed."""
        if start < 0 or start + length > len(self):
            raise IndexError(f"slice [{start}, {start + length}) outside a stream of {len(self)} tokens")
        out = np.empty(length, dtype=np.int64)
        i = int(np.searchsorted(self.offsets, start, side="right")) - 1
        filled = 0
        while filled < length:
            local = start + filled - self.offsets[i]
            take = min(length - filled, len(self.arrays[i]) - local)
            out[filled:filled + take] = self.arrays[i][local:local + take]
            filled += take
            i += 1
        return out


def _pair(chunk: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.from_numpy(chunk)
    return t[:-1], t[1:]


class SlidingWindowDataset(torch.utils.data.Dataset):
    """Windows at 0, stride, 2 x stride, ... (the textbook GPT dataset); stride defaults to max_length."""

    def __init__(self, stream: TokenStream, max_length: int, stride: int | None = None):
        self.stream, self.max_length, self.stride = stream, max_length, stride or max_length
        self.n = max(0, (len(stream) - max_length - 1) // self.stride + 1)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return _pair(self.stream.slice(i * self.stride, self.max_length + 1))


class PackedDataset(torch.utils.data.Dataset):
    """Non-overlapping windows that start at a document start (after EOS/BOS), never mid-document.

    The rest of a document longer than a window is dropped, unless `allow_mid_doc`, in which case it
    continues in the next window. Windows may run on into the following documents (packing).
    """

    def __init__(self, stream: TokenStream, max_length: int, allow_mid_doc: bool = False):
        self.stream, self.max_length = stream, max_length
        need, n = max_length + 1, len(stream)
        starts, pos = [], 0
        doc_starts = list(stream.doc_starts) + [n]
        for k in range(len(doc_starts) - 1):
            d, next_doc = int(doc_starts[k]), int(doc_starts[k + 1])
            if allow_mid_doc:
                if pos >= next_doc:  # the previous window already covered this document
                    continue
                pos = max(pos, d)
                while pos < next_doc and pos + need <= n:
                    starts.append(pos)
                    pos += need
            elif d >= pos and d + need <= n:
                starts.append(d)
                pos = d + need
        self.starts = np.asarray(starts, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int):
        return _pair(self.stream.slice(int(self.starts[i]), self.max_length + 1))


class BatchLoader:
    """Shuffled batches of a map-style dataset; deterministic per (seed, epoch); resumable mid-epoch.

    With `world_size` > 1, rank r takes every world_size-th example of each global batch, so the ranks
    together see exactly the examples a single process would.
    """

    def __init__(self, dataset, batch_size: int, seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1):
        if batch_size % world_size:
            raise ValueError(f"global batch size {batch_size} is not divisible by world size {world_size}")
        if len(dataset) < batch_size:
            raise ValueError(f"the dataset has {len(dataset)} examples, fewer than one batch of {batch_size}")
        self.dataset, self.batch_size, self.seed, self.shuffle = dataset, batch_size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch, self.index = 0, 0  # index: batches already taken in this epoch

    def __len__(self) -> int:
        return len(self.dataset) // self.batch_size

    def _order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(len(self.dataset))
        return torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.index >= len(self):
            self.epoch, self.index = self.epoch + 1, 0
        order = self._order()
        picks = order[self.index * self.batch_size:(self.index + 1) * self.batch_size][self.rank::self.world_size]
        self.index += 1
        xs, ys = zip(*(self.dataset[int(i)] for i in picks))
        return torch.stack(xs), torch.stack(ys)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index, self.seed = state["epoch"], state["index"], state["seed"]


class ShuffledBatches:
    """The Trainer's train_data over n in-memory examples: each epoch a fresh seeded order (numpy, seed + epoch), this
    process's `micro_batch_size` members of every global batch (rank r takes the r-th slice), `collate(members)`
    builds the batch; an epoch's tail shorter than a global batch is dropped. Resumes mid-epoch from state_dict()."""

    def __init__(self, n: int, micro_batch_size: int, collate, seed: int = 0, rank: int = 0, world: int = 1):
        self.n, self.micro, self.collate = n, micro_batch_size, collate
        self.seed, self.rank, self.world = seed, rank, world
        self.epoch, self.cursor = 0, 0
        self._plan()

    def _plan(self) -> None:
        self.order = np.random.default_rng(self.seed + self.epoch).permutation(self.n).tolist()

    def next_batch(self) -> dict:
        step = self.micro * self.world
        if self.cursor + step > len(self.order):  # a new epoch
            self.epoch, self.cursor = self.epoch + 1, 0
            self._plan()
        start = self.cursor + self.rank * self.micro
        members = [self.order[(start + i) % len(self.order)] for i in range(self.micro)]
        self.cursor += step
        return self.collate(members)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self._plan()


class RandomOffsetBatches:
    """nanoGPT's sampler: each example starts at a uniformly random offset. Batch k depends only on
    (seed, k), so resuming is setting the step."""

    def __init__(self, stream: TokenStream, max_length: int, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1):
        if len(stream) <= max_length + 1:
            raise ValueError(f"the stream has {len(stream)} tokens, too few for windows of {max_length + 1}")
        self.stream, self.max_length, self.batch_size, self.seed = stream, max_length, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.step = 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.step)
        starts = torch.randint(0, len(self.stream) - self.max_length, (self.batch_size,), generator=g)
        self.step += 1
        xs, ys = zip(*(_pair(self.stream.slice(int(s), self.max_length + 1)) for s in starts[self.rank::self.world_size]))
        return torch.stack(xs), torch.stack(ys)

    def state_dict(self) -> dict:
        return {"step": self.step, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.seed = state["step"], state["seed"]
