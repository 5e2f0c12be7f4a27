"""Metrics that give the same numbers as the libraries people cite, on the same inputs.

  text        bleu, chrf (= sacrebleu's corpus_bleu / corpus_chrf, incl. its 13a and zh tokenizers), ter (sacrebleu's
              own code), rouge (= rouge-score's rouge1/2/L/Lsum F-measure, averaged over pairs)
  labels      accuracy, precision / recall / F1 (binary, macro, micro, weighted, per class), ROC-AUC, MCC,
              confusion matrix (= scikit-learn)
  entities    entity-level precision / recall / F1 of BIO tags, per type and averaged (= seqeval, default and
              strict IOB2 modes)
  regression  MSE, MAE, R² (= scikit-learn)
  calibration negative log-likelihood of logits (= scikit-learn's log_loss of their softmax), expected calibration
              error, the softmax temperature that minimises the NLL (temperature scaling)
  QA          SQuAD exact match and token F1 (the official SQuAD v2 script's normalisation)
  code        pass@k (the unbiased estimator of Chen et al. 2021)

Chinese is handled by default where the reference library does not: BLEU with tokenize="auto" picks sacrebleu's `zh`
tokenizer when the references hold Chinese (sacrebleu's default `13a` gives 0.0 BLEU on a close Chinese pair), ROUGE
and SQuAD F1 count CJK characters as tokens (rouge-score drops every non-ASCII character, so two identical Chinese
sentences score 0.0). English inputs get exactly the reference library's numbers.
Scores are on sacrebleu's 0-100 scale for BLEU/chrF/TER and 0-1 for everything else.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import regex

from lmforge.text import CJK_CHAR

# ---------------------------------------------------------------------------------------------------------------------
# BLEU and chrF (sacrebleu 2.x)

# sacrebleu's TokenizerRegexp: the post-processing of the 13a and zh tokenizers (mteval-v13a.pl)
_13A_RULES = [
    (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),
]

# sacrebleu's tokenizer_zh ranges, compared as strings exactly as it does: '\u20000' is the two characters
# '\u2000' '0', so that range covers U+2001..U+2A6D (general punctuation and more); kept for equal scores
_ZH_RANGES = [("\u3400", "\u4db5"), ("\u4e00", "\u9fa5"), ("\u9fa6", "\u9fbb"), ("\uf900", "\ufa2d"),
              ("\ufa30", "\ufa6a"), ("\ufa70", "\ufad9"), ("\u20000", "\u2a6d6"), ("\u2f800", "\u2fa1d"),
              ("\uff00", "\uffef"), ("\u2e80", "\u2eff"), ("\u3000", "\u303f"), ("\u31c0", "\u31ef"),
              ("\u2f00", "\u2fdf"), ("\u2ff0", "\u2fff"), ("\u3100", "\u312f"), ("\u31a0", "\u31bf"),
              ("\ufe10", "\ufe1f"), ("\ufe30", "\ufe4f"), ("\u2600", "\u26ff"), ("\u2700", "\u27bf"),
              ("\u3200", "\u32ff"), ("\u3300", "\u33ff")]


@lru_cache(maxsize=1 << 16)
def _is_zh_char(c: str) -> bool:
    return any(start <= c <= end for start, end in _ZH_RANGES)


def _regexp_tokenize(line: str) -> str:
    for rule, repl in _13A_RULES:
        line = rule.sub(repl, line)
    return " ".join(line.split())


def tokenize_13a(line: str) -> str:
    """sacrebleu's default `13a` tokenizer (mteval-v13a)."""
    line = line.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    if "&" in line:
        line = line.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    return _regexp_tokenize(f" {line} ")


def tokenize_zh(line: str) -> str:
    """sacrebleu's `zh` tokenizer: every Chinese character (its ranges) is a token, the rest as 13a's rules."""
    line = line.strip()
    return _regexp_tokenize("".join(f" {c} " if _is_zh_char(c) else c for c in line))


BLEU_TOKENIZERS = {"13a": tokenize_13a, "zh": tokenize_zh, "none": lambda s: s,
                   "char": lambda s: " ".join(s.replace(" ", ""))}


def has_cjk(texts: Sequence[str], sample: int = 200) -> bool:
    """True when any of the first `sample` texts holds a CJK character (the script decides the tokenizer)."""
    return any(CJK_CHAR.search(t) for t in texts[:sample] if t)


def _references(refs: Sequence[str] | Sequence[Sequence[str]], n: int, what: str) -> list[list[str]]:
    """References per hypothesis: a list of strings (one each) or a list of reference streams (sacrebleu's
    layout: refs[k][i] is the k-th reference of hypothesis i)."""
    streams = [list(refs)] if refs and isinstance(refs[0], str) else [list(s) for s in refs]
    for k, s in enumerate(streams):
        if len(s) != n:
            raise ValueError(f"{what}: {n} hypotheses but reference stream {k} has {len(s)} lines")
    return [[s[i] for s in streams if s[i] is not None] for i in range(n)]


