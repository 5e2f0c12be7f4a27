"""Generation with a preallocated KV cache: greedy and sampling, batched prompts, streaming text.

Logit processing follows transformers' order and definitions so seeded results are comparable:
repetition penalty (Keskar et al. 2019) -> temperature -> top-k -> top-p (nucleus, Holtzman et al.
2020) -> min-p (Nguyen et al. 2024).
"""

from __future__ import annotations

import codecs
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from lmforge.model.transformer import KVCache, Transformer


@dataclass
class SamplingConfig:
    max_new_tokens: int = field(default=128, metadata={"help": "tokens to generate at most"})
    temperature: float = field(default=1.0, metadata={"help": "0 = greedy"})
    top_k: int = field(default=0, metadata={"help": "keep the k most likely tokens (0 = off)"})
    top_p: float = field(default=1.0, metadata={"help": "keep the smallest set with this probability mass"})
    min_p: float = field(default=0.0, metadata={"help": "drop tokens below min_p x the top probability"})
    repetition_penalty: float = field(default=1.0, metadata={"help": "> 1 discourages repeating tokens"})
    stop_token_ids: list[int] = field(default_factory=list, metadata={"help": "token ids that end a sequence"})
    stop_strings: list[str] = field(default_factory=list, metadata={"help": "strings that end a sequence"})
    seed: int | None = field(default=None, metadata={"help": "fixes sampling"})

    def __post_init__(self):
        checks = [(self.max_new_tokens >= 0, "max_new_tokens must be >= 0"),
                  (self.temperature >= 0, "temperature must be >= 0"),
                  (self.top_k >= 0, "top_k must be >= 0"), (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
                  (0 <= self.min_p < 1, "min_p must be in [0, 1)"),
                  (self.repetition_penalty > 0, "repetition_penalty must be > 0")]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


def process_logits(logits: torch.Tensor, previous: torch.Tensor | None, cfg: SamplingConfig) -> torch.Tensor:
    """Apply penalty, temperature and filters to (B, V) logits; filtered entries become -inf."""
    logits = logits.float()
    if cfg.repetition_penalty != 1.0 and previous is not None and previous.numel():
        seen = torch.gather(logits, 1, previous)
        seen = torch.where(seen > 0, seen / cfg.repetition_penalty, seen * cfg.repetition_penalty)
        logits = logits.scatter(1, previous, seen)
    if cfg.temperature > 0 and cfg.temperature != 1.0:
        logits = logits / cfg.temperature
    if cfg.top_k > 0 and cfg.top_k < logits.shape[-1]:
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        remove = cumulative <= (1 - cfg.top_p)
        remove[:, -1] = False  # always keep the most likely token
        logits = logits.masked_fill(remove.scatter(1, order, remove), float("-inf"))
    if cfg.min_p > 0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < cfg.min_p * probs.max(-1, keepdim=True).values, float("-inf"))
    return logits


def _next_tokens(logits: torch.Tensor, previous: torch.Tensor | None, cfg: SamplingConfig,
                 generator: torch.Generator | None) -> torch.Tensor:
    logits = process_logits(logits, previous, cfg)
    if cfg.temperature == 0:
        return logits.argmax(-1)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its compiled one-token step
_STATIC_CACHE_ROUND = 256  # static caches round their length up, so nearby lengths share one compiled graph


def _decode_step_model(model: Transformer):
    """torch.compile of the model, kept per model: compiled at the first decode step for each batch size, cache
    length (rounded up) and padding; the prompt's prefill runs eagerly (its length varies from call to call)."""
    if model not in _COMPILED:
        _COMPILED[model] = torch.compile(model, dynamic=False)
    return _COMPILED[model]


def _check_positions(model: Transformer, prompt_len: int, new_tokens: int) -> None:
    """Learned positions end at max_seq_len (RoPE/ALiBi extrapolate); checked up front, not inside a compiled step."""
    if model.cfg.pos == "learned" and prompt_len + new_tokens > model.cfg.max_seq_len:
        raise ValueError(f"prompt ({prompt_len}) + max_new_tokens ({new_tokens}) exceeds the model's "
                         f"{model.cfg.max_seq_len} positions")


