"""The studio's HTTP app: the runs and their curves as JSON, the forms, the exact command, launches confined to the
workspace and to the known commands, the CLI's own refusal of a used run directory, and the guard (a page on
another site, a rebinding domain or a request without the token changes nothing)."""

from __future__ import annotations

import time

import pytest

pytest.importorskip("fastapi")

TOKEN = "test-token"


@pytest.fixture()
def client(workspace, parsers):
    from fastapi.testclient import TestClient

    from lmforge.studio.app import Studio, create_studio_app

    studio = Studio(workspace / "runs", parsers, cwd=workspace)
    with TestClient(create_studio_app(studio, host="127.0.0.1", port=7860, token=TOKEN),
                    base_url="http://127.0.0.1:7860") as c:
        c.studio = studio
        yield c


def _post(client, path, body, token=TOKEN, **headers):
    return client.post(path, json=body, headers={"X-Lmforge-Token": token, **headers})


def test_runs_and_their_curves(client, workspace):
    runs = {r["id"]: r for r in client.get("/api/runs").json()["runs"]}
    assert runs["pt-done"]["status"] == "finished" and runs["pt-done"]["command_line"].startswith("lmforge pretrain ")
    lines = (workspace / "runs" / "pt-done" / "metrics.jsonl").read_text().splitlines()
    first = client.get("/api/runs/pt-done/metrics", params={"offset": 0}).json()
    assert len(first["records"]) == len(lines) and first["offset"] == sum(len(x) + 1 for x in lines)
    again = client.get("/api/runs/pt-done/metrics", params={"offset": first["offset"], "file": first["file"]}).json()
    assert again["records"] == [] and again["offset"] == first["offset"]  # nothing new: nothing resent
    other = client.get("/api/runs/pt-done/metrics", params={"offset": first["offset"], "file": "0:1"}).json()
    assert other["reset"] and other["records"] == first["records"]  # another file under the name: from its start
    assert client.get("/api/runs/sft/ft-done/detail").json()["kind"] == "finetune"
    for bad in ("../..", "..", "pt-done/../../..", "nope"):  # outside the workspace, or no such run
        assert client.get(f"/api/runs/{bad}/metrics").status_code == 404, bad
    page = client.get("/")
    assert page.status_code == 200 and "lmforge studio" in page.text
    for asset in ("studio.js", "chart.js", "studio.css"):  # every asset ships in the package: no CDN
        assert client.get(f"/static/{asset}").status_code == 200
    assert "http" not in page.text.replace("http-equiv", "")
    assert client.get("/static/..%2Fapp.py").status_code == 404


def test_forms_and_the_exact_command(client):
    forms = client.get("/api/commands").json()["commands"]
    assert set(forms) == {"pretrain", "finetune", "classify train", "eval run", "data run"}
    assert any(o["flag"] == "--max-steps" for o in forms["pretrain"])
    r = _post(client, "/api/preview", {"command": "pretrain", "values": {"data": "tokens", "out": "runs/new run",
                                                                        "max_steps": "8"}})
    assert r.json()["command_line"] == "lmforge pretrain --data tokens --out 'runs/new run' --max-steps 8"
    r = _post(client, "/api/preview", {"command": "pretrain", "values": {"out": "../elsewhere"}})
    assert r.status_code == 400 and "outside the workspace" in r.json()["error"]
    r = _post(client, "/api/preview", {"command": "pretrain", "values": {"dataset": "nope"}})
    assert r.status_code == 400 and "--dataset" in r.json()["error"]
    # only the known commands: nothing else is ever started, whatever the body says
    before = client.get("/api/launches").json()["launches"]
    for command in ("serve", "export merge", "pretrain; rm -rf /", None):
        r = _post(client, "/api/launch", {"command": command, "values": {"out": "runs/x"}})
        assert r.status_code == 400 and "command" in r.json()["error"]
    assert client.get("/api/launches").json()["launches"] == before


