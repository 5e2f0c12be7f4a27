"""Deduplication: exact (hash of normalised text) and near-duplicate (MinHash + LSH).

Everything here works on whole batches with numpy; no Python loop runs per shingle.

Shingles. A text is normalised (NFKC, lower case, punctuation to spaces, whitespace
collapsed) and cut into word n-grams or character n-grams; `unit="auto"` picks
characters for CJK text (no spaces between words) and words otherwise. Each shingle is
hashed with a polynomial hash over its code points, computed for all shingles at once
from prefix sums (arithmetic mod 2^64, then the splitmix64 finaliser to spread the
bits), and reduced to 32 bits.

Permutations. Signature row i is min over shingles x of h_i(x) = ((a_i*x + b_i) mod 2^64)
>> 32 with random 64-bit a_i (odd) and b_i: Dietzfelbinger's multiply-add-shift family,
strongly universal for 32-bit keys. The wrap-around mod 2^64 is part of its definition,
so unlike `(a*x + b) % (2**61 - 1)` evaluated in uint64 (datasketch) nothing overflows
into a biased value; it is also three vector operations per entry instead of five.

LSH. The signature is cut into `bands` x `rows`; two documents are candidates when any
band is identical. For a Jaccard threshold the (bands, rows) pair minimises the sum of
the false-positive and false-negative areas under the S-curve 1-(1-s^r)^b, the same
criterion as datasketch. Buckets are found by sorting one uint64 key per document and
band (memory: 8 bytes x documents), clusters by vectorised union-find (pointer jumping).
Candidates may be verified by the exact Jaccard of their shingle sets, which removes
the false positives LSH lets through.
"""

from __future__ import annotations

import functools
import hashlib
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import regex

from lmforge.data.config import MinHashSettings
from lmforge.text import CJK_CHAR

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_BASE = np.uint64(0x100000001B3)  # odd, so invertible mod 2^64
_SEPARATOR = r"[\p{P}\p{S}\p{Z}\p{Cc}\s]"  # punctuation, symbols, spaces, control characters
_SEP_CHAR = regex.compile(_SEPARATOR)
_PUNCT = regex.compile(_SEPARATOR + "+")
_CJK = CJK_CHAR  # Han, kana and Hangul (lmforge/text.py): characters, not words, are the shingle unit


def normalize_for_dedup(text: str) -> str:
    """NFKC, lower case, punctuation/symbols/whitespace collapsed to one space (the string
    form of what shingling does to code-point arrays)."""
    return _PUNCT.sub(" ", unicodedata.normalize("NFKC", text).lower()).strip()


_LETTER, _SEP, _CJK_LETTER, _END = 0, 1, 2, 3


_JAMO = ((0x1100, 0x1200), (0x3130, 0x3190), (0xA960, 0xA980), (0xD7B0, 0xD800), (0xFFA0, 0xFFE0))


def _build_tables() -> tuple[np.ndarray, np.ndarray]:
    """Per code point: its uint8 class (letter, separator = punctuation/symbol/space/control,
    CJK letter) and NFKC-then-lower-case as one code point, or -1 where that is not a single
    code point or may combine with a neighbour (marks, Hangul jamo): texts containing those
    take the exact string path."""
    every = [" " if 0xD800 <= c < 0xE000 or c == 10 else chr(c) for c in range(0x110000)]
    joined = "".join(every)
    cls = np.zeros(0x110000, np.uint8)
    cls[[m.start() for m in _CJK.finditer(joined)]] = _CJK_LETTER
    # separators win over the CJK class, as in normalize_for_dedup: CJK radicals (U+2E80...), ideographic
    # punctuation and symbols are in the Han/Kana scripts but are punctuation or symbols (528 code points)
    cls[[m.start() for m in _SEP_CHAR.finditer(joined)]] = _SEP
    cls[0] = _END  # ends each text of a batch
    cls[10] = _SEP
    mapped = unicodedata.normalize("NFKC", "\n".join(every)).lower().split("\n")
    # an expansion made only of separators ("…" -> "...") collapses to one space anyway
    table = np.array([ord(m) if len(m) == 1 else 32 if m and _PUNCT.fullmatch(m) else -1 for m in mapped], np.int32)
    marks = np.array([unicodedata.category(ch).startswith("M") or unicodedata.combining(ch) != 0 for ch in every])
    table[marks] = -1
    table[np.isin(table, np.flatnonzero(marks))] = -1  # maps onto a mark
    for lo, hi in _JAMO:
        table[lo:hi] = -1
        table[(table >= lo) & (table < hi)] = -1
    table[10] = 10
    table[0] = 0
    return cls, table


