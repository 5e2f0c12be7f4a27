"""Grounding metrics on fixed judgements: ALCE's citation recall / precision worked by hand, RAGAS's formulas
transcribed (ragas is not installed here; the source file of each is named), the two support judges."""

from __future__ import annotations

import random

import numpy as np
import pytest

from lmforge.infer.client import Completion, ModelClient
from lmforge.rag.grounding import (
    NLI_PROMPT,
    JudgeSupport,
    OverlapSupport,
    answer_metrics,
    answer_relevance,
    citations,
    context_precision,
    context_recall,
    judge_citations,
    parse_generated_question,
)

SOURCES = ["Cats purr when content.", "Cats sleep most of the day.", "Dogs bark. Fish swim."]


def substring_support(pairs):
    """A fixed judge: the premise supports the sentence when it holds the sentence's words verbatim."""
    return [h.lower().rstrip(".") in p.lower() for p, h in pairs]


def test_citation_recall_and_precision_worked_by_hand():
    answer = "Cats purr [1][2]. Cats sleep [2]. Dogs meow [3]. Fish swim."
    judged = judge_citations(answer, SOURCES, substring_support)
    assert [(j.text, j.cites, j.supported, j.precise) for j in judged] == [
        ("Cats purr.", [1, 2], True, 1),   # [1]+[2] support it; [2] alone does not and [1] alone does: [2] superfluous
        ("Cats sleep.", [2], True, 1),
        ("Dogs meow.", [3], False, 0),     # cited, not supported: its citation counts against precision
        ("Fish swim.", [], False, 0)]      # no citation: not recalled, whatever the sources say
    m = answer_metrics(answer, SOURCES, substring_support)
    assert m["citation_recall"] == 2 / 4 and m["citation_precision"] == 2 / 4  # 2 precise of 4 citations
    assert m["faithfulness"] == 3 / 4  # RAGAS: supported by the sources given, cited or not


def test_alce_rules_for_odd_citations():
    # out of range: unsupported, and (ALCE) its citations are not counted; [n, m] lists and citations after the stop
    m = answer_metrics("Cats purr [7]. Cats sleep. [1, 2]", SOURCES, substring_support)
    assert m["citation_recall"] == 1 / 2 and m["citation_precision"] == 1 / 2
    assert citations("x [1][2] y [3, 4]") == [1, 2, 3, 4]
    # at most 3 citations are read (ALCE's default); a citation both needed and sufficient is precise
    judged = judge_citations("Cats purr [2][3][4][1].", SOURCES + ["x"], substring_support)
    assert judged[0].cites == [2, 3, 4] and not judged[0].supported
    both = ["Cats purr", "when content"]
    judged = judge_citations("Cats purr when content [1][2].", both, lambda pairs: [
        p.replace("\n", " ").lower().startswith(h.lower().rstrip(".")) for p, h in pairs])
    assert judged[0].supported and judged[0].precise == 2  # neither alone supports it, so neither is superfluous
    assert answer_metrics("", SOURCES, substring_support)["citation_recall"] == 0.0


def ragas_average_precision(verdicts):
    """ragas/metrics/_context_precision.py `_calculate_average_precision` (ragas 0.2), transcribed."""
    denominator = sum(verdicts) + 1e-10
    numerator = sum([(sum(verdicts[: i + 1]) / (i + 1)) * verdicts[i] for i in range(len(verdicts))])
    return numerator / denominator


def test_context_precision_and_recall_equal_ragas():
    qrels = {"d1": 1, "d3": 2, "d9": 1, "d0": 0}
    assert context_precision(["d1", "d2", "d3"], qrels) == pytest.approx((1 + 2 / 3) / 2)
    assert context_recall(["d1", "d2", "d3"], qrels) == 2 / 3  # IDBasedContextRecall: d9 missed (d0 is not relevant)
    rng = random.Random(0)
    for _ in range(200):
        retrieved = rng.sample([f"d{i}" for i in range(12)], rng.randint(1, 10))
        verdicts = [1 if qrels.get(d, 0) > 0 else 0 for d in retrieved]
        assert context_precision(retrieved, qrels) == pytest.approx(ragas_average_precision(verdicts), abs=1e-9)
    assert context_precision(["d5"], qrels) == 0.0


def test_overlap_support():
    s = OverlapSupport(threshold=0.6)
    # content words after stemming and stop words: {cat, purr, content} all in the premise; {dog, purr, loud} 1 of 3
    assert s([("Domestic cats purr when they are content.", "The cat purrs when content."),
              ("Domestic cats purr when they are content.", "Dogs purr loudly.")]) == [True, False]
    assert s([("绿茶含有儿茶素。", "绿茶含有儿茶素")]) == [True]
    assert s([("anything", "the of and")]) == [False]  # no content words: nothing to support


