"""Tokenizer file formats: HF tokenizer.json (+ tokenizer_config.json) and GPT-2 encoder.json/vocab.bpe.

A byte-level BPE is written as HF writes GPT-4-style tokenizers (Split(regex) then
ByteLevel without its own regex, BPE with `ignore_merges`, merges in rank order), so
`tokenizers.Tokenizer.from_file` and `transformers.AutoTokenizer` give the same ids as lmforge.

Loading picks the backend: a tokenizer.json that is exactly a byte-level BPE that lmforge
can run (no normalizer, a regex split, ranks that follow the merge order) becomes a
`BPETokenizer` (tiktoken-fast); anything else (WordPiece, Unigram, normalizers, ...) is
served by the `tokenizers` library as an `HFTokenizer`.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Literal

from lmforge.files import StagedDirectory, write_json
from lmforge.tokenizer.patterns import PATTERNS
from lmforge.tokenizer.tokenizer import BPETokenizer, HFTokenizer, Tokenizer


class TokenizerFormatError(ValueError):
    """A tokenizer file that cannot be read; the message names the file and what is wrong."""


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable unicode characters (openai/gpt-2 encoder.py)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


@functools.lru_cache(maxsize=1)
def _unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


def bytes_to_unicode_str(b: bytes) -> str:
    table = bytes_to_unicode()
    return "".join(table[x] for x in b)


def unicode_str_to_bytes(s: str) -> bytes:
    """Inverse of bytes_to_unicode_str; KeyError for a character outside the byte alphabet."""
    table = _unicode_to_bytes()
    return bytes(table[c] for c in s)


# --- writing -------------------------------------------------------------------------

def hf_tokenizer_json(tok: BPETokenizer) -> dict:
    """The HF tokenizer.json structure for a byte-level BPE."""
    vocab = {bytes_to_unicode_str(b): i for b, i in sorted(tok.ranks.items(), key=lambda kv: kv[1])}
    merges = [[bytes_to_unicode_str(a), bytes_to_unicode_str(b)] for a, b in tok.merges]
    added = [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for s, i in sorted(tok.special_tokens.items(), key=lambda kv: kv[1])]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": tok.pattern}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        ]},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  # a piece that is itself a token is that token, as in tiktoken
                  "ignore_merges": True, "vocab": vocab, "merges": merges},
    }


def _tokenizer_config(tok: Tokenizer, added: dict[int, str]) -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": {str(i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": True} for i, s in sorted(added.items())},
        "bos_token": tok.bos_token,
        "eos_token": tok.eos_token,
        "pad_token": tok.pad_token,
        "unk_token": tok.unk_token,
        **{name: getattr(tok, name) for name in ("sep_token", "cls_token", "mask_token") if getattr(tok, name)},
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000_000_000_000_019_884_624_838_656,  # transformers' "no limit" value
        **({"chat_template": [{"name": k, "template": v} for k, v in tok.chat_templates.items()]} if tok.chat_templates
           else {"chat_template": tok.chat_template} if tok.chat_template else {}),
    }


def save_hf_tokenizer(tok: BPETokenizer, directory: str | os.PathLike) -> None:
    """Write tokenizer.json and tokenizer_config.json into `directory`, together (files.StagedDirectory)."""
    with StagedDirectory(directory) as stage:
        write_json(stage.path("tokenizer.json"), hf_tokenizer_json(tok), indent=None)
        write_json(stage.path("tokenizer_config.json"),
                   _tokenizer_config(tok, {i: s for s, i in tok.special_tokens.items()}))


def save_hf_wrapped(tok: HFTokenizer, directory: str | os.PathLike) -> None:
    config = {**tok.config, **_tokenizer_config(tok, {i: s for s, i in tok.special_tokens.items()})}
    with StagedDirectory(directory) as stage:
        write_json(stage.path("tokenizer.json"), json.loads(tok.tok.to_str()), indent=None)
        write_json(stage.path("tokenizer_config.json"), config)


# --- reading -------------------------------------------------------------------------

def _split_pattern(pre: dict | None) -> str | None:
    """The regex of a pure byte-level pre-tokenizer, or None if it is anything else."""
    if not pre:
        return None
    if pre.get("type") == "ByteLevel":
        return PATTERNS["gpt2"] if pre.get("use_regex", True) and not pre.get("add_prefix_space") else None
    if pre.get("type") == "Sequence":
        steps = pre.get("pretokenizers", [])
        if (len(steps) == 2 and steps[0].get("type") == "Split" and steps[0].get("behavior") == "Isolated"
                and not steps[0].get("invert") and "Regex" in steps[0].get("pattern", {})
                and steps[1].get("type") == "ByteLevel" and not steps[1].get("use_regex", True)
                and not steps[1].get("add_prefix_space")):
            return steps[0]["pattern"]["Regex"]
    return None


def _parse_merges(merges: list) -> list[tuple[str, str]]:
    out = []
    for m in merges:
        if isinstance(m, str):
            left, sep, right = m.partition(" ")
            if not sep:
                raise TokenizerFormatError(f"merge {m!r} is not 'left right'")
            out.append((left, right))
        else:
            out.append((m[0], m[1]))
    return out


def bpe_from_ranks_and_merges(vocab: dict[str, int], merges: list[tuple[str, str]], pattern: str,
                              specials: dict[str, int]) -> BPETokenizer | None:
    """A BPETokenizer if this vocabulary runs identically under tiktoken's rank rule, else None.

    The rank rule equals the merge-list rule when every merged token's id grows with its merge
    position and every multi-byte token comes from a merge.
    """
    try:
        ranks = {unicode_str_to_bytes(t): i for t, i in vocab.items()}
        merge_bytes = [(unicode_str_to_bytes(a), unicode_str_to_bytes(b)) for a, b in merges]
    except KeyError:
        return None  # not a byte-level alphabet
    if len(ranks) != len(vocab) or any(bytes([b]) not in ranks for b in range(256)):
        return None
    last = -1
    produced = set()
    for a, b in merge_bytes:
        r = ranks.get(a + b)
        if r is None or r < last or a not in ranks or b not in ranks:
            return None
        last = r
        produced.add(a + b)
    if any(len(t) > 1 and t not in produced for t in ranks):
        return None
    if set(specials.values()) & set(ranks.values()):
        return None
    return BPETokenizer(ranks, merge_bytes, pattern, specials)


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as e:
        raise TokenizerFormatError(f"cannot read {path}: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerFormatError(f"{path}: not valid JSON: {e}") from None


def _token_str(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _apply_config(tok: Tokenizer, config: dict) -> Tokenizer:
    for key in Tokenizer.NAMED_TOKENS:
        setattr(tok, key, _token_str(config.get(key)))
    template = config.get("chat_template")
    tok.chat_templates = None
    if isinstance(template, list):  # HF allows named templates: "default" is used unless another is asked for
        tok.chat_templates = {t["name"]: t["template"] for t in template}
        template = tok.chat_templates.get("default")
    tok.chat_template = template
    return tok


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerFormatError(f"cannot read {path}: {e}") from None


def read_tokenizer_config(directory: Path) -> dict:
    """tokenizer_config.json with the chat template transformers would use: chat_template.jinja (the default) and
    additional_chat_templates/NAME.jinja (named ones), as transformers 5 saves them; else chat_template.json (a
    processor's, e.g. Gemma 3's); else the config's own "chat_template". The one reader of a model's template
    files: chat/templates.py documents this order with the other sources."""
    config = _read_json(directory / "tokenizer_config.json") if (directory / "tokenizer_config.json").exists() else {}
    jinja = directory / "chat_template.jinja"
    named = sorted((directory / "additional_chat_templates").glob("*.jinja"))
    if jinja.exists() or named:
        templates = {"default": _read_text(jinja)} if jinja.exists() else {}
        templates |= {path.name.removesuffix(".jinja"): _read_text(path) for path in named}
        config["chat_template"] = templates["default"] if list(templates) == ["default"] else \
            [{"name": name, "template": text} for name, text in templates.items()]
    elif (directory / "chat_template.json").exists():
        template = _read_json(directory / "chat_template.json").get("chat_template")
        if template is not None:
            config["chat_template"] = template
    return config


def load_hf_json(path: str | os.PathLike, config: dict | None = None,
                 backend: Literal["auto", "lmforge", "hf"] = "auto") -> Tokenizer:
    """Load an HF tokenizer.json; `backend` forces lmforge's BPE or the tokenizers library."""
    path = Path(path)
    data = _read_json(path)
    if "model" not in data:
        raise TokenizerFormatError(f"{path}: no 'model' section; is this an HF tokenizer.json?")
    config = config or {}
    native = None
    if backend != "hf":
        model = data["model"]
        pattern = _split_pattern(data.get("pre_tokenizer"))
        added = data.get("added_tokens", [])
        simple = (model.get("type") == "BPE" and data.get("normalizer") is None and pattern is not None
                  and (data.get("decoder") or {}).get("type") == "ByteLevel"
                  and not model.get("dropout") and model.get("unk_token") is None
                  and not model.get("continuing_subword_prefix") and not model.get("end_of_word_suffix")
                  and not model.get("byte_fallback")
                  and all(t.get("special") and not (t.get("lstrip") or t.get("rstrip") or t.get("single_word"))
                          for t in added))
        if simple:
            native = bpe_from_ranks_and_merges(model["vocab"], _parse_merges(model.get("merges", [])), pattern,
                                               {t["content"]: t["id"] for t in added})
        if native is None and backend == "lmforge":
            raise TokenizerFormatError(f"{path}: not a byte-level BPE that lmforge can run natively; "
                                       "use backend='hf'")
    if native is not None:
        return _apply_config(native, config)
    from tokenizers import Tokenizer as RustTokenizer

    try:
        rust = RustTokenizer.from_file(str(path))
    except Exception as e:  # the library raises plain Exception subclasses
        raise TokenizerFormatError(f"{path}: the tokenizers library cannot load it: {e}") from None
    _as_transformers_builds_it(rust, config)
    return _apply_config(HFTokenizer(rust, config=config), config)


