"""Load test of `lmforge serve` with the official `openai` client (loopback only, bounded in count and time), JSON out.

Starts `lmforge serve` as a user does (a subprocess on 127.0.0.1), then
  1. sequential: requests one at a time (the baseline a one-request-at-a-time server gives);
  2. concurrent: C streaming clients at once (asyncio + openai.AsyncOpenAI), continuous batching on the server;
and reports errors, time to first token (p50 / p99), inter-token latency (p50 / p99), aggregate generated tokens/s and
the concurrent / sequential ratio; then the same model exported to GGUF by lmforge behind llama-cpp-python's OpenAI
server (the peer), both at --peer-clients concurrent streams.

    python benchmarks/serve.py                      # a ~103M-parameter Llama (8 x 512, Qwen2.5's 151k vocabulary)
    python benchmarks/serve.py --clients 8 --tokens 32

`--latency` measures chunked prefill instead: for each of --max-prefill-tokens (default 256, then 0: no chunking) one
server, and at 1, 8 and 32 concurrent clients (--client-counts) each client sends --rounds requests one after the
other, every --long-every'th a long prompt (~--long-tokens tokens), the others short; p50 / p99 time to first token
and inter-token latency over every request. Long prompts arriving while other streams decode are what chunking is
for: unchunked, each stalls every running stream for one whole prefill.
"""


from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPTS = ["Explain what a Python generator is.", "北京有哪些著名的景点？", "Write a short poem about the sea.",
           "What does the with statement do?", "用一句话介绍长江。", "List three uses of a dictionary."]


def build_model(d: Path, layers: int, width: int) -> Path:
    import torch
    import transformers

    # Qwen2.5's real tokenizer: byte-level BPE, so the same model exports to GGUF for the peer
    from tests.corpora import real_tokenizer

    real_tokenizer("qwen2.5-instruct", d)
    tok = transformers.AutoTokenizer.from_pretrained(d)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=width * 8 // 3,
                                   num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4,
                                   max_position_embeddings=1024, tie_word_embeddings=True,
                                   bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)  # a llama-architecture model over Qwen's vocabulary
    return d


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return round(values[min(int(q * len(values)), len(values) - 1)], 4) if values else float("nan")


COUNT = None  # text -> tokens, with the model's tokenizer: both servers' output is counted the same way


async def one(client, prompt: str, tokens: int) -> dict:
    start = time.perf_counter()
    first, stamps, n, text = None, [], 0, []
    stream = await client.chat.completions.create(model="bench", messages=[{"role": "user", "content": prompt}],
                                                  max_tokens=tokens, temperature=0, stream=True)
    async for chunk in stream:
        now = time.perf_counter()
        if chunk.choices and chunk.choices[0].delta.content:
            if first is None:
                first = now - start
            stamps.append(now)
            text.append(chunk.choices[0].delta.content)
    n = COUNT("".join(text))
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"ttft": first, "gaps": gaps, "tokens": n, "seconds": time.perf_counter() - start}


async def run(url: str, clients: int, tokens: int, sequential: int) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="bench", max_retries=0, timeout=600)
    await one(client, PROMPTS[0], 4)  # warm-up
    t = time.perf_counter()
    seq = [await one(client, PROMPTS[i % len(PROMPTS)], tokens) for i in range(sequential)]
    seq_s = time.perf_counter() - t
    t = time.perf_counter()
    results = await asyncio.gather(*[one(client, PROMPTS[i % len(PROMPTS)], tokens) for i in range(clients)],
                                   return_exceptions=True)
    conc_s = time.perf_counter() - t
    ok = [r for r in results if isinstance(r, dict)]
    errors = [repr(r) for r in results if not isinstance(r, dict)]
    seq_tps = sum(r["tokens"] for r in seq) / seq_s
    conc_tps = sum(r["tokens"] for r in ok) / conc_s
    return {"sequential": {"requests": sequential, "tokens_per_s": round(seq_tps, 1),
                           "ttft_p50_s": pct([r["ttft"] for r in seq], 0.5)},
            "concurrent": {"clients": clients, "errors": len(errors), "error_samples": errors[:3],
                           "tokens_per_s": round(conc_tps, 1), "ttft_p50_s": pct([r["ttft"] for r in ok], 0.5),
                           "ttft_p99_s": pct([r["ttft"] for r in ok], 0.99),
                           "inter_token_p50_s": pct([g for r in ok for g in r["gaps"]], 0.5),
                           "inter_token_p99_s": pct([g for r in ok for g in r["gaps"]], 0.99),
                           "wall_s": round(conc_s, 2)},
            "speedup_aggregate_tokens_per_s": round(conc_tps / seq_tps, 2)}


