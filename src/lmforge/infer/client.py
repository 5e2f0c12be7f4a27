"""Model clients: one small interface, two implementations, the same sampling options.

    client = EngineClient("runs/sft/merged")                    # lmforge's engine, in this process
    client = HTTPClient("http://localhost:8000/v1", model="m")   # lmforge serve, llama.cpp's server, any OpenAI API
    replies = client.chat([[{"role": "user", "content": "2+2?"}]], Sampling(temperature=0.0, max_tokens=32))

`chat(conversations, sampling, n=1)` returns, per conversation, a list of n Completion (text, finish_reason,
tool_calls, tokens). Each conversation is a list of OpenAI-style messages; the engine renders it with the model's
chat template (or `template=`), the HTTP client sends it as is. `tools=` passes OpenAI tool definitions (the engine
renders them through the template and parses calls back like `lmforge serve`).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field


class ClientError(RuntimeError):
    """A request the endpoint refused or could not answer, with its status and message."""


@dataclass
class Sampling:
    """The sampling options both clients take (OpenAI names)."""

    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


@dataclass
class Completion:
    text: str
    finish_reason: str = "stop"
    tool_calls: list[dict] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None  # HTTPClient(request_errors="keep"): why the endpoint refused this request


class ModelClient:
    """The interface: `chat(conversations, sampling, n, tools)`; `complete(prompts, ...)` is one user turn each."""

    name = "model"

    def chat(self, conversations: Sequence[list[dict]], sampling: Sampling | None = None, n: int = 1,
             tools: list[dict] | None = None) -> list[list[Completion]]:
        raise NotImplementedError

    def complete(self, prompts: Sequence[str], sampling: Sampling | None = None, n: int = 1) -> list[list[Completion]]:
        return self.chat([[{"role": "user", "content": p}] for p in prompts], sampling, n)


class EngineClient(ModelClient):
    """lmforge's generation engine in this process: a model directory (loaded by infer/load.py, with its `dtype`,
    `quantize`, `pack` and `compile` options) or a loaded model and tokenizer. `template`: any choice
    chat/templates.py resolves (a built-in, one of the model's named templates, a file, Jinja text)."""

    def __init__(self, model=None, tokenizer=None, template: str | None = None, batch_size: int = 16,
                 compile: bool = False, **load_options):
        from pathlib import Path

        from lmforge.chat.stops import stop_ids
        from lmforge.chat.templates import resolve_template

        loaded = None
        if isinstance(model, (str, Path)):
            from lmforge.infer.load import load_for_inference

            self.name = str(model)
            loaded = load_for_inference(model, template=template, **load_options)
            model = loaded.model
        if loaded is not None and tokenizer is None:  # the template is resolved and in the tokenizer already
            tokenizer, self.template = loaded.tokenizer, loaded.template
        else:
            self.template, _ = resolve_template(tokenizer, template, required=False)
        self.model, self.tokenizer, self.batch_size, self.compile = model.eval(), tokenizer, batch_size, compile
        self.stop_ids = stop_ids(tokenizer, model.cfg, self.template)

    def render(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        from lmforge.chat.render import encode_chat

        if self.template is None:  # a base model without a template: the last user turn is the prompt, as text
            return self.tokenizer.encode(messages[-1]["content"], disallowed_special=())
        return encode_chat(self.tokenizer, self.template, messages, add_generation_prompt=True, tools=tools).ids

    def chat(self, conversations, sampling=None, n=1, tools=None):
        import torch

        from lmforge.infer.engine import Request, generate_stream
        from lmforge.infer.sampling import SamplingConfig

        s = sampling or Sampling()
        prompts = [self.render(c, tools) for c in conversations]
        # the n samples of a conversation share its prefill; sample k draws with seed + k (greedy ones are the same
        # anyway); batch_size rows decode together, the next request taking a row as soon as one is free
        cfg = SamplingConfig(max_new_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p,
                             stop_strings=list(s.stop), stop_token_ids=self.stop_ids, seed=s.seed)
        texts = [[""] * n for _ in prompts]
        tokens = [[0] * n for _ in prompts]
        reasons = [["length"] * n for _ in prompts]
        with torch.no_grad():
            for event in generate_stream(self.model, self.tokenizer, [Request(ids, cfg, n=n) for ids in prompts],
                                         compile=self.compile, batch_size=self.batch_size):
                i, k = event.index, event.choice
                texts[i][k] += event.text
                if event.token_id is not None:
                    tokens[i][k] += 1
                if event.finish_reason is not None:
                    reasons[i][k] = event.finish_reason
        out: list[list[Completion]] = [[] for _ in conversations]
        for i in range(len(prompts)):
            for c in range(n):
                j = i * n + c  # the flat number of this sample (its tool calls' ids)
                done = Completion(texts[i][c], reasons[i][c], prompt_tokens=len(prompts[i]),
                                  completion_tokens=tokens[i][c])
                if tools:
                    from lmforge.chat.tools import parse_tool_calls

                    content, calls = parse_tool_calls(texts[i][c], {t["function"]["name"] for t in tools})
                    if calls:
                        done.text, done.finish_reason = content or "", "tool_calls"
                        done.tool_calls = [{"id": f"call_{j}_{k}", "name": call["function"]["name"],
                                            "arguments": _arguments(call["function"].get("arguments", {}))}
                                           for k, call in enumerate(calls)]
                out[i].append(done)
        return out


def _arguments(args):
    """A call's arguments as an object (the API sends a JSON string; templates want the object)."""
    if isinstance(args, str):
        try:
            return json.loads(args)
        except json.JSONDecodeError:
            return args
    return args


class HTTPClient(ModelClient):
    """An OpenAI-compatible endpoint (`base_url` ending in /v1): `concurrency` requests in flight, retries with
    backoff on connection errors, 429 and 5xx (Retry-After honoured, in seconds, waiting 30 s at most), token usage
    counted. A request the endpoint refuses (4xx: a prompt longer than its context, ...) raises ClientError, or with
    request_errors="keep" comes back as one Completion with `error` set, so a batch job can set that one prompt aside
    and go on (401/403/404 always raise: every request would fail the same way). `retry_connect=False` fails at once
    where nothing listens at `base_url` (the judge's choice: a wrong URL is not a busy server)."""

    def __init__(self, base_url: str, model: str = "default", api_key: str | None = None, timeout: float = 120.0,
                 concurrency: int = 4, retries: int = 4, request_errors: str = "raise", retry_connect: bool = True):
        self.base_url, self.name, self.api_key = base_url.rstrip("/"), model, api_key
        self.timeout, self.concurrency, self.retries = timeout, concurrency, retries
        self.request_errors, self.retry_connect = request_errors, retry_connect
        self.usage = {"prompt_tokens": 0, "completion_tokens": 0, "requests": 0}

    def _post(self, client, body: dict) -> dict:
        import httpx

        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        delay = 0.5
        for attempt in range(self.retries + 1):
            try:
                r = client.post(f"{self.base_url}/chat/completions", json=body, headers=headers, timeout=self.timeout)
            except httpx.TransportError as e:
                refused = isinstance(e, httpx.ConnectError)
                if attempt == self.retries or (refused and not self.retry_connect):
                    reason = f"{type(e).__name__}: {e}"
                    raise ClientError(f"{self.base_url}: " + (f"cannot connect ({reason})" if refused else reason)
                                      ) from None
                time.sleep(delay)
                delay *= 2
                continue
            if r.status_code == 429 or r.status_code >= 500:
                if attempt == self.retries:
                    raise ClientError(f"{self.base_url}: HTTP {r.status_code} after {self.retries} retries: "
                                      f"{r.text[:200]}")
                wait = r.headers.get("retry-after")
                time.sleep(min(float(wait), 30.0) if wait and wait.replace(".", "", 1).isdigit() else delay)
                delay *= 2
                continue
            if r.status_code != 200:
                try:
                    message = r.json().get("error", {}).get("message", r.text)
                except ValueError:
                    message = r.text
                error = ClientError(f"{self.base_url}: HTTP {r.status_code}: {str(message)[:300]}")
                if self.request_errors == "keep" and r.status_code not in (401, 403, 404):
                    return {"error": str(error)}
                raise error
            try:
                data = r.json()
            except ValueError:
                data = None
            if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
                raise ClientError(f"{self.base_url}: the answer is not an OpenAI chat completion: {r.text[:200]}")
            return data
        raise AssertionError("unreachable")

    def chat(self, conversations, sampling=None, n=1, tools=None):
        from concurrent.futures import ThreadPoolExecutor

        import httpx

        s = sampling or Sampling()

        def wire(m: dict) -> dict:  # OpenAI's wire format: a call's arguments travel as a JSON string
            if not m.get("tool_calls"):
                return m
            calls = [{**c, "function": {**c["function"], "arguments": c["function"]["arguments"] if isinstance(
                c["function"].get("arguments"), str) else json.dumps(c["function"].get("arguments", {}),
                                                                      ensure_ascii=False)}} for c in m["tool_calls"]]
            return {**m, "tool_calls": calls}

        def one(messages):
            body = {"model": self.name, "messages": [wire(m) for m in messages], "temperature": s.temperature,
                    "top_p": s.top_p,
                    "max_tokens": s.max_tokens, "n": n}
            if s.stop:
                body["stop"] = list(s.stop)
            if s.seed is not None:
                body["seed"] = s.seed
            if tools:
                body["tools"] = tools
            data = self._post(client, body)
            if "error" in data and "choices" not in data:
                return [Completion("", "error", error=data["error"])] * n
            usage = data.get("usage") or {}
            self.usage["prompt_tokens"] += usage.get("prompt_tokens", 0)
            self.usage["completion_tokens"] += usage.get("completion_tokens", 0)
            self.usage["requests"] += 1
            out = []
            for choice in sorted(data["choices"], key=lambda c: c.get("index", 0)):
                msg = choice.get("message") or {}
                calls = []
                for c in msg.get("tool_calls") or []:
                    fn = c.get("function", {})
                    calls.append({"id": c.get("id"), "name": fn.get("name"),
                                  "arguments": _arguments(fn.get("arguments", "{}"))})
                out.append(Completion(msg.get("content") or "", choice.get("finish_reason") or "stop", calls,
                                      usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)))
            return out

        with httpx.Client() as client, ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(one, conversations))


