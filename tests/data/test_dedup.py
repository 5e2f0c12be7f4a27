"""MinHash/LSH deduplication against exact Jaccard, datasketch's parameter choice, the
S-curve, a reference union-find and hand-worked keep policies."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmforge.data import dedup as D
from tests.corpora import chinese_news, english


def _word_ngrams(text: str, n: int) -> set:
    words = D.normalize_for_dedup(text).split()
    return {tuple(words[i:i + n]) for i in range(max(1, len(words) - n + 1))} if words else set()


def _char_ngrams(text: str, n: int) -> set:
    letters = D.normalize_for_dedup(text).replace(" ", "")
    return {letters[i:i + n] for i in range(max(1, len(letters) - n + 1))} if letters else set()


def _jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b)


def _paragraphs(text: str, min_words: int = 40) -> list[str]:
    return [p for p in text.split("\n\n") if len(p.split()) >= min_words]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60), min_size=1, max_size=8))
def test_vectorised_normalisation_equals_the_string_form(texts):
    # the vectorised shingler sees the same words as the string normalisation
    for t in texts:
        words = [w for w in D.normalize_for_dedup(t).split(" ") if w]
        hashes, offsets = D.shingle_hashes([t], 1, "word")
        assert offsets[1] == len(words)
        assert len(set(hashes.tolist())) == len(set(words))


def test_shingler_and_string_normalisation_agree_on_every_code_point():
    """One character class per code point in both paths: the CJK class used to override the separator class for 528
    code points (CJK radicals, ideographic punctuation and symbols), so the two disagreed on text holding them."""
    cls, _ = D._build_tables()
    disagree = [c for c in range(1, 0x110000) if not 0xD800 <= c < 0xE000 and c != 10
                and bool(D._SEP_CHAR.fullmatch(chr(c))) != (cls[c] == D._SEP)]
    assert disagree == []
    # the example the review found: a radical between Chinese words is a word break in both paths
    text = "中文\u2e80字符\u3001测试\u30fb词"
    words = [w for w in D.normalize_for_dedup(text).split(" ") if w]
    hashes, offsets = D.shingle_hashes([text], 1, "word")
    assert offsets[1] == len(words) == 4


def test_word_shingles_match_python_ngram_sets():
    docs = _paragraphs(english())[:30]
    hashes, offsets = D.shingle_hashes(docs, 5, "word")
    for i, doc in enumerate(docs):
        words = D.normalize_for_dedup(doc).split()
        assert offsets[i + 1] - offsets[i] == max(1, len(words) - 4)
    # set-level Jaccard from hashes equals Jaccard of the n-gram tuples themselves
    for i in range(0, 28, 2):
        a, b = docs[i], docs[i] + " " + docs[i + 1]
        ha, hb = D.shingle_hashes([a], 5, "word")[0], D.shingle_hashes([b], 5, "word")[0]
        assert D.exact_jaccard(ha, hb) == pytest.approx(_jaccard(_word_ngrams(a, 5), _word_ngrams(b, 5)))


def test_case_punctuation_and_spacing_do_not_change_shingles():
    a = "The Quick, brown fox -- jumps over the lazy dog!"
    b = "the quick brown   fox jumps\nover THE lazy dog"
    ha, _ = D.shingle_hashes([a], 3, "word")
    hb, _ = D.shingle_hashes([b], 3, "word")
    assert sorted(ha) == sorted(hb)
    zh1, zh2 = "今天天气很好，我们去公园散步吧。", "今天天气很好 我们去公园散步吧"
    assert sorted(D.shingle_hashes([zh1], 3)[0]) == sorted(D.shingle_hashes([zh2], 3)[0])


def test_unicode_variants_normalise_alike():
    # composed/decomposed accents, full-width forms, ligatures, Hangul jamo: NFKC + lower case
    pairs = [("café résumé naïve", "cafe\u0301 re\u0301sume\u0301 nai\u0308ve"), ("ＦＵＬＬ ｗｉｄｔｈ", "full width"),
             ("ﬁne ﬂow", "fine flow"), ("하나 둘", "\u1112\u1161\u1102\u1161 \u1103\u116e\u11af")]
    for a, b in pairs:
        assert sorted(D.shingle_hashes([a], 2, "word")[0]) == sorted(D.shingle_hashes([b], 2, "word")[0]), (a, b)
        assert D.normalize_for_dedup(a) == D.normalize_for_dedup(b)


def test_auto_unit_uses_characters_for_chinese():
    news = [p for p in chinese_news().split("\n") if len(p) > 80][:20]
    hashes, offsets = D.shingle_hashes(news, 5, "auto")
    for i, doc in enumerate(news):
        assert offsets[i + 1] - offsets[i] == max(1, len(D.normalize_for_dedup(doc).replace(" ", "")) - 4)
    a, b = news[0], news[0][:60] + news[1][:40]
    ha, hb = D.shingle_hashes([a], 5)[0], D.shingle_hashes([b], 5)[0]
    assert D.exact_jaccard(ha, hb) == pytest.approx(_jaccard(_char_ngrams(a, 5), _char_ngrams(b, 5)))


def test_short_and_empty_texts():
    hashes, offsets = D.shingle_hashes(["one two", "", "!!!", "a b c d e f"], 5, "word")
    assert np.diff(offsets).tolist() == [1, 0, 0, 2]
    sig = D.MinHasher(16).signatures(["", "x y z"])
    assert D.is_empty(sig).tolist() == [True, False]


def test_minhash_estimates_jaccard_within_statistical_bounds():
    rng = np.random.default_rng(0)
    hasher = D.MinHasher(num_perm=256, seed=3)
    errors = []
    for _ in range(200):  # random sets with Jaccard spread over (0, 1)
        shared = rng.integers(0, 2**32, rng.integers(20, 200), dtype=np.uint64).astype(np.uint32)
        only_a = rng.integers(0, 2**32, rng.integers(0, 150), dtype=np.uint64).astype(np.uint32)
        only_b = rng.integers(0, 2**32, rng.integers(0, 150), dtype=np.uint64).astype(np.uint32)
        a, b = np.concatenate([shared, only_a]), np.concatenate([shared, only_b])
        j = D.exact_jaccard(a, b)
        hashes = np.concatenate([a, b])
        sig = hasher.signatures_from_hashes(hashes, np.array([0, len(a), len(a) + len(b)]))
        est = D.estimate_jaccard(sig[0], sig[1])
        sd = np.sqrt(j * (1 - j) / 256)
        assert abs(est - j) <= 4.5 * sd + 1e-9
        errors.append(est - j)
    # unbiased: the mean error is within 4 standard errors of 0
    assert abs(np.mean(errors)) < 4 * np.std(errors) / np.sqrt(len(errors)) + 1e-3


def test_lsh_params_match_datasketch():
    from datasketch.lsh import _optimal_param

    for threshold in (0.5, 0.7, 0.8, 0.9):
        for num_perm in (64, 128, 256):
            assert D.lsh_params(threshold, num_perm) == _optimal_param(threshold, num_perm, 0.5, 0.5)


def test_candidate_probability_follows_the_s_curve():
    rng = np.random.default_rng(1)
    bands, rows, trials = 8, 4, 400
    for s in (0.3, 0.5, 0.7):
        hits = 0
        for t in range(trials):
            n_union = 60
            n_shared = int(round(s * n_union))
            universe = rng.integers(0, 2**32, n_union + n_union, dtype=np.uint64).astype(np.uint32)
            shared = universe[:n_shared]
            rest = universe[n_shared:n_union + (n_union - n_shared)]
            half = (n_union - n_shared) // 2
            a = np.concatenate([shared, rest[:half]])
            b = np.concatenate([shared, rest[half:2 * half]])
            jac = D.exact_jaccard(a, b)
            sig = D.MinHasher(bands * rows, seed=t).signatures_from_hashes(np.concatenate([a, b]),
                                                                          np.array([0, len(a), len(a) + len(b)]))
            hits += len(D.candidate_pairs(sig, bands, rows)) == 1
        p = 1 - (1 - jac ** rows) ** bands
        assert abs(hits / trials - p) < 4 * np.sqrt(p * (1 - p) / trials) + 0.02, (s, hits / trials, p)


def _reference_components(n: int, pairs) -> np.ndarray:
    parent = list(range(n))

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in pairs:
        ra, rb = find(int(a)), find(int(b))
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return np.array([min(i for i in range(n) if find(i) == find(x)) for x in range(n)])


def test_connected_components_equal_union_find():
    rng = np.random.default_rng(2)
    for _ in range(20):
        n = int(rng.integers(2, 60))
        pairs = rng.integers(0, n, (int(rng.integers(0, 2 * n)), 2))
        assert D.connected_components(n, pairs).tolist() == _reference_components(n, pairs).tolist()


def test_keep_policies():
    labels = np.array([0, 1, 0, 3, 1, 0])  # clusters {0,2,5}, {1,4}, {3}
    lengths = np.array([5, 9, 7, 1, 9, 7])
    scores = np.array([0.1, 0.2, 0.9, 0.5, 0.8, np.nan])
    kept, cluster = D.choose_kept(labels, "first")
    assert kept.tolist() == [True, True, False, True, False, False]
    assert cluster.tolist() == [0, 1, 0, -1, 1, 0]
    kept, cluster = D.choose_kept(labels, "longest", lengths=lengths)
    assert kept.tolist() == [False, True, True, True, False, False]  # 2 and 5 tie at 7: the earlier wins
    assert cluster.tolist() == [2, 1, 2, -1, 1, 2]
    kept, _ = D.choose_kept(labels, "score", scores=scores)
    assert kept.tolist() == [False, False, True, True, True, False]


def test_near_duplicates_end_to_end_with_verification():
    base = []
    for p in _paragraphs(english(), 80):  # the reference repeats itself here and there: distinct ones only
        if all(_jaccard(_word_ngrams(p, 5), _word_ngrams(q, 5)) < 0.3 for q in base):
            base.append(p)
    base = base[:60]
    texts, family = [], []
    for i, doc in enumerate(base):
        texts.append(doc)
        family.append(i)
        words = doc.split()
        # light edits (Jaccard >= 0.95, where LSH finds a pair with probability ~1): a word
        # appended, the first word replaced
        texts += [" ".join(words + ["appended"]), " ".join(["replaced"] + words[1:])]
        family += [i, i]
    result = D.near_duplicates(texts, threshold=0.8, verify=True)
    family = np.array(family)
    assert result.keep.sum() == len(base)
    # one survivor per family, and it is the original (keep=first)
    assert set(np.flatnonzero(result.keep)) == {family.tolist().index(i) for i in range(len(base))}
    for i, j in result.pairs:
        assert family[i] == family[j]
        assert _jaccard(_word_ngrams(texts[i], 5), _word_ngrams(texts[j], 5)) >= 0.8


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12), min_size=1, max_size=12))
def test_exact_keys_group_texts_as_the_string_normal_form_does(texts):
    # exact_keys hashes the vectorised normal form: two texts share a key exactly when normalize_for_dedup says
    # they are equal (hypothesis draws short texts from every script, so collisions are common)
    texts = texts + [t.upper() for t in texts] + [f" {t}. " for t in texts]
    keys = D.exact_keys(texts).tolist()
    forms = [D.normalize_for_dedup(t) for t in texts]
    for i in range(len(texts)):
        for j in range(i + 1, len(texts)):
            assert (keys[i] == keys[j]) == (forms[i] == forms[j]), (texts[i], texts[j])


def test_exact_keys_on_real_text_equal_the_string_normal_form():
    docs = _paragraphs(english())[:200] + [p for p in chinese_news(100_000).split("\n") if p][:200]
    variants = docs + [d.upper() for d in docs[::3]] + [d.replace(" ", "  ").replace("，", ",") for d in docs[1::3]]
    keys = D.exact_keys(variants).tolist()
    forms = [D.normalize_for_dedup(t) for t in variants]
    groups_by_key, groups_by_form = {}, {}
    for i, (k, f) in enumerate(zip(keys, forms)):
        groups_by_key.setdefault(k, set()).add(i)
        groups_by_form.setdefault(f, set()).add(i)
    assert sorted(map(sorted, groups_by_key.values())) == sorted(map(sorted, groups_by_form.values()))
    assert len(groups_by_form) < len(variants)  # the variants did collapse


def test_verified_components_equal_verifying_every_pair():
    # skipping pairs already joined must not change the components
    rng = np.random.default_rng(3)
    for _ in range(30):
        n = int(rng.integers(2, 300))
        pairs = np.unique(np.sort(rng.integers(0, n, (int(rng.integers(0, 6 * n)), 2)), axis=1), axis=0)
        pairs = pairs[pairs[:, 0] != pairs[:, 1]]
        salt = int(rng.integers(1, 1000))
        calls = []

        def verify(p, calls=calls, salt=salt):
            calls.append(len(p))
            return p[(p[:, 0] * 7919 + p[:, 1] * 104729 + salt) % 3 != 0]

        labels, confirmed, checked = D.verified_components(n, pairs, verify, first_batch=8)
        assert labels.tolist() == D.connected_components(n, verify(pairs)).tolist()
        assert checked == sum(calls[:-1]) <= len(pairs)
        assert D.connected_components(n, confirmed).tolist() == labels.tolist()


def test_exact_keys():
    k = D.exact_keys(["Hello, World!", "hello world", "hello  world.", "hello there", "你好，世界", "你好 世界"])
    assert k[0] == k[1] == k[2] != k[3]
    assert k[4] == k[5]


def test_candidate_pairs_equal_brute_force_band_matching():
    rng = np.random.default_rng(5)
    sig = rng.integers(0, 4, (80, 12), dtype=np.uint64).astype(np.uint32)  # few values: many collisions
    bands, rows = 4, 3
    expected = {(i, j) for i in range(80) for j in range(i + 1, 80)
                if any((sig[i, b * rows:(b + 1) * rows] == sig[j, b * rows:(b + 1) * rows]).all() for b in range(bands))}
    got = {tuple(p) for p in D.candidate_pairs(sig, bands, rows, max_bucket_pairs=1000).tolist()}
    assert got == expected
    # above the bucket cap each bucket is a star: still connects every member
    capped = D.candidate_pairs(sig, bands, rows, max_bucket_pairs=3)
    assert (D.connected_components(80, capped) == D.connected_components(80, np.array(sorted(expected)))).all()


def test_verify_pairs_equals_exact_jaccard():
    docs = _paragraphs(english())[:40]
    texts = docs + [d + " one more sentence at the end of it" for d in docs]
    pairs = np.array([(i, i + 40) for i in range(0, 40, 2)] + [(i, j) for i in range(0, 80, 3) for j in range(i + 1, 80, 7)])
    kept = {tuple(p) for p in D.verify_pairs(texts, pairs, 0.8, 5, "word").tolist()}
    expected = {(int(i), int(j)) for i, j in pairs if _jaccard(_word_ngrams(texts[i], 5), _word_ngrams(texts[j], 5)) >= 0.8}
    assert kept == expected and expected
