"""serve/security.py: each attack a web page can mount on a local server (DNS rebinding, a cross-site form or fetch,
a state change without the session token) is refused with a 403 naming why; ordinary clients (curl, the openai SDK:
Host 127.0.0.1:PORT, no Origin) pass. The real `lmforge serve` app is checked over a real socket."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from lmforge.serve.security import RequestGuard, is_loopback, split_host

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")


def _echo_app(**guard):
    """A two-route Starlette app behind the guard (the guard is all that is under test here)."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def read(request):
        return JSONResponse({"ok": True})

    app = Starlette(routes=[Route("/", read), Route("/api/runs", read), Route("/api/launch", read, methods=["POST"])])
    return RequestGuard(app, **guard)


def _client(app, base="http://127.0.0.1:7860"):
    from starlette.testclient import TestClient

    return TestClient(app, base_url=base)


def _refused(r, code):
    assert r.status_code == 403, r.text
    body = r.json()["error"]
    assert body["code"] == code and body["type"] == "permission_error" and body["message"]
    return body["message"]


def test_host_header_must_name_this_server():
    c = _client(_echo_app(host="127.0.0.1", port=7860))
    for host in ("127.0.0.1:7860", "localhost:7860", "[::1]:7860", "LOCALHOST:7860"):
        assert c.get("/api/runs", headers={"Host": host}).status_code == 200, host
    # DNS rebinding: the attacker's domain resolves to 127.0.0.1, the browser still sends its name
    assert "evil.example" in _refused(c.get("/api/runs", headers={"Host": "evil.example:7860"}), "bad_host")
    _refused(c.get("/api/runs", headers={"Host": "evil.example"}), "bad_host")
    _refused(c.get("/api/runs", headers={"Host": "127.0.0.1.evil.example:7860"}), "bad_host")
    _refused(c.get("/api/runs", headers={"Host": "127.0.0.1:8000"}), "bad_host")  # another port's name
    _refused(c.get("/api/runs", headers={"Host": "127.0.0.1:x"}), "bad_host")
    # the bound address itself is a valid name when it is not a loopback one
    lan = _client(_echo_app(host="192.168.1.5", port=7860, token="t"), base="http://192.168.1.5:7860")
    assert lan.get("/", headers={"Host": "192.168.1.5:7860"}).status_code == 200
    _refused(lan.get("/", headers={"Host": "evil.example:7860"}), "bad_host")


def test_cross_site_origin_is_refused_same_origin_and_listed_ones_pass():
    c = _client(_echo_app(host="127.0.0.1", port=7860, origins=["http://localhost:3000"]))
    assert c.get("/api/runs", headers={"Origin": "http://127.0.0.1:7860"}).status_code == 200
    assert c.get("/api/runs", headers={"Origin": "http://localhost:3000"}).status_code == 200
    # a form on another site posting to the server ("simple" request: no preflight), and a fetch reading from it
    _refused(c.post("/api/launch", headers={"Origin": "https://evil.example"}, data={"a": "b"}), "bad_origin")
    _refused(c.get("/api/runs", headers={"Origin": "http://evil.example"}), "bad_origin")
    _refused(c.get("/api/runs", headers={"Origin": "null"}), "bad_origin")  # sandboxed iframe / file: page
    # the page's own origin under another of the allowed names is not this request's origin
    _refused(c.get("/api/runs", headers={"Host": "127.0.0.1:7860", "Origin": "http://localhost:7860"}), "bad_origin")


def test_state_changes_need_the_session_token():
    c = _client(_echo_app(host="127.0.0.1", port=7860, token="s3cret"))
    assert c.get("/api/runs").status_code == 200  # loopback: reads are open
    _refused(c.post("/api/launch"), "bad_token")
    _refused(c.post("/api/launch", headers={"X-Lmforge-Token": "s3cre"}), "bad_token")
    assert c.post("/api/launch", headers={"X-Lmforge-Token": "s3cret"}).status_code == 200
    # a non-loopback bind: every request needs it, but the page shell (which reads the token from its URL) loads
    lan = _client(_echo_app(host="0.0.0.0", port=7860, token="s3cret", token_for_reads=True),
                  base="http://10.0.0.7:7860")
    assert lan.get("/").status_code == 200
    _refused(lan.get("/api/runs"), "bad_token")
    assert lan.get("/api/runs", headers={"X-Lmforge-Token": "s3cret"}).status_code == 200


def test_address_helpers():
    assert split_host("[::1]:7860") == ("::1", 7860) and split_host("LocalHost") == ("localhost", None)
    assert split_host("a.b:12") == ("a.b", 12) and split_host("a:b")[1] == -1
    assert is_loopback("127.0.0.1") and is_loopback("127.1.2.3") and is_loopback("[::1]") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")


@pytest.fixture(scope="module")
def model_dir(trained_dir, tmp_path_factory):
    from tests.models import tiny_llama

    return tiny_llama(tmp_path_factory.mktemp("guarded"), trained_dir)


def test_lmforge_serve_refuses_rebinding_and_cross_site_but_serves_the_openai_sdk(model_dir):
    """`lmforge serve` used to answer `Host: evil.example`; the app it builds (create_app with its host and port)
    now refuses it, while the openai SDK and curl-like requests work as before."""
    openai = pytest.importorskip("openai")
    uvicorn = pytest.importorskip("uvicorn")
    from lmforge.model import load_hf_model
    from lmforge.serve.app import Server, create_app
    from lmforge.tokenizer import load_tokenizer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = Server(load_hf_model(model_dir), load_tokenizer(model_dir), "tiny")
    uv = uvicorn.Server(uvicorn.Config(create_app(server, host="127.0.0.1", port=port), host="127.0.0.1", port=port,
                                       log_level="warning", log_config=None))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    try:
        for _ in range(200):
            if uv.started:
                break
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port}"
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
        out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert out.choices[0].message.content is not None
        assert httpx.get(url + "/health").json()["status"] == "ok"
        _refused(httpx.get(url + "/health", headers={"Host": "evil.example"}), "bad_host")
        _refused(httpx.post(url + "/v1/chat/completions", headers={"Host": f"evil.example:{port}"},
                            json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}), "bad_host")
        _refused(httpx.post(url + "/v1/chat/completions", headers={"Origin": "https://evil.example"},
                            json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}), "bad_origin")
        # the web chat page is served from the same origin and its fetches carry that Origin
        assert httpx.get(url + "/v1/models", headers={"Origin": url}).status_code == 200
    finally:
        uv.should_exit = True
        thread.join(10)