def _word_ngrams(tokens: list[str], order: int) -> Counter:
    grams = Counter()
    for n in range(1, order + 1):
        grams.update(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
    return grams


def _closest(hyp_len: int, ref_lens: list[int]) -> int:
    best_diff, best = -1, -1
    for r in ref_lens:
        d = abs(hyp_len - r)
        if best_diff == -1 or d < best_diff or (d == best_diff and r < best):
            best_diff, best = d, r
    return best


def bleu(hypotheses: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]], tokenize: str = "auto",
         lowercase: bool = False, smooth: str = "exp", smooth_value: float | None = None, max_order: int = 4,
         effective_order: bool = False) -> dict:
    """Corpus BLEU (0-100) with sacrebleu's defaults. `tokenize="auto"` is `zh` when the references hold CJK text
    and `13a` otherwise; any sacrebleu tokenizer name lmforge implements ("13a", "zh", "char", "none") may be given.
    Returns score, the n-gram precisions, brevity penalty, lengths and the tokenizer used."""
    refs = _references(references, len(hypotheses), "bleu")
    if tokenize == "auto":
        tokenize = "zh" if has_cjk([r for rs in refs for r in rs[:1]]) else "13a"
    if tokenize not in BLEU_TOKENIZERS:
        raise ValueError(f"bleu: unknown tokenizer {tokenize!r} (one of auto, {', '.join(BLEU_TOKENIZERS)})")
    tok = BLEU_TOKENIZERS[tokenize]
    cache: dict[str, list[str]] = {}

    def prep(s: str) -> list[str]:
        if lowercase:
            s = s.lower()
        s = s.rstrip()
        out = cache.get(s)
        if out is None:
            out = cache[s] = tok(s).split()
        return out

    correct, total = [0] * max_order, [0] * max_order
    sys_len = ref_len = 0
    for hyp, rs in zip(hypotheses, refs):
        ref_grams: Counter | None = None
        lens = []
        for r in rs:
            toks = prep(r)
            lens.append(len(toks))
            grams = _word_ngrams(toks, max_order)
            if ref_grams is None:
                ref_grams = grams
            else:
                for g, c in grams.items():
                    if c > ref_grams[g]:
                        ref_grams[g] = c
        ref_grams = ref_grams or Counter()
        htoks = prep(hyp)
        sys_len += len(htoks)
        ref_len += _closest(len(htoks), lens)
        for g, c in _word_ngrams(htoks, max_order).items():
            n = len(g) - 1
            total[n] += c
            m = ref_grams.get(g)
            if m:
                correct[n] += min(c, m)
    return _bleu_from_stats(correct, total, sys_len, ref_len, smooth, smooth_value, effective_order, max_order) \
        | {"tokenize": tokenize}


def _bleu_from_stats(correct, total, sys_len, ref_len, smooth, smooth_value, effective_order, max_order) -> dict:
    """sacrebleu's BLEU.compute_bleu on the corpus counts."""
    defaults = {"none": None, "floor": 0.1, "add-k": 1, "exp": None}
    if smooth not in defaults:
        raise ValueError(f"bleu: unknown smoothing {smooth!r} (one of {', '.join(defaults)})")
    value = defaults[smooth] if smooth_value is None else smooth_value
    correct, total = list(correct), list(total)
    bp = 1.0
    if sys_len < ref_len:
        bp = math.exp(1 - ref_len / sys_len) if sys_len > 0 else 0.0
    precisions = [0.0] * max_order
    out = {"bp": bp, "sys_len": sys_len, "ref_len": ref_len, "counts": correct, "totals": total}
    if not any(correct):
        return {"score": 0.0, "precisions": precisions} | out
    smooth_mteval, eff = 1.0, max_order
    for n in range(1, max_order + 1):
        if smooth == "add-k" and n > 1:
            correct[n - 1] += value
            total[n - 1] += value
        if total[n - 1] == 0:
            break
        if effective_order:
            eff = n
        if correct[n - 1] == 0:
            if smooth == "exp":
                smooth_mteval *= 2
                precisions[n - 1] = 100.0 / (smooth_mteval * total[n - 1])
            elif smooth == "floor":
                precisions[n - 1] = 100.0 * value / total[n - 1]
        else:
            precisions[n - 1] = 100.0 * correct[n - 1] / total[n - 1]
    log = sum(math.log(p) if p > 0 else -9999999999 for p in precisions[:eff])
    return {"score": bp * math.exp(log / eff), "precisions": precisions} | out


def _char_ngrams(line: str, order: int, whitespace: bool) -> list[Counter]:
    if not whitespace:
        line = "".join(line.split())
    return [Counter(line[i:i + n] for i in range(len(line) - n + 1)) for n in range(1, order + 1)]


_PUNCT = set('!"#$%&\'()*+,-./:;<=>?@[\\]^_`{|}~')