class Scripted(ModelClient):
    def __init__(self, reply):
        self.reply, self.prompts = reply, []

    def chat(self, conversations, sampling=None, n=1, tools=None):
        out = []
        for c in conversations:
            self.prompts.append(c[-1]["content"])
            out.append([Completion(self.reply(c[-1]["content"], k)) for k in range(n)])
        return out


def test_judge_support_prompts_in_the_sentence_language_and_caches():
    client = Scripted(lambda p, k: "Yes, it does." if "purr" in p.split("Hypothesis")[-1] else "否")
    judge = JudgeSupport(client)
    pairs = [("Cats purr when content.", "Cats purr."), ("Cats purr.", "Dogs bark."), ("绿茶含有儿茶素。", "绿茶含有咖啡因。")]
    assert judge(pairs) == [True, False, False]
    assert client.prompts[0] == NLI_PROMPT["en"].format(premise="Cats purr when content.", hypothesis="Cats purr.")
    assert client.prompts[2].startswith("前提：绿茶含有儿茶素。")
    judge(pairs[:2])
    assert len(client.prompts) == 3  # verdicts cached


def bag_of_words(texts):
    vocab = ["cats", "purr", "why", "do", "dogs", "bark", "how"]
    return np.array([[t.lower().count(w) for w in vocab] for t in texts], float)


def test_answer_relevance_is_the_mean_cosine_of_generated_questions():
    questions = ["Question: why do cats purr?\nNoncommittal: no", "问题：how do dogs bark?\n含糊：否",
                 "Question: why do dogs bark\nNoncommittal: no"]
    client = Scripted(lambda p, k: questions[k])
    score = answer_relevance("why do cats purr", "Cats purr when content [1].", client, bag_of_words, n=3)
    v = bag_of_words(["why do cats purr", "why do cats purr?", "how do dogs bark?", "why do dogs bark"])
    v = v / np.linalg.norm(v, axis=1, keepdims=True)
    assert score == pytest.approx(float(np.mean(v[1:] @ v[0])))  # RAGAS ResponseRelevancy's mean cosine
    assert "[1]" not in client.prompts[0]
    vague = Scripted(lambda p, k: "Question: why do cats purr?\nNoncommittal: yes")
    assert answer_relevance("why do cats purr", "I don't know.", vague, bag_of_words, n=2) == 0.0
    assert parse_generated_question("问题：猫为什么打呼噜？\n含糊：是") == ("猫为什么打呼噜？", True)


