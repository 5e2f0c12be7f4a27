"""Benchmark tasks read from their original public files, with lm-evaluation-harness's default prompts.

A `Task` holds its documents (normalised dicts), few-shot documents, and lm-eval-style templates: `doc_to_text`,
`doc_to_choice`, `doc_to_target` (Jinja, or a field name), `description`, `target_delimiter` (" ") and
`fewshot_delimiter` ("\\n\\n"). Built-in tasks and readers:

  arc          ARC jsonl: the original ({"question": {"stem", "choices": [{text, label}]}, "answerKey"}) or the HF
               dataset's rows ({"question", "choices": {"text", "label"}, "answerKey"}); "Question: ..\\nAnswer:"
  hellaswag    hellaswag_*.jsonl (ctx_a, ctx_b, activity_label, endings, label), lm-eval's preprocessing
  mmlu         headerless CSV per subject (question, A, B, C, D, answer): SUBJECT_test.csv, a data/ directory
               (test/ and dev/), shots from SUBJECT_dev.csv
  ceval        C-Eval CSV with header (id, question, A..D, answer[, explanation]): SUBJECT_val.csv, shots SUBJECT_dev.csv
  cmmlu        CMMLU CSV with header (, Question, A..D, Answer): SUBJECT.csv under test/, shots under dev/
  gsm8k        jsonl (question, answer with "#### N"); generation, strict and flexible number extraction
  TASK.yaml    a user's own task in lm-eval's YAML keys (see docs/eval.md)
"""

from __future__ import annotations

import ast
import csv
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from lmforge.config import ConfigError

LETTERS = ["A", "B", "C", "D"]


class TaskError(ValueError):
    """A task file or data file that cannot be read as the task expects (names the file, line and field)."""


@lru_cache(maxsize=1)
def _jinja():
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    env.filters["regex_replace"] = lambda s, pattern, repl: re.sub(pattern, repl, s)
    return env


@lru_cache(maxsize=256)
def _template(source: str):
    return _jinja().from_string(source)


def _render(source, doc: dict, what: str):
    """A template field: a callable, a field name of the doc, a Jinja string, or a literal (list / int)."""
    if callable(source):
        return source(doc)
    if isinstance(source, str):
        if source in doc:
            return doc[source]
        if "{{" in source or "{%" in source:
            try:
                return _template(source).render(**doc)
            except Exception as e:  # jinja's UndefinedError and friends: name the template and the field
                raise TaskError(f"{what}: template {source!r} failed on a document with fields "
                                f"{sorted(doc)}: {e}") from None
    return source


@dataclass
class Filter:
    """Answer extraction for generation tasks: `regex` (take the match's group 1, or the `group`-th match), then
    the first result; "[invalid]" when nothing matches (lm-eval's fallback)."""

    name: str
    regex: str | None = None
    group: int = 0  # which match when there are several: 0 first, -1 last

    def apply(self, text: str) -> str:
        if self.regex is None:
            return text.strip()
        matches = re.findall(self.regex, text)
        if not matches:
            return "[invalid]"
        m = matches[self.group]
        if isinstance(m, tuple):  # several groups: the first that matched
            m = next((g for g in m if g), m[0])
        return m.strip()