def _chrf_words(line: str) -> list[str]:
    """sacrebleu's CHRF._remove_punctuation: a word's leading or trailing punctuation mark is split off."""
    out = []
    for w in line.split():
        if len(w) == 1:
            out.append(w)
        elif w[-1] in _PUNCT:
            out += [w[:-1], w[-1]]
        elif w[0] in _PUNCT:
            out += [w[0], w[1:]]
        else:
            out.append(w)
    return out


def _chrf_f(stats: list[int], order: int, beta: float, eps_smoothing: bool) -> float:
    eps, factor = 1e-16, beta ** 2
    score, eff, avg_p, avg_r = 0.0, 0, 0.0, 0.0
    for i in range(order):
        n_hyp, n_ref, n_match = stats[3 * i: 3 * i + 3]
        p = n_match / n_hyp if n_hyp > 0 else eps
        r = n_match / n_ref if n_ref > 0 else eps
        denom = factor * p + r
        score += ((1 + factor) * p * r / denom) if denom > 0 else eps
        if n_hyp > 0 and n_ref > 0:
            avg_p += p
            avg_r += r
            eff += 1
    if eps_smoothing:
        return 100 * score / order
    if eff == 0:
        return 0.0
    avg_p, avg_r = avg_p / eff, avg_r / eff
    if avg_p + avg_r:
        return 100 * (1 + factor) * avg_p * avg_r / (factor * avg_p + avg_r)
    return 0.0


def chrf(hypotheses: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]], char_order: int = 6,
         word_order: int = 0, beta: float = 2, lowercase: bool = False, whitespace: bool = False,
         eps_smoothing: bool = False) -> dict:
    """Corpus chrF (0-100) as sacrebleu's corpus_chrf (word_order=2 gives chrF++). Characters need no tokenizer, so
    Chinese works as it is."""
    refs = _references(references, len(hypotheses), "chrf")
    order = char_order + word_order
    totals = [0] * (3 * order)

    def grams(s: str) -> list[Counter]:
        s = s.lower() if lowercase else s
        out = _char_ngrams(s, char_order, whitespace)
        if word_order:
            words = _chrf_words(s)
            out += [Counter(" ".join(words[i:i + n]) for i in range(len(words) - n + 1))
                    for n in range(1, word_order + 1)]
        return out

    for hyp, rs in zip(hypotheses, refs):
        h = grams(hyp)
        best, best_f = [], -1.0
        for r in rs:
            stats = []
            for hg, rg in zip(h, grams(r)):
                match = sum(min(c, rg[g]) for g, c in hg.items() if g in rg)
                stats += [sum(hg.values()), sum(rg.values()), match]
            f = _chrf_f(stats, order, beta, eps_smoothing)
            if f > best_f:
                best_f, best = f, stats
        for i, v in enumerate(best):
            totals[i] += v
    return {"score": _chrf_f(totals, order, beta, eps_smoothing), "char_order": char_order, "word_order": word_order,
            "beta": beta}


def ter(hypotheses: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]], **kw) -> dict:
    """Corpus TER (0-100, lower is better), computed by sacrebleu's own TER (its shift search is the reference
    algorithm; lmforge does not re-implement it). Keyword arguments go to sacrebleu.metrics.TER."""
    try:
        from sacrebleu.metrics import TER
    except ImportError as e:
        raise ImportError("TER needs sacrebleu: pip install 'lmforge[eval]'") from e
    refs = [list(references)] if references and isinstance(references[0], str) else [list(s) for s in references]
    score = TER(**kw).corpus_score(list(hypotheses), refs)
    return {"score": score.score, "num_edits": score.num_edits, "ref_length": score.ref_length}


# ---------------------------------------------------------------------------------------------------------------------
# ROUGE (rouge-score 0.1.x)

_NON_ALNUM = re.compile(r"[^a-z0-9]+")
_CJK_OR_ALNUM = regex.compile(r"[a-z0-9]+|" + CJK_CHAR.pattern)


@lru_cache(maxsize=1)
def _porter():
    try:
        from nltk.stem import porter
    except ImportError as e:
        raise ImportError("ROUGE with stemming uses nltk's Porter stemmer (as rouge-score does): "
                          "pip install 'lmforge[eval]'") from e
    return porter.PorterStemmer()


def rouge_tokens(text: str, stem: bool = False, chinese: str = "auto") -> list[str]:
    """rouge-score's tokenizer (lowercase, runs of [a-z0-9], Porter stem for words over 3 letters). With CJK text
    (chinese="auto" and CJK present, or chinese="char") every CJK character is a token too; chinese="jieba" cuts
    Chinese into jieba words instead; chinese="ignore" is rouge-score exactly (CJK dropped)."""
    text = text.lower()
    if chinese == "ignore" or (chinese == "auto" and not CJK_CHAR.search(text)):
        tokens = [t for t in _NON_ALNUM.sub(" ", text).split() if t]
    elif chinese == "jieba":
        from lmforge.text import jieba

        tokens = []
        for w in jieba().lcut(text):
            if CJK_CHAR.match(w):
                tokens.append(w)
            else:
                tokens += _NON_ALNUM.sub(" ", w).split()
    elif chinese in ("auto", "char"):
        tokens = _CJK_OR_ALNUM.findall(text)
    else:
        raise ValueError(f"rouge: chinese={chinese!r} (one of auto, char, jieba, ignore)")
    if stem:
        st = _porter()
        tokens = [st.stem(t) if len(t) > 3 and not CJK_CHAR.match(t) else t for t in tokens]
        tokens = [t for t in tokens if t]
    return tokens


