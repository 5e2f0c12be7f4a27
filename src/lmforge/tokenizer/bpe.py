"""Byte-level BPE training (Sennrich et al. 2016; byte-level as in GPT-2, Radford et al. 2019).

The algorithm, in two phases:
  1. Count unique pre-tokens once. Text is split by the pre-tokenizer regex in worker
     processes, each returning a Counter; the corpus streams through in blocks.
  2. Merge. Every unique pre-token becomes a list of byte ids with its count. Pair counts
     and an index pair -> words-containing-it are built once; a max-heap with lazy
     invalidation picks the most frequent pair; merging it rewrites only the words that
     contain it and updates the pair counts by the difference. Nothing re-scans the corpus.

Ties between equally frequent pairs go to the smaller (left id, right id), so a seed-free
run is deterministic. Special tokens are cut out of the training text and never merged.
"""

from __future__ import annotations

import heapq
import logging
import multiprocessing as mp
import os
import signal
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator

import regex

from lmforge.data.sources import iter_text_chunks
from lmforge.progress import progress
from lmforge.tokenizer.patterns import resolve_pattern
from lmforge.tokenizer.tokenizer import BPETokenizer

log = logging.getLogger(__name__)

TASK_BYTES = 4 << 20  # text handed to one worker at a time

# ChatML (used by Qwen and many others): a trained tokenizer that reserves its markers gets this template
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")


class TrainingError(ValueError):
    """The corpus or settings cannot produce a tokenizer; the message says why."""


def _special_splitter(special_tokens: Iterable[str]) -> regex.Pattern | None:
    specials = sorted(special_tokens, key=len, reverse=True)
    return regex.compile("|".join(regex.escape(s) for s in specials)) if specials else None


_worker_state: dict = {}


def _init_worker(pattern: str, specials: list[str]) -> None:
    # a forked worker inherits the parent's Python signal handlers (Ray's driver keeps one for SIGTERM after
    # shutdown); with one, Pool.terminate cannot stop an idle worker and the parent waits forever
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _worker_state["pat"] = regex.compile(pattern)
    _worker_state["split"] = _special_splitter(specials)


def _count_texts(texts: list[str]) -> Counter:
    pat, split = _worker_state["pat"], _worker_state["split"]
    counts: Counter = Counter()
    for text in texts:
        for part in (split.split(text) if split else (text,)):
            counts.update(pat.findall(part))
    return counts


def _batches(chunks: Iterable[str], stats: dict) -> Iterator[list[str]]:
    batch, size = [], 0
    for text in chunks:
        batch.append(text)
        size += len(text)
        stats["chars"] += len(text)
        stats["texts"] += 1
        if size >= TASK_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def count_pretokens(chunks: Iterable[str], pattern: str, special_tokens: Iterable[str] = (),
                    num_workers: int | None = None, show_progress: bool = True) -> tuple[Counter, dict]:
    """Count each distinct pre-token of the corpus; returns (counts, {"chars", "texts"})."""
    specials = list(special_tokens)
    num_workers = num_workers or os.cpu_count() or 1
    stats = {"chars": 0, "texts": 0}
    total: Counter = Counter()
    bar = progress(desc="count pre-tokens", unit="MB", unit_scale=False, enabled=show_progress,
               bar_format="{desc}: {n:.1f} MB [{elapsed}, {rate_fmt}]")
    batches = _batches(chunks, stats)
    if num_workers == 1:
        _init_worker(pattern, specials)
        results: Iterable[Counter] = map(_count_texts, batches)
        pool = None
    else:
        # fork shares the already-imported modules; spawn is the safe default elsewhere
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        pool = ctx.Pool(num_workers, initializer=_init_worker, initargs=(pattern, specials))
        results = pool.imap(_count_texts, batches)  # ordered, so the counts are deterministic
    try:
        seen = 0
        for counts in results:
            if total:
                total.update(counts)
            else:
                total = counts
            bar.update((stats["chars"] - seen) / 1e6)
            seen = stats["chars"]
    finally:
        if pool is not None:
            pool.terminate()
        bar.close()
    return total, stats