@pytest.mark.slow
def test_rag_eval_generate_on_a_tiny_model(tmp_path, trained_dir, capsys):
    """`rag eval --generate` end to end: every row's sources are what `rag ask` gives for the query, and its context
    and citation figures follow from those sources and the qrels (computed here from `ask`'s own output)."""
    import json

    from lmforge.cli import main
    from lmforge.data.document import Document
    from lmforge.infer.load import load_for_inference
    from lmforge.rag.answer import AskConfig, ask
    from lmforge.rag.index import IndexConfig, RagIndex
    from tests.models import tiny_llama

    docs = {"cats": "Domestic cats purr when content.", "felines": "A feline needs taurine; cats are carnivores.",
            "dogs": "Dogs bark at strangers.", "tea": "Green tea contains catechins and caffeine."}
    index = RagIndex(tmp_path / "idx", IndexConfig(dense=False))
    index.upsert([Document(k, v) for k, v in docs.items()])
    (tmp_path / "qrels").mkdir()
    queries = {"q1": "why do cats purr", "q2": "what is in green tea", "q3": "do dogs bark"}
    (tmp_path / "queries.jsonl").write_text("".join(json.dumps({"_id": q, "text": t}) + "\n"
                                                    for q, t in queries.items()), encoding="utf-8")
    (tmp_path / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\nq1\tcats\t2\nq1\tfelines\t1\nq2\ttea\t1\nq3\tdogs\t1\n", encoding="utf-8")
    model = tiny_llama(tmp_path / "m", trained_dir, hidden=64, max_positions=512, tie=False)
    out = tmp_path / "answers.json"
    assert main(["rag", "eval", "--index", str(index.path), "--queries", str(tmp_path / "queries.jsonl"), "--qrels",
                 str(tmp_path / "qrels" / "test.tsv"), "--generate", "--model", str(model), "--max-new-tokens", "12",
                 "--answer-k", "3", "--limit", "2", "--json", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    rows = json.loads(out.read_text(encoding="utf-8"))["rows"]
    assert printed["queries"] == 2 and [r["query"] for r in rows] == ["q1", "q2"] and printed["support"] == "overlap"
    loaded = load_for_inference(model)
    qrels = {"q1": {"cats": 2, "felines": 1}, "q2": {"tea": 1}}
    for row in rows:
        result = ask(index, queries[row["query"]], loaded.model, loaded.tokenizer,
                     AskConfig(k=3, mode="sparse", max_new_tokens=12))
        docs_ = list(dict.fromkeys(s["doc_id"] for s in result["sources"]))
        assert row["sources"] == docs_ and row["answer"] == result["answer"]
        assert row["context_recall"] == context_recall(docs_, qrels[row["query"]])
        assert row["context_precision"] == context_precision(docs_, qrels[row["query"]])
    q1 = rows[0]
    assert q1["sources"][0] == "cats" and q1["context_precision"] == 1.0  # the random model's text aside
    assert printed["metrics"]["context_recall"] == pytest.approx(np.mean([r["context_recall"] for r in rows]))


def test_cite_sentences_worked_by_hand():
    """Sentence 1 cites nothing: source 1 holds all its content words (capit, franc, pari), source 2 one of three, so
    [1] is added; sentence 2 keeps its [2] (3 of 3 words); sentence 3 has no word in any source: unsupported, no
    marker. The answer's support is the mean of 1, 1 and 0."""
    from lmforge.rag.grounding import cite_sentences

    sources = {1: "Paris is the capital of France.", 2: "The Seine river flows through Paris and Rouen."}
    answer = "The capital of France is Paris. The Seine flows through Rouen [2]. Bananas are yellow!"
    text, sentences, support = cite_sentences(answer, sources)
    assert text == "The capital of France is Paris [1]. The Seine flows through Rouen [2]. Bananas are yellow!"
    assert [(s["cites"], s["added"], s["supported"], s["support"]) for s in sentences] == [
        ([1], True, True, 1.0), ([2], False, True, 1.0), ([], False, False, 0.0)]
    assert support == pytest.approx(2 / 3)
    # a sentence whose best source holds half its words (below the 0.6 threshold) stays unmarked
    text, sentences, _ = cite_sentences("Paris exports bananas.", sources)
    assert text == "Paris exports bananas." and sentences[0]["support"] == pytest.approx(1 / 3)
    assert cite_sentences("", sources) == ("", [], 0.0)


def test_cite_sentences_in_chinese():
    from lmforge.rag.grounding import cite_sentences

    sources = {1: "长江是中国最长的河流。", 2: "巴黎是法国的首都。"}
    text, sentences, support = cite_sentences("法国的首都是巴黎。长江是中国最长的河流[1]。", sources)
    assert text == "法国的首都是巴黎[2]。长江是中国最长的河流[1]。"
    assert [s["cites"] for s in sentences] == [[2], [1]] and support == 1.0


def test_eval_rag_is_rag_eval_generate(tmp_path, trained_dir, capsys):
    """`lmforge eval rag` runs the one implementation of `rag eval --generate`: the same rows from the same flags
    (timings aside), and the answers flags (--rag, --no-cite) reach it."""
    import json

    from lmforge.cli import main
    from lmforge.data.document import Document
    from lmforge.rag.index import IndexConfig, RagIndex
    from tests.models import tiny_llama

    index = RagIndex(tmp_path / "idx", IndexConfig(dense=False))
    index.upsert([Document("cats", "Domestic cats purr when content."),
                  Document("tea", "Cats avoid green tea: it has caffeine.")])
    (tmp_path / "queries.jsonl").write_text(json.dumps({"_id": "q1", "text": "why do cats purr"}) + "\n")
    (tmp_path / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\nq1\tcats\t1\n")
    model = tiny_llama(tmp_path / "m", trained_dir, max_positions=512, tie=False)
    flags = ["--index", str(index.path), "--queries", str(tmp_path / "queries.jsonl"), "--qrels",
             str(tmp_path / "qrels.tsv"), "--model", str(model), "--max-new-tokens", "6", "--answer-k", "2",
             "--rag", "sequence", "--no-cite", "--json", "--no-pack"]
    runs = []
    for command in (["rag", "eval", "--generate"], ["eval", "rag"]):
        assert main(command + flags + ["--out", str(tmp_path / f"{command[0]}.json")]) == 0
        capsys.readouterr()
        rows = json.loads((tmp_path / f"{command[0]}.json").read_text())["rows"]
        runs.append([{k: v for k, v in r.items() if k != "seconds"} for r in rows])
    assert runs[0] == runs[1] and runs[0][0]["sources"] == ["cats", "tea"]
    assert main(["eval", "rag", "--index", str(index.path), "--queries", str(tmp_path / "queries.jsonl"),
                 "--qrels", str(tmp_path / "qrels.tsv")]) == 2
    assert "--model" in capsys.readouterr().err
