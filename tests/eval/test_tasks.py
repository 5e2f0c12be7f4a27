"""Benchmark tasks: readers on files in each benchmark's original format, multiple-choice log-likelihoods and
accuracy equal to lm-evaluation-harness on the same local HF model and items, perplexity equal to a transformers
loop, generation tasks' answer extraction."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

from lmforge.eval.run import evaluate, write_run
from lmforge.eval.scoring import perplexity, windows
from lmforge.eval.tasks import GSM8K_FILTERS, TaskError, load_task
from lmforge.model import load_hf_model
from lmforge.tokenizer import load_tokenizer
from tests import corpora

transformers = pytest.importorskip("transformers")

ARC = [("Which gas do plants take in from the air to make food?", ["oxygen", "carbon dioxide", "nitrogen", "helium"],
        ["A", "B", "C", "D"], "B"),
       ("水在多少摄氏度时沸腾？", ["50度", "100度", "0度"], ["1", "2", "3"], "2"),
       ("What is the main source of energy for Earth's water cycle? ", ["the Sun", "the Moon", "wind"],
        ["A", "B", "C"], "A"),
       ("A student mixes salt into water. Which property of the water changes?", ["its boiling point",
        "its colour", "its number of atoms"], ["A", "B", "C"], "A")]
MMLU_DEV = [["What is 2 + 3?", "4", "5", "6", "7", "B"], ["Which is a prime number?", "4", "6", "7", "9", "C"],
            ["What is 10 / 2?", "2", "5", "8", "20", "B"]]
MMLU_TEST = [["What is 7 x 6?", "42", "36", "48", "13", "A"], ["Solve for x: 2x = 8.", "2", "3", "4", "16", "C"],
             ["What is the square root of 81?", "7", "8", "10", "9", "D"]]
CMMLU_DEV = [["中国的首都是哪座城市？", "上海", "北京", "广州", "深圳", "B"],
             ["一年有几个季节？", "两个", "三个", "四个", "五个", "C"]]
CMMLU_TEST = [["长江流经下列哪个城市？", "武汉", "北京", "西安", "哈尔滨", "A"],
              ["“床前明月光”的作者是谁？", "杜甫", "白居易", "苏轼", "李白", "D"],
              ["水的化学式是什么？", "CO2", "H2O", "NaCl", "O2", "B"]]
HELLASWAG = [{"activity_label": "Baking cookies", "ctx_a": "A woman stands in a kitchen with a bowl of dough.",
              "ctx_b": "she", "endings": ["rolls the dough into small balls [title] and bakes them.",
                                          "throws the bowl out of the window.", "starts to swim in the pool.",
                                          "reads a newspaper on the roof."], "label": "0"},
             {"activity_label": "Washing a car", "ctx_a": "A man sprays water on a red car.", "ctx_b": "then he",
              "endings": ["scrubs the car with a soapy sponge.", "eats the hose.", "flies away on the car.",
                          "paints the sky green."], "label": "0"}]


def _model_dir(tmp: Path, fixture: str) -> Path:
    """A tiny random Llama with a real model's tokenizer (phi-3: SentencePiece with BOS; qwen2.5: byte-level)."""
    d = corpora.real_tokenizer(fixture, tmp / fixture)
    tok = transformers.AutoTokenizer.from_pretrained(d)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                                   eos_token_id=tok.eos_token_id)
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval_models")
    return {name: _model_dir(tmp, name) for name in ("phi-3-mini-instruct", "qwen2.5-instruct")}


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _csv(path: Path, rows, header=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        if header:
            w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
    """Each benchmark's items in its original file format (for lmforge) and as the HF dataset rows lm-eval's
    task YAMLs read (for the reference run)."""
    d = tmp_path_factory.mktemp("tasks")
    arc_orig = _jsonl(d / "ARC-Easy-Test.jsonl", [
        {"id": f"q{i}", "question": {"stem": q, "choices": [{"text": t, "label": lab} for t, lab in zip(ts, ls)]},
         "answerKey": k} for i, (q, ts, ls, k) in enumerate(ARC)])
    arc_hf = _jsonl(d / "arc_hf.jsonl", [{"id": f"q{i}", "question": q, "choices": {"text": ts, "label": ls},
                                           "answerKey": k} for i, (q, ts, ls, k) in enumerate(ARC)])
    mmlu = d / "mmlu" / "data"
    _csv(mmlu / "dev" / "elementary_mathematics_dev.csv", MMLU_DEV)
    _csv(mmlu / "test" / "elementary_mathematics_test.csv", MMLU_TEST)
    mmlu_hf = {s: _jsonl(d / f"mmlu_{s}.jsonl", [{"question": r[0], "subject": "elementary_mathematics",
                                                  "choices": r[1:5], "answer": "ABCD".index(r[5])} for r in rows])
               for s, rows in (("dev", MMLU_DEV), ("test", MMLU_TEST))}
    head = ["", "Question", "A", "B", "C", "D", "Answer"]
    cm = d / "cmmlu"
    _csv(cm / "dev" / "chinese_history.csv", [[i] + r for i, r in enumerate(CMMLU_DEV)], head)
    _csv(cm / "test" / "chinese_history.csv", [[i] + r for i, r in enumerate(CMMLU_TEST)], head)
    cm_hf = {s: _jsonl(d / f"cmmlu_{s}.jsonl", [dict(zip(head[1:], r)) for r in rows])
             for s, rows in (("dev", CMMLU_DEV), ("test", CMMLU_TEST))}
    hs = _jsonl(d / "hellaswag_val.jsonl", HELLASWAG)
    return {"arc": arc_orig, "arc_hf": arc_hf, "mmlu": mmlu, "mmlu_hf": mmlu_hf, "cmmlu": cm, "cmmlu_hf": cm_hf,
            "hellaswag": hs}


def _lm_eval_yamls(d: Path, files: dict) -> None:
    """lm-eval's own task definitions (read from its installed package), pointed at the local files."""
    import yaml
    from lm_eval import tasks as lm_tasks

    root = Path(lm_tasks.__file__).parent
    arc = yaml.safe_load((root / "arc" / "arc_easy.yaml").read_text())
    mmlu = yaml.safe_load((root / "mmlu" / "default" / "_default_template_yaml").read_text())
    cmmlu = yaml.safe_load((root / "cmmlu" / "_default_template_yaml").read_text())
    hs_text = (root / "hellaswag" / "hellaswag.yaml").read_text()
    shutil.copy(root / "hellaswag" / "utils.py", d / "utils.py")

    def local(spec, name, splits, **extra):
        spec = {k: v for k, v in spec.items() if k not in ("tag", "dataset_name", "training_split",
                                                           "validation_split", "test_split", "fewshot_split")}
        return spec | {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": splits},
                       "test_split": "test"} | extra

    docs = {
        "lm_arc": local(arc, "lm_arc", {"test": str(files["arc_hf"])}),
        "lm_mmlu": local(mmlu, "lm_mmlu", {k: str(v) for k, v in files["mmlu_hf"].items()}, fewshot_split="dev",
                         description="The following are multiple choice questions (with answers) about "
                                     "elementary mathematics.\n\n"),
        "lm_cmmlu": local(cmmlu, "lm_cmmlu", {k: str(v) for k, v in files["cmmlu_hf"].items()},
                          fewshot_split="dev", description="以下是关于中国历史的单项选择题，请直接给出正确答案的选项。\n\n"),
    }
    for name, spec in docs.items():
        (d / f"{name}.yaml").write_text(yaml.safe_dump(spec, allow_unicode=True), encoding="utf-8")
    hs_text = hs_text.replace("task: hellaswag", "task: lm_hellaswag").replace("dataset_path: Rowan/hellaswag",
                                                                               "dataset_path: json")
    hs_text = hs_text.replace("test_split: null", f"test_split: test\ndataset_kwargs:\n  data_files:\n    test: "
                                                  f"{files['hellaswag']}")
    hs_text = "\n".join(line for line in hs_text.splitlines() if not line.startswith(("training_split",
                                                                                       "validation_split")))
    (d / "lm_hellaswag.yaml").write_text(hs_text, encoding="utf-8")


def _lm_eval(model_dir: Path, yaml_dir: Path, tasks: list[str], shots: int) -> dict:
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model_dir},dtype=float32,device=cpu",
                                  tasks=tasks, num_fewshot=shots, task_manager=TaskManager(include_path=str(yaml_dir)),
                                  log_samples=True, batch_size=1)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("fixture", ["phi-3-mini-instruct", "qwen2.5-instruct"])