@dataclass
class Task:
    """One benchmark: documents, how each becomes a prompt and an answer, and how it is scored."""

    name: str
    docs: list[dict]
    output_type: str = "multiple_choice"  # or "generate_until"
    doc_to_text: str | Callable = "{{question}}"
    doc_to_choice: str | list | Callable | None = None
    doc_to_target: str | Callable = "{{answer}}"
    description: str | Callable = ""
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    fewshot_docs: list[dict] = field(default_factory=list)
    num_fewshot: int = 0
    metrics: list[str] = field(default_factory=lambda: ["acc", "acc_norm"])
    until: list[str] = field(default_factory=list)  # generation: stop strings
    max_new_tokens: int = 256
    filters: list[Filter] = field(default_factory=lambda: [Filter("none")])
    exact_match: dict = field(default_factory=dict)  # generation: HF exact_match options (ignore_case, regexes)
    group_by: str | None = None  # a doc field whose values get their own scores (MMLU's subject)
    source: str = ""

    def text(self, doc: dict) -> str:
        out = _render(self.doc_to_text, doc, f"{self.name}: doc_to_text")
        if not isinstance(out, str):
            raise TaskError(f"{self.name}: doc_to_text gave {type(out).__name__}, not text")
        return out

    def choices(self, doc: dict) -> list[str]:
        out = _render(self.doc_to_choice, doc, f"{self.name}: doc_to_choice")
        if isinstance(out, str):
            try:
                out = ast.literal_eval(out)
            except (ValueError, SyntaxError):
                raise TaskError(f"{self.name}: doc_to_choice gave {out!r}, not a list of choices") from None
        if not isinstance(out, list | tuple) or not out or not all(isinstance(c, str) for c in out):
            raise TaskError(f"{self.name}: doc_to_choice must give a list of strings, got {out!r}")
        return list(out)

    def target(self, doc: dict) -> int | str:
        """The gold choice's index (multiple choice) or the reference text (generation)."""
        out = _render(self.doc_to_target, doc, f"{self.name}: doc_to_target")
        if self.output_type != "multiple_choice":
            return str(out)
        if isinstance(out, str):
            s = out.strip()
            if s.lstrip("-").isdigit():
                out = int(s)
            else:
                choices = self.choices(doc)
                if s not in choices:
                    raise TaskError(f"{self.name}: target {s!r} is neither an index nor one of the choices {choices}")
                out = choices.index(s)
        if not isinstance(out, int) or not 0 <= out < len(self.choices(doc)):
            raise TaskError(f"{self.name}: target {out!r} is not a choice index")
        return out

    def target_text(self, doc: dict) -> str:
        t = self.target(doc)
        return self.choices(doc)[t] if isinstance(t, int) else t

    def describe(self, doc: dict) -> str:
        return _render(self.description, doc, f"{self.name}: description") or ""

    def _shots(self, doc: dict, shots: int | None) -> list[dict]:
        k = self.num_fewshot if shots is None else shots
        pool = [d for d in self.fewshot_docs if d is not doc and d != doc]
        if self.group_by:  # MMLU / C-Eval: shots from the same subject
            pool = [d for d in pool if d.get(self.group_by) == doc.get(self.group_by)]
        if k > len(pool):
            raise TaskError(f"{self.name}: {k} shots asked but only {len(pool)} few-shot documents"
                            + (f" for {self.group_by} {doc.get(self.group_by)!r}" if self.group_by else "")
                            + " (give --shots-data FILE)")
        return pool[:k]

    def messages(self, doc: dict, multiturn: bool = False, shots: int | None = None) -> list[dict]:
        """The prompt as a conversation for the model's chat template: the description as the system message,
        then either one user turn holding the solved examples and the question (the few-shot block as text), or
        one user / assistant exchange per example and the question last (few-shot as turns)."""
        system = self.describe(doc)
        out = [{"role": "system", "content": system.strip()}] if system.strip() else []
        examples = self._shots(doc, shots)
        if multiturn:
            for d in examples:
                out += [{"role": "user", "content": self.text(d)}, {"role": "assistant", "content": self.target_text(d)}]
            return out + [{"role": "user", "content": self.text(doc)}]
        block = "".join(self.text(d) + self.target_delimiter + self.target_text(d) + self.fewshot_delimiter
                        for d in examples)
        return out + [{"role": "user", "content": block + self.text(doc)}]

    def context(self, doc: dict, shots: int | None = None) -> str:
        """The prompt for `doc`: description, then `shots` solved examples (the first ones of the few-shot
        documents, lm-eval's first_n sampler, never the doc itself), then the doc's own text."""
        shot_text = "".join(self.text(d) + self.target_delimiter + self.target_text(d) + self.fewshot_delimiter
                            for d in self._shots(doc, shots))
        return self.describe(doc) + shot_text + self.text(doc)


# ---------------------------------------------------------------------------------------------------------------------
# readers

