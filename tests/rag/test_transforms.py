"""Query transforms: parsing, prompts by script, RRF fusion with the original query against the formula written out,
the reply cache, the CLI; a deterministic client at the ModelClient boundary and one real (tiny) engine model."""

from __future__ import annotations

import json

import pytest

from lmforge.config import ConfigError
from lmforge.data.document import Document
from lmforge.infer.client import Completion, ModelClient
from lmforge.rag.index import IndexConfig, RagIndex
from lmforge.rag.transforms import PROMPTS, QueryTransform, TransformCache, TransformedIndex

DOCS = {
    "cats": "Domestic cats purr when content and sleep for most of the day.",
    "felines": "Felines are obligate carnivores; a feline needs taurine in its diet.",
    "dogs": "Dogs bark at strangers and need daily walks.",
    "tea": "Green tea contains catechins and a little caffeine.",
    "coffee": "Coffee beans are roasted seeds; caffeine is a stimulant.",
    "茶": "绿茶含有儿茶素和少量咖啡因，是中国人常喝的饮料。",
}


class ScriptedClient(ModelClient):
    """Replies chosen by the question inside the prompt; counts the prompts it was sent."""

    def __init__(self, replies: dict[str, str], name: str = "scripted"):
        self.replies, self.name, self.prompts = replies, name, []

    def chat(self, conversations, sampling=None, n=1, tools=None):
        out = []
        for messages in conversations:
            prompt = messages[-1]["content"]
            self.prompts.append(prompt)
            reply = next((r for q, r in self.replies.items() if q in prompt), "")
            out.append([Completion(reply)])
        return out


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    idx = RagIndex(tmp_path_factory.mktemp("t") / "idx", IndexConfig(dense=False))
    idx.upsert([Document(k, v) for k, v in DOCS.items()])
    return idx


def test_parse_specs_and_errors():
    assert QueryTransform.parse("rewrite") == QueryTransform("rewrite", 3)
    assert QueryTransform.parse("multi-query:5") == QueryTransform("multi-query", 5)
    assert str(QueryTransform.parse("decompose")) == "decompose:3"
    for bad, why in [("expand", "one of rewrite"), ("hyde:2", "only multi-query and decompose"),
                     ("multi-query:x", "whole number"), ("multi-query:0", "whole number")]:
        with pytest.raises(ConfigError, match=why):
            QueryTransform.parse(bad)


def test_the_query_script_picks_the_prompt_language():
    t = QueryTransform("multi-query", 4)
    assert t.prompt("why do cats purr?") == PROMPTS["multi-query"]["en"].format(query="why do cats purr?", n=4)
    zh = t.prompt("绿茶有什么成分？")
    assert zh == PROMPTS["multi-query"]["zh"].format(query="绿茶有什么成分？", n=4) and "4 个" in zh
    assert set(PROMPTS) == {"rewrite", "hyde", "multi-query", "decompose"}
    assert all(set(p) == {"en", "zh"} and all("{query}" in v for v in p.values()) for p in PROMPTS.values())


def test_replies_become_queries():
    mq = QueryTransform("multi-query", 3)
    reply = '1. feline diet\n- "what do cats eat"\n\n2) Why do cats purr?\n3. feline diet\n4. cat food\n5. extra'
    # numbering and quotes stripped, the original and repeats dropped, at most n
    assert mq.queries(reply, "why do cats purr") == ["feline diet", "what do cats eat", "cat food"]
    assert QueryTransform("decompose").queries("一、绿茶的成分\n二、咖啡因的作用", "q") == ["绿茶的成分", "咖啡因的作用"]
    assert QueryTransform("rewrite").queries('\n"cat purring mechanism"\nextra line', "q") == ["cat purring mechanism"]
    assert QueryTransform("hyde").queries("Cats purr\n when  content.", "q") == ["Cats purr when content."]
    assert QueryTransform("rewrite").queries("   ", "q") == []


def _rrf(rankings, k=60):
    """Cormack et al.'s formula written out, for the expected fused order."""
    scores = {}
    for ranking in rankings:
        for r, item in enumerate(ranking):
            scores[item] = scores.get(item, 0) + 1 / (k + r + 1)
    return scores


