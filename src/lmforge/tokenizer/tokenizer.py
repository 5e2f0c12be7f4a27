"""`Tokenizer`: one interface for lmforge's byte-level BPE and for any HF tokenizer.json.

Two implementations:
  - `BPETokenizer`: byte-level BPE held as merge ranks (token bytes -> id). Encoding goes
    through tiktoken built from those ranks (fast, offline); a pure-Python reference encoder
    with the same semantics is kept (`encode(..., reference=True)`) and tested against it.
  - `HFTokenizer`: wraps a `tokenizers.Tokenizer` (BPE, WordPiece, Unigram, ...), so a
    pretrained model's own tokenizer works everywhere in lmforge.

Encoding semantics of `BPETokenizer` (those of tiktoken): split the text with the
pre-tokenizer regex; a piece whose bytes are a token is that token; otherwise start from
single bytes and repeatedly merge the adjacent pair whose concatenation has the lowest
rank (leftmost on ties). Byte fallback means no unknown token ever exists.

Special tokens follow tiktoken's rules: by default a special token's text inside ordinary
input is an error (`disallowed_special="all"`); `allowed_special` lists the ones to encode as
specials; pass `disallowed_special=()` to encode their text as ordinary text.

Lone surrogates (str code points U+D800-U+DFFF, which UTF-8 cannot represent) are encoded as
their 3 "surrogatepass" bytes each, split apart from the surrounding text, and decoded back,
so `decode(encode(s)) == s` for every Python str. (`HFTokenizer` rejects them: the Rust
library cannot hold them.)
"""

from __future__ import annotations

import abc
import codecs
import functools
import os
import re
from collections.abc import Collection, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import regex

_SURROGATES = re.compile("[\ud800-\udfff]")
_SURROGATE_LEADS = range(0xA0, 0xC0)


def _surrogate_or_replace(exc: UnicodeDecodeError) -> tuple[str, int]:
    """Decode error handler: 3-byte surrogate encodings back to the code point, else U+FFFD."""
    data, i = exc.object, exc.start
    if (i + 2 < len(data) and data[i] == 0xED and data[i + 1] in _SURROGATE_LEADS
            and 0x80 <= data[i + 2] < 0xC0):
        return bytes(data[i:i + 3]).decode("utf-8", "surrogatepass"), i + 3
    return codecs.replace_errors(exc)


codecs.register_error("lmforge.surrogates", _surrogate_or_replace)

# encode_batch(processes=True): each worker process holds the tokenizer once, set by the pool initializer
_worker: dict = {}


def _set_worker_tokenizer(tok: Tokenizer, kw: dict) -> None:
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not an inherited Python handler: Pool.terminate must work
    _worker["tok"], _worker["kw"] = tok, kw


def _encode_share_in_worker(texts: Sequence[str]) -> list[list[int]]:
    return [_worker["tok"].encode(t, **_worker["kw"]) for t in texts]

SpecialSet = Literal["all"] | Collection[str]


class TokenizerError(ValueError):
    """Input a tokenizer cannot take (unknown token id, lone surrogate for HF, ...)."""


class DisallowedSpecialError(TokenizerError):
    """Input text contains a special token's text that was not allowed."""


