"""Model-written augmentation: back-translation and paraphrase through a model client (lmforge.infer.client), for
lmforge.data.augment's `backtranslate` and `paraphrase` operations (that module, in the data layer below the model
clients, leaves their texts to a `ModelAugmenter` handed to it).

  backtranslate  the text translated into a pivot language, then back into its own (Sennrich et al. 2016; Xie et
                 al. 2020, UDA): the meaning stays, the wording changes
  paraphrase     the model asked to say the same thing in other words, in the same language

The model is lmforge's engine in this process (`EngineClient`, a model directory) or any OpenAI-compatible endpoint
(`HTTPClient`: lmforge serve, llama.cpp's server, vLLM, a hosted API). The prompts, English and Chinese, are all in
PROMPTS below: the instruction is in Chinese when the text (or either side of a translation) is Chinese. Replies
are sampled (temperature 0.7, top-p 0.95, the run's seed), so a record's several variants differ; each leg's
replies are cached in a JSONL file keyed by the model's name, the messages and the sampling options, so a rerun (a
new seed of the classifier, another learning rate) asks the model nothing it asked before.

A reply is cleaned of what chat models wrap around an answer (surrounding quotes, a "Here is the translation:"
line); an empty reply makes no record. Entity spans of tagged sentences (NER) cannot be carried through a rewrite,
so these operations refuse tagged records (lmforge.data.augment checks that). Pipeline steps do not run models, so
the `augment` step takes the other operations only.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import regex

from lmforge.data.augment import MODEL_OPS, AugmentError
from lmforge.text import LANGUAGES, is_mostly_cjk

# the prompts, by the language the instruction is written in; {src} / {tgt} are language names in that language
PROMPTS = {
    "translate": {
        "en": "Translate the following {src} text into {tgt}. Reply with the translation only.\n\n{text}",
        "zh": "将下面的{src}翻译成{tgt}。只回复译文。\n\n{text}",
    },
    "paraphrase": {
        "en": "Paraphrase the following text: say the same thing in different words, in the same language and "
              "tone. Reply with the new text only.\n\n{text}",
        "zh": "用不同的说法改写下面这段文字，意思、语气和语言保持不变。只回复改写后的文字。\n\n{text}",
    },
}
TEMPERATURE, TOP_P = 0.7, 0.95
_LEAD_IN = regex.compile(r"^(here is|here's|sure|translation|paraphrase|rewritten|译文|改写|以下是)[^\n]{0,60}[:：]\s*\n",
                         regex.IGNORECASE)
_QUOTES = {'"': '"', "'": "'", "“": "”", "「": "」", "『": "』", "‘": "’"}


def text_language(text: str, lang: str = "auto") -> str:
    """The text's language code: `lang` unless auto; auto is zh for mostly-CJK text, en otherwise."""
    return lang if lang != "auto" else ("zh" if is_mostly_cjk(text) else "en")


def pivot_language(source: str, pivot: str = "auto") -> str:
    """The language a back-translation goes through: `pivot`, or (auto) Chinese for English text, English else."""
    if pivot == "auto":
        return "zh" if source == "en" else "en"
    if pivot not in LANGUAGES:
        raise AugmentError(f"pivot: unknown language code {pivot!r} (known: {', '.join(LANGUAGES)})")
    return pivot


def translate_prompt(text: str, src: str, tgt: str) -> str:
    """The translation prompt: in Chinese when either side is Chinese (as finetune --task translate's)."""
    if src not in LANGUAGES:
        raise AugmentError(f"lang: back-translation needs a known language code, not {src!r} "
                           f"(known: {', '.join(LANGUAGES)})")
    lang = "zh" if "zh" in (src, tgt) else "en"
    column = 1 if lang == "zh" else 0
    return PROMPTS["translate"][lang].format(src=LANGUAGES[src][column], tgt=LANGUAGES[tgt][column], text=text)


def paraphrase_prompt(text: str, lang: str) -> str:
    return PROMPTS["paraphrase"]["zh" if lang == "zh" else "en"].format(text=text)


def clean_reply(text: str) -> str:
    """The answer in a reply: without a lead-in line ("Here is the translation:") and surrounding quotes."""
    text = _LEAD_IN.sub("", text.strip(), count=1).strip()
    if len(text) >= 2 and _QUOTES.get(text[0]) == text[-1] and text[0] not in text[1:-1]:
        text = text[1:-1].strip()
    return text


