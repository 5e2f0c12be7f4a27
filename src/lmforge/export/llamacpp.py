"""llama.cpp (llama-cpp-python) in a child process: how the quickstart and the tests read back a GGUF file.

llama.cpp is native code built on the user's machine; when it crashes (a build for the wrong CPU, e.g. its AMX
kernels faulting inside a VM at `ldtilecfg`), the process that loaded it dies with a signal. Running it in a
child process turns such a crash into a `LlamaCppCrash` naming the signal and the likely cause, and the caller
(a quickstart step, one test) fails alone instead of taking the whole run down silently.
"""

from __future__ import annotations

import multiprocessing
import signal
import traceback
from collections.abc import Sequence
from pathlib import Path

HINT = ("llama.cpp was probably built for another CPU than this one (pip builds llama-cpp-python from its sdist with "
        "-march=native; on Intel CPUs with AMX its AMX kernels fault inside many VMs). Rebuild it as "
        "scripts/setup.sh --dev does: CMAKE_ARGS='-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON' "
        "pip install --no-cache-dir --force-reinstall --no-deps llama-cpp-python (docs/export.md)")


class LlamaCppCrash(RuntimeError):
    """llama.cpp's process died (a signal) or did not answer in time."""


def _serve(conn, path: str, kwargs: dict) -> None:
    """The child: load the model once, then answer (method, args) requests until the pipe closes."""
    try:
        import llama_cpp
        import numpy as np

        llm = llama_cpp.Llama(model_path=path, **kwargs)
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises it there
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ok", {"version": llama_cpp.__version__, "metadata": dict(llm.metadata), "eos": llm.token_eos(),
                      "system_info": llama_cpp.llama_print_system_info().decode()}))

    def logits(ids):
        llm.reset()
        llm.eval(list(ids))
        return np.array(llm.scores[:len(ids)], dtype=np.float32)

    def greedy(ids, n, stop_at_eos):
        llm.reset()
        out = []
        for t in llm.generate(list(ids), temp=0.0, top_k=1, repeat_penalty=1.0):
            out.append(t)
            if len(out) >= n or (stop_at_eos and t == llm.token_eos()):
                break
        return out

    methods = {"tokenize": lambda text: llm.tokenize(text.encode("utf-8"), add_bos=False, special=False),
               "detokenize": lambda ids: llm.detokenize(list(ids)).decode("utf-8", "replace"),
               "logits": logits, "greedy": greedy}
    while True:
        try:
            name, args = conn.recv()
        except EOFError:
            return
        try:
            conn.send(("ok", methods[name](*args)))
        except Exception:  # noqa: BLE001
            conn.send(("error", traceback.format_exc()))


class LlamaCpp:
    """A GGUF file loaded by llama-cpp-python in a child process (spawned: no torch state is inherited).

    `tokenize(text)` (no BOS, special tokens as text), `detokenize(ids)`, `logits(ids)` (float32, one row per
    position, from a fresh context), `greedy(ids, n)` (up to n tokens, stopping at the file's EOS unless told not to), `metadata`,
    `eos`, `version`, `system_info`. Use as a context manager, or call `close()`."""

    def __init__(self, path: str | Path, timeout: float = 600.0, **kwargs):
        self.path, self.timeout = str(path), timeout
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, self.path, kwargs), daemon=True,
                                 name="lmforge-llama-cpp")
        self._proc.start()
        child.close()
        info = self._receive("loading the model")
        self.version, self.metadata, self.eos = info["version"], info["metadata"], info["eos"]
        self.system_info = info["system_info"]

    def _receive(self, what: str):
        if not self._conn.poll(self.timeout):
            self.close()
            raise LlamaCppCrash(f"llama.cpp did not answer within {self.timeout:.0f} s ({what}, {self.path})")
        try:
            status, value = self._conn.recv()
        except (EOFError, ConnectionResetError):  # the child's end closed by its death (which one: a race)
            self._proc.join(5)
            code = self._proc.exitcode
            died = (f"was killed by {signal.Signals(-code).name}" if code is not None and code < 0
                    else f"exited with status {code}")
            raise LlamaCppCrash(f"llama.cpp's process {died} while {what} ({self.path}). {HINT}") from None
        if status == "error":
            raise LlamaCppCrash(f"llama.cpp failed while {what} ({self.path}):\n{value}")
        return value

    def _call(self, name: str, *args):
        try:
            self._conn.send((name, args))
        except (BrokenPipeError, ConnectionResetError):  # the child died before the request: _receive says how
            pass
        return self._receive(name)

    def tokenize(self, text: str) -> list[int]:
        return self._call("tokenize", text)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._call("detokenize", list(ids))

    def logits(self, ids: Sequence[int]):
        return self._call("logits", list(ids))

    def greedy(self, ids: Sequence[int], n: int, stop_at_eos: bool = True) -> list[int]:
        return self._call("greedy", list(ids), n, stop_at_eos)

    def close(self) -> None:
        self._conn.close()
        self._proc.join(10)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()

    def __del__(self) -> None:
        if getattr(self, "_proc", None) is not None and self._proc.is_alive():
            self.close()

    def __enter__(self) -> LlamaCpp:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