def add_client_args(parser: argparse.ArgumentParser, max_tokens: int) -> None:
    """The options of every command that talks to a model (prompt, synth): a model run in this process (with
    infer/load.py's options) or an OpenAI-compatible endpoint; `client_from_args` reads them back."""
    from lmforge.infer.load import add_inference_args

    add_inference_args(parser, model_required=False, model_help="a model directory (or Hub id), run in this process; "
                                                                "--dtype, --quantize, --pack, --compile and --template "
                                                                "apply to it")
    parser.add_argument("--endpoint", metavar="URL", help="an OpenAI-compatible base URL, e.g. http://localhost:8000/v1")
    parser.add_argument("--served-model", default="default", help="the model name the endpoint expects")
    parser.add_argument("--api-key", help="the endpoint's key (default: $OPENAI_API_KEY)")
    parser.add_argument("--concurrency", type=int, default=8,
                        help="requests in flight to an endpoint (default 8: lmforge serve batches 8)")
    parser.add_argument("--max-tokens", type=int, default=max_tokens)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def client_from_args(args: argparse.Namespace, request_errors: str = "raise") -> ModelClient:
    """The client `add_client_args`' options name: exactly one of --model and --endpoint. `request_errors`:
    HTTPClient's (\"keep\": a refused prompt comes back as a Completion with its error, the run goes on)."""
    from lmforge.config import ConfigError

    if bool(args.model) == bool(args.endpoint):
        raise ConfigError("give the model: --model DIR (in this process) or --endpoint URL (an OpenAI-compatible API)")
    if args.endpoint:
        return HTTPClient(args.endpoint, args.served_model, args.api_key or os.environ.get("OPENAI_API_KEY"),
                          concurrency=args.concurrency, request_errors=request_errors)
    return EngineClient(args.model, template=args.template, compile=args.compile, dtype=args.dtype,
                        quantize=args.quantize, pack=args.pack)
