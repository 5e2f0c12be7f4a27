"""Looking at a tokenizer: coloured token boundaries and compression figures."""

from __future__ import annotations

from importlib import resources

from lmforge.text import HAN_RUN
from lmforge.tokenizer.tokenizer import Tokenizer

_HAN = HAN_RUN
# background colours that keep text readable on light and dark terminals
_COLORS = ["\x1b[48;5;153m", "\x1b[48;5;222m", "\x1b[48;5;151m", "\x1b[48;5;217m", "\x1b[48;5;188m"]
_RESET = "\x1b[0m"
SAMPLE_CHARS = 200_000


def chinese_sample() -> str:
    """A short original Chinese text shipped with lmforge, for compression figures."""
    return resources.files("lmforge.data").joinpath("samples/zh.txt").read_text(encoding="utf-8")


def english_sample() -> str:
    from lmforge.data.builtin import builtin_documents

    return "".join(d.text for d in builtin_documents("builtin:python-docs"))[:SAMPLE_CHARS]


def render_spans(spans: list[tuple[str, list[int]]], color: bool = True, show_ids: bool = False) -> str:
    """Token boundaries as alternating background colours, or `|`-separated without colour."""
    out = []
    for k, (text, ids) in enumerate(spans):
        shown = text.replace("\n", "↵\n").replace("\t", "→")
        if show_ids:
            shown += "[" + ",".join(map(str, ids)) + "]"
        out.append(f"{_COLORS[k % len(_COLORS)]}{shown}{_RESET}" if color else shown)
    return "".join(out) if color else "|".join(out)


def measure(tok: Tokenizer, text: str, source: str) -> dict:
    """bytes/token and chars/token on `text`; tokens per Chinese character on its Han runs."""
    ids = tok.encode(text, disallowed_special=())
    n_bytes = len(text.encode("utf-8", "surrogatepass"))
    han = _HAN.findall(text)
    cjk_chars = sum(map(len, han))
    report = {"source": source, "chars": len(text), "bytes": n_bytes, "tokens": len(ids),
              "bytes_per_token": n_bytes / max(len(ids), 1), "chars_per_token": len(text) / max(len(ids), 1),
              "cjk_chars": cjk_chars}
    if cjk_chars:
        report["tokens_per_cjk_char"] = sum(len(x) for x in tok.encode_batch(han, disallowed_special=())) / cjk_chars
    return report


def compression_report(tok: Tokenizer, inputs: list[str] | None = None, max_chars: int = 1_000_000) -> dict:
    """Compression on the given corpus, or on the built-in English and Chinese samples."""
    if not inputs:
        return {"en": measure(tok, english_sample(), "builtin:python-docs (first 200k chars)"),
                "zh": measure(tok, chinese_sample(), "lmforge Chinese sample")}
    from lmforge.data.sources import iter_text_chunks

    parts, n = [], 0
    for chunk in iter_text_chunks(inputs, errors="replace"):
        parts.append(chunk[: max_chars - n])
        n += len(parts[-1])
        if n >= max_chars:
            break
    return {"input": measure(tok, "".join(parts), " ".join(inputs) + (f" (first {max_chars} chars)" if n >= max_chars else ""))}