def test_the_guard_protects_every_state_change(client):
    before = client.get("/api/launches").json()["launches"]
    body = {"command": "pretrain", "values": {"out": "runs/x"}}
    assert _post(client, "/api/launch", body, token="").status_code == 403
    assert _post(client, "/api/launch", body, token="wrong").status_code == 403
    assert _post(client, "/api/launch", body, Origin="https://evil.example").json()["error"]["code"] == "bad_origin"
    assert _post(client, "/api/launch", body, Host="evil.example:7860").json()["error"]["code"] == "bad_host"
    assert client.get("/api/runs", headers={"Host": "attacker.test:7860"}).status_code == 403
    assert _post(client, "/api/launches/x/stop", {}, token="").status_code == 403
    assert client.get("/api/launches").json()["launches"] == before  # none of them started anything


def test_a_non_loopback_bind_needs_the_token_for_reads(workspace, parsers):
    from fastapi.testclient import TestClient

    from lmforge.studio.app import Studio, create_studio_app

    app = create_studio_app(Studio(workspace / "runs", parsers, cwd=workspace), host="0.0.0.0", port=7860,
                            token=TOKEN)
    with TestClient(app, base_url="http://192.168.1.9:7860") as c:
        assert c.get("/").status_code == 200  # the page, which then reads the token from its URL
        assert c.get("/api/runs").status_code == 403
        assert c.get("/api/runs", headers={"X-Lmforge-Token": TOKEN}).status_code == 200


def test_a_launch_into_a_used_run_directory_is_refused_by_the_cli(client, workspace):
    """The studio starts the command; the CLI's own check refuses the used directory (exit 2, its one-line error
    in the log the page shows)."""
    r = _post(client, "/api/launch", {"command": "pretrain", "values": {
        "data": "tokens", "out": "runs/pt-done", "max_steps": "2", "max_length": "16", "batch_size": "2"}})
    assert r.status_code == 200, r.text
    launch = r.json()
    assert launch["argv"][:2] == ["--data", "tokens"] and launch["out"] == "pt-done"
    for _ in range(600):
        got = client.get(f"/api/launches/{launch['id']}/log").json()
        if got["launch"]["state"] == "exited":
            break
        time.sleep(0.1)
    assert got["launch"]["returncode"] == 2
    assert "lmforge: error: runs/pt-done already holds a training run" in got["text"]
    assert client.get("/api/runs").json()["runs"][0]["status"] == "finished"  # the run itself is untouched
    assert (workspace / "runs" / ".studio" / "launches" / f"{launch['id']}.log").exists()  # survives a reload


def test_lmforge_studio_command_prints_the_token_url_and_guards_it(workspace, tmp_path):
    """The real command in a child process: loopback by default, the URL with its token printed, a non-loopback
    --host refused without --token (one line, exit 2)."""
    import os
    import re
    import socket
    import subprocess
    import sys

    import httpx

    from lmforge.cli import main

    assert main(["studio", "--host", "0.0.0.0", "--runs", str(tmp_path)]) == 2
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    child = subprocess.Popen([sys.executable, "-m", "lmforge", "studio", "--runs", "runs", "--port", str(port)],
                             cwd=workspace, stderr=subprocess.PIPE, text=True, env={**os.environ})
    try:
        printed = ""
        while "#token=" not in printed:
            line = child.stderr.readline()
            assert line, printed
            printed += line
        url, token = re.search(r"(http://127\.0\.0\.1:\d+)/#token=(\S+)", printed).groups()
        for _ in range(100):
            try:
                runs = httpx.get(url + "/api/runs").json()["runs"]
                break
            except httpx.TransportError:
                time.sleep(0.1)
        assert {"pt-done", "sft/ft-done"} <= {r["id"] for r in runs}
        assert httpx.get(url + "/api/runs", headers={"Host": "evil.example"}).status_code == 403
        assert httpx.post(url + "/api/preview", json={"command": "pretrain", "values": {"out": "runs/z"}}
                          ).status_code == 403
        ok = httpx.post(url + "/api/preview", json={"command": "pretrain", "values": {"out": "runs/z"}},
                        headers={"X-Lmforge-Token": token})
        assert ok.status_code == 200 and ok.json()["command_line"] == "lmforge pretrain --out runs/z"
    finally:
        child.terminate()
        child.wait(10)