# tokenizer classes whose pipeline transformers (5.x) rebuilds from the vocabulary, whatever tokenizer.json says
_LLAMA_CLASSES = {"LlamaTokenizer", "LlamaTokenizerFast", "CodeLlamaTokenizer", "CodeLlamaTokenizerFast"}


def _as_transformers_builds_it(rust, config: dict) -> None:
    """Give a SentencePiece-style Llama tokenizer (Llama 2, Mistral, Phi-3) the pipeline transformers 5 uses.

    Their tokenizer.json files prepend the word marker with a normalizer (Prepend("▁")), which the library applies to
    every piece between added tokens: "<|user|>\nhi" would encode "▁hi". transformers' LlamaTokenizer replaces that
    with a Metaspace pre-tokenizer that prepends only at the start of the text (legacy=False, its default), which is
    how SentencePiece encoded the models' training data. The ids then equal transformers'.
    """
    if config.get("tokenizer_class") not in _LLAMA_CLASSES:
        return
    model = json.loads(rust.to_str()).get("model", {})
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        return
    from tokenizers import decoders, pre_tokenizers

    add_prefix_space = config.get("add_prefix_space")
    add_prefix_space = True if add_prefix_space is None else bool(add_prefix_space)
    scheme = ("always" if config.get("legacy", False) else "first") if add_prefix_space else "never"
    rust.normalizer = None
    rust.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix_space:
        steps.append(decoders.Strip(content=" ", left=1))
    rust.decoder = decoders.Sequence(steps)