class Tokenizer(abc.ABC):
    """The interface every tokenizer in lmforge offers (see the module docstring)."""

    special_tokens: dict[str, int]
    chat_template: str | None = None
    # named templates from tokenizer_config.json ({"default": ..., "tool_use": ...}), when it has several
    chat_templates: dict[str, str] | None = None
    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    unk_token: str | None = None
    sep_token: str | None = None
    cls_token: str | None = None
    mask_token: str | None = None
    NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

    # --- what each backend provides ----------------------------------------------
    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, special tokens included."""

    @abc.abstractmethod
    def _encode_ordinary(self, text: str) -> list[int]:
        """Encode text that holds no special tokens and no lone surrogates."""

    @abc.abstractmethod
    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The raw bytes the ids stand for (may end inside a UTF-8 character)."""

    @abc.abstractmethod
    def id_to_token(self, token_id: int) -> str:
        """The token's vocabulary entry (byte-level BPE: GPT-2's printable byte alphabet)."""

    @abc.abstractmethod
    def token_to_id(self, token: str) -> int | None:
        """Inverse of id_to_token; None for a string that is not a vocabulary entry."""

    @abc.abstractmethod
    def save(self, directory: str | os.PathLike) -> None:
        """Write tokenizer.json and tokenizer_config.json (HF format) into `directory`."""

    # --- shared behaviour ---------------------------------------------------------
    def _encode_surrogates(self, text: str) -> list[int]:
        raise TokenizerError("this tokenizer cannot encode lone surrogates (U+D800-U+DFFF); "
                             "fix the text, e.g. text.encode('utf-16', 'surrogatepass').decode('utf-16', 'replace')")

    def encode_ordinary(self, text: str, **kw) -> list[int]:
        """Encode `text`, treating special tokens' text as ordinary text."""
        try:
            # the encoders raise UnicodeEncodeError on a lone surrogate, so the common case pays no pre-scan
            return self._encode_ordinary(text, **kw)
        except UnicodeEncodeError:
            return self._encode_surrogates(text, **kw)

    @functools.cached_property
    def _special_regex(self) -> re.Pattern | None:
        names = sorted(self.special_tokens, key=len, reverse=True)
        return re.compile("|".join(map(re.escape, names))) if names else None

    def encode(self, text: str, allowed_special: SpecialSet = frozenset(),
               disallowed_special: SpecialSet = "all", **kw) -> list[int]:
        """Encode `text` to token ids (tiktoken's rules for special tokens)."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        special_regex = self._special_regex
        if special_regex is None or (not allowed_special and disallowed_special == "all"
                                     and special_regex.search(text) is None):
            return self.encode_ordinary(text, **kw)  # the common case: one C-level scan, no set building
        allowed = set(self.special_tokens) if allowed_special == "all" else set(allowed_special)
        unknown = allowed - set(self.special_tokens)
        if unknown:
            raise TokenizerError(f"allowed_special names tokens this tokenizer lacks: {sorted(unknown)}")
        disallowed = (set(self.special_tokens) - allowed if disallowed_special == "all"
                      else set(disallowed_special))
        if self._special_regex is None or not (allowed or disallowed):
            return self.encode_ordinary(text, **kw)
        ids: list[int] = []
        start = 0
        strip = self._strip_flags
        for m in self._special_regex.finditer(text):
            token = m.group()
            if m.start() < start:  # inside the whitespace an rstrip token took
                continue
            if token in disallowed:
                raise DisallowedSpecialError(
                    f"text contains the special token {token!r} at character {m.start()}; pass "
                    f"allowed_special={{{token!r}}} to encode it as a special token, or "
                    f"disallowed_special=() to encode it as ordinary text")
            if token in allowed:
                lstrip, rstrip = strip.get(token, (False, False))
                before = text[start:m.start()]
                ids += self.encode_ordinary(before.rstrip() if lstrip else before, **kw)
                ids.append(self.special_tokens[token])
                start = m.end()
                if rstrip:  # an added token with rstrip takes the whitespace after it (HF's AddedToken rules)
                    while start < len(text) and text[start].isspace():
                        start += 1
        ids += self.encode_ordinary(text[start:], **kw)
        return ids

    # added tokens that take the whitespace on their left / right (HF AddedToken lstrip / rstrip)
    _strip_flags: dict[str, tuple[bool, bool]] = {}

    def encode_batch(self, texts: Sequence[str], num_threads: int | None = None, processes: bool = False,
                     **kw) -> list[list[int]]:
        """Encode many texts in parallel: threads (the fast encoders release the GIL) or processes.

        Each worker takes one contiguous share of `texts`, so small documents cost no per-item
        scheduling. Use `processes=True` for the pure-Python reference encoder.
        """
        n = min(num_threads or os.cpu_count() or 1, len(texts))
        if n <= 1:
            return [self.encode(t, **kw) for t in texts]
        size = -(-len(texts) // n)
        shares = [texts[i:i + size] for i in range(0, len(texts), size)]
        if processes:
            import multiprocessing as mp

            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            with ctx.Pool(len(shares), initializer=_set_worker_tokenizer, initargs=(self, kw)) as pool:
                parts = pool.map(_encode_share_in_worker, shares)
        else:
            with ThreadPoolExecutor(len(shares)) as pool:
                parts = list(pool.map(lambda share: [self.encode(t, **kw) for t in share], shares))
        return [ids for part in parts for ids in part]

    def encode_for_model(self, texts: Sequence[str], max_length: int | None = None) -> list[list[int]]:
        """Model inputs for documents: special-token text is plain text; truncated to max_length ids.

        HF tokenizers add their model's special tokens here (e.g. BERT's [CLS] ... [SEP]).
        """
        batch = self.encode_batch(list(texts), disallowed_special=())
        return [ids[:max_length] for ids in batch] if max_length else batch

    def decode(self, ids: Iterable[int]) -> str:
        """Decode ids to text; bytes that are not valid UTF-8 become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", "lmforge.surrogates")

    def raw_bytes(self, ids: Iterable[int]) -> bytes | None:
        """The bytes the ids stand for, before UTF-8 decoding, or None where the tokenizer does not say (a
        streaming decoder asks whether the last ids end inside a character)."""
        return self.decode_bytes(ids)

    def token_spans(self, text: str, **kw) -> list[tuple[str, list[int]]]:
        """Split the encoding of `text` into displayable spans: (text, ids that make it).

        A character split over several byte-level tokens is one span with all of its ids.
        """
        spans: list[tuple[str, list[int]]] = []
        pending: list[int] = []
        for token_id in self.encode(text, **kw):
            pending.append(token_id)
            try:
                piece = self.decode_bytes(pending).decode("utf-8", "surrogatepass")
            except UnicodeDecodeError as e:
                if e.reason == "unexpected end of data":
                    continue  # wait for the rest of the character
                piece = self.decode(pending)
            spans.append((piece, pending))
            pending = []
        if pending:
            spans.append((self.decode(pending), pending))
        return spans

    # --- chat ---------------------------------------------------------------------------
    def special_tokens_map(self) -> dict[str, str]:
        """The named special tokens that are set ({"eos_token": "<|im_end|>", ...}): chat template variables."""
        return {name: getattr(self, name) for name in self.NAMED_TOKENS if getattr(self, name)}

    def control_tokens(self) -> tuple[str, ...]:
        """Tokens that only a chat template may write: encoded as text wherever they appear in data."""
        return tuple(t for t in self.special_tokens if not t.isspace())

    def encode_template_text(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and character offsets of text a chat template wrote: its markers become their token ids."""
        ids = self.encode(text, allowed_special="all")
        return ids, self._char_offsets(text, ids)

    def encode_plain_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids of `text` as plain text (no token's text becomes that token); every id spans the whole text."""
        ids = self.encode_ordinary(text)
        return ids, [(0, len(text))] * len(ids)

    def _char_offsets(self, text: str, ids: list[int]) -> list[tuple[int, int]]:
        """Character span of each id, from the bytes each decodes to (all tokens of one character share its span)."""
        char_of_byte: list[int] = []
        for i, ch in enumerate(text):
            char_of_byte += [i] * len(ch.encode("utf-8", "surrogatepass"))
        offsets, pos = [], 0
        for token_id in ids:
            n = len(self.decode_bytes([token_id]))
            if n == 0 or pos + n > len(char_of_byte):
                offsets.append((len(text), len(text)) if pos >= len(char_of_byte) else (char_of_byte[pos], len(text)))
            else:
                offsets.append((char_of_byte[pos], char_of_byte[pos + n - 1] + 1))
            pos += n
        return offsets

    def __len__(self) -> int:
        return self.vocab_size


class BPETokenizer(Tokenizer):
    """Byte-level BPE from merge ranks; tiktoken fast path plus a pure-Python reference."""

    def __init__(self, ranks: dict[bytes, int], merges: list[tuple[bytes, bytes]], pattern: str,
                 special_tokens: dict[str, int] | None = None, *, chat_template: str | None = None,
                 bos_token: str | None = None, eos_token: str | None = None, pad_token: str | None = None,
                 name: str = "lmforge"):
        missing = [b for b in range(256) if bytes([b]) not in ranks]
        if missing:
            raise ValueError(f"a byte-level BPE vocabulary needs all 256 single bytes; missing {missing[:8]}")
        self.ranks = ranks
        self.merges = merges
        self.pattern = pattern
        self.special_tokens = dict(special_tokens or {})
        clash = set(self.special_tokens.values()) & set(ranks.values())
        if clash:
            raise ValueError(f"special token ids clash with ordinary token ids: {sorted(clash)[:8]}")
        self.chat_template, self.bos_token, self.eos_token, self.pad_token = chat_template, bos_token, eos_token, pad_token
        self.name = name
        self._decoder = {i: b for b, i in ranks.items()}
        self._decoder.update({i: s.encode("utf-8") for s, i in self.special_tokens.items()})
        self._pat = regex.compile(pattern)
        self._cache: dict[bytes, list[int]] = {}

    @property
    def vocab_size(self) -> int:
        return max(self._decoder) + 1

    @functools.cached_property
    def _tiktoken(self):
        """The tiktoken Encoding for these ranks, or None if tiktoken cannot take the pattern."""
        import tiktoken

        try:
            return tiktoken.Encoding(self.name, pat_str=self.pattern, mergeable_ranks=self.ranks,
                                     special_tokens=self.special_tokens)
        except ValueError:  # a custom regex that tiktoken's engine rejects
            return None

    # --- the pure-Python reference (tiktoken's algorithm, written out) -------------
    def _bpe(self, piece: bytes) -> list[int]:
        ranks = self.ranks
        if piece in ranks:
            return [ranks[piece]]
        cached = self._cache.get(piece)
        if cached is not None:
            return cached
        parts = [piece[i:i + 1] for i in range(len(piece))]
        while len(parts) > 1:
            best_rank, best_i = None, -1
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and (best_rank is None or r < best_rank):
                    best_rank, best_i = r, i
            if best_rank is None:
                break
            parts[best_i:best_i + 2] = [parts[best_i] + parts[best_i + 1]]
        ids = [ranks[p] for p in parts]
        if len(self._cache) < 100_000:
            self._cache[piece] = ids
        return ids

    def _encode_reference(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in self._pat.findall(text):
            ids += self._bpe(piece.encode("utf-8"))
        return ids

    def _encode_ordinary(self, text: str, reference: bool = False) -> list[int]:
        fast = None if reference else self._tiktoken
        if fast is None:
            return self._encode_reference(text)
        core = getattr(fast, "_core_bpe", None)
        if core is not None:
            return core.encode_ordinary(text)  # raises UnicodeEncodeError on lone surrogates
        text.encode("utf-8")  # public API fallback: tiktoken would silently replace surrogates
        return fast.encode_ordinary(text)

    def _encode_surrogates(self, text: str, reference: bool = False) -> list[int]:
        ids: list[int] = []
        start = 0
        for m in _SURROGATES.finditer(text):
            ids += self._encode_ordinary(text[start:m.start()], reference=reference)
            ids += self._bpe(m.group().encode("utf-8", "surrogatepass"))
            start = m.end()
        return ids + self._encode_ordinary(text[start:], reference=reference)

    _BATCH_SEPARATOR = "<|lmforge:document-separator|>"

    @functools.cached_property
    def _tiktoken_batch(self):
        """tiktoken with one extra private special token that separates documents in a batch."""
        import tiktoken

        fast = self._tiktoken
        if fast is None or getattr(fast, "_core_bpe", None) is None:
            return None
        sep_id = self.vocab_size
        enc = tiktoken.Encoding(f"{self.name}-batch", pat_str=self.pattern, mergeable_ranks=self.ranks,
                                special_tokens={**self.special_tokens, self._BATCH_SEPARATOR: sep_id})
        return enc, sep_id

    def _encode_group(self, group: Sequence[str]) -> list[list[int]]:
        """Encode documents in one tiktoken call: joined by the private separator, which tiktoken
        treats like any special token, so the text between two separators is encoded exactly as
        a document on its own would be. The GIL is released for the whole group."""
        enc, sep_id = self._tiktoken_batch
        sep = self._BATCH_SEPARATOR
        joined = sep.join(group)
        special = self._special_regex
        if (special is not None and special.search(joined)) or joined.count(sep) != len(group) - 1:
            return [self.encode(t) for t in group]  # specials in the text: the per-document rules apply
        try:
            ids = enc._core_bpe.encode(joined, {sep})
        except UnicodeEncodeError:
            return [self.encode(t) for t in group]
        out, start = [], 0
        for _ in range(len(group) - 1):
            end = ids.index(sep_id, start)
            out.append(ids[start:end])
            start = end + 1
        out.append(ids[start:])
        return out

    def encode_batch(self, texts: Sequence[str], num_threads: int | None = None, processes: bool = False,
                     **kw) -> list[list[int]]:
        if processes or kw or self._tiktoken_batch is None or len(texts) < 2:
            return super().encode_batch(texts, num_threads, processes, **kw)
        # groups of about 256k characters: large enough that each call is mostly Rust, many enough to share
        groups: list[list[str]] = [[]]
        size = 0
        for t in texts:
            if size > 1 << 18:
                groups.append([])
                size = 0
            groups[-1].append(t)
            size += len(t)
        n = min(num_threads or os.cpu_count() or 1, len(groups))
        if n <= 1:
            parts = [self._encode_group(g) for g in groups]
        else:
            with ThreadPoolExecutor(n) as pool:
                parts = list(pool.map(self._encode_group, groups))
        return [ids for part in parts for ids in part]

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        decoder = self._decoder
        try:
            return b"".join([decoder[i] for i in ids])
        except KeyError as e:
            raise TokenizerError(f"token id {e.args[0]} is outside the vocabulary (size {self.vocab_size})") from None

    def token_bytes(self, token_id: int) -> bytes:
        return self.decode_bytes([token_id])

    def id_to_token(self, token_id: int) -> str:
        from lmforge.tokenizer.formats import bytes_to_unicode_str

        if token_id in self.special_tokens.values():
            return self.decode([token_id])
        return bytes_to_unicode_str(self.token_bytes(token_id))

    def token_to_id(self, token: str) -> int | None:
        from lmforge.tokenizer.formats import unicode_str_to_bytes

        if token in self.special_tokens:
            return self.special_tokens[token]
        try:
            return self.ranks.get(unicode_str_to_bytes(token))
        except KeyError:
            return None

    def save(self, directory: str | os.PathLike) -> None:
        from lmforge.tokenizer.formats import save_hf_tokenizer

        save_hf_tokenizer(self, directory)

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size}, specials={list(self.special_tokens)})"