class ReplyCache:
    """Replies by request, in a JSONL file (one `{"key", "replies"}` a line, appended as they come): the key is a
    hash of the model's name, the messages and the sampling options."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path) if path else None
        self.replies: dict[str, list[str]] = {}
        if self.path is not None and self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                    self.replies[row["key"]] = list(row["replies"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a line cut short by an interrupted run: asked again

    @staticmethod
    def key(model: str, messages: list[dict], sampling, n: int) -> str:
        blob = json.dumps({"model": model, "messages": messages, "sampling": asdict(sampling), "n": n},
                          ensure_ascii=False, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def put(self, key: str, replies: list[str]) -> None:
        self.replies[key] = replies
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps({"key": key, "replies": replies}, ensure_ascii=False) + "\n")


class ModelAugmenter:
    """Back-translations and paraphrases of many texts, asked of `client` in batches (one `chat` call per leg and
    number of variants), through the reply cache."""

    def __init__(self, client, pivot: str = "auto", seed: int = 0, cache: str | os.PathLike | None = None,
                 max_tokens: int = 512, lang: str = "auto"):
        self.client, self.pivot, self.seed, self.max_tokens, self.lang = client, pivot, seed, max_tokens, lang
        self.cache = ReplyCache(cache)
        self.asked = 0  # requests sent to the model (cache misses)

    def _sampling(self, texts: Sequence[str]):
        from lmforge.infer.client import Sampling

        # room for a rewrite a good deal longer than its source (a Chinese character can be two tokens)
        longest = max(len(t) for t in texts)
        return Sampling(temperature=TEMPERATURE, top_p=TOP_P, max_tokens=min(self.max_tokens, 2 * longest + 32),
                        seed=self.seed)

    def _ask(self, prompts: list[str], n: int) -> list[list[str]]:
        """n cleaned replies per prompt (one user turn each), from the cache where it has them."""
        if not prompts:
            return []
        sampling = self._sampling(prompts)
        convs = [[{"role": "user", "content": p}] for p in prompts]
        keys = [ReplyCache.key(self.client.name, c, sampling, n) for c in convs]
        # a prompt asked twice in one batch (two equal translations on their way back) is sent once: the same
        # prompt with the same seed gets the same reply
        first: dict[str, int] = {}
        for i, k in enumerate(keys):
            if k not in self.cache.replies:
                first.setdefault(k, i)
        missing = list(first.values())
        if missing:
            answers = self.client.chat([convs[i] for i in missing], sampling, n=n)
            self.asked += len(missing)
            for i, answer in zip(missing, answers):
                self.cache.put(keys[i], [clean_reply(c.text) if c.error is None else "" for c in answer])
        return [self.cache.replies[k] for k in keys]

    def variants(self, op: str, texts: Sequence[str], counts: Sequence[int]) -> list[list[str]]:
        """`counts[i]` variants of `texts[i]` by `op` (an empty string where the model gave nothing)."""
        out: list[list[str]] = [[] for _ in texts]
        for n in sorted(set(counts)):
            idx = [i for i, c in enumerate(counts) if c == n and n > 0]
            if not idx:
                continue
            langs = [text_language(texts[i], self.lang) for i in idx]
            if op == "paraphrase":
                for i, replies in zip(idx, self._ask([paraphrase_prompt(texts[i], lang)
                                                      for i, lang in zip(idx, langs)], n)):
                    out[i] = replies
            elif op == "backtranslate":
                pivots = [pivot_language(lang, self.pivot) for lang in langs]
                forth = self._ask([translate_prompt(texts[i], lang, p) for i, lang, p in zip(idx, langs, pivots)], n)
                legs = [(k, j, reply) for k, replies in enumerate(forth) for j, reply in enumerate(replies) if reply]
                back = self._ask([translate_prompt(reply, pivots[k], langs[k]) for k, _, reply in legs], 1)
                for i in idx:
                    out[i] = [""] * n
                for (k, j, _), replies in zip(legs, back):
                    out[idx[k]][j] = replies[0]
            else:
                raise ValueError(f"not a model operation: {op}")
        return out


def client_from_options(model: str = "", endpoint: str = "", served_model: str = "default", api_key: str = ""):
    """The augmentation model's client: a model directory run in this process, or an OpenAI-compatible endpoint
    (its key from `api_key` or $OPENAI_API_KEY); exactly one of the two."""
    from lmforge.config import ConfigError

    if bool(model) == bool(endpoint):
        raise ConfigError("augment: backtranslate and paraphrase need a model: give --augment-model DIR (run in "
                          "this process) or --augment-endpoint URL (an OpenAI-compatible API), not both")
    from lmforge.infer.client import EngineClient, HTTPClient

    if endpoint:
        return HTTPClient(endpoint, served_model, api_key or os.environ.get("OPENAI_API_KEY"))
    return EngineClient(model)


def check_augment_options(cfg) -> None:
    """A classify / finetune config's model augmentation options (`augment`, `augment_model`, `augment_endpoint`):
    exactly one model where backtranslate / paraphrase are asked for, none where they are not."""
    from lmforge.config import ConfigError

    wanted = [op for op in cfg.augment if op in MODEL_OPS]
    if wanted and bool(cfg.augment_model) == bool(cfg.augment_endpoint):
        raise ConfigError(f"augment: {wanted[0]} needs a model to write it: give --augment-model DIR (run in this "
                          "process) or --augment-endpoint URL (an OpenAI-compatible API), not both")
    if not wanted and (cfg.augment_model or cfg.augment_endpoint):
        raise ConfigError("augment_model: only backtranslate and paraphrase use a model (--augment backtranslate "
                          "paraphrase)")


def rewriter_for(cfg):
    """The ModelAugmenter a classify / finetune config's backtranslate / paraphrase augmentation asks (its replies
    cached in `augment_cache`, else OUT/augment_replies.jsonl), or None when it asks for neither."""
    if not any(op in MODEL_OPS for op in cfg.augment):
        return None
    client = client_from_options(cfg.augment_model, cfg.augment_endpoint, cfg.augment_served_model)
    cache = cfg.augment_cache or str(Path(cfg.out) / "augment_replies.jsonl")
    return ModelAugmenter(client, cfg.augment_pivot, cfg.seed, cache)