def load_gpt2_files(encoder_json: str | os.PathLike, vocab_bpe: str | os.PathLike) -> BPETokenizer:
    """Load GPT-2's encoder.json + vocab.bpe (HF: vocab.json + merges.txt)."""
    vocab = _read_json(Path(encoder_json))
    try:
        lines = Path(vocab_bpe).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise TokenizerFormatError(f"cannot read {vocab_bpe}: {e.strerror or e}") from None
    merges = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip() or (lineno == 1 and line.startswith("#version")):
            continue
        left, sep, right = line.partition(" ")
        if not sep or " " in right:
            raise TokenizerFormatError(f"{vocab_bpe}:{lineno}: expected 'left right', got {line!r}")
        merges.append((left, right))
    produced = {a + b for a, b in merges}
    byte_chars = set(bytes_to_unicode().values())
    # entries that are neither a byte nor a merge result (GPT-2's <|endoftext|>) are special
    specials = {t: i for t, i in vocab.items() if t not in produced and t not in byte_chars}
    ordinary = {t: i for t, i in vocab.items() if t not in specials}
    tok = bpe_from_ranks_and_merges(ordinary, merges, PATTERNS["gpt2"], specials)
    if tok is None:
        raise TokenizerFormatError(f"{encoder_json} + {vocab_bpe}: ids do not follow the merge order; "
                                   "not a GPT-2 style vocabulary")
    tok.name = "gpt2-files"
    if "<|endoftext|>" in specials:
        tok.bos_token = tok.eos_token = "<|endoftext|>"
    return tok


def load_tokenizer(path: str | os.PathLike, backend: Literal["auto", "lmforge", "hf"] = "auto") -> Tokenizer:
    """Load a tokenizer from a directory or file (tokenizer.json, or GPT-2 encoder.json + vocab.bpe).

    A directory written by `Tokenizer.save` or by transformers works; so does a Hugging Face Hub id
    (`hf:gpt2`, `Qwen/Qwen2.5-0.5B`) for users who are online (lmforge/hub.py says when it downloads).
    """
    p = Path(path)
    if p.is_file():
        return load_hf_json(p, read_tokenizer_config(p.parent), backend)
    if p.is_dir():
        if (p / "tokenizer.json").exists():
            return load_hf_json(p / "tokenizer.json", read_tokenizer_config(p), backend)
        for enc, bpe in (("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt")):
            if (p / enc).exists() and (p / bpe).exists():
                return load_gpt2_files(p / enc, p / bpe)
        from lmforge.hub import run_directory_hint

        raise TokenizerFormatError(f"{p}: no tokenizer.json, encoder.json + vocab.bpe, or vocab.json + merges.txt"
                                   f"{run_directory_hint(p)}")
    from lmforge.hub import hub_repo_id, missing_path_error

    repo = hub_repo_id(path)
    if repo is not None:
        return _load_from_hub(repo, backend)
    raise TokenizerFormatError(str(missing_path_error(p, "tokenizer file or directory")))


def _load_from_hub(repo_id: str, backend: Literal["auto", "lmforge", "hf"]) -> Tokenizer:
    from lmforge.hub import download

    d = download(repo_id, ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "chat_template.json",
                           "additional_chat_templates/*.jinja"])
    if not (d / "tokenizer.json").exists():
        raise TokenizerFormatError(f"'{repo_id}' on the Hugging Face Hub has no tokenizer.json")
    return load_hf_json(d / "tokenizer.json", read_tokenizer_config(d), backend)