def read_jsonl(path: Path) -> list[dict]:
    rows = []
    opener = open
    if path.suffix == ".gz":
        import gzip

        opener = gzip.open
    with opener(path, "rt", encoding="utf-8") as f:
        if path.suffix == ".json":
            data = json.load(f)
            if not isinstance(data, list):
                raise TaskError(f"{path}: a .json task file must hold a list of records")
            return data
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskError(f"{path}:{n}: not JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise TaskError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            row["_line"] = n
            rows.append(row)
    if not rows:
        raise TaskError(f"{path}: no records")
    return rows


def read_text_rows(path: str | os.PathLike, field: str | None = None) -> list:
    """One value per line: the lines of a text file, or of a .jsonl / .json file the values of each record (its
    `field`, else the first of prediction, text, reference, answer, output; a record that is not an object is taken
    whole, so a line may hold a list of references). Errors name the file and line (TaskError)."""
    p = Path(path)
    if not p.is_file():
        raise TaskError(f"{path}: no such file")
    text = p.read_text(encoding="utf-8")
    if p.suffix not in (".jsonl", ".json"):
        return text.split("\n")[:-1] if text.endswith("\n") else text.split("\n")
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskError(f"{path}:{n}: not JSON ({e.msg})") from None
        if isinstance(row, dict):
            key = field or next((k for k in ("prediction", "text", "reference", "answer", "output") if k in row), None)
            if key is None or key not in row:
                raise TaskError(f"{path}:{n}: no field {field or 'prediction/text/reference/answer/output'!r}; "
                                "name it with --field")
            row = row[key]
        out.append(row)
    return out

def _need(row: dict, path: Path, *keys: str) -> None:
    for k in keys:
        if k not in row:
            raise TaskError(f"{path}:{row.get('_line', '?')}: missing field {k!r} (has {sorted(row)})")


def read_arc(path: Path) -> list[dict]:
    """ARC rows as the HF dataset's layout (question text, choices {text, label}, answerKey)."""
    docs = []
    for row in read_jsonl(path):
        _need(row, path, "question", "answerKey")
        q = row["question"]
        if isinstance(q, dict):  # the original ARC-V1 files
            _need(q, path, "stem", "choices")
            choices = {"text": [c["text"] for c in q["choices"]], "label": [c["label"] for c in q["choices"]]}
            q = q["stem"]
        else:
            _need(row, path, "choices")
            choices = row["choices"]
        if row["answerKey"] not in choices["label"]:
            raise TaskError(f"{path}:{row.get('_line', '?')}: answerKey {row['answerKey']!r} is not one of the "
                            f"labels {choices['label']}")
        docs.append({"id": row.get("id"), "question": q, "choices": choices, "answerKey": row["answerKey"],
                     "_line": row.get("_line")})
    return docs


def _hellaswag_preprocess(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def read_hellaswag(path: Path) -> list[dict]:
    docs = []
    for row in read_jsonl(path):
        _need(row, path, "ctx_a", "ctx_b", "activity_label", "endings", "label")
        ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
        docs.append({"query": _hellaswag_preprocess(row["activity_label"] + ": " + ctx),
                     "choices": [_hellaswag_preprocess(e) for e in row["endings"]], "label": int(row["label"]),
                     "_line": row.get("_line")})
    return docs


def _csv_rows(path: Path, header: bool) -> list[tuple[int, list[str]]]:
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    out = [(n, r) for n, r in enumerate(rows, 1) if r]
    return out[1:] if header else out


def _mmlu_subject(path: Path) -> str:
    name = path.name.removesuffix(".csv")
    for suffix in ("_test", "_dev", "_val"):
        name = name.removesuffix(suffix)
    return name


def read_mmlu_csv(path: Path) -> list[dict]:
    """MMLU's headerless rows: question, four choices, answer letter."""
    docs, subject = [], _mmlu_subject(path)
    for n, r in _csv_rows(path, header=False):
        if len(r) != 6 or r[5].strip() not in LETTERS:
            raise TaskError(f"{path}:{n}: expected 6 columns (question, A, B, C, D, answer letter), got {len(r)}"
                            + (f" with answer {r[5]!r}" if len(r) == 6 else ""))
        docs.append({"question": r[0], "choices": r[1:5], "answer": LETTERS.index(r[5].strip()),
                     "subject": subject, "_line": n})
    return docs


def read_chinese_exam_csv(path: Path, kind: str) -> list[dict]:
    """C-Eval (id, question, A, B, C, D, answer[, explanation]) and CMMLU (, Question, A, B, C, D, Answer) rows,
    by their headers."""
    rows = _csv_rows(path, header=False)
    if not rows:
        raise TaskError(f"{path}: empty file")
    head = [h.strip() for h in rows[0][1]]
    qkey, akey = ("question", "answer") if kind == "ceval" else ("Question", "Answer")
    for k in (qkey, "A", "B", "C", "D", akey):
        if k not in head:
            raise TaskError(f"{path}:1: the header has no {k!r} column ({kind} files have {qkey}, A, B, C, D, {akey})")
    docs, subject = [], _mmlu_subject(path)
    for n, r in rows[1:]:
        row = dict(zip(head, r))
        if row.get(akey, "").strip() not in LETTERS:
            if kind == "ceval" and not row.get(akey, "").strip():  # C-Eval's test split has no answers
                raise TaskError(f"{path}:{n}: no answer (C-Eval publishes test answers only through its site: "
                                "evaluate the val split)")
            raise TaskError(f"{path}:{n}: field {akey!r} is {row.get(akey)!r}, not one of A, B, C, D")
        row[akey] = row[akey].strip()
        docs.append(row | {"subject": subject, "_line": n})
    return docs


def read_gsm8k(path: Path) -> list[dict]:
    docs = []
    for row in read_jsonl(path):
        _need(row, path, "question", "answer")
        docs.append(row)
    return docs


def _subjects() -> dict:
    return json.loads((Path(__file__).parent / "data" / "subjects.json").read_text(encoding="utf-8"))


def _csv_files(data: Path, split_dirs: tuple[str, ...], suffixes: tuple[str, ...]) -> list[Path]:
    if data.is_file():
        return [data]
    for d in split_dirs:
        if (data / d).is_dir():
            data = data / d
            break
    files = sorted(p for p in data.glob("*.csv") if not suffixes or p.name.removesuffix(".csv").endswith(suffixes))
    if not files:
        raise TaskError(f"{data}: no {'/'.join(suffixes) or ''} CSV files")
    return files


def _shot_files(files: list[Path], kind: str) -> list[Path]:
    """The dev file next to each test file: SUBJECT_dev.csv beside it or in a sibling dev/ directory."""
    out = []
    for f in files:
        subject = _mmlu_subject(f)
        names = [f"{subject}_dev.csv"] if kind != "cmmlu" else [f"{subject}.csv"]
        for d in (f.parent, f.parent.parent / "dev"):
            for n in names:
                if (d / n).is_file() and (d / n) != f:
                    out.append(d / n)
    return out


def _exam_task(name: str, kind: str, data: Path, shots_data: Path | None) -> Task:
    if kind == "mmlu":
        files = _csv_files(data, ("test",), ("_test",) if data.is_dir() else ())
        reader = read_mmlu_csv
        text = "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\nD. {{choices[3]}}\nAnswer:"
        target = "answer"

        def description(doc):
            return f"The following are multiple choice questions (with answers) about " \
                   f"{doc['subject'].replace('_', ' ')}.\n\n"
    else:
        files = _csv_files(data, ("val",) if kind == "ceval" else ("test",), ("_val",) if kind == "ceval" and
                           data.is_dir() else ())
        names = _subjects()[kind]

        def reader(p):
            return read_chinese_exam_csv(p, kind)

        q, a = ("question", "answer") if kind == "ceval" else ("Question", "Answer")
        text = f"{{{{{q}.strip()}}}}\nA. {{{{A}}}}\nB. {{{{B}}}}\nC. {{{{C}}}}\nD. {{{{D}}}}\n答案："
        target = f"{{{{['A', 'B', 'C', 'D'].index({a})}}}}"

        def description(doc):
            zh = names.get(doc["subject"], doc["subject"])
            if kind == "ceval":
                return f"以下是中国关于{zh}的单项选择题，请选出其中的正确答案。\n\n"
            return f"以下是关于{zh}的单项选择题，请直接给出正确答案的选项。\n\n"
    docs = [d for f in files for d in reader(f)]
    shot_paths = _csv_files(shots_data, ("dev",), ()) if shots_data else _shot_files(files, kind)
    shots = [d for f in shot_paths for d in reader(f)]
    return Task(name, docs, doc_to_text=text, doc_to_choice=list(LETTERS), doc_to_target=target,
                description=description, fewshot_docs=shots, group_by="subject",
                metrics=["acc"] if kind == "mmlu" else ["acc", "acc_norm"], source=str(data))


GSM8K_FILTERS = [Filter("strict-match", r"#### (\-?[0-9\.\,]+)"),
                 Filter("flexible-extract", r"(-?[$0-9.,]{2,})|(-?[0-9]+)", group=-1)]
GSM8K_EXACT_MATCH = {"ignore_case": True, "ignore_punctuation": False,
                     "regexes_to_ignore": [",", "\\$", "(?s).*#### ", "\\.$"]}

BUILTIN_TASKS = ("arc", "arc_easy", "arc_challenge", "hellaswag", "mmlu", "ceval", "cmmlu", "gsm8k")


def load_task(name_or_yaml: str, data: str | os.PathLike | None = None, shots_data: str | os.PathLike | None = None,
              num_fewshot: int | None = None) -> Task:
    """A built-in task (BUILTIN_TASKS) on the user's `data` file or directory, or a YAML task definition."""
    if name_or_yaml.endswith((".yaml", ".yml")):
        task = load_yaml_task(Path(name_or_yaml), data)
    else:
        if name_or_yaml not in BUILTIN_TASKS:
            import difflib

            close = difflib.get_close_matches(name_or_yaml, BUILTIN_TASKS, n=1)
            raise ConfigError(f"--task {name_or_yaml!r}: not a built-in task ({', '.join(BUILTIN_TASKS)}) nor a "
                              "TASK.yaml" + (f"; did you mean {close[0]!r}?" if close else ""))
        if data is None:
            raise ConfigError(f"--task {name_or_yaml} needs --data: the task's file or directory (lmforge downloads "
                              "nothing; docs/eval.md says where each benchmark's files come from)")
        path = Path(data)
        if not path.exists():
            raise TaskError(f"--data {path}: no such file or directory")
        shots = Path(shots_data) if shots_data else None
        if name_or_yaml.startswith("arc"):
            task = Task(name_or_yaml, read_arc(path), doc_to_text="Question: {{question}}\nAnswer:",
                        doc_to_choice="{{choices.text}}", doc_to_target="{{choices.label.index(answerKey)}}",
                        fewshot_docs=read_arc(shots) if shots else [], source=str(path))
        elif name_or_yaml == "hellaswag":
            task = Task("hellaswag", read_hellaswag(path), doc_to_text="{{query}}", doc_to_choice="choices",
                        doc_to_target="{{label}}", fewshot_docs=read_hellaswag(shots) if shots else [],
                        source=str(path))
        elif name_or_yaml in ("mmlu", "ceval", "cmmlu"):
            task = _exam_task(name_or_yaml, name_or_yaml, path, shots)
        else:  # gsm8k
            task = Task("gsm8k", read_gsm8k(path), output_type="generate_until",
                        doc_to_text="Question: {{question}}\nAnswer:", doc_to_target="{{answer}}",
                        fewshot_docs=read_gsm8k(shots) if shots else [], metrics=["exact_match"],
                        until=["Question:", "</s>", "<|im_end|>"], filters=list(GSM8K_FILTERS),
                        exact_match=dict(GSM8K_EXACT_MATCH), source=str(path))
    if num_fewshot is not None:
        task.num_fewshot = num_fewshot
    return task


YAML_KEYS = {"task", "data", "dataset_path", "dataset_kwargs", "output_type", "doc_to_text", "doc_to_choice",
             "doc_to_target", "description", "target_delimiter", "fewshot_delimiter", "num_fewshot", "fewshot_data",
             "metric_list", "generation_kwargs", "filter_list", "test_split", "validation_split", "training_split",
             "fewshot_split", "metadata", "tag", "should_decontaminate", "doc_to_decontamination_query",
             "fewshot_config", "repeats", "group_by"}


def load_yaml_task(path: Path, data: str | os.PathLike | None = None) -> Task:
    """A task in lm-evaluation-harness's YAML keys over a local jsonl / json / csv file: `data: FILE` (or lm-eval's
    `dataset_path: json` with `dataset_kwargs: {data_files: FILE}`), doc_to_text / doc_to_choice / doc_to_target,
    description, delimiters, num_fewshot with `fewshot_data: FILE`, metric_list (acc, acc_norm, exact_match),
    generation_kwargs.until and filter_list regex extraction. Relative paths are from the YAML's folder."""
    import yaml

    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TaskError(f"{path}: no such task file") from None
    except yaml.YAMLError as e:
        raise TaskError(f"{path}: not YAML ({e})") from None
    if not isinstance(spec, dict):
        raise TaskError(f"{path}: a task file is a mapping of keys")
    unknown = sorted(set(spec) - YAML_KEYS)
    if unknown:
        raise TaskError(f"{path}: unknown keys {unknown} (known: {sorted(YAML_KEYS)})")
    for key in ("doc_to_text", "doc_to_target"):
        if key not in spec:
            raise TaskError(f"{path}: missing key {key!r}")
    source = data or spec.get("data")
    if source is None:
        files = (spec.get("dataset_kwargs") or {}).get("data_files")
        if isinstance(files, dict):
            split = spec.get("test_split") or spec.get("validation_split") or next(iter(files))
            files = files.get(split)
        source = files[0] if isinstance(files, list) else files
    if source is None:
        raise TaskError(f"{path}: no data: give `data: FILE` in the YAML or --data FILE")

    def resolve(p) -> Path:
        p = Path(p)
        return p if p.is_absolute() or data is not None and p == Path(data) else path.parent / p

    def read(p: Path) -> list[dict]:
        if not p.exists():
            raise TaskError(f"{path}: data file {p} does not exist")
        if p.suffix in (".csv", ".tsv"):
            with open(p, encoding="utf-8", newline="") as f:
                return [r | {"_line": n} for n, r in enumerate(csv.DictReader(f, delimiter="\t" if p.suffix == ".tsv"
                                                                               else ","), 2)]
        return read_jsonl(p)

    out_type = spec.get("output_type", "multiple_choice")
    if out_type not in ("multiple_choice", "generate_until"):
        raise TaskError(f"{path}: output_type {out_type!r}: lmforge runs multiple_choice and generate_until")
    if out_type == "multiple_choice" and "doc_to_choice" not in spec:
        raise TaskError(f"{path}: a multiple_choice task needs doc_to_choice")
    metrics = [m["metric"] if isinstance(m, dict) else m for m in spec.get("metric_list", [])] or (
        ["acc", "acc_norm"] if out_type == "multiple_choice" else ["exact_match"])
    known = ("acc", "acc_norm") if out_type == "multiple_choice" else (
        "exact_match", "rouge1", "rouge2", "rougeL", "rougeLsum", "bleu", "chrf")
    for m in metrics:
        if m not in known:
            raise TaskError(f"{path}: metric {m!r} is not one lmforge computes for {out_type} ({', '.join(known)})")
    em = next((dict(m) for m in spec.get("metric_list", []) if isinstance(m, dict) and m.get("metric") ==
               "exact_match"), {})
    em = {k: v for k, v in em.items() if k in ("ignore_case", "ignore_punctuation", "regexes_to_ignore")}
    filters = []
    for f in spec.get("filter_list", []):
        rx = next((s for s in f.get("filter", []) if s.get("function") == "regex"), None)
        filters.append(Filter(f.get("name", "filter"), rx.get("regex_pattern") if rx else None,
                              int(rx.get("group_select", 0)) if rx else 0))
    gen = spec.get("generation_kwargs") or {}
    fewshot = spec.get("fewshot_data")
    return Task(spec.get("task", path.stem), read(resolve(source)), output_type=out_type,
                doc_to_text=spec["doc_to_text"], doc_to_choice=spec.get("doc_to_choice"),
                doc_to_target=spec["doc_to_target"], description=spec.get("description", ""),
                target_delimiter=spec.get("target_delimiter", " "),
                fewshot_delimiter=spec.get("fewshot_delimiter", "\n\n"),
                fewshot_docs=read(resolve(fewshot)) if fewshot else [], num_fewshot=int(spec.get("num_fewshot", 0)),
                metrics=metrics, until=list(gen.get("until", [])),
                max_new_tokens=int(gen.get("max_gen_toks", gen.get("max_new_tokens", 256))),
                filters=filters or [Filter("none")], exact_match=em, group_by=spec.get("group_by"),
                source=str(resolve(source)))