def lcs_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence, bit-parallel (Hyyrö 2004): one big-integer add per element of b,
    so O(len(a) * len(b) / 64) instead of the O(len(a) * len(b)) table."""
    if len(a) < len(b):
        a, b = b, a
    if not b:
        return 0
    masks: dict = {}
    for i, x in enumerate(a):
        masks[x] = masks.get(x, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for y in b:
        m = masks.get(y)
        if m:
            u = v & m
            v = ((v + u) | (v - u)) & full
    return len(a) - v.bit_count()


def _lcs_indices(ref: list[str], can: list[str]) -> list[int]:
    """rouge-score's lcs_ind: the reference indices of one LCS, read back from the DP table (its tie rule)."""
    rows, cols = len(ref), len(can)
    t = [[0] * (cols + 1) for _ in range(rows + 1)]
    for i in range(1, rows + 1):
        ri, prev, cur = ref[i - 1], t[i - 1], t[i]
        for j in range(1, cols + 1):
            cur[j] = prev[j - 1] + 1 if ri == can[j - 1] else (prev[j] if prev[j] > cur[j - 1] else cur[j - 1])
    out, i, j = [], rows, cols
    while i > 0 and j > 0:
        if ref[i - 1] == can[j - 1]:
            out.append(i - 1)
            i -= 1
            j -= 1
        elif t[i][j - 1] > t[i - 1][j]:
            j -= 1
        else:
            i -= 1
    return out[::-1]


def _f(p: float, r: float) -> float:
    return 2 * p * r / (p + r) if p + r > 0 else 0.0


def _prf(hits: int, n_pred: int, n_ref: int) -> tuple[float, float, float]:
    p = hits / max(n_pred, 1)
    r = hits / max(n_ref, 1)
    return p, r, _f(p, r)


def _rouge_n(ref: list[str], pred: list[str], n: int) -> tuple[float, float, float]:
    rg = Counter(tuple(ref[i:i + n]) for i in range(len(ref) - n + 1))
    pg = Counter(tuple(pred[i:i + n]) for i in range(len(pred) - n + 1))
    hits = sum(min(c, pg[g]) for g, c in rg.items() if g in pg)
    return _prf(hits, sum(pg.values()), sum(rg.values()))


def _rouge_lsum(ref_sents: list[list[str]], pred_sents: list[list[str]]) -> tuple[float, float, float]:
    m, n = sum(map(len, ref_sents)), sum(map(len, pred_sents))
    if not ref_sents or not pred_sents or not m or not n:
        return 0.0, 0.0, 0.0
    cr, cc = Counter(), Counter()
    for s in ref_sents:
        cr.update(s)
    for s in pred_sents:
        cc.update(s)
    hits = 0
    for r in ref_sents:
        union = sorted(set().union(*[_lcs_indices(r, c) for c in pred_sents]))
        for t in (r[i] for i in union):
            if cc[t] > 0 and cr[t] > 0:
                hits += 1
                cc[t] -= 1
                cr[t] -= 1
    p, rec = hits / n, hits / m
    return p, rec, _f(p, rec)


ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def rouge_pair(prediction: str, reference: str, types: Sequence[str] = ROUGE_TYPES, stem: bool = False,
               chinese: str = "auto") -> dict[str, tuple[float, float, float]]:
    """(precision, recall, F) per ROUGE type for one pair, as rouge_score.RougeScorer.score(reference, prediction).
    rougeLsum reads sentences from newlines, as rouge-score does without split_summaries."""
    toks = {}

    def tk(s):
        if s not in toks:
            toks[s] = rouge_tokens(s, stem, chinese)
        return toks[s]

    out = {}
    for t in types:
        if t == "rougeL":
            ref, pred = tk(reference), tk(prediction)
            if not ref or not pred:
                out[t] = (0.0, 0.0, 0.0)
            else:
                hits = lcs_length(ref, pred)
                p, r = hits / len(pred), hits / len(ref)
                out[t] = (p, r, _f(p, r))
        elif t == "rougeLsum":
            out[t] = _rouge_lsum([tk(s) for s in reference.split("\n") if s],
                                 [tk(s) for s in prediction.split("\n") if s])
        elif re.fullmatch(r"rouge[1-9]", t):
            out[t] = _rouge_n(tk(reference), tk(prediction), int(t[5:]))
        else:
            raise ValueError(f"rouge: unknown type {t!r} (rouge1..rouge9, rougeL, rougeLsum)")
    return out


