"""Data augmentation: EDA's four operations, typos and punctuation checked by the properties each must keep
(hand-written synonym tables, so every expected word is known), NER spans never cut, labels and sources kept,
dedup against the originals; WordNet and Cilin where their data is installed."""

from __future__ import annotations

import json
import random

import pytest

from lmforge.data.augment import (
    EN_PUNCT,
    ZH_PUNCT,
    AugmentConfig,
    Augmenter,
    AugmentError,
    SynonymTable,
    _text_pieces,
    augment_records,
    augment_tagged,
    cilin_synonyms,
    synonyms_from_file,
)
from lmforge.text import WORD

EN = SynonymTable()
for group in (["movie", "film", "picture"], ["good", "fine", "decent"], ["quick", "fast", "speedy"],
              ["funny", "amusing", "comic"], ["plot", "storyline"]):
    EN.add_group(group)
ZH = SynonymTable()
for group in (["好吃", "可口", "美味"], ["服务", "服侍"], ["餐厅", "饭馆", "饭店"], ["周到", "周全"]):
    ZH.add_group(group)
TEXT = "The movie was quick, funny and good; the plot was thin."


def _words(text: str) -> list[str]:
    return WORD.findall(text)


def _run(op: str, text: str, table, alpha: float, seed: int, lang: str = "en") -> str:
    aug = Augmenter(table, alpha, lang)
    out = aug.apply(op, _text_pieces(text, lang), random.Random(seed))
    return "".join(p.text for p in out)


@pytest.mark.parametrize("seed", range(5))
def test_eda_operations_keep_their_properties(seed):
    src = _words(TEXT)  # 11 words: alpha 0.2 -> n = 2
    n = max(1, int(0.2 * len(src)))
    # synonym: the same words but n replaced, each by a synonym of the word it replaces
    new = _words(_run("synonym", TEXT, EN, 0.2, seed))
    changed = [(a, b) for a, b in zip(src, new) if a != b]
    assert len(new) == len(src) and len(changed) == n and all(b in EN(a) for a, b in changed)
    # insert: removing the n inserted words gives the source; each is a synonym of a word of the text
    new = _words(_run("insert", TEXT, EN, 0.2, seed))
    assert len(new) == len(src) + n
    extra = list(new)
    for w in src:
        extra.remove(w)
    assert all(any(e in EN(w) for w in src) for e in extra)
    # swap: the same words in another order, punctuation where it was
    out = _run("swap", TEXT, EN, 0.2, seed)
    assert sorted(_words(out)) == sorted(src) and [c for c in out if c in ",;."] == [",", ";", "."]
    # delete: a subsequence of the source, at least one word kept, no double spaces
    out = _run("delete", TEXT, EN, 0.3, seed)
    it = iter(src)
    assert all(w in it for w in _words(out)) and 1 <= len(_words(out)) < len(src) and "  " not in out
    # char: exactly n words differ, each by one typo (swap, drop, double, key, extra)
    new = _words(_run("char", TEXT, EN, 0.2, seed))
    diff = [(a, b) for a, b in zip(src, new) if a != b]
    assert len(new) == len(src) and 1 <= len(diff) <= n
    assert all(abs(len(a) - len(b)) <= 1 and (sorted(a) == sorted(b) or len(set(a) ^ set(b)) <= 1 or
                                              len(a) != len(b)) for a, b in diff)
    # punct (AEDA): between 1 and words/3 marks inserted, nothing else changed
    out = _run("punct", TEXT, EN, 0.2, seed)
    marks = sum(out.count(m) for m in EN_PUNCT) - sum(TEXT.count(m) for m in EN_PUNCT)
    assert 1 <= marks <= len(src) // 3 and _words(out) == src


def test_chinese_words_come_from_jieba_and_synonyms_from_the_table():
    text = "这家餐厅的菜很好吃，服务也周到。"
    for seed in range(4):
        out = _run("synonym", text, ZH, 0.5, seed, "zh")
        assert out != text and "，" in out and out.endswith("。")
        # every changed word is a table synonym: put each group's words back and the source returns
        back = out
        for group in (["可口", "美味"], ["服侍"], ["饭馆", "饭店"], ["周全"]):
            for w in group:
                back = back.replace(w, {"可口": "好吃", "美味": "好吃", "服侍": "服务", "饭馆": "餐厅", "饭店": "餐厅",
                                        "周全": "周到"}[w])
        assert back == text
        out = _run("punct", text, ZH, 0.1, seed, "zh")
        assert any(m in out for m in ZH_PUNCT) and out.replace("，", "").replace("。", "").replace("；", "").replace(
            "？", "").replace("：", "").replace("！", "") == text.replace("，", "").replace("。", "")
    assert Augmenter(ZH, 0.5, "zh")._syns(_text_pieces("的", "zh")[0]) == []  # a stop word is never replaced


