"""Sequence-to-sequence tasks on a decoder: translation and summarisation as instruction tuning.

A record holds a `source` and a `target` (other names through `--columns '{source: en, target: zh}'`), in any
structured file lmforge reads (JSON, JSONL, CSV/TSV with a header, parquet, a datasets folder). The task builds the
user turn from the source; the target is the reply:
  translate   --src-lang en --tgt-lang zh: "Translate the following English text into Chinese." (the instruction in
              Chinese when either side is Chinese), then the source
  summarize   "Summarize the following text." (in Chinese for a Chinese source), then the source
  a template  any text with a {source} slot, e.g. "English: {source}\nChinese:"
Validation is by generation: greedy replies to the held-out sources scored against their targets with BLEU and chrF
(translation; sacrebleu's numbers, its `zh` tokenizer for Chinese targets) or ROUGE-L (summarisation; Chinese by
characters, as rouge-score with a CJK tokenizer), and the best checkpoint is the one with the best such score.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from lmforge.config import ConfigError
from lmforge.data.sources import OnBad, iter_records
from lmforge.finetune.conversations import Conversation, DataFormatError, resolve_spec
from lmforge.text import LANGUAGES, is_mostly_cjk

TASKS = ("translate", "summarize")
TASK_METRICS = {"translate": "val_bleu", "summarize": "val_rougeL"}


def _language(code: str, what: str) -> tuple[str, str]:
    if code not in LANGUAGES:
        raise ConfigError(f"{what}: unknown language code {code!r} (known: {', '.join(LANGUAGES)}); or give the "
                          "instruction yourself with --task-template '...{source}...'")
    return LANGUAGES[code]


def task_template(task: str, src_lang: str = "", tgt_lang: str = "", template: str = "") -> str | None:
    """The user turn with a `{source}` slot; None for a summarisation template chosen per record (by its script)."""
    if template:
        if "{source}" not in template:
            raise ConfigError("task_template: put {source} where the source text goes")
        return template
    if task == "translate":
        if not src_lang or not tgt_lang:
            raise ConfigError("task translate: give --src-lang and --tgt-lang (e.g. en and zh)")
        (src_en, src_zh), (tgt_en, tgt_zh) = _language(src_lang, "src_lang"), _language(tgt_lang, "tgt_lang")
        if "zh" in (src_lang, tgt_lang):
            return f"将下面的{src_zh}翻译成{tgt_zh}。\n\n{{source}}"
        return f"Translate the following {src_en} text into {tgt_en}.\n\n{{source}}"
    if task == "summarize":
        return None
    raise ConfigError(f"task: {task!r} is not one of {', '.join(TASKS)}")


SUMMARIZE_EN = "Summarize the following text.\n\n{source}"
SUMMARIZE_ZH = "请概括下面这段文字。\n\n{source}"


def task_conversation(rec: dict, where: str, template: str | None, columns: dict) -> Conversation:
    """One record as a user turn (the template filled with the source) and the target as the reply."""
    src_key, tgt_key = columns.get("source", "source"), columns.get("target", "target")
    values = []
    for key, what in ((src_key, "source"), (tgt_key, "target")):
        value = rec.get(key)
        if not isinstance(value, str) or not value.strip():
            have = ", ".join(sorted(map(str, rec))[:8])
            raise DataFormatError(f"{where}: field '{key}' ({what}): " + (
                f"missing (the record has {have}; map yours with --columns '{{source: X, target: Y}}')"
                if key not in rec else "not a non-empty string"))
        values.append(value.strip())
    source, target = values
    if template is None:
        template = SUMMARIZE_ZH if is_mostly_cjk(source) else SUMMARIZE_EN
    # str.replace, not format: a source may hold braces of its own
    return Conversation([{"role": "user", "content": template.replace("{source}", source)},
                         {"role": "assistant", "content": target}], where=where)


def load_task_conversations(data: str, task: str, src_lang: str = "", tgt_lang: str = "", template: str = "",
                            columns: dict | None = None, on_bad: OnBad | None = None, encoding: str = "utf-8",
                            errors: str = "strict") -> list[Conversation]:
    """Every source/target record of `data` (a file, folder or datasets source) as a Conversation."""
    text = task_template(task, src_lang, tgt_lang, template)
    spec = resolve_spec(data, "auto", columns)
    out = []
    for path in spec.files:
        for where, rec in iter_records(path, on_bad, encoding, errors):
            try:
                out.append(task_conversation(rec, where, text, spec.columns))
            except DataFormatError as e:
                if on_bad is None:
                    raise
                on_bad(where, str(e).split(": ", 1)[1], json.dumps(rec, ensure_ascii=False, default=str)[:2000])
    if not out:
        raise DataFormatError(f"{data}: no source/target records")
    return out


def task_scores(task: str, replies: Sequence[str], references: Sequence[str], tgt_lang: str = "") -> dict:
    """The validation metrics of a task's generated replies: val_bleu and val_chrf (translation, sacrebleu's
    defaults, its zh tokenizer for Chinese targets), val_rougeL (summarisation)."""
    from lmforge.metrics import bleu, chrf, rouge

    replies = [r.strip() for r in replies]
    if task == "translate":
        tokenize = "zh" if tgt_lang == "zh" else "13a"
        return {"val_bleu": bleu(replies, list(references), tokenize=tokenize)["score"],
                "val_chrf": chrf(replies, list(references))["score"]}
    return {"val_rougeL": rouge(replies, list(references), types=("rougeL",))["rougeL"]}