def rouge(predictions: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]],
          types: Sequence[str] = ROUGE_TYPES, stem: bool = False, chinese: str = "auto") -> dict[str, float]:
    """Mean F-measure per ROUGE type over the pairs (what HF evaluate's `rouge` reports, without bootstrap).
    Several references per prediction: the best-scoring one per type, as rouge-score's score_multi."""
    if len(predictions) != (len(references)):
        raise ValueError(f"rouge: {len(predictions)} predictions but {len(references)} references")
    sums = dict.fromkeys(types, 0.0)
    for pred, ref in zip(predictions, references):
        refs = [ref] if isinstance(ref, str) else list(ref)
        scores = [rouge_pair(pred, r, types, stem, chinese) for r in refs]
        for t in types:
            sums[t] += max(s[t][2] for s in scores)
    n = max(len(predictions), 1)
    return {t: v / n for t, v in sums.items()}


# ---------------------------------------------------------------------------------------------------------------------
# classification and regression (scikit-learn's definitions)

def _labels(y_true, y_pred, labels=None) -> tuple[np.ndarray, np.ndarray, list]:
    yt, yp = np.asarray(y_true), np.asarray(y_pred)
    if yt.shape != yp.shape:
        raise ValueError(f"{len(yt)} true labels but {len(yp)} predictions")
    if labels is None:
        labels = sorted(set(yt.tolist()) | set(yp.tolist()))
    return yt, yp, list(labels)


def confusion_matrix(y_true, y_pred, labels=None) -> tuple[np.ndarray, list]:
    """(matrix, labels): matrix[i, j] = items of true label i predicted as j (scikit-learn's layout)."""
    yt, yp, labels = _labels(y_true, y_pred, labels)
    index = {v: i for i, v in enumerate(labels)}
    m = np.zeros((len(labels), len(labels)), dtype=np.int64)
    for t, p in zip(yt.tolist(), yp.tolist()):
        if t in index and p in index:
            m[index[t], index[p]] += 1
    return m, labels


def accuracy(y_true, y_pred) -> float:
    yt, yp, _ = _labels(y_true, y_pred)
    return float((yt == yp).mean()) if len(yt) else 0.0