LONG_TEXT = ("The Yangtze is the longest river in Asia and flows for more than six thousand kilometres from the "
             "Tibetan Plateau to the East China Sea. 长江是亚洲第一长河，流经青藏高原、四川盆地和长江中下游平原。 ")


def long_prompt(tokens: int, i: int) -> str:
    """A prompt of about `tokens` tokens (a paragraph repeated), different per request so no prefix is reused."""
    text = f"Request {i}. "
    while COUNT(text) < tokens:
        text += LONG_TEXT
    return text + "Summarise the text above in one sentence."


async def latency(url: str, clients: int, rounds: int, tokens: int, long_every: int, long_tokens: int) -> dict:
    """`clients` concurrent clients, each sending `rounds` requests in turn (every long_every'th request overall a
    long prompt), started 50 ms apart: p50 / p99 time to first token (short and long prompts apart) and
    inter-token latency over all of them."""
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="bench", max_retries=0, timeout=600)
    await one(client, PROMPTS[0], 4)  # warm-up

    async def loop(c: int) -> list[tuple[bool, dict]]:
        await asyncio.sleep(0.05 * c)
        out = []
        for r in range(rounds):
            i = c * rounds + r
            long = i % long_every == long_every - 1
            prompt = long_prompt(long_tokens, i) if long else PROMPTS[i % len(PROMPTS)]
            out.append((long, await one(client, prompt, tokens)))
        return out

    t = time.perf_counter()
    results = [x for per in await asyncio.gather(*[loop(c) for c in range(clients)]) for x in per]
    wall = time.perf_counter() - t
    gaps = [g for _, r in results for g in r["gaps"]]
    return {"clients": clients, "requests": len(results), "long_requests": sum(long for long, _ in results),
            "ttft_short_p50_s": pct([r["ttft"] for long, r in results if not long], 0.5),
            "ttft_short_p99_s": pct([r["ttft"] for long, r in results if not long], 0.99),
            "ttft_long_p50_s": pct([r["ttft"] for long, r in results if long], 0.5),
            "ttft_long_p99_s": pct([r["ttft"] for long, r in results if long], 0.99),
            "inter_token_p50_s": pct(gaps, 0.5), "inter_token_p99_s": pct(gaps, 0.99),
            "tokens_per_s": round(sum(r["tokens"] for _, r in results) / wall, 1), "wall_s": round(wall, 1)}


def serve_lmforge(model: Path, max_batch: int, extra: list[str] = ()) -> tuple[subprocess.Popen, str]:
    """`lmforge serve` as a user starts it, on a free loopback port, once it answers /health."""
    import urllib.request

    port = _port()
    log = tempfile.TemporaryFile("w+")  # noqa: SIM115 (lives as long as the server); a pipe nobody reads could fill
    proc = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", "--model", str(model), "--port", str(port),
                             "--max-batch", str(max_batch), "--max-queue", str(max_batch * 2), *extra],
                            stderr=log, text=True)
    deadline = time.monotonic() + 600  # a loaded machine takes minutes to import torch and load the model
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                log.seek(0)
                raise SystemExit(f"lmforge serve did not start: {log.read()[-2000:]}") from None
            time.sleep(0.2)