def merge_pairs(words: list[bytes], counts: list[int], token_bytes: list[bytes], vocab_target: int,
                min_frequency: int = 2, show_progress: bool = True) -> list[tuple[int, int, int]]:
    """Learn merges until `token_bytes` holds `vocab_target` tokens (or no pair is frequent enough).

    `words` are the distinct pre-tokens as bytes, `counts` their frequencies; `token_bytes` (the
    bytes of each id) grows in place. Returns the merges as (left id, right id, new id). A merge
    whose bytes already exist as a token reuses that id.

    A word is held as a str with one character per token id (chr(id)), so finding a pair is
    `str.find` and rewriting a word is `str.replace`, both in C; a pair is a 2-character str,
    which hashes fast and sorts like the (left, right) tuple.
    """
    syms = [w.decode("latin-1") for w in words]  # byte b -> chr(b), in C
    pair_counts: dict[str, int] = defaultdict(int)
    where: dict[str, set[int]] = defaultdict(set)
    for wi, s in enumerate(syms):
        c = counts[wi]
        for k in range(len(s) - 1):
            p = s[k:k + 2]
            pair_counts[p] += c
            where[p].add(wi)
    heap = [(-c, p) for p, c in pair_counts.items()]
    heapq.heapify(heap)
    bytes_to_id = {b: i for i, b in enumerate(token_bytes)}
    merges: list[tuple[int, int, int]] = []
    bar = progress(total=max(0, vocab_target - len(token_bytes)), desc="merge", unit="tok", enabled=show_progress)
    while len(token_bytes) < vocab_target and heap:
        neg, pair = heapq.heappop(heap)
        count = pair_counts.get(pair, 0)
        if count != -neg:  # stale entry: its count went down since it was pushed
            if count > 0:
                heapq.heappush(heap, (-count, pair))
            continue
        if count < min_frequency:
            break
        a, b = ord(pair[0]), ord(pair[1])
        merged = token_bytes[a] + token_bytes[b]
        new_id = bytes_to_id.get(merged)
        if new_id is None:
            new_id = len(token_bytes)
            token_bytes.append(merged)
            bytes_to_id[merged] = new_id
            bar.update(1)
        merges.append((a, b, new_id))
        A, B, N = pair[0], pair[1], chr(new_id)
        changed = set()
        for wi in where.pop(pair):
            s = syms[wi]
            j = s.find(pair)
            if j < 0:  # the index is lazy: this word lost the pair to an earlier merge
                continue
            c = counts[wi]
            n = len(s)
            prev_end = -1
            occurrences = 0
            # Only the pairs around each occurrence change (as in HF tokenizers' Word::merge).
            while j >= 0:
                occurrences += 1
                if j > 0:
                    pair_counts[s[j - 1] + A] -= c
                    p = (N if prev_end == j else s[j - 1]) + N
                    pair_counts[p] += c
                    changed.add(p)
                    where[p].add(wi)
                nxt = s.find(pair, j + 2)
                if j + 2 < n and nxt != j + 2:  # an adjacent next occurrence updates this pair itself
                    r = s[j + 2]
                    pair_counts[B + r] -= c
                    p = N + r
                    pair_counts[p] += c
                    changed.add(p)
                    where[p].add(wi)
                prev_end = j + 2
                j = nxt
            pair_counts[pair] -= occurrences * c
            syms[wi] = s.replace(pair, N)
        del pair_counts[pair]
        for p in changed:
            heapq.heappush(heap, (-pair_counts[p], p))
    bar.close()
    return merges