def test_search_fuses_the_original_and_generated_rankings_by_rrf(index):
    client = ScriptedClient({"why do cats purr": "feline taurine carnivores\ncaffeine stimulant"})
    t = TransformedIndex(index, QueryTransform("multi-query", 2), client)
    hits = t.search("why do cats purr", k=5, mode="sparse", distinct=False)
    lists = [[h.chunk.chunk_id for h in index.search(q, k=100, mode="sparse", distinct=False)]
             for q in ["why do cats purr", "feline taurine carnivores", "caffeine stimulant"]]
    expected = _rrf(lists)
    assert [h.chunk.chunk_id for h in hits] == sorted(expected, key=lambda c: (-expected[c], c))[:5]
    assert [round(h.score, 12) for h in hits] == [round(expected[h.chunk.chunk_id], 12) for h in hits]
    assert {h.chunk.doc_id for h in hits} >= {"cats", "felines", "coffee"}  # found only through the generated ones
    assert t.generated("why do cats purr") == ["feline taurine carnivores", "caffeine stimulant"]
    assert all(h.scores["sparse"] > 0 for h in hits)  # what rag ask's relevance check reads


def test_a_rewrite_finds_what_the_words_of_the_question_miss(index):
    question = "which drink wakes you up"  # no word of it is in the corpus
    assert index.search(question, k=3, mode="sparse") == []
    client = ScriptedClient({question: "caffeine stimulant coffee"})
    hits = TransformedIndex(index, QueryTransform("rewrite"), client).search(question, k=3, mode="sparse")
    assert hits[0].chunk.doc_id == "coffee"


def test_chinese_query_gets_the_chinese_prompt_and_finds_chinese_text(index):
    client = ScriptedClient({"早上喝什么提神": "咖啡因 饮料"})
    hits = TransformedIndex(index, QueryTransform("hyde"), client).search("早上喝什么提神", k=2, mode="sparse")
    assert "问题：早上喝什么提神" in client.prompts[0] and hits[0].chunk.doc_id == "茶"


def test_replies_are_cached_per_model_and_prompt(index, tmp_path):
    path = tmp_path / "cache.jsonl"
    first = ScriptedClient({"cats": "feline diet"})
    TransformedIndex(index, QueryTransform("rewrite"), first, TransformCache(path)).search("cats", k=2, mode="sparse")
    TransformedIndex(index, QueryTransform("rewrite"), first, TransformCache(path)).search("cats", k=2, mode="sparse")
    assert len(first.prompts) == 1  # the second search (a new cache object, the same file) asked nothing
    row = json.loads(path.read_text(encoding="utf-8").splitlines()[0])
    assert row["model"] == "scripted" and row["reply"] == "feline diet" and "Question: cats" in row["prompt"]
    other = ScriptedClient({"cats": "purring"}, name="another-model")
    t = TransformedIndex(index, QueryTransform("rewrite"), other, TransformCache(path))
    assert t.generated("cats") == ["purring"] and len(other.prompts) == 1  # another model: asked again
    hyde = TransformedIndex(index, QueryTransform("hyde"), first, TransformCache(path))
    hyde.generated("cats")
    assert len(first.prompts) == 2  # another prompt: asked again
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"key": "cut mid-wri')  # a crash while appending
    assert len(TransformCache(path).replies) == 3


def test_prepare_asks_once_for_all_uncached_queries(index):
    client = ScriptedClient({"cats": "felines", "tea": "catechins"})
    t = TransformedIndex(index, QueryTransform("rewrite"), client)
    calls = []
    real = client.chat
    client.chat = lambda conv, *a, **k: calls.append(len(conv)) or real(conv, *a, **k)
    t.prepare(["cats", "tea", "cats"])
    t.prepare(["cats"])
    assert calls == [2]