def _start(cmd: list[str], port: int) -> subprocess.Popen:
    import urllib.request

    log = open(os.devnull, "w")  # noqa: SIM115 (lives as long as the server)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
    for _ in range(1800):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=1)
            return proc
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd[2]} exited with {proc.returncode}") from None
            time.sleep(0.1)
    raise RuntimeError(f"{cmd} did not start")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peer(model: Path, tmp: Path, clients: int, tokens: int, sequential: int) -> dict:
    """The same model, exported to GGUF (f32) by lmforge, behind llama-cpp-python's OpenAI server."""
    try:
        import llama_cpp.server  # noqa: F401
    except ImportError as e:
        return {"skipped": f"llama-cpp-python's server is not installed ({e.name}): pip install 'llama-cpp-python[server]'"}
    from lmforge.export.gguf import export_gguf

    gguf = export_gguf(model, tmp / "bench.gguf", dtype="f32")
    port = _port()
    # --interrupt_requests False: otherwise each new request kills the running stream
    proc = _start([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
                   "--port", str(port),
                   "--n_threads", str(os.cpu_count()), "--n_ctx", "2048", "--interrupt_requests", "False"], port)
    try:
        return asyncio.run(run(f"http://127.0.0.1:{port}", clients, tokens, sequential))
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64, help="max_tokens per request (no stop token is forced)")
    ap.add_argument("--sequential", type=int, default=6, help="requests in the one-at-a-time baseline")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--peer-clients", type=int, default=8, help="concurrent clients against both servers")
    ap.add_argument("--skip-peer", action="store_true", help="without llama-cpp-python's server")
    ap.add_argument("--latency", action="store_true", help="chunked prefill vs not under arrivals (see above)")
    ap.add_argument("--client-counts", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--max-prefill-tokens", type=int, nargs="+", default=[256, 0])
    ap.add_argument("--rounds", type=int, default=2, help="--latency: requests per client, one after the other")
    ap.add_argument("--long-every", type=int, default=4, help="--latency: every n'th request has a long prompt")
    ap.add_argument("--long-tokens", type=int, default=600, help="--latency: a long prompt's tokens (about)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(Path(tmp) / "bench", args.layers, args.width)
        global COUNT
        import transformers

        hf_tok = transformers.AutoTokenizer.from_pretrained(model)
        COUNT = lambda text: len(hf_tok(text, add_special_tokens=False)["input_ids"])  # noqa: E731
        if args.latency:
            rows = []
            for chunk in args.max_prefill_tokens:
                proc, url = serve_lmforge(model, max(args.client_counts), ["--max-prefill-tokens", str(chunk)])
                try:
                    for clients in args.client_counts:
                        row = {"max_prefill_tokens": chunk} | asyncio.run(latency(
                            url, clients, args.rounds, args.tokens, args.long_every, args.long_tokens))
                        print(json.dumps(row), file=sys.stderr)
                        rows.append(row)
                finally:
                    proc.terminate()
                    proc.wait(30)
            print(json.dumps({"latency": rows, "model": {"layers": args.layers, "width": args.width},
                              "max_tokens": args.tokens, "long_tokens": args.long_tokens, "cpus": os.cpu_count(),
                              "load": os.getloadavg(), "date": time.strftime("%Y-%m-%d")}, indent=1))
            return
        proc, url = serve_lmforge(model, args.clients)
        try:
            import urllib.request

            out = asyncio.run(run(url, args.clients, args.tokens, args.sequential))
            if not args.skip_peer:
                out["at_peer_clients"] = asyncio.run(run(url, args.peer_clients, args.tokens, args.sequential))
            metrics = urllib.request.urlopen(f"{url}/metrics").read().decode()
        finally:
            proc.terminate()
            proc.wait(30)
        if not args.skip_peer:
            out["llama_cpp_python_server"] = peer(model, Path(tmp), args.peer_clients, args.tokens, args.sequential)
            theirs = out["llama_cpp_python_server"].get("concurrent", {}).get("tokens_per_s")
            if theirs:
                out["vs_llama_cpp_python_at_peer_clients"] = round(
                    out["at_peer_clients"]["concurrent"]["tokens_per_s"] / theirs, 2)
    out |= {"model": {"layers": args.layers, "width": args.width, "tokenizer": "qwen2.5 (151k)"},
            "max_tokens": args.tokens, "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
            "server_metrics": [line for line in metrics.splitlines() if line.startswith(("lmforge_requests_total",
                                                                                         "lmforge_finished"))]}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