def train_bpe(chunks: Iterable[str], vocab_size: int, pattern: str, special_tokens: Iterable[str] = (),
              min_frequency: int = 2, num_workers: int | None = None,
              show_progress: bool = True) -> tuple[list[bytes], list[tuple[int, int, int]], dict]:
    """Train byte-level BPE; returns (token bytes by id, merges, stats).

    Ids 0-255 are the single bytes (id == byte value); merged tokens follow; the caller places
    special tokens after them. `vocab_size` counts the special tokens.
    """
    specials = list(dict.fromkeys(special_tokens))
    if vocab_size < 256 + len(specials):
        raise TrainingError(f"vocab size {vocab_size} is below the minimum {256 + len(specials)} "
                            f"(256 byte tokens + {len(specials)} special tokens)")
    if min_frequency < 1:
        raise TrainingError(f"min frequency must be at least 1, got {min_frequency}")
    t0 = time.perf_counter()
    counts, stats = count_pretokens(chunks, pattern, specials, num_workers, show_progress)
    if not counts:
        raise TrainingError("the corpus is empty: no text to train on")
    words = []
    word_counts = []
    for piece, c in counts.items():
        b = piece.encode("utf-8", "surrogatepass")
        if len(b) > 1:  # a single byte has no pair to merge
            words.append(b)
            word_counts.append(c)
    stats["count_seconds"] = time.perf_counter() - t0
    stats["unique_pretokens"] = len(counts)
    stats["pretokens"] = sum(counts.values())
    del counts
    token_bytes = [bytes([i]) for i in range(256)]
    t0 = time.perf_counter()
    merges = merge_pairs(words, word_counts, token_bytes, vocab_size - len(specials), min_frequency, show_progress)
    stats["merge_seconds"] = time.perf_counter() - t0
    if len(token_bytes) + len(specials) < vocab_size:
        log.warning("stopped at %d tokens (asked for %d): no pair occurs at least %d times; "
                    "use a larger corpus or a lower --min-frequency", len(token_bytes) + len(specials),
                    vocab_size, min_frequency)
    return token_bytes, merges, stats


DEFAULT_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def train_tokenizer(inputs: list[str] | str, vocab_size: int = 8192, pattern: str = "gpt2",
                    special_tokens: Iterable[str] = DEFAULT_SPECIALS, min_frequency: int = 2,
                    errors: str = "strict", text_field: str = "text", num_workers: int | None = None,
                    show_progress: bool = True, encoding: str = "utf-8", on_bad=None) -> BPETokenizer:
    """Train a byte-level BPE `BPETokenizer` on files, directories, globs or `builtin:` corpora.

    `pattern` is a preset (gpt2, cl100k, o200k) or a custom regex. Special tokens take the ids
    after the ordinary tokens; `<|endoftext|>` becomes the EOS token, and a tokenizer with the
    ChatML markers gets the ChatML chat template. `encoding` (a codec or "auto") decodes the inputs; with `on_bad`
    (e.g. a data.sources.RejectLog) bad records and undecodable files are reported to it and skipped.
    """
    regex_str = resolve_pattern(pattern)
    specials = list(dict.fromkeys(special_tokens))
    for s in specials:
        if not s:
            raise TrainingError("a special token cannot be the empty string")
    chunks = iter_text_chunks(inputs, errors=errors, text_field=text_field, encoding=encoding, on_bad=on_bad)
    token_bytes, merges, stats = train_bpe(chunks, vocab_size, regex_str, specials, min_frequency,
                                           num_workers, show_progress)
    ranks = {b: i for i, b in enumerate(token_bytes)}
    special_ids = {s: len(token_bytes) + k for k, s in enumerate(specials)}
    tok = BPETokenizer(ranks, [(token_bytes[a], token_bytes[b]) for a, b, _ in merges], regex_str, special_ids)
    if "<|endoftext|>" in special_ids:
        tok.eos_token = "<|endoftext|>"
    if all(t in special_ids for t in CHATML_TOKENS):
        tok.chat_template = CHATML_TEMPLATE
    tok.training_stats = stats
    return tok