def precision_recall_f1(y_true, y_pred, average: str | None = "macro", labels=None, pos_label=1,
                        beta: float = 1.0) -> dict:
    """precision, recall, f1 (F-beta) and support, as sklearn.metrics.precision_recall_fscore_support with
    zero_division=0: average "binary" (pos_label only), "macro", "micro", "weighted", or None (per class lists)."""
    m, labels = confusion_matrix(y_true, y_pred, labels)
    tp = np.diag(m).astype(float)
    pred, true = m.sum(0).astype(float), m.sum(1).astype(float)
    if average == "binary":
        if pos_label not in labels:
            raise ValueError(f"pos_label {pos_label!r} is not among the labels {labels}")
        i = labels.index(pos_label)
        tp, pred, true = tp[i:i + 1], pred[i:i + 1], true[i:i + 1]
    if average == "micro":
        tp, pred, true = tp.sum(keepdims=True), pred.sum(keepdims=True), true.sum(keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(pred > 0, tp / pred, 0.0)
        r = np.where(true > 0, tp / true, 0.0)
        b2 = beta * beta
        denom = b2 * p + r
        f = np.where(denom > 0, (1 + b2) * p * r / np.where(denom > 0, denom, 1), 0.0)
    if average is None:
        return {"labels": labels, "precision": p.tolist(), "recall": r.tolist(), "f1": f.tolist(),
                "support": true.astype(int).tolist()}
    if average == "weighted":
        w = true / true.sum() if true.sum() else np.zeros_like(true)
        return {"precision": float((p * w).sum()), "recall": float((r * w).sum()), "f1": float((f * w).sum())}
    if average in ("macro", "micro", "binary"):
        return {"precision": float(p.mean()), "recall": float(r.mean()), "f1": float(f.mean())}
    raise ValueError(f"average={average!r}: one of binary, macro, micro, weighted, None")


def matthews_corrcoef(y_true, y_pred) -> float:
    """MCC for two or more classes (scikit-learn's multiclass formula; 0.0 where it is undefined)."""
    m, _ = confusion_matrix(y_true, y_pred)
    t, p = m.sum(1).astype(float), m.sum(0).astype(float)
    c, s = float(np.trace(m)), float(m.sum())
    cov_ytyp = c * s - float(t @ p)
    cov_ypyp = s * s - float(p @ p)
    cov_ytyt = s * s - float(t @ t)
    if cov_ypyp * cov_ytyt == 0:
        return 0.0
    return cov_ytyp / math.sqrt(cov_ytyt * cov_ypyp)


def _binary_auc(y: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve = the Mann-Whitney U statistic with ties counted half (equal to sklearn's
    trapezoidal roc_auc_score)."""
    pos, neg = int(y.sum()), int(len(y) - y.sum())
    if pos == 0 or neg == 0:
        raise ValueError("ROC-AUC needs both classes among the true labels")
    order = np.argsort(score, kind="mergesort")
    s = score[order]
    ranks = np.empty(len(s), dtype=float)
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[i:j + 1] = (i + j) / 2 + 1
        i = j + 1
    r = np.empty(len(s))
    r[order] = ranks
    return float((r[y == 1].sum() - pos * (pos + 1) / 2) / (pos * neg))


def roc_auc(y_true, scores, labels=None, average: str = "macro") -> float:
    """ROC-AUC: binary (scores = probability of the positive class, labels 0/1 or the larger label positive) or
    multi-class one-vs-rest (scores (N, C) probabilities in `labels` order; macro or weighted average), as
    sklearn.metrics.roc_auc_score."""
    yt = np.asarray(y_true)
    sc = np.asarray(scores, dtype=float)
    if sc.ndim == 1:
        classes = sorted(set(yt.tolist()))
        if len(classes) != 2:
            raise ValueError(f"binary ROC-AUC needs 2 classes among the true labels, found {len(classes)}")
        return _binary_auc((yt == classes[1]).astype(int), sc)
    labels = sorted(set(yt.tolist())) if labels is None else list(labels)
    if sc.shape[1] != len(labels):
        raise ValueError(f"scores have {sc.shape[1]} columns for {len(labels)} classes")
    aucs = [_binary_auc((yt == c).astype(int), sc[:, i]) for i, c in enumerate(labels)]
    if average == "weighted":
        w = np.array([(yt == c).sum() for c in labels], dtype=float)
        return float(np.dot(aucs, w / w.sum()))
    return float(np.mean(aucs))


# ---------------------------------------------------------------------------------------------------------------------
# entities of BIO-tagged sequences (seqeval 1.2)

def _conll_end(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    if prev_tag in ("E", "S") or (prev_tag in ("B", "I") and tag in ("B", "S", "O")):
        return True
    return prev_tag not in ("O", ".") and prev_type != type_


def _conll_start(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    if tag in ("B", "S") or (prev_tag in ("E", "S", "O") and tag in ("E", "I")):
        return True
    return tag not in ("O", ".") and prev_type != type_


def entities(tags: Sequence[str], mode: str = "default") -> list[tuple[str, int, int]]:
    """(type, first, last) of every entity in one tag sequence ("B-PER", "I-PER", "O", ...; inclusive indices).

    mode "default": conlleval's chunking, as seqeval's default (an I- after O or after another type starts an
    entity). "strict": seqeval's mode="strict" with the IOB2 scheme: an entity is B- followed by I- of its type;
    a stray I- is no entity, and a tag other than B/I/O is an error."""
    if mode == "strict":
        out, i = [], 0
        parsed = []
        for t in tags:
            if t[:1] not in ("B", "I", "O"):
                raise ValueError(f"tag {t!r} is not IOB2 (B-, I- or O)")
            parsed.append((t[0], t[1:].strip("-") or "_"))
        while i < len(parsed):
            prefix, type_ = parsed[i]
            if prefix != "B":
                i += 1
                continue
            j = i + 1
            while j < len(parsed) and parsed[j] == ("I", type_):
                j += 1
            out.append((type_, i, j - 1))
            i = j
        return out
    if mode != "default":
        raise ValueError(f"mode={mode!r}: default or strict")
    chunks, prev_tag, prev_type, begin = [], "O", "", 0
    for i, chunk in enumerate(list(tags) + ["O"]):
        tag, type_ = chunk[0], chunk[1:].split("-", maxsplit=1)[-1] or "_"
        if _conll_end(prev_tag, tag, prev_type, type_):
            chunks.append((prev_type, begin, i - 1))
        if _conll_start(prev_tag, tag, prev_type, type_):
            begin = i
        prev_tag, prev_type = tag, type_
    return chunks


def entity_scores(y_true: Sequence[Sequence[str]], y_pred: Sequence[Sequence[str]], mode: str = "default") -> dict:
    """Entity-level scores of tagged sentences, as seqeval's classification_report(output_dict=True) (zero_division
    = 0): {"per_type": {TYPE: {precision, recall, f1, support}}, "micro", "macro", "weighted": {precision, recall,
    f1, support}, "accuracy": token accuracy}."""
    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} true sentences but {len(y_pred)} predicted")
    true_ents, pred_ents = set(), set()
    for s, (t, p) in enumerate(zip(y_true, y_pred)):
        if len(t) != len(p):
            raise ValueError(f"sentence {s}: {len(t)} true tags but {len(p)} predicted")
        true_ents |= {(s, *e) for e in entities(t, mode)}
        pred_ents |= {(s, *e) for e in entities(p, mode)}
    types = sorted({e[1] for e in true_ents | pred_ents})
    per_type = {}
    for ty in types:
        tt = {e for e in true_ents if e[1] == ty}
        pp = {e for e in pred_ents if e[1] == ty}
        p, r, f = _prf(len(tt & pp), len(pp), len(tt))
        per_type[ty] = {"precision": p, "recall": r, "f1": f, "support": len(tt)}
    p, r, f = _prf(len(true_ents & pred_ents), len(pred_ents), len(true_ents))
    support = len(true_ents)
    rows = list(per_type.values())
    macro = {k: float(np.mean([row[k] for row in rows])) if rows else 0.0 for k in ("precision", "recall", "f1")}
    weighted = {k: (sum(row[k] * row["support"] for row in rows) / support if support else 0.0)
                for k in ("precision", "recall", "f1")}
    flat_t = [x for t in y_true for x in t]
    flat_p = [x for p in y_pred for x in p]
    return {"per_type": per_type, "micro": {"precision": p, "recall": r, "f1": f, "support": support},
            "macro": {**macro, "support": support}, "weighted": {**weighted, "support": support},
            "accuracy": accuracy(flat_t, flat_p) if flat_t else 0.0}


def regression(y_true, y_pred) -> dict:
    """mse, mae, r2 (scikit-learn's r2_score: 1 - SS_res / SS_tot; 0.0 for a constant target predicted exactly
    wrong is -inf there too, so a constant target returns 1.0 if predicted exactly, else 0.0, as sklearn does)."""
    yt, yp = np.asarray(y_true, dtype=float), np.asarray(y_pred, dtype=float)
    if yt.shape != yp.shape:
        raise ValueError(f"{len(yt)} targets but {len(yp)} predictions")
    err = yt - yp
    ss_res, ss_tot = float((err ** 2).sum()), float(((yt - yt.mean()) ** 2).sum())
    r2 = (1.0 if ss_res == 0 else 0.0) if ss_tot == 0 else 1 - ss_res / ss_tot
    return {"mse": float((err ** 2).mean()), "mae": float(np.abs(err).mean()), "r2": r2}


def pearson(x, y) -> float:
    """Pearson's r (scipy.stats.pearsonr's statistic); nan when either side is constant."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    dx, dy = x - x.mean(), y - y.mean()
    denom = math.sqrt(float((dx * dx).sum()) * float((dy * dy).sum()))
    return float((dx * dy).sum()) / denom if denom else float("nan")


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given their mean rank (scipy.stats.rankdata's "average")."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=float)
    sorted_x = x[order]
    start = 0
    for end in range(1, len(x) + 1):
        if end == len(x) or sorted_x[end] != sorted_x[start]:
            ranks[order[start:end]] = (start + end + 1) / 2  # mean of ranks start+1 .. end
            start = end
    return ranks


def spearman(x, y) -> float:
    """Spearman's rho (scipy.stats.spearmanr's statistic): Pearson's r of the average ranks."""
    return pearson(_average_ranks(np.asarray(x, dtype=float)), _average_ranks(np.asarray(y, dtype=float)))


# ---------------------------------------------------------------------------------------------------------------------
# calibration of a classifier's probabilities

def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def negative_log_likelihood(logits, labels, temperature: float = 1.0) -> float:
    """Mean -log softmax(logits / temperature)[label] over the rows of (n, classes) logits, in nats (scikit-learn's
    log_loss of the softmax probabilities, computed from the logits so that no probability rounds to zero)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    y = np.asarray(labels, dtype=np.int64)
    return float(-_log_softmax(z)[np.arange(len(y)), y].mean())


def expected_calibration_error(probs, labels, bins: int = 10) -> float:
    """ECE (Guo et al. 2017): over equal-width bins (lo, hi] of the top probability (the confidence), the mean
    |accuracy - mean confidence| of each bin weighted by its share of the rows. `probs`: (n, classes)."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    confidence, predicted = p.max(axis=-1), p.argmax(axis=-1)
    correct = (predicted == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (confidence > lo) & (confidence <= hi)
        if inside.any():
            ece += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(ece)


def fit_temperature(logits, labels, low: float = 0.01, high: float = 100.0) -> float:
    """The softmax temperature T in (low, high) minimising `negative_log_likelihood(logits, labels, T)` (temperature
    scaling, Guo et al. 2017): one scalar, so the predicted class never changes. 1.0 where there is nothing to fit
    (fewer than two rows) or the minimum lies outside (low, high).

    The NLL is convex in b = 1 / T, with derivative mean(E_softmax(b z)[z] - z[label]) increasing in b, so its root
    is found by bisection (on log b, to float precision)."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if len(z) < 2:
        return 1.0
    target = z[np.arange(len(y)), y].mean()

    def slope(b: float) -> float:  # d NLL / d b
        p = np.exp(_log_softmax(b * z))
        return float((p * z).sum(axis=-1).mean() - target)

    lo, hi = math.log(1 / high), math.log(1 / low)
    if slope(math.exp(lo)) >= 0 or slope(math.exp(hi)) <= 0:
        return 1.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if slope(math.exp(mid)) < 0 else (lo, mid)
    return float(1 / math.exp((lo + hi) / 2))


# ---------------------------------------------------------------------------------------------------------------------
# SQuAD and pass@k

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT_TABLE = str.maketrans("", "", string.punctuation)


def normalize_answer(s: str) -> str:
    """The official SQuAD v2 script's normalize_answer: lower, drop punctuation, articles and extra spaces."""
    return " ".join(_ARTICLES.sub(" ", s.lower().translate(_PUNCT_TABLE)).split())


def _answer_tokens(s: str) -> list[str]:
    """SQuAD's tokens (normalised words); text with CJK counts each CJK character as a token (the CMRC rule),
    since Chinese has no spaces to split on."""
    norm = normalize_answer(s)
    if CJK_CHAR.search(norm):
        return [t for w in norm.split() for t in (list(w) if CJK_CHAR.search(w) else [w])]
    return norm.split()


def squad_f1(prediction: str, gold: str) -> float:
    p, g = _answer_tokens(prediction), _answer_tokens(gold)
    if not p or not g:
        return float(p == g)
    common = Counter(p) & Counter(g)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


def squad(predictions: Sequence[str], answers: Sequence[str | Sequence[str]]) -> dict:
    """exact_match and f1 (0-1) averaged over questions, each the best over its gold answers (SQuAD v2: a question
    with no gold answers is right only when the prediction is empty)."""
    em = f1 = 0.0
    for pred, gold in zip(predictions, answers):
        golds = [gold] if isinstance(gold, str) else [g for g in gold if normalize_answer(g)] or [""]
        em += max(float(normalize_answer(pred) == normalize_answer(g)) for g in golds)
        f1 += max(squad_f1(pred, g) for g in golds)
    n = max(len(predictions), 1)
    return {"exact_match": em / n, "f1": f1 / n}


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c pass: 1 - C(n-c, k) / C(n, k), in the stable product form."""
    if not 0 <= c <= n or k < 1:
        raise ValueError(f"pass@k needs 0 <= c <= n and k >= 1 (n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def exact_match(predictions: Sequence[str], references: Sequence[str], ignore_case: bool = False,
                ignore_punctuation: bool = False, regexes_to_ignore: Sequence[str] = ()) -> float:
    """Share of predictions equal to their reference after the same clean-up as HF evaluate's exact_match (which
    lm-evaluation-harness uses): regexes removed, then optional lowercasing and punctuation removal."""
    hits = 0
    for p, r in zip(predictions, references):
        for rx in regexes_to_ignore:
            p, r = re.sub(rx, "", p), re.sub(rx, "", r)
        if ignore_case:
            p, r = p.lower(), r.lower()
        if ignore_punctuation:
            p, r = p.translate(_PUNCT_TABLE), r.translate(_PUNCT_TABLE)
        hits += p == r
    return hits / max(len(predictions), 1)


# the metrics `score_texts` computes by name (`lmforge eval metrics --metric`)
TEXT_METRICS = ("bleu", "chrf", "chrf++", "ter", "rouge", "exact_match", "squad", "accuracy", "f1", "mcc")


def score_texts(names: Sequence[str], predictions: Sequence[str], references: Sequence[Sequence],
                tokenize: str = "auto", stem: bool = False, chinese: str = "auto") -> dict:
    """The metrics `names` (TEXT_METRICS) of `predictions` against line-aligned reference lists (`references[k][i]`:
    the k-th reference of item i; the label metrics and exact match read the first list). BLEU's tokenizer, ROUGE's
    stemming and Chinese handling as in `bleu` and `rouge_tokens`. Keys: bleu (+ bleu_tokenize), chrf, chrf++, ter,
    ROUGE's rouge1 / rouge2 / rougeL / rougeLsum, exact_match, squad_exact_match / squad_f1, accuracy,
    precision_macro / recall_macro / f1_macro, mcc."""
    refs = list(references)
    out: dict = {}
    for name in names:
        if name == "bleu":
            res = bleu(predictions, refs, tokenize=tokenize)
            out["bleu"], out["bleu_tokenize"] = res["score"], res["tokenize"]
        elif name in ("chrf", "chrf++"):
            out[name] = chrf(predictions, refs, word_order=2 if name == "chrf++" else 0)["score"]
        elif name == "ter":
            out["ter"] = ter(predictions, refs)["score"]
        elif name == "rouge":
            out |= rouge(predictions, list(zip(*refs)) if len(refs) > 1 else refs[0], stem=stem, chinese=chinese)
        elif name == "exact_match":
            out["exact_match"] = exact_match(predictions, refs[0])
        elif name == "squad":
            out |= {f"squad_{k}": v for k, v in squad(predictions, [list(g) for g in zip(*refs)]).items()}
        elif name == "accuracy":
            out["accuracy"] = accuracy(refs[0], predictions)
        elif name == "f1":
            out |= {f"{k}_macro": v for k, v in precision_recall_f1(refs[0], predictions, "macro").items()}
        elif name == "mcc":
            out["mcc"] = matthews_corrcoef(refs[0], predictions)
        else:
            raise ValueError(f"unknown metric {name!r}: one of {', '.join(TEXT_METRICS)}")
    return out