def test_multiple_choice_equals_lm_evaluation_harness(models, task_files, tmp_path, fixture):
    model_dir = models[fixture]
    _lm_eval_yamls(tmp_path, task_files)
    model, tok = load_hf_model(model_dir), load_tokenizer(model_dir)
    ours = {"lm_arc": load_task("arc_easy", task_files["arc"]), "lm_hellaswag": load_task("hellaswag",
                                                                                          task_files["hellaswag"]),
            "lm_mmlu": load_task("mmlu", task_files["mmlu"]), "lm_cmmlu": load_task("cmmlu", task_files["cmmlu"])}
    for shots, names in ((0, ["lm_arc", "lm_hellaswag", "lm_mmlu", "lm_cmmlu"]), (2, ["lm_mmlu", "lm_cmmlu"])):
        theirs = _lm_eval(model_dir, tmp_path, names, shots)
        for name in names:
            task = ours[name]
            task.num_fewshot = shots
            results, rows = evaluate(model, tok, task, show_progress=False)
            samples = sorted(theirs["samples"][name], key=lambda s: s["doc_id"])
            assert len(samples) == len(rows)
            for s, row in zip(samples, rows):
                ref = [float(r[0]) for r in s["filtered_resps"]]
                assert row["loglikelihoods"] == pytest.approx(ref, abs=1e-4), (name, shots)
                assert row["greedy"] == [bool(r[1]) for r in s["filtered_resps"]]
                assert row["acc"] == s["acc"]
            for metric in task.metrics:
                assert results[metric] == pytest.approx(theirs["results"][name][f"{metric},none"]), (name, metric)