class HFTokenizer(Tokenizer):
    """Any HF `tokenizers` tokenizer (BPE, WordPiece, Unigram, ...) behind the lmforge interface."""

    def __init__(self, tok, *, chat_template: str | None = None, bos_token: str | None = None,
                 eos_token: str | None = None, pad_token: str | None = None, config: dict | None = None):
        self.tok = tok
        # we split special tokens ourselves (tiktoken rules); inside ordinary text they are text
        tok.encode_special_tokens = True
        # a tokenizer.json may carry padding/truncation settings; lmforge pads and truncates explicitly,
        # and a silent cut of long texts in encode() would lose data
        tok.no_padding()
        tok.no_truncation()
        added = tok.get_added_tokens_decoder()
        self.special_tokens = {t.content: i for i, t in added.items() if t.special}
        self._strip_flags = {t.content: (t.lstrip, t.rstrip) for t in added.values() if t.special and (t.lstrip or t.rstrip)}
        # added tokens that are not special (Phi-3's </s>, Qwen's <tool_call>) are still matched by the library in
        # any text; where one appears, ordinary text goes through the pipeline without the added-token step
        self._added_contents = tuple(sorted({t.content for t in added.values()}, key=len, reverse=True))
        nonspecial = [t.content for t in added.values() if not t.special]
        self._nonspecial_regex = re.compile("|".join(map(re.escape, sorted(nonspecial, key=len, reverse=True)))) \
            if nonspecial else None
        self.chat_template, self.bos_token, self.eos_token, self.pad_token = chat_template, bos_token, eos_token, pad_token
        self.config = config or {}

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def _encode_ordinary(self, text: str) -> list[int]:
        text.encode("utf-8")  # the Rust library cannot take lone surrogates: raise UnicodeEncodeError first
        if self._nonspecial_regex is not None and self._nonspecial_regex.search(text):
            return self._encode_without_added_tokens(text)
        return self.tok.encode(text, add_special_tokens=False).ids

    def _encode_without_added_tokens(self, text: str) -> list[int]:
        """normalizer -> pre-tokenizer -> model, the library's pipeline without its added-token matching."""
        t = self.tok
        s = t.normalizer.normalize_str(text) if t.normalizer is not None else text
        pieces = t.pre_tokenizer.pre_tokenize_str(s) if t.pre_tokenizer is not None else [(s, (0, len(s)))]
        return [token.id for piece, _ in pieces for token in t.model.tokenize(piece)]

    def control_tokens(self) -> tuple[str, ...]:
        return tuple(c for c in self._added_contents if not c.isspace())

    def encode_template_text(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        # what a template wrote is encoded as transformers encodes it: every added token matched, with its
        # lstrip/rstrip rules
        text.encode("utf-8")
        self.tok.encode_special_tokens = False
        try:
            enc = self.tok.encode(text, add_special_tokens=False)
        finally:
            self.tok.encode_special_tokens = True
        return enc.ids, [tuple(o) for o in enc.offsets]

    def encode_for_model(self, texts: Sequence[str], max_length: int | None = None) -> list[list[int]]:
        for t in texts:
            t.encode("utf-8")  # lone surrogates: UnicodeEncodeError rather than a Rust-side TypeError
        if max_length:  # the library truncates around its post-processor, keeping e.g. the final [SEP]
            self.tok.enable_truncation(max_length)
        try:
            return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=True)]
        finally:
            self.tok.no_truncation()

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self.decode(ids).encode("utf-8", "surrogatepass")

    @functools.cached_property
    def _byte_level(self) -> bool:
        import json

        decoder = json.loads(self.tok.to_str()).get("decoder") or {}
        kinds = [d.get("type") for d in decoder.get("decoders", [decoder])]
        return "ByteLevel" in kinds

    def raw_bytes(self, ids: Iterable[int]) -> bytes | None:
        """Byte tokens (byte-level BPE, SentencePiece's <0xNN> fallback) give their bytes; a token of whole characters
        gives the UTF-8 of its vocabulary entry (its word marker included), which ends no character early."""
        from lmforge.tokenizer.formats import unicode_str_to_bytes

        out = bytearray()
        for token_id in ids:
            token = self.tok.id_to_token(token_id)
            if token is None:
                return None
            if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):  # SentencePiece byte fallback
                out.append(int(token[3:5], 16))
            elif self._byte_level:
                try:
                    out += unicode_str_to_bytes(token)
                except KeyError:
                    return None
            else:  # a token of whole characters ("▁word", "##ab"): complete characters, whatever its spelling
                out += token.encode("utf-8", "surrogatepass")
        return bytes(out)

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def token_spans(self, text: str, **kw) -> list[tuple[str, list[int]]]:
        enc = self.tok.encode(text, add_special_tokens=False)
        spans: list[tuple[str, list[int]]] = []
        for token_id, (start, end) in zip(enc.ids, enc.offsets):
            if spans and spans[-1][2] == (start, end):  # bytes of one character share an offset
                spans[-1][1].append(token_id)
            else:
                spans.append((text[start:end], [token_id], (start, end)))
        return [(s, ids) for s, ids, _ in spans]

    def id_to_token(self, token_id: int) -> str:
        return self.tok.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def save(self, directory: str | os.PathLike) -> None:
        from lmforge.tokenizer.formats import save_hf_wrapped

        save_hf_wrapped(self, directory)

    def __repr__(self) -> str:
        model = type(self.tok.model).__name__
        return f"HFTokenizer({model}, vocab_size={self.vocab_size})"