_TABLES: tuple[np.ndarray, np.ndarray] | None = None


def code_point_tables() -> tuple[np.ndarray, np.ndarray]:
    """(class, NFKC-lower-case code point) for every code point, built once per process (the pipeline
    builds them before it forks its workers, which then share them)."""
    global _TABLES
    if _TABLES is None:
        _TABLES = _build_tables()
    return _TABLES


def _utf32(text: str) -> bytes:
    try:
        return text.encode("utf-32-le")
    except UnicodeEncodeError:  # lone surrogates (they become separators)
        return text.encode("utf-32-le", "surrogatepass")


def _codepoints(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The batch as one code-point array (NFKC, lower case, each text followed by 0), the
    class of each code point, and the index of each text's terminating 0.

    NFKC + lower case is a table lookup per code point; only texts with characters that can
    combine (accents written as separate marks, Hangul jamo) are normalised as strings."""
    classes, nfkc_lower = code_point_tables()
    texts = list(texts)
    joined = "\0".join(texts) + "\0"
    if joined.isascii():  # the common fast path: lower() in C, no table
        cps = np.frombuffer(joined.lower().encode("utf-32-le"), np.uint32)
        ends = np.flatnonzero(cps == 0)
        if len(ends) == len(texts):
            return cps, classes[cps], ends
    cps = np.frombuffer(_utf32(joined), np.uint32)
    ends = np.flatnonzero(cps == 0)
    if len(ends) != len(texts):  # a text contains NUL itself
        texts = [t.replace("\0", " ") for t in texts]
        cps = np.frombuffer(_utf32("\0".join(texts) + "\0"), np.uint32)
        ends = np.flatnonzero(cps == 0)
    mapped = nfkc_lower[cps]
    unmapped = np.flatnonzero(mapped < 0)
    if len(unmapped):
        slow = np.unique(np.searchsorted(ends, unmapped))
        for i in slow.tolist():
            texts[i] = unicodedata.normalize("NFKC", texts[i]).lower().replace("\0", " ")
        cps = np.frombuffer(_utf32("\0".join(texts) + "\0"), np.uint32)
        ends = np.flatnonzero(cps == 0)
        exact = np.zeros(len(texts), bool)
        exact[slow] = True
        owner = np.repeat(np.arange(len(texts)), np.diff(np.concatenate([[-1], ends])))
        mapped = np.where(exact[owner], cps.astype(np.int32), nfkc_lower[cps])
    cps = mapped.astype(np.uint32)
    return cps, classes[cps], ends


def _sorted_unique(x: np.ndarray) -> np.ndarray:
    """np.unique by sorting (numpy's hash-based unique is several times slower on uint64)."""
    x = np.sort(x)
    return x[np.concatenate([[True], x[1:] != x[:-1]])] if len(x) else x


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint64(30))
        x = x * np.uint64(0xBF58476D1CE4E5B9)
        x = x ^ (x >> np.uint64(27))
        x = x * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


class _Powers:
    """BASE^i and BASE^-i mod 2^64, grown on demand."""

    def __init__(self):
        self.pow = np.ones(1, np.uint64)
        self.inv = np.ones(1, np.uint64)
        self.base_inv = np.uint64(pow(int(_BASE), -1, 1 << 64))

    def upto(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        if len(self.pow) < n:
            size = max(n, 2 * len(self.pow))
            steps = np.full(size, _BASE, np.uint64)
            steps[0] = 1
            inv_steps = np.full(size, self.base_inv, np.uint64)
            inv_steps[0] = 1
            with np.errstate(over="ignore"):
                self.pow = np.cumprod(steps, dtype=np.uint64)
                self.inv = np.cumprod(inv_steps, dtype=np.uint64)
        return self.pow[:n], self.inv[:n]


_POWERS = _Powers()


def _prefix_hashes(cps: np.ndarray) -> np.ndarray:
    """P[i] = sum_{j<i} (cps[j]+1) * BASE^j mod 2^64, so a span's hash is a difference."""
    pw, _ = _POWERS.upto(len(cps))
    prefix = np.zeros(len(cps) + 1, np.uint64)
    with np.errstate(over="ignore"):
        np.cumsum((cps.astype(np.uint64) + np.uint64(1)) * pw, out=prefix[1:])
    return prefix


def _span_hashes(prefix: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """64-bit hashes of the code-point spans [starts, ends), all at once."""
    _, inv = _POWERS.upto(int(prefix.shape[0]))
    with np.errstate(over="ignore"):
        return (prefix[ends] - prefix[starts]) * inv[starts] + (ends - starts).astype(np.uint64)


def _runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and end indices of the runs of True in `mask`."""
    edges = np.diff(np.concatenate([[False], mask, [False]]).astype(np.int8))
    return np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)


def _ngram_index(per_text: np.ndarray, which: np.ndarray, ngram: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For texts `which` holding per_text[t] units each (units of all texts numbered in
    order): owner, first unit and last unit (inclusive) of every n-gram; a text with fewer
    than `ngram` units has one n-gram of all of them, an empty text none."""
    first_unit = (np.cumsum(per_text) - per_text)[which]
    units = per_text[which]
    count = np.where(units == 0, 0, np.maximum(units - ngram + 1, 1))
    k = np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
    first = np.repeat(first_unit, count) + k
    last = np.minimum(first + ngram - 1, np.repeat(first_unit + units - 1, count))
    return np.repeat(which, count), first, last


def shingle_hashes(texts: Sequence[str], ngram: int = 5, unit: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Hashes of every shingle of every text: (uint32 hashes, offsets) with text i owning
    hashes[offsets[i]:offsets[i+1]]. Duplicated shingles within a text are kept (MinHash
    does not care); a text shorter than one n-gram is a single shingle; an empty one has none.

    Word shingles are n consecutive words (runs of letters and digits); character shingles
    are n consecutive letters, punctuation and spaces skipped.
    """
    if unit not in ("auto", "word", "char"):
        raise ValueError(f"unit must be 'auto', 'word' or 'char', got {unit!r}")
    if ngram < 1:
        raise ValueError(f"ngram must be >= 1, got {ngram}")
    n = len(texts)
    if n == 0:
        return np.zeros(0, np.uint32), np.zeros(1, np.int64)
    cps, cls, ends = _codepoints(texts)
    letter = (cls == _LETTER) | (cls == _CJK_LETTER)
    owner_cp_start = np.concatenate([[0], ends[:-1] + 1])
    if unit == "auto":  # CJK when at least 30% of the letters are CJK
        letters = np.add.reduceat(letter.astype(np.int64), owner_cp_start)
        cjk = np.add.reduceat((cls == _CJK_LETTER).astype(np.int64), owner_cp_start)
        char_mode = (letters > 0) & (cjk >= 0.3 * letters)
    else:
        char_mode = np.full(n, unit == "char")
    parts: list[tuple[np.ndarray, np.ndarray]] = []  # (owner, 64-bit hash)
    ci = np.flatnonzero(char_mode)
    if len(ci):  # windows of `ngram` letters over the text with separators removed
        owner = np.repeat(np.arange(n), np.diff(np.concatenate([[-1], ends])))
        keep = letter & char_mode[owner]
        kept_cps, kept_owner = cps[keep], owner[keep]
        per_text = np.bincount(kept_owner, minlength=n)
        own, first, last = _ngram_index(per_text, ci, ngram)
        parts.append((own, _span_hashes(_prefix_hashes(kept_cps), first, last + 1)))
    wi = np.flatnonzero(~char_mode)
    if len(wi):  # n consecutive words: a polynomial over the words' own hashes
        w_start, w_end = _runs(letter)
        w_owner = np.searchsorted(ends, w_start)
        in_word_mode = ~char_mode[w_owner]
        w_start, w_end, w_owner = w_start[in_word_mode], w_end[in_word_mode], w_owner[in_word_mode]
        words = _splitmix64(_span_hashes(_prefix_hashes(cps), w_start, w_end))
        own, first, last = _ngram_index(np.bincount(w_owner, minlength=n), wi, ngram)
        h = np.zeros(len(first), np.uint64)
        with np.errstate(over="ignore"):
            for i in range(ngram):
                idx = np.minimum(first + i, last)
                h = h * np.uint64(0x9E3779B97F4A7C15) + np.where(first + i <= last, words[idx], np.uint64(0))
        parts.append((own, h))
    owner = np.concatenate([p[0] for p in parts])
    h64 = np.concatenate([p[1] for p in parts])
    if len(parts) > 1:
        order = np.argsort(owner, kind="stable")
        owner, h64 = owner[order], h64[order]
    hashes = (_splitmix64(h64) >> np.uint64(32)).astype(np.uint32)
    offsets = np.concatenate([[0], np.cumsum(np.bincount(owner, minlength=n))]).astype(np.int64)
    return hashes, offsets


class MinHasher:
    """MinHash signatures (uint32, `num_perm` per text) computed for batches of texts."""

    def __init__(self, num_perm: int = MinHashSettings.num_perm, ngram: int = MinHashSettings.ngram,
                 unit: str = MinHashSettings.unit, seed: int = 1):
        if num_perm < 1:
            raise ValueError(f"num_perm must be >= 1, got {num_perm}")
        self.num_perm, self.ngram, self.unit, self.seed = num_perm, ngram, unit, seed
        rng = np.random.Generator(np.random.PCG64(seed))
        self.a = rng.integers(0, 1 << 64, num_perm, dtype=np.uint64, endpoint=False) | np.uint64(1)
        self.b = rng.integers(0, 1 << 64, num_perm, dtype=np.uint64, endpoint=False)

    def signatures_from_hashes(self, hashes: np.ndarray, offsets: np.ndarray, block: int = 8192) -> np.ndarray:
        """Rows of an empty text are all 0xFFFFFFFF (they match nothing; see `is_empty`)."""
        n = len(offsets) - 1
        sig = np.full((n, self.num_perm), 0xFFFFFFFF, np.uint32)
        counts = np.diff(offsets)
        nonempty = np.flatnonzero(counts > 0)
        if not len(nonempty):
            return sig
        # Process whole texts in blocks of about `block` shingles to stay in cache.
        bounds = [0]
        acc = 0
        for i, c in zip(nonempty, counts[nonempty]):
            acc += c
            if acc >= block:
                bounds.append(int(np.searchsorted(nonempty, i)) + 1)
                acc = 0
        if bounds[-1] != len(nonempty):
            bounds.append(len(nonempty))
        x_all = hashes.astype(np.uint64)
        a, b = self.a[:, None], self.b[:, None]
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            docs = nonempty[lo:hi]
            s, e = offsets[docs[0]], offsets[docs[-1] + 1]
            # [num_perm, shingles]: the per-document minimum then runs along contiguous memory.
            # Ordering by the full 64-bit value is ordering by its top 32 bits (ties aside), so
            # the shift is applied to the minima only.
            with np.errstate(over="ignore"):
                h = a * x_all[None, s:e]
                h += b
            sig[docs] = (np.minimum.reduceat(h, offsets[docs] - s, axis=1) >> np.uint64(32)).T
        return sig

    def signatures(self, texts: Sequence[str]) -> np.ndarray:
        return self.signatures_from_hashes(*shingle_hashes(texts, self.ngram, self.unit))


def is_empty(signatures: np.ndarray) -> np.ndarray:
    return (signatures == 0xFFFFFFFF).all(axis=1)


def estimate_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    return float(np.mean(sig_a == sig_b))


def estimated_jaccards(signatures: np.ndarray, pairs: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """MinHash estimate of each pair's Jaccard (the share of equal signature entries), in bounded memory."""
    out = np.empty(len(pairs), np.float32)
    for lo in range(0, len(pairs), chunk):
        p = pairs[lo:lo + chunk]
        out[lo:lo + chunk] = (signatures[p[:, 0]] == signatures[p[:, 1]]).mean(axis=1)
    return out


def exact_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Jaccard similarity of two shingle-hash multisets taken as sets."""
    return _set_jaccard(np.unique(a), np.unique(b))


def _probability_curve(threshold_lo: float, threshold_hi: float, bands: int, rows: int, above: bool) -> float:
    s = np.linspace(threshold_lo, threshold_hi, 201)
    p = 1 - (1 - s ** rows) ** bands
    y = 1 - p if above else p
    return float(np.sum((y[1:] + y[:-1]) * np.diff(s)) / 2)


@functools.lru_cache(maxsize=256)
def lsh_params(threshold: float, num_perm: int, fp_weight: float = 0.5, fn_weight: float = 0.5,
               min_recall: float | None = None) -> tuple[int, int]:
    """(bands, rows) with bands*rows <= num_perm minimising the weighted false-positive
    area (s < threshold) plus false-negative area (s >= threshold) of the S-curve
    (datasketch's criterion).

    With `min_recall` (used when candidates are verified, so false positives only cost
    time): the steepest curve whose candidate probability at the threshold itself is at
    least `min_recall`, which keeps recall high right down to the threshold.
    """
    if not 0 < threshold < 1:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    if min_recall is not None:
        for r in range(num_perm, 0, -1):
            b = num_perm // r
            if 1 - (1 - threshold ** r) ** b >= min_recall:
                return b, r
        return num_perm, 1
    best, best_err = (1, num_perm), float("inf")
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            fp = _probability_curve(0.0, threshold, b, r, above=False)
            fn = _probability_curve(threshold, 1.0, b, r, above=True)
            err = fp_weight * fp + fn_weight * fn
            if err < best_err:
                best, best_err = (b, r), err
    return best


VERIFIED_RECALL = 0.99  # candidate probability at the threshold when candidates are verified


def band_keys(signatures: np.ndarray, bands: int, rows: int, band: int | None = None) -> np.ndarray:
    """[n, bands] uint64 keys, one per document and band (equal band rows -> equal key), or
    the [n] keys of one `band` (what candidate search uses: 8 bytes per document at a time)."""
    if bands * rows > signatures.shape[1]:
        raise ValueError(f"bands x rows = {bands * rows} exceeds num_perm = {signatures.shape[1]}")
    if band is None:
        return np.stack([band_keys(signatures, bands, rows, b) for b in range(bands)], 1) if bands else \
            np.zeros((len(signatures), 0), np.uint64)
    key = np.zeros(len(signatures), np.uint64)
    with np.errstate(over="ignore"):
        for r in range(band * rows, (band + 1) * rows):
            key = _splitmix64(key * np.uint64(0x9E3779B97F4A7C15) + signatures[:, r].astype(np.uint64))
    return key


def _bucket_pairs(keys: np.ndarray, valid: np.ndarray, max_bucket_pairs: int) -> np.ndarray:
    """Pairs (i, j), i < j, of documents sharing a key in one band, all vectorised: every
    pair in a bucket of up to `max_bucket_pairs` members, the first member with each other
    one in a larger bucket."""
    idx = np.flatnonzero(valid)
    order = idx[np.argsort(keys[idx], kind="stable")]
    k = keys[order]
    if len(k) < 2:
        return np.zeros((0, 2), np.int64)
    new_group = np.concatenate([[True], k[1:] != k[:-1]])
    group = np.cumsum(new_group) - 1
    start = np.flatnonzero(new_group)
    size = np.diff(np.concatenate([start, [len(k)]]))[group]
    out = []
    small = size <= max_bucket_pairs
    max_small = int(size[small & (size > 1)].max()) if (small & (size > 1)).any() else 1
    for d in range(1, max_small):  # element i with element i+d of the same (small) bucket
        same = (group[d:] == group[:-d]) & small[d:]
        if not same.any():
            break
        out.append(np.stack([order[:-d][same], order[d:][same]], 1))
    big = (~small) & ~new_group
    if big.any():  # star: the bucket's first member with every other member
        out.append(np.stack([order[start[group[big]]], order[big]], 1))
    if not out:
        return np.zeros((0, 2), np.int64)
    pairs = np.concatenate(out)
    return np.sort(pairs, axis=1)


def candidate_pairs(signatures: np.ndarray, bands: int, rows: int, max_bucket_pairs: int = 64,
                    skip: np.ndarray | None = None) -> np.ndarray:
    """Distinct (i, j), i < j, sorted, that share at least one band bucket: all pairs in a
    bucket of up to `max_bucket_pairs` members, the first member paired with every other
    above that (keeps the count linear for huge buckets of identical boilerplate)."""
    n = len(signatures)
    if bands * rows > signatures.shape[1]:
        raise ValueError(f"bands x rows = {bands * rows} exceeds num_perm = {signatures.shape[1]}")
    valid = np.ones(n, bool) if skip is None else ~skip
    pairs = [_bucket_pairs(band_keys(signatures, bands, rows, band), valid, max_bucket_pairs) for band in range(bands)]
    pairs = np.concatenate(pairs).astype(np.int64) if pairs else np.zeros((0, 2), np.int64)
    if not len(pairs):
        return pairs
    code = _sorted_unique(pairs[:, 0] * n + pairs[:, 1])
    return np.stack([code // n, code % n], 1)


def connected_components(n: int, pairs: np.ndarray) -> np.ndarray:
    """Label of each of n nodes = the smallest node index of its component."""
    labels = np.arange(n, dtype=np.int64)
    if not len(pairs):
        return labels
    u, v = pairs[:, 0], pairs[:, 1]
    while True:
        lu, lv = labels[u], labels[v]
        low = np.minimum(lu, lv)
        before = labels.copy()
        np.minimum.at(labels, lu, low)
        np.minimum.at(labels, lv, low)
        while True:  # pointer jumping: point every node at its root
            nxt = labels[labels]
            if np.array_equal(nxt, labels):
                break
            labels = nxt
        if np.array_equal(labels, before):
            return labels


def verified_components(n: int, pairs: np.ndarray, verify: Callable[[np.ndarray], np.ndarray],
                        first_batch: int = 4096, max_batch: int = 1 << 18) -> tuple[np.ndarray, np.ndarray, int]:
    """Connected components of the candidate pairs that `verify` confirms (verify(pairs) -> the confirmed ones),
    checking only pairs whose ends are not joined yet: the components equal those of verifying every pair, but a
    cluster of m near-copies costs about m checks instead of up to m^2 / 2. Pairs go in growing batches so the
    first batches join the big clusters. Returns (labels as in connected_components, the confirmed pairs, the
    number of pairs checked)."""
    labels = np.arange(n, dtype=np.int64)
    confirmed: list[np.ndarray] = []
    checked, lo, batch = 0, 0, first_batch
    while lo < len(pairs):
        chunk = pairs[lo:lo + batch]
        lo += batch
        batch = min(batch * 2, max_batch)
        chunk = chunk[labels[chunk[:, 0]] != labels[chunk[:, 1]]]
        if not len(chunk):
            continue
        checked += len(chunk)
        ok = verify(chunk)
        if len(ok):
            confirmed.append(ok)
            labels = connected_components(n, np.concatenate(confirmed))
    found = np.concatenate(confirmed) if confirmed else np.zeros((0, 2), np.int64)
    return labels, found, checked


def exact_keys(texts: Sequence[str]) -> np.ndarray:
    """64-bit hash (blake2b) of each text's normalised form: exact duplicates share it.

    The normal form is normalize_for_dedup's, built on the batch's code-point array (NFKC + lower case by table,
    each run of separators one space, one space after the last word), which is several times faster than the
    string form per text."""
    n = len(texts)
    if n == 0:
        return np.zeros(0, np.uint64)
    cps, cls, ends = _codepoints(texts)
    sep = (cls == _SEP) | (cls == _END)
    # a word character stays; the first separator after one becomes a space (the text's terminating 0 included,
    # so a text that ends in a word gets one trailing space, which does not change which texts are equal)
    after_word = np.concatenate([[False], ~sep[:-1]])
    emit = ~sep | after_word
    out = np.where(sep, np.uint32(32), cps)[emit]
    owner = np.searchsorted(ends, np.flatnonzero(emit))
    offsets = np.concatenate([[0], np.cumsum(np.bincount(owner, minlength=n))])
    data = out.astype("<u4").tobytes()
    return np.array([int.from_bytes(hashlib.blake2b(data[4 * a:4 * b], digest_size=8).digest(), "little")
                     for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())], np.uint64)


@dataclass
class DedupResult:
    """What deduplication decided for n documents (indices are positions in the input)."""

    keep: np.ndarray  # bool [n]
    cluster: np.ndarray  # int64 [n]: index of the kept member of the document's cluster, -1 if unique
    pairs: np.ndarray  # [m, 2] duplicate pairs found (verified when verification was on)
    candidates: int  # candidate pairs before verification
    bands: int = 0
    rows: int = 0

    @property
    def removed(self) -> int:
        return int((~self.keep).sum())


def choose_kept(labels: np.ndarray, keep: str = "first", lengths: np.ndarray | None = None,
                scores: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One survivor per cluster: the first document, the longest, or the highest score
    (ties go to the earlier document, so the choice never depends on run order)."""
    n = len(labels)
    if keep == "first":
        rank = np.arange(n, dtype=np.float64)
    elif keep == "longest":
        if lengths is None:
            raise ValueError("keep='longest' needs lengths")
        rank = -np.asarray(lengths, np.float64)
    elif keep == "score":
        if scores is None:
            raise ValueError("keep='score' needs scores")
        rank = -np.nan_to_num(np.asarray(scores, np.float64), nan=-np.inf)
    else:
        raise ValueError(f"keep must be 'first', 'longest' or 'score', got {keep!r}")
    order = np.lexsort((np.arange(n), rank, labels))  # by cluster, then rank, then position
    first_of_cluster = np.ones(n, bool)
    first_of_cluster[1:] = labels[order][1:] != labels[order][:-1]
    winner_of_label = np.empty(n, np.int64)
    winner_of_label[labels[order][first_of_cluster]] = order[first_of_cluster]
    kept = np.zeros(n, bool)
    kept[order[first_of_cluster]] = True
    sizes = np.bincount(labels, minlength=n)
    cluster = np.where(sizes[labels] > 1, winner_of_label[labels], -1)
    return kept, cluster


def near_duplicates(texts: Sequence[str], threshold: float = MinHashSettings.threshold,
                    num_perm: int = MinHashSettings.num_perm, ngram: int = MinHashSettings.ngram,
                    unit: str = MinHashSettings.unit, bands: int | None = None, rows: int | None = None,
                    verify: bool = False, keep: str = MinHashSettings.keep, scores: np.ndarray | None = None, seed: int = 1,
                    batch_size: int = 2048) -> DedupResult:
    """MinHash-LSH deduplication of an in-memory list of texts."""
    if (bands is None) != (rows is None):
        raise ValueError("give both bands and rows, or neither")
    if bands is None:
        bands, rows = lsh_params(threshold, num_perm, min_recall=VERIFIED_RECALL if verify else None)
    hasher = MinHasher(num_perm, ngram, unit, seed)
    sigs, all_hashes, all_offsets, base = [], [], [np.zeros(1, np.int64)], 0
    for i in range(0, len(texts), batch_size):
        hashes, offsets = shingle_hashes(texts[i:i + batch_size], ngram, unit)
        sigs.append(hasher.signatures_from_hashes(hashes, offsets))
        if verify:  # keep the shingles: verification needs them and recomputing costs as much again
            all_hashes.append(hashes)
            all_offsets.append(offsets[1:] + base)
            base += len(hashes)
    sig = np.concatenate(sigs) if sigs else np.zeros((0, num_perm), np.uint32)
    pairs = candidate_pairs(sig, bands, rows, skip=is_empty(sig))
    n_candidates = len(pairs)
    if verify and len(pairs):
        # every pair is checked (the result lists them all); the pipeline's step checks only pairs not yet joined
        pairs = verify_pairs(texts, pairs, threshold, ngram, unit,
                             shingles=(np.concatenate(all_hashes), np.concatenate(all_offsets)))
    labels = connected_components(len(texts), pairs)
    kept, cluster = choose_kept(labels, keep, lengths=np.array([len(t) for t in texts]), scores=scores)
    return DedupResult(kept, cluster, pairs, n_candidates, bands, rows)


def verify_pairs(texts: Sequence[str], pairs: np.ndarray, threshold: float, ngram: int, unit: str,
                 shingles: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """The pairs whose exact shingle-set Jaccard reaches `threshold` (all pairs at once:
    each document's distinct shingles are tagged with the pair id, sorted, and the
    repeats counted). `shingles` = (hashes, offsets) of all texts, if already computed."""
    if not len(pairs):
        return pairs
    involved = _sorted_unique(pairs.ravel())
    if shingles is None:
        hashes, offsets = shingle_hashes([texts[i] for i in involved], ngram, unit)
    else:
        all_hashes, all_offsets = shingles
        counts = all_offsets[involved + 1] - all_offsets[involved]
        take = np.repeat(all_offsets[involved], counts) + (np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts,
                                                                                              counts))
        hashes, offsets = all_hashes[take], np.concatenate([[0], np.cumsum(counts)])
    # distinct shingles per document, as (document, hash) keys
    owner = np.repeat(np.arange(len(involved)), np.diff(offsets))
    doc_hash = _sorted_unique((owner.astype(np.uint64) << np.uint64(32)) | hashes.astype(np.uint64))
    d_owner = (doc_hash >> np.uint64(32)).astype(np.int64)
    d_hash = doc_hash & np.uint64(0xFFFFFFFF)
    d_start = np.searchsorted(d_owner, np.arange(len(involved) + 1))
    d_size = np.diff(d_start)
    local = np.searchsorted(involved, pairs)
    inter = np.zeros(len(pairs), np.int64)
    chunk = max(1, 4_000_000 // max(1, int(d_size.mean()) * 2))
    for lo in range(0, len(pairs), chunk):  # bounded memory
        a, b = local[lo:lo + chunk, 0], local[lo:lo + chunk, 1]
        pid = np.arange(len(a))
        sa, sb = d_size[a], d_size[b]
        ia = np.repeat(d_start[a], sa) + (np.arange(sa.sum()) - np.repeat(np.cumsum(sa) - sa, sa))
        ib = np.repeat(d_start[b], sb) + (np.arange(sb.sum()) - np.repeat(np.cumsum(sb) - sb, sb))
        keys = np.concatenate([(np.repeat(pid, sa).astype(np.uint64) << np.uint64(32)) | d_hash[ia],
                               (np.repeat(pid, sb).astype(np.uint64) << np.uint64(32)) | d_hash[ib]])
        keys.sort()
        dup = keys[1:] == keys[:-1]  # a shingle in both sets
        inter[lo:lo + chunk] = np.bincount((keys[1:][dup] >> np.uint64(32)).astype(np.int64), minlength=len(a))
    union = d_size[local[:, 0]] + d_size[local[:, 1]] - inter
    jac = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    return pairs[jac >= threshold]


def _set_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    if not len(a) and not len(b):
        return 1.0
    inter = len(np.intersect1d(a, b, assume_unique=True))
    return inter / (len(a) + len(b) - inter)