def test_entity_spans_are_never_cut_replaced_or_noised():
    tokens = ["John", "Smith", "flew", "from", "New", "York", "to", "the", "quick", "meeting", "in", "Paris", "today"]
    tags = ["B-PER", "I-PER", "O", "O", "B-LOC", "I-LOC", "O", "O", "O", "O", "O", "B-LOC", "O"]

    def spans(toks, tgs):
        out, cur = [], None
        for t, g in zip(toks, tgs):
            if g.startswith("B-"):
                cur = [g[2:], t]
                out.append(cur)
            elif g.startswith("I-"):
                assert cur is not None and cur[0] == g[2:], (toks, tgs)  # an I- always continues its entity
                cur.append(t)
            else:
                cur = None
        return sorted(map(tuple, out))

    table = SynonymTable()
    table.add_group(["flew", "flown", "traveled"])
    table.add_group(["quick", "fast"])
    table.add_group(["John", "Jack"])  # an entity word with synonyms: still never replaced
    cfg = AugmentConfig(ops=("synonym", "insert", "swap", "delete", "char", "punct"), per_record=6, alpha=0.3,
                        tokens_field="tokens")
    for seed in range(10):
        made = augment_tagged(tokens, tags, cfg, random.Random(seed), lambda lang: table)
        assert {op for op, _, _ in made} == set(cfg.ops)
        for op, toks, tgs in made:
            assert len(toks) == len(tgs) and spans(toks, tgs) == spans(tokens, tags), (op, toks, tgs)


def test_records_keep_labels_and_sources_and_drop_duplicates():
    recs = [("a.jsonl:1", {"text": "good movie", "label": "pos", "id": 7}),
            ("a.jsonl:2", {"text": "movie good", "label": "neg", "id": 8}),
            ("a.jsonl:3", {"text": "ok ok", "label": "pos", "id": 9})]
    cfg = AugmentConfig(ops=("swap",), per_record=3, seed=1, synonyms="none")
    out = list(augment_records(recs, cfg))
    assert out[:3] == [r for _, r in recs]  # the originals first, unchanged
    # every swap of a two-word text gives the other original (or itself): all dropped as duplicates
    assert len(out) == 3 and augment_records.stats["duplicates"] == 9
    recs = [("b:1", {"text": TEXT, "label": "pos"}), ("b:2", {"text": "The plot was quick and funny.", "label": "neg"})]
    cfg = AugmentConfig(ops=("synonym", "swap", "delete", "punct"), per_record=4, alpha=0.2, seed=3, synonyms="none")
    new = [r for r in augment_records(recs, cfg, originals=False)]
    by = dict(recs)
    for r in new:
        src = by[r["augmented"]["source"]]
        assert r["label"] == src["label"] and r["text"] != src["text"] and r["augmented"]["op"] in cfg.ops
    assert len({r["text"] for r in new}) == len(new)
    # the same seed gives the same records; a record's own draws do not depend on the ones before it
    again = list(augment_records(recs, cfg, originals=False))
    alone = list(augment_records(recs[1:], cfg, originals=False))
    assert again == new and alone == [r for r in new if r["augmented"]["source"] == "b:2"]
    assert list(augment_records(recs, AugmentConfig(**{**cfg.__dict__, "seed": 4}), originals=False)) != new
    with pytest.raises(AugmentError, match=r"b:1: field 'review': missing \(the record has label, text\)"):
        list(augment_records(recs, AugmentConfig(text_field="review", synonyms="none")))


def test_synonym_files_and_cilin_lines(tmp_path):
    f = tmp_path / "syn.txt"
    f.write_text("Aa01A01= 人 士 人物\nAa01A02# 人类 生人\nAa01A03@ 劳力\nquick fast, speedy\n", encoding="utf-8")
    table = synonyms_from_file(f)
    assert table("人") == ["士", "人物"] and table("人类") == [] and table("劳力") == []  # only "=" groups
    assert table("fast") == ["quick", "speedy"] and table("Quick") == ["fast", "speedy"]
    tree = tmp_path / "cilin_tree.json"
    tree.write_text(json.dumps({"A": {"tag": "人", "sub": {"a": {"tag": "x", "sub": {"01": {"tag": "y", "sub": {
        "A": {"tag": "z", "sub": {"01=": ["人", "士"], "02#": ["人类", "生人"]}}}}}}}}}, ensure_ascii=False))
    assert cilin_synonyms(tree)("士") == ["人"] and cilin_synonyms(tree)("人类") == []
    (tmp_path / "empty.txt").write_text("\n", encoding="utf-8")
    with pytest.raises(AugmentError, match="no synonym groups"):
        synonyms_from_file(tmp_path / "empty.txt")