def test_perplexity_equals_a_transformers_loop(models):
    model_dir = models["qwen2.5-instruct"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    texts = ["The quick brown fox jumps over the lazy dog. " * 12, "北京是中华人民共和国的首都，位于华北平原北部。" * 6,
             "short"]
    window, stride = 64, 24
    nll, count = 0.0, 0
    prefix = hf_tok.eos_token_id  # Qwen has no BOS: lm-eval's prefix is the EOS
    for text in texts:
        ids = [prefix] + hf_tok(text)["input_ids"]
        scored = 1
        for start, end, first in windows(len(ids), window, stride):
            assert first == scored and end - start <= window
            x = torch.tensor([ids[start:end]])
            with torch.no_grad():
                logp = torch.log_softmax(hf(x).logits[0, :-1], -1)
            lp = logp.gather(1, x[0, 1:, None])[:, 0]
            nll -= float(lp[first - start - 1:].sum())
            count += end - first
            scored = end
        assert scored == len(ids)
    ours = perplexity(load_hf_model(model_dir), load_tokenizer(model_dir), texts, window=window, stride=stride)
    assert ours.tokens == count
    assert ours.nll == pytest.approx(nll, rel=1e-5)
    assert ours.perplexity == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert ours.bits_per_byte == pytest.approx(nll / math.log(2) / sum(len(t.encode()) for t in texts), rel=1e-5)
    # every token scored once, with stride == window too (one token of overlap)
    for n, w, s in ((200, 64, 64), (10, 64, 32), (65, 64, 1)):
        spans = windows(n, w, s)
        assert [f for _, _, f in spans][0] == 1 and spans[-1][1] == n
        assert all(a[1] == b[2] and b[0] < b[2] for a, b in zip(spans, spans[1:]))


def test_readers_name_the_file_line_and_field(tmp_path):
    bad = _jsonl(tmp_path / "arc.jsonl", [{"question": {"stem": "q", "choices": [{"text": "a", "label": "A"}]},
                                           "answerKey": "Z"}])
    with pytest.raises(TaskError, match=r"arc.jsonl:1: answerKey 'Z'"):
        load_task("arc_easy", bad)
    mm = _csv(tmp_path / "x_test.csv", [["q", "a", "b", "c", "d", "E"]])
    with pytest.raises(TaskError, match=r"x_test.csv:1: expected 6 columns .* answer 'E'"):
        load_task("mmlu", mm)
    ce = _csv(tmp_path / "ceval" / "val" / "law_val.csv", [["1", "问题", "甲", "乙", "丙", "丁", ""]],
              ["id", "question", "A", "B", "C", "D", "answer"])
    with pytest.raises(TaskError, match=r"law_val.csv:2: no answer"):
        load_task("ceval", ce)
    (tmp_path / "bad.jsonl").write_text('{"question": "q", "answer": "1"}\nnot json\n', encoding="utf-8")
    with pytest.raises(TaskError, match=r"bad.jsonl:2: not JSON"):
        load_task("gsm8k", tmp_path / "bad.jsonl")
    from lmforge.config import ConfigError

    with pytest.raises(ConfigError, match="did you mean 'hellaswag'"):
        load_task("helaswag", tmp_path)
    with pytest.raises(TaskError, match="2 shots asked but only 0"):
        t = load_task("mmlu", mm.with_name("y_test.csv") if False else _csv(tmp_path / "y_test.csv",
                                                                            [MMLU_TEST[0]]), num_fewshot=2)
        t.context(t.docs[0])


def test_ceval_description_names_the_subject_in_chinese(tmp_path):
    head = ["id", "question", "A", "B", "C", "D", "answer", "explanation"]
    _csv(tmp_path / "ceval" / "dev" / "accountant_dev.csv", [["0", "会计的基本职能是？", "核算", "分析", "预测", "决策",
                                                            "A", "核算与监督"]], head)
    _csv(tmp_path / "ceval" / "val" / "accountant_val.csv", [["0", "资产负债表反映的是？", "经营成果", "财务状况",
                                                            "现金流量", "利润分配", "B"]], head[:-1])
    task = load_task("ceval", tmp_path / "ceval", num_fewshot=1)
    ctx = task.context(task.docs[0])
    assert ctx == ("以下是中国关于注册会计师的单项选择题，请选出其中的正确答案。\n\n"
                   "会计的基本职能是？\nA. 核算\nB. 分析\nC. 预测\nD. 决策\n答案： A\n\n"
                   "资产负债表反映的是？\nA. 经营成果\nB. 财务状况\nC. 现金流量\nD. 利润分配\n答案：")


def test_gsm8k_extraction_follows_lm_eval():
    strict, flexible = GSM8K_FILTERS
    out = "Natalia sold 48/2 = 24 clips in May.\nShe sold 48+24 = 72 clips.\n#### 72\n\nQuestion: next"
    assert strict.apply(out) == "72" and flexible.apply(out) == "72"
    assert strict.apply("so the answer is $1,250.") == "[invalid]"
    assert flexible.apply("so the answer is $1,250.") == "$1,250."


def test_yaml_task_generation_run_writes_results_predictions_and_report(models, tmp_path):
    rows = [{"q": "2+2=?", "a": "4"}, {"q": "北京在哪个国家？", "a": "中国"}]
    data = _jsonl(tmp_path / "mine.jsonl", rows)
    (tmp_path / "mine.yaml").write_text(
        "task: mine\ndata: mine.jsonl\noutput_type: generate_until\ndoc_to_text: 'Q: {{q}}\\nA:'\n"
        "doc_to_target: '{{a}}'\ngeneration_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 8\n"
        "metric_list:\n  - metric: exact_match\n    ignore_case: true\n  - rougeL\n  - bleu\n", encoding="utf-8")
    task = load_task(str(tmp_path / "mine.yaml"))
    assert task.source == str(data) and task.max_new_tokens == 8 and task.exact_match == {"ignore_case": True}
    model_dir = models["qwen2.5-instruct"]
    res, preds = evaluate(load_hf_model(model_dir), load_tokenizer(model_dir), task, show_progress=False)
    assert res["n"] == 2 and 0 <= res["exact_match"] <= 1
    from lmforge.eval import metrics

    outs = [p["generation"].strip() for p in preds]
    assert res["rougeL"] == pytest.approx(metrics.rouge(outs, ["4", "中国"], types=("rougeL",))["rougeL"])
    assert res["bleu"] == pytest.approx(metrics.bleu(outs, ["4", "中国"])["score"])
    assert all("\n" not in p["generation"] for p in preds)
    out = write_run(tmp_path / "run", str(model_dir), {"mine": res}, {"mine": preds}, {"task": "mine"})
    assert json.loads((out / "results.json").read_text())["results"]["mine"]["n"] == 2
    assert len((out / "predictions_mine.jsonl").read_text().splitlines()) == 2
    assert "| mine | 0 | plain | exact_match |" in (out / "report.md").read_text()
    (tmp_path / "bad.yaml").write_text("task: x\ndoc_to_text: a\ndoc_to_target: b\ndoc_to_choise: c\n")
    with pytest.raises(TaskError, match=r"unknown keys \['doc_to_choise'\]"):
        load_task(str(tmp_path / "bad.yaml"))


def test_a_task_whose_generations_are_mostly_empty_warns(models, tmp_path):
    """A model whose every reply ends at once (its output head picks token 0, one of the task's `until` strings)
    scores 0 on every metric: the run says why instead of reporting 0.0 silently; a model that answers does not."""
    rows = [{"q": "2+2=?", "a": "4"}, {"q": "北京在哪个国家？", "a": "中国"}, {"q": "1+1=?", "a": "2"}]
    _jsonl(tmp_path / "qa.jsonl", rows)
    model_dir = models["qwen2.5-instruct"]
    tok = load_tokenizer(model_dir)
    stop = tok.decode([0])
    (tmp_path / "qa.yaml").write_text(
        "task: qa\ndata: qa.jsonl\noutput_type: generate_until\ndoc_to_text: 'Q: {{q}}\\nA:'\n"
        f"doc_to_target: '{{{{a}}}}'\ngeneration_kwargs:\n  until: {json.dumps([stop])}\n  max_gen_toks: 4\n"
        "metric_list:\n  - metric: exact_match\n", encoding="utf-8")
    task = load_task(str(tmp_path / "qa.yaml"))
    mute = load_hf_model(model_dir)
    with torch.no_grad():
        (mute.lm_head.weight if mute.lm_head is not None else mute.embed.weight).zero_()  # every logit 0: argmax 0
    with pytest.warns(UserWarning, match="qa: 3 of 3 generations are empty"):
        res, preds = evaluate(mute, tok, task, show_progress=False)
    assert res["empty_generations"] == 3 and res["exact_match"] == 0 and all(p["generation"] == "" for p in preds)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res, _ = evaluate(load_hf_model(model_dir), tok, load_task(str(tmp_path / "qa.yaml")), show_progress=False)
    assert res["empty_generations"] < 2


def test_format_sweep_renders_the_models_chat_template(models, task_files):
    from lmforge.eval.run import format_sweep, prompts

    model_dir = models["qwen2.5-instruct"]
    model, tok = load_hf_model(model_dir), load_tokenizer(model_dir)
    hf_tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    task = load_task("cmmlu", task_files["cmmlu"], num_fewshot=2)
    doc = task.docs[0]
    for fmt, multiturn in (("chat", False), ("chat-multiturn", True)):
        ids = prompts(tok, task, [doc], fmt)[0]
        messages = task.messages(doc, multiturn=multiturn)
        assert ids == hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                 return_dict=False)
    assert [m["role"] for m in task.messages(doc, multiturn=True)] == ["system", "user", "assistant", "user",
                                                                        "assistant", "user"]
    # a chat-format choice is scored right after the generation prompt, without the delimiter
    res, rows = evaluate(model, tok, task, fmt="chat", show_progress=False)
    ids = prompts(tok, task, [doc], "chat")[0]
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for choice, ll in zip(rows[0]["choices"], rows[0]["loglikelihoods"]):
        cont = hf_tok(choice, add_special_tokens=False)["input_ids"]
        x = torch.tensor([ids + cont])
        with torch.no_grad():
            logp = torch.log_softmax(hf(x).logits[0, len(ids) - 1:-1], -1)
        assert ll == pytest.approx(float(logp.gather(1, torch.tensor(cont)[:, None]).sum()), abs=1e-4)
    sweep = format_sweep(model, tok, task, show_progress=False)
    assert set(sweep["formats"]) == {"plain", "chat", "chat-multiturn"}
    assert sweep["formats"]["chat"]["acc"] == res["acc"]
    values = [v["acc"] for v in sweep["formats"].values()]
    assert sweep["spread"]["acc"] == pytest.approx(max(values) - min(values))


