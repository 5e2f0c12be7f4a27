"""Chat A/B: the same conversation put to two checkpoints, each through lmforge's one engine (infer/client.py's
EngineClient over infer/load.py's load_for_inference: the model's own chat template and stop tokens), side by side.

Loaded checkpoints stay in memory for the next turn, the `keep` most recently used ones only, so comparing run
after run does not grow the studio without bound. One generation runs at a time (the machine's cores are shared by
the runs the studio launched).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from pathlib import Path


class Checkpoints:
    """EngineClients by checkpoint directory, least recently used dropped beyond `keep`."""

    def __init__(self, keep: int = 2):
        self.keep = keep
        self.clients: OrderedDict[str, object] = OrderedDict()
        self.lock = threading.Lock()

    def client(self, path: Path):
        from lmforge.infer.client import EngineClient

        key = str(Path(path).resolve())
        if key in self.clients:
            self.clients.move_to_end(key)
        else:
            self.clients[key] = EngineClient(key)
            while len(self.clients) > self.keep:
                self.clients.popitem(last=False)
        return self.clients[key]

    def reply(self, paths: list[Path], conversations: list[list[dict]], max_tokens: int = 128,
              temperature: float = 0.0, seed: int | None = 0) -> list[dict]:
        """One reply per checkpoint, checkpoint i answering conversations[i] (each side keeps its own history):
        [{"checkpoint", "text", "finish_reason", "prompt_tokens", "completion_tokens", "seconds"}]."""
        from lmforge.infer.client import Sampling

        sampling = Sampling(temperature=temperature, max_tokens=max_tokens, seed=seed)
        out = []
        with self.lock:
            # more sides than `keep` would evict a model between its load and its reply
            self.keep = max(self.keep, len(paths))
            for path, messages in zip(paths, conversations):
                client = self.client(path)
                t0 = time.perf_counter()
                done = client.chat([messages], sampling)[0][0]
                out.append({"checkpoint": str(path), "text": done.text, "finish_reason": done.finish_reason,
                            "prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
                            "seconds": round(time.perf_counter() - t0, 3)})
        return out