def test_cli_and_pipeline_step_on_a_chinese_dataset(tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    from lmforge.cli import main

    rows = {"text": ["这家餐厅的菜很好吃，服务也周到。", "The movie was quick and good.", "服务太差了，再也不来。"],
            "label": ["pos", "pos", "neg"]}
    datasets.Dataset.from_dict(rows).save_to_disk(tmp_path / "ds")
    syn = tmp_path / "syn.txt"
    syn.write_text("好吃 可口 美味\n服务 服侍\n餐厅 饭馆\nmovie film\ngood fine\n", encoding="utf-8")
    assert main(["data", "augment", "--input", str(tmp_path / "ds"), "--output", str(tmp_path / "aug.jsonl"),
                 "--ops", "synonym", "swap", "delete", "punct", "--per-record", "4", "--alpha", "0.3",
                 "--synonyms", str(syn)]) == 0
    assert "3 records ->" in capsys.readouterr().out
    out = [json.loads(line) for line in (tmp_path / "aug.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["text"] for r in out[:3]] == rows["text"] and len(out) > 3
    assert all(r["label"] == rows["label"][int(r["augmented"]["source"].rsplit(" ", 1)[1]) - 1] for r in out[3:])
    # the file's synonyms replaced words (which ones depends on the seed's draws)
    synonyms = [r["text"] for r in out[3:] if r["augmented"]["op"] == "synonym"]
    assert synonyms and all(any(w in t for w in ("可口", "美味", "服侍", "饭馆", "film", "fine")) for t in synonyms)
    # the same as a pipeline step: every document, then its new ones, in the output with their meta
    (tmp_path / "p.yaml").write_text(
        f"input: [{tmp_path / 'ds'}]\noutput: {tmp_path / 'run'}\nsteps:\n"
        f"  - augment: {{ops: [swap, punct], per_record: 2, synonyms: none}}\n  - exact_dedup\n", encoding="utf-8")
    assert main(["data", "run", str(tmp_path / "p.yaml"), "--workers", "1"]) == 0
    import gzip

    docs = [json.loads(line) for f in sorted((tmp_path / "run" / "data").glob("*.jsonl.gz"))
            for line in gzip.decompress(f.read_bytes()).decode("utf-8").splitlines()]
    originals = [d for d in docs if "augmented" not in d]
    assert [d["text"] for d in originals] == rows["text"] and len(docs) > 3
    assert all(d["label"] == next(o["label"] for o in originals if o["id"] == d["augmented"]["source"])
               for d in docs if "augmented" in d)


def test_wordnet_synonyms_are_edas():
    from lmforge.data.augment import wordnet_dir, wordnet_synonyms

    try:
        wordnet_dir()
    except AugmentError as e:
        pytest.skip(f"no WordNet database here: {e}")
    syn = wordnet_synonyms()
    # WordNet 3.0: quick.a.01 (speedy), fast.s.?, agile; "movies" finds movie.n.01 through morphy
    assert {"speedy", "fast", "agile"} <= set(syn("quick")) and "quick" not in syn("quick")
    assert syn("movies")[:3] == ["movie", "film", "picture"]


def test_cilin_package_synonyms():
    try:
        table = cilin_synonyms()
    except AugmentError as e:
        pytest.skip(f"the cilin package is not installed here: {e}")
    assert {"可口", "美味"} <= set(table("好吃")) and "好吃" not in table("好吃")


def test_finetune_augments_the_training_prompts_only(trained_dir, tmp_path):
    from lmforge.finetune.conversations import Conversation
    from lmforge.finetune.run import FinetuneConfig, augment_conversations, run_finetune
    from tests.models import tiny_llama

    qa = [("What is the capital city of France?", "Paris."), ("北京是哪个国家的首都？", "北京是中国的首都。"),
          ("Name the largest planet in our solar system.", "Jupiter.")]
    convs = [Conversation([{"role": "system", "content": "Be brief."}, {"role": "user", "content": q},
                           {"role": "assistant", "content": a}], where=f"qa.jsonl:{i + 1}")
             for i, (q, a) in enumerate(qa)]
    out = augment_conversations(convs, ["swap"], per_record=2, seed=0, synonyms="none")
    assert out[:3] == convs and len(out) > 3
    for c in out[3:]:
        src = convs[int(c.where.split(":")[1].split(" ")[0]) - 1]
        assert c.where.endswith("(swap)") and c.messages[0] == src.messages[0] and c.messages[2] == src.messages[2]
        assert c.messages[1]["content"] != src.messages[1]["content"]
        assert sorted(c.messages[1]["content"].replace(" ", "")) == sorted(src.messages[1]["content"].replace(" ", ""))
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"instruction": q, "output": a}, ensure_ascii=False) + "\n" for q, a in qa * 4),
                    encoding="utf-8")
    model = tiny_llama(tmp_path / "base", trained_dir)
    summary = run_finetune(FinetuneConfig(model=str(model), data=str(data), out=str(tmp_path / "run"), max_steps=1,
                                          batch_size=4, max_length=64, progress=False, samples=0, val_fraction=0.25,
                                          augment=["swap", "punct"], augment_per_record=2, augment_synonyms="none"))
    assert summary["data"]["train"]["examples"] > 9 and summary["data"]["val"]["examples"] == 3  # val untouched