def _new_cache(model: Transformer, batch: int, length: int, compile: bool) -> KVCache:
    device, dtype = model.embed.weight.device, model.embed.weight.dtype
    if compile:
        length = -(-length // _STATIC_CACHE_ROUND) * _STATIC_CACHE_ROUND
        if model.cfg.pos == "learned":
            length = min(length, model.cfg.max_seq_len)
    return KVCache(model.cfg, batch, length, device, dtype, static=compile)


@torch.no_grad()
def generate_ids(model: Transformer, prompts: Sequence[Sequence[int]], cfg: SamplingConfig, pad_id: int = 0,
                 use_cache: bool = True, compile: bool = False) -> list[list[int]]:
    """New token ids for each prompt (prompts may differ in length: left padding with correct positions).

    `compile=True` runs the one-token decode steps through torch.compile with a static KV cache: the first
    call for a shape pays the compilation (seconds for a tiny model, minutes for 100M+ parameters on a
    small CPU), later calls and steps reuse it. Same tokens as eager (tested), fewer kernel launches.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = model.embed.weight.device
    B, P = len(prompts), max(len(p) for p in prompts)
    total = P + cfg.max_new_tokens
    _check_positions(model, P, cfg.max_new_tokens)
    compile = compile and use_cache
    cache = _new_cache(model, B, total, compile) if use_cache else None
    step_model = _decode_step_model(model) if compile else model
    ids = torch.full((B, total), pad_id, dtype=torch.long, device=device)
    # a static cache attends over all its slots, so the mask spans them (slots not yet filled stay 0)
    mask = torch.zeros((B, cache.max_len if compile else total), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):P] = torch.tensor(list(p), device=device)
        mask[i, P - len(p):P] = 1
    padded = bool((mask[:, :P] == 0).any())
    generator = torch.Generator(device=device).manual_seed(cfg.seed) if cfg.seed is not None else None
    stop = torch.tensor(sorted(set(cfg.stop_token_ids)) or [-1], device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    lengths = torch.full((B,), cfg.max_new_tokens, dtype=torch.long, device=device)
    end = P
    for step in range(cfg.max_new_tokens):
        if cache is not None:
            start = cache.length
            run = step_model if end - start == 1 else model
            # a copy: a slice of `ids` has the width as its stride, and a new stride would recompile the graph
            step_ids = ids[:, start:end].clone(memory_format=torch.contiguous_format)
            step_mask = (mask if compile else mask[:, :end]) if padded else None
            logits = run(step_ids, attention_mask=step_mask, cache=cache, logits_to_keep=1)[:, -1]
        else:
            logits = model(ids[:, :end], attention_mask=mask[:, :end] if padded else None, logits_to_keep=1)[:, -1]
        previous = ids[:, :end] if cfg.repetition_penalty != 1.0 else None
        if previous is not None and padded:  # padding is not a previous token
            previous = torch.where(mask[:, :end].bool(), previous, ids[:, P - 1:P].expand_as(previous))
        token = _next_tokens(logits, previous, cfg, generator)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        ids[:, end], mask[:, end] = token, 1
        end += 1
        newly = ~done & torch.isin(token, stop)
        lengths = torch.where(newly, torch.full_like(lengths, step + 1), lengths)
        done |= newly
        if bool(done.all()):
            break
    return [ids[i, P:P + int(lengths[i])].tolist() for i in range(B)]


class IncrementalDetokenizer:
    """Turn a stream of token ids into text pieces that never split a multi-byte character."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self.decoder.decode(self.tokenizer.decode_bytes([token_id]))

    def flush(self) -> str:
        return self.decoder.decode(b"", final=True)


def _cut_at_stop(text: str, stop_strings: Sequence[str]) -> tuple[str, bool]:
    cuts = [text.find(s) for s in stop_strings if s and s in text]
    return (text[:min(cuts)], True) if cuts else (text, False)


def generate(model: Transformer, tokenizer, prompts: Sequence[str] | str, cfg: SamplingConfig | None = None,
             compile: bool = False, **overrides) -> list[str] | str:
    """Text in, text out; stop strings cut the text (the stop string itself is not returned)."""
    cfg = cfg or SamplingConfig(**overrides)
    single = isinstance(prompts, str)
    texts = [prompts] if single else list(prompts)
    stop_ids = list(cfg.stop_token_ids) or ([tokenizer.special_tokens[tokenizer.eos_token]]
                                            if getattr(tokenizer, "eos_token", None) in tokenizer.special_tokens else [])
    run = SamplingConfig(**{**cfg.__dict__, "stop_token_ids": stop_ids})
    outs = generate_ids(model, [tokenizer.encode(t, allowed_special="all") for t in texts], run,
                        pad_id=stop_ids[0] if stop_ids else 0, compile=compile)
    results = []
    for ids in outs:
        ids = [i for i in ids if i not in stop_ids]
        results.append(_cut_at_stop(tokenizer.decode(ids), cfg.stop_strings)[0])
    return results[0] if single else results


@torch.no_grad()
def stream(model: Transformer, tokenizer, prompt: str, cfg: SamplingConfig | None = None, compile: bool = False,
           **overrides) -> Iterator[str]:
    """Yield decoded text as it is generated (one prompt, KV cache, stop ids and strings honoured);
    `compile` as in generate_ids."""
    cfg = cfg or SamplingConfig(**overrides)
    device = model.embed.weight.device
    prompt_ids = tokenizer.encode(prompt, allowed_special="all")
    if not prompt_ids:
        raise ValueError("the prompt encodes to no tokens")
    stop_ids = set(cfg.stop_token_ids)
    if not stop_ids and getattr(tokenizer, "eos_token", None) in tokenizer.special_tokens:
        stop_ids = {tokenizer.special_tokens[tokenizer.eos_token]}
    _check_positions(model, len(prompt_ids), cfg.max_new_tokens)
    cache = _new_cache(model, 1, len(prompt_ids) + cfg.max_new_tokens, compile)
    step_model = _decode_step_model(model) if compile else model
    generator = torch.Generator(device=device).manual_seed(cfg.seed) if cfg.seed is not None else None
    history = torch.tensor([prompt_ids], device=device)
    feed = history
    detok = IncrementalDetokenizer(tokenizer)
    text, emitted = "", 0
    hold = max((len(s) for s in cfg.stop_strings), default=1) - 1  # keep back what could start a stop string
    for _ in range(cfg.max_new_tokens):
        logits = (step_model if feed.shape[1] == 1 else model)(feed, cache=cache, logits_to_keep=1)[:, -1]
        token = _next_tokens(logits, history if cfg.repetition_penalty != 1.0 else None, cfg, generator)
        tid = int(token)
        if tid in stop_ids:
            break
        history = torch.cat([history, token[:, None]], dim=1)
        feed = token[:, None]
        text += detok.push(tid)
        text, stopped = _cut_at_stop(text, cfg.stop_strings)
        safe = len(text) if stopped else max(emitted, len(text) - hold)
        if safe > emitted:
            yield text[emitted:safe]
            emitted = safe
        if stopped:
            return
    text += detok.flush()
    text, _ = _cut_at_stop(text, cfg.stop_strings)
    if len(text) > emitted:
        yield text[emitted:]