@pytest.mark.slow
def test_torchrun_evaluation_equals_one_process(models, task_files, tmp_path):
    import subprocess
    import sys

    model_dir = models["phi-3-mini-instruct"]
    common = ["eval", "run", "--model", str(model_dir), "--task", "mmlu", "--data", str(task_files["mmlu"]),
              "--task", "arc_easy", "--data", str(task_files["arc"]), "--json"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "lmforge", *common, "--out", str(tmp_path / "one")], check=True, env=env,
                   capture_output=True)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "lmforge", *common, "--out", str(tmp_path / "two")], env=env, capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["config"]["processes"] == 2
    for task in ("mmlu", "arc_easy"):
        for metric in ("acc", "acc_norm"):
            if metric in one["results"][task]:
                assert two["results"][task][metric] == one["results"][task][metric]
        a = [json.loads(x) for x in (tmp_path / "one" / f"predictions_{task}.jsonl").read_text().splitlines()]
        b = [json.loads(x) for x in (tmp_path / "two" / f"predictions_{task}.jsonl").read_text().splitlines()]
        assert [r["doc"] for r in a] == [r["doc"] for r in b]
        for x, y in zip(a, b):
            assert x["loglikelihoods"] == pytest.approx(y["loglikelihoods"], abs=1e-5)
