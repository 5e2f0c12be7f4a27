"""Streaming detokenization: text pieces as tokens arrive, whose concatenation is `tokenizer.decode(ids)`.

Decoding one token at a time is wrong for two families. SentencePiece-style tokenizers (Llama 2, Mistral, Phi-3,
Gemma: a "▁" word marker and a decoder that strips the first space of a text) lose every space at a token
start ("veishru timay" printed as "veishrutimay"), and byte tokens (byte-level BPE, or SentencePiece's byte
fallback) hold parts of a character. So each step decodes a short window of recent ids twice, with and without
the new ones, and emits the difference once it no longer ends in U+FFFD (the algorithm of vLLM's and
transformers' streamers, written for every lmforge tokenizer). A character still incomplete when generation
stops (cut by max_new_tokens) is dropped rather than shown as U+FFFD, and the complete characters before it are
kept (SentencePiece's byte fallback decodes a run of byte tokens that ends incomplete as U+FFFDs throughout).

`TextStream` adds stop strings on top: the text of one reply as its tokens arrive, cut at the first stop string,
and never emitting text that could still turn out to begin one.
"""

from __future__ import annotations

import codecs

_REPLACEMENT = "\ufffd"


def _ends_inside_a_character(data: bytes) -> bool:
    """True if the bytes end with the start of a UTF-8 character whose other bytes are missing."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    decoder.decode(data, final=False)
    return bool(decoder.getstate()[0])


class IncrementalDetokenizer:
    """push(token_id) -> new text (maybe ""); flush() -> the rest. Joined, they equal `tokenizer.decode(ids)`
    (without a trailing character the ids leave incomplete)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # start of the window: ids before it are decoded for good
        self.read = 0  # ids up to here have been emitted

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix:self.read])
        now = decode(self.ids[self.prefix:])
        if len(now) > len(before) and not now.endswith(_REPLACEMENT) and now.startswith(before):
            self.prefix, self.read = self.read, len(self.ids)
            return now[len(before):]
        return ""

    def flush(self) -> str:
        """The text of ids not yet emitted; a trailing incomplete character is dropped."""
        if self.read == len(self.ids):
            return ""
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        now = self.tokenizer.decode(self.ids[self.prefix:])
        # SentencePiece's byte fallback turns a whole run of byte tokens into U+FFFDs when it ends incomplete, so
        # the window's text may no longer start with what was emitted: then decode the new ids on their own
        rest = now[len(before):] if now.startswith(before) else self.tokenizer.decode(self.ids[self.read:])
        if rest.endswith(_REPLACEMENT):
            data = self.tokenizer.raw_bytes(self.ids[self.read:])
            if data is not None and _ends_inside_a_character(data):
                rest = rest.rstrip(_REPLACEMENT)
        self.prefix = self.read = len(self.ids)
        return rest


class TextStream:
    """The detokenized text of one reply with its stop strings: push(token_id) / flush() -> (new text, stopped).
    Text that could still begin a stop string is held back until it cannot; a stop string cuts the text where it
    starts (the stop string itself is never emitted)."""

    def __init__(self, tokenizer, stop_strings=()):
        self.detok = IncrementalDetokenizer(tokenizer)
        self.stops = [s for s in stop_strings if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.text, self.emitted = "", 0

    def _cut(self) -> bool:
        # emitted text held no stop string, and one that began in it would have ended in the hold-back window
        start = max(0, self.emitted - self.hold)
        cuts = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if cuts:
            self.text = self.text[:min(cuts)]
        return bool(cuts)

    def push(self, token_id: int) -> tuple[str, bool]:
        self.text += self.detok.push(token_id)
        stopped = bool(self.stops) and self._cut()
        safe = len(self.text) if stopped else max(self.emitted, len(self.text) - self.hold)
        return self._emit(safe), stopped

    def flush(self) -> tuple[str, bool]:
        self.text += self.detok.flush()
        stopped = bool(self.stops) and self._cut()
        return self._emit(len(self.text)), stopped

    def _emit(self, upto: int) -> str:
        piece = self.text[self.emitted:upto] if upto > self.emitted else ""
        self.emitted = max(self.emitted, upto)
        return piece


def decode_generated(tokenizer, ids: list[int]) -> str:
    """What streaming these ids prints: `decode(ids)`, without a trailing incomplete character."""
    detok = IncrementalDetokenizer(tokenizer)
    return "".join(detok.push(i) for i in ids) + detok.flush()
