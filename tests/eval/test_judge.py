"""LLM-as-judge against a local OpenAI-compatible HTTP server started by the test: prompts, parsing, position swap,
retries, raw replies saved."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from lmforge.cli import main
from lmforge.eval.judge import JudgeError, OpenAIClient, judge_pairwise, judge_pointwise, parse_score, parse_verdict

ENTRIES = [{"instruction": "Name the capital of France.", "input": "", "output": "Paris"},
           {"instruction": "把这句话翻译成英文。", "input": "我喜欢读书。", "output": "I like reading."},
           {"instruction": "What is 3 + 4?", "input": "", "output": "7"}]


class Judge(BaseHTTPRequestHandler):
    """A judge that reads the prompt: a response equal to the reference scores 90, others 20; pairwise it prefers
    the response equal to the reference, unless `biased`, when it always answers "A"."""

    biased = False
    fail_first = 0
    seen: list = []

    def log_message(self, *a):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Judge.seen.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        if Judge.fail_first:
            Judge.fail_first -= 1
            self.send_response(429)
            self.send_header("Retry-After", "0")
            self.end_headers()
            return
        prompt = body["messages"][0]["content"]
        if "score the model response" in prompt:
            ref = re.search(r"correct output `(.*?)`, score", prompt, re.S).group(1)
            resp = re.search(r"model response `(.*?)` on a scale", prompt, re.S).group(1)
            reply = "90" if resp == ref else "Score: 20"
        else:
            ref = re.search(r"reference answer `(.*?)`", prompt, re.S).group(1)
            a = re.search(r"Response A: `(.*?)`", prompt, re.S).group(1)
            reply = "A" if Judge.biased or a == ref else "B"
        out = json.dumps({"id": "x", "object": "chat.completion", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)


@pytest.fixture()
def endpoint():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Judge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    Judge.seen, Judge.biased, Judge.fail_first = [], False, 0
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_pointwise_scores_use_the_books_prompt_and_keep_raw_replies(endpoint):
    client = OpenAIClient(endpoint, model="judge", api_key="k")
    summary, rows = judge_pointwise(client, ENTRIES, ["Paris", "I love books.", "7"])
    assert summary == {"mean_score": pytest.approx((90 + 20 + 90) / 3), "scored": 3, "unparsed": 0, "n": 3}
    assert [r["reply"] for r in rows] == ["90", "Score: 20", "90"]
    assert Judge.seen[0]["auth"] == "Bearer k" and Judge.seen[0]["path"] == "/v1/chat/completions"
    assert Judge.seen[1]["body"]["messages"][0]["content"].startswith(
        "Given the input `Below is an instruction that describes a task.")
    assert "### Input:\n我喜欢读书。" in Judge.seen[1]["body"]["messages"][0]["content"]
    assert Judge.seen[0]["body"]["temperature"] == 0.0


def test_pairwise_swaps_positions_so_a_biased_judge_decides_nothing(endpoint):
    client = OpenAIClient(endpoint)
    a, b = ["Paris", "I like reading.", "8"], ["Lyon", "I like books.", "7"]
    summary, rows = judge_pairwise(client, ENTRIES, a, b)
    assert [r["outcome"] for r in rows] == ["a", "a", "b"]
    assert summary["win_rate_a"] == pytest.approx(2 / 3) and summary["position_consistency"] == 1.0
    Judge.biased = True
    summary, rows = judge_pairwise(client, ENTRIES, a, b)
    assert [r["outcome"] for r in rows] == ["tie"] * 3 and summary["position_consistency"] == 0.0
    assert all(r["reply_ab"] == "A" and r["reply_ba"] == "A" for r in rows)


def test_retries_rate_limits_and_reports_dead_endpoints(endpoint):
    Judge.fail_first = 2
    assert OpenAIClient(endpoint).chat([{"role": "user", "content": "score the model response `x` on a scale"
                                         " correct output `x`, score"}]) in ("90", "Score: 20")
    with pytest.raises(JudgeError, match="cannot connect"):
        OpenAIClient("http://127.0.0.1:9/v1", retries=0).chat([{"role": "user", "content": "hi"}])
    assert parse_score("I'd say 75 out of 100") == 75 and parse_score("no idea") is None
    assert parse_verdict("B is better") == "B" and parse_verdict("Tie.") == "tie" and parse_verdict("??") is None


def test_judge_command_writes_summary_and_replies(endpoint, tmp_path, capsys):
    data = tmp_path / "answers.jsonl"
    data.write_text("".join(json.dumps(e | {"model_response": r}, ensure_ascii=False) + "\n"
                            for e, r in zip(ENTRIES, ["Paris", "I like reading.", "8"])), encoding="utf-8")
    assert main(["eval", "judge", "--data", str(data), "--endpoint", endpoint, "--out", str(tmp_path / "j"),
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["mean_score"] == pytest.approx((90 + 90 + 20) / 3) and summary["mode"] == "pointwise"
    assert len((tmp_path / "j" / "judge.jsonl").read_text(encoding="utf-8").splitlines()) == 3
    assert main(["eval", "judge", "--data", str(data), "--endpoint", "http://127.0.0.1:9/v1", "--out",
                 str(tmp_path / "k")]) == 2
    assert "cannot connect" in capsys.readouterr().err