@pytest.mark.slow
def test_cli_search_and_eval_with_a_real_tiny_engine_model(index, tmp_path, trained_dir, capsys):
    """The CLI through EngineClient: the generated query --explain shows is the engine's own greedy reply to the
    rewrite prompt, rendered with the model's chat template (computed here with infer.generate)."""
    import shutil

    from lmforge.chat.render import encode_chat
    from lmforge.cli import main
    from lmforge.infer import SamplingConfig, generate
    from lmforge.infer.load import load_for_inference
    from tests.models import tiny_llama

    # untied: a random tied model echoes the prompt's last token (here a newline), which parses to no query
    model_dir = tiny_llama(tmp_path / "m", trained_dir, hidden=64, max_positions=512, tie=False)
    idx = tmp_path / "idx"
    shutil.copytree(index.path, idx)
    question = "why do cats purr"
    assert main(["rag", "search", "--index", str(idx), question, "--query-transform", "rewrite", "--model",
                 str(model_dir), "--explain", "--json", "--mode", "sparse"]) == 0
    out = capsys.readouterr()
    loaded = load_for_inference(model_dir)
    prompt = QueryTransform("rewrite").prompt(question)
    ids = encode_chat(loaded.tokenizer, loaded.template, [{"role": "user", "content": prompt}],
                      add_generation_prompt=True).ids if loaded.template else loaded.tokenizer.encode(prompt)
    reply = generate(loaded.model, loaded.tokenizer, ids, SamplingConfig(max_new_tokens=64, temperature=0.0,
                                                                         stop_token_ids=loaded.stop_ids))
    expected = QueryTransform("rewrite").queries(reply, question)
    explained = out.err[out.err.index("rewrite: searched the query and"):].splitlines()
    assert expected and [line[4:] for line in explained[1:]] == expected
    hits = json.loads(out.out)
    assert hits and hits[0]["scores"]["queries"] >= 1
    cached = [json.loads(line) for line in (idx / "query_transforms.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [c["reply"] for c in cached] == [reply] and cached[0]["model"] == str(model_dir)

    qdir = tmp_path / "beir"
    (qdir / "qrels").mkdir(parents=True)
    (qdir / "queries.jsonl").write_text(json.dumps({"_id": "q1", "text": question}) + "\n", encoding="utf-8")
    (qdir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\tcats\t1\n", encoding="utf-8")
    assert main(["rag", "eval", "--index", str(idx), "--queries", str(qdir / "queries.jsonl"), "--qrels",
                 str(qdir / "qrels" / "test.tsv"), "--query-transform", "rewrite", "--model", str(model_dir),
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["query_transform"] == "rewrite" and result["modes"]["sparse"]["ndcg@10"] == 1.0
    assert len((idx / "query_transforms.jsonl").read_text(encoding="utf-8").splitlines()) == 1  # from the cache

    # the same through `lmforge serve` and the HTTP client: the same greedy reply, cached under the served name
    from tests.serve.test_server import Running

    served = Running(model_dir, max_batch=4)
    try:
        (idx / "query_transforms.jsonl").unlink()
        assert main(["rag", "search", "--index", str(idx), question, "--query-transform", "rewrite", "--endpoint",
                     served.url + "/v1", "--served-model", "tiny", "--explain", "--mode", "sparse"]) == 0
    finally:
        served.close()
    err = capsys.readouterr().err
    assert [line[4:] for line in err[err.index("rewrite: searched"):].splitlines()[1:]] == expected
    cached = [json.loads(line) for line in (idx / "query_transforms.jsonl").read_text(encoding="utf-8").splitlines()]
    assert cached[0]["model"] == "tiny" and cached[0]["reply"].strip() == reply.strip()


def test_cli_needs_a_model_for_a_transform(index, capsys):
    from lmforge.cli import main

    rc = main(["rag", "search", "--index", str(index.path), "cats", "--query-transform", "hyde"])
    assert rc != 0 and "--model DIR or --endpoint URL" in capsys.readouterr().err


def test_cli_ask_with_a_transform_through_an_endpoint(index, tmp_path, capsys, monkeypatch):
    """`rag ask --query-transform --endpoint` (the client replaced at the HTTP boundary): the sources come from the
    fused search, the JSON names the generated queries, --explain prints them."""
    import shutil

    from lmforge.cli import main
    from lmforge.infer import client as client_module

    idx = tmp_path / "idx"
    shutil.copytree(index.path, idx)
    question = "which drink wakes you up"
    made = []

    def fake_http(base_url, model="default", api_key=None, **kw):
        made.append((base_url, model))
        return ScriptedClient({question: "caffeine stimulant coffee"}, name=model)

    monkeypatch.setattr(client_module, "HTTPClient", fake_http)
    assert main(["rag", "ask", "--index", str(idx), question, "--query-transform", "rewrite", "--endpoint",
                 "http://x/v1", "--served-model", "m", "--json", "--explain", "--mode", "sparse", "--k", "2"]) == 0
    out = capsys.readouterr()
    result = json.loads(out.out)
    assert made == [("http://x/v1", "m")]
    assert result["query_transform"] == {"kind": "rewrite", "queries": ["caffeine stimulant coffee"]}
    assert result["sources"][0]["doc_id"] == "coffee" and "  - caffeine stimulant coffee" in out.err
