"""Rollouts for RL fine-tuning: prompts -> G sampled completions each -> rewards -> advantages -> training batches.

`Rollouts` is the Trainer's train_data for the policy-gradient objectives (train/rl.py): whenever its buffer is empty
it takes the next prompts (batch_size / G of them, in a seeded order that repeats every epoch), renders them with the
chat template, samples G completions of each through the generation engine (infer/engine.py; the G share the
prompt's prefill and KV cache) with the model as it is now, scores them (finetune/rewards.py), computes the
advantages and the log-probabilities the loss needs (of the sampling policy when num_iterations > 1; of the
reference when beta > 0), and cuts the rows into micro-batches; those are served num_iterations times (one
optimizer step each) before the next sampling.

Prompts: any record `finetune` reads, its last assistant turn dropped (alpaca, sharegpt, openai, pairs such as GSM8K's
question/answer, LLaMA-Factory entries), or TRL's prompt-only records (`prompt`: a string or a list of messages). The
whole record goes to the rewards (GSM8K's `answer`, a `tests` column).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lmforge.config import ConfigError
from lmforge.finetune.rewards import Reward, score
from lmforge.train.rl import combine_rewards, group_advantages, rloo_advantages, token_logps


@dataclass
class Prompt:
    """One RL prompt: the chat messages before the reply, the record it came from, and where (file:line)."""

    messages: list[dict]
    record: dict
    where: str
    tools: list | None = None
    ids: list[int] = field(default_factory=list)  # the rendered prompt's token ids


# --- reading prompts ------------------------------------------------------------------------------------------------

def _prompt_only(rec: dict, columns: dict, where: str) -> list[dict] | None:
    """TRL's prompt-only record: `prompt` as a string (one user turn) or as messages; else None."""
    from lmforge.finetune.conversations import DataFormatError

    key = columns.get("prompt", "prompt")
    value = rec.get(key)
    if isinstance(value, str):
        if not value.strip():
            raise DataFormatError(f"{where}: field '{key}' is empty")
        system = rec.get(columns.get("system", "system"))
        return ([{"role": "system", "content": system}] if isinstance(system, str) and system else []) + \
            [{"role": "user", "content": value}]
    if isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m for m in value):
        return [{"role": m["role"], "content": m.get("content", "")} for m in value]
    return None


def load_prompts(data: str, format: str = "auto", columns: dict | None = None, tags: dict | None = None,
                 on_bad=None, encoding: str = "utf-8", errors: str = "strict") -> list[Prompt]:
    """Every prompt of `data` (module docstring); a bad record is a DataFormatError naming it (or goes to on_bad)."""
    from lmforge.data.sources import CorpusError, iter_records
    from lmforge.finetune.conversations import DataFormatError, detect_format, parse_record, resolve_spec

    spec = resolve_spec(data, format, columns, tags)
    out = []
    for path in spec.files:
        if path.endswith(".txt"):
            raise ConfigError(f"data: {path}: RL reads prompts from records (jsonl, json, csv, parquet), not .txt")
        fmt = spec.format
        for where, rec in iter_records(path, on_bad, encoding, errors):
            try:
                messages = _prompt_only(rec, spec.columns, where) if fmt in ("auto", "pairs") else None
                tools = None
                if messages is None:
                    if fmt == "auto":
                        fmt = detect_format(rec, spec.columns, where)
                    conv = parse_record(rec, fmt, spec.columns, spec.tags, where)
                    if conv.text is not None:
                        raise DataFormatError(f"{where}: a plain-text record has no prompt; RL needs prompts "
                                              "(prompt, question, instruction, messages ...)")
                    messages, tools = conv.messages[:-1], conv.tools
            except DataFormatError as e:
                if on_bad is None:
                    raise
                on_bad(where, str(e).split(": ", 1)[1], json.dumps(rec, ensure_ascii=False, default=str)[:2000])
                continue
            out.append(Prompt(messages, rec, where, tools))
    if not out:
        raise CorpusError(f"{data}: no prompts")
    return out


# --- sampling ---------------------------------------------------------------------------------------------------------

def sample_completions(model, prompts: Sequence[Sequence[int]], group_size: int, cfg, seeds: Sequence[int]
                       ) -> list[list[int]]:
    """`group_size` completions of each prompt (prompt-major: the G of prompt 0, then prompt 1's ...), their stop
    token included. The G completions of a prompt share its prefill and KV cache (the engine's `n` per request);
    completion k of prompt i samples with seed seeds[i] + k."""
    from dataclasses import replace

    from lmforge.infer.engine import generate_ids

    return generate_ids(model, [list(p) for p in prompts], [replace(cfg, seed=int(s)) for s in seeds], n=group_size)


#: parameters below which a rollout samples the training model itself: a small model's decode step is Python, not
#: weight reads, and copying and packing the weights every rollout costs more than the kernels save
#: (docs/benchmarks.md, RL from rewards)
PACKED_SAMPLING_MIN_PARAMS = 20_000_000


def sampling_copy(model, cache: dict | None = None):
    """The model a rollout samples from. A native lmforge model on the CPU in float32 samples through a copy of itself
    with its adapter merged in (LoRA / DoRA) and its weights packed for lmforge's CPU kernels (model/packed.py: what
    `lmforge generate` runs by default, 2-3x torch's matmul at decode), rebuilt from the current weights at every
    rollout: the same policy, only computed faster. The old log-probabilities and the loss stay on the training model.
    Elsewhere (CUDA, other dtypes, an adapter that does not merge such as prompt tuning, the portable path, no C++
    compiler for the kernels, fewer than PACKED_SAMPLING_MIN_PARAMS parameters) the training model itself. The copy
    holds a second set of weights while it samples.

    `cache` (a dict the caller keeps between rollouts) keeps a frozen tied embedding's packed head, the largest and
    slowest matrix to pack, which adapters never change: it is packed again only when the table changes (another
    tensor, or an in-place write: its version counter) or trains."""
    from lmforge.model.packed import PackedEmbedding, PackedLinear, kernel_available, pack_for_cpu
    from lmforge.model.transformer import Transformer
    from lmforge.peft import adapter_of, merge

    adapter = adapter_of(model)
    if not (isinstance(model, Transformer) and (adapter is None or adapter.mergeable)
            and all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())
            and sum(p.numel() for p in model.parameters()) >= PACKED_SAMPLING_MIN_PARAMS and kernel_available()):
        return model
    table = model.embed.weight if isinstance(model.embed, torch.nn.Embedding) else None
    reuse = cache is not None and model.lm_head is None and table is not None and not table.requires_grad
    key = (id(table), table.data_ptr(), table._version) if reuse else None
    head = cache.get(key) if reuse else None
    twin = copy.deepcopy(model, {id(table): table} if reuse else None)  # a frozen table is shared, not copied
    if adapter is not None:
        merge(twin)
    if reuse:
        if head is None:
            cache.clear()
            head = cache[key] = PackedLinear(table)
        twin.lm_head, twin.embed = head, PackedEmbedding(head)
    return pack_for_cpu(twin)


@contextlib.contextmanager
def adapters_disabled(model):
    """The base model inside the block: LoRA / DoRA / QLoRA layers (and LoRA on MoE expert stacks) skip their
    adapter (their `merged` flag set without merging, so the layer returns the base projection alone). The
    reference policy of a LoRA run, with no second copy of the weights."""
    from lmforge.peft import adapter_of

    adapter = adapter_of(model)
    if adapter is None or adapter.peft_type != "LORA":
        raise ConfigError("beta > 0 with this method needs a reference model: supported with lora, dora, qlora "
                          "(the base, adapters off) and full / freeze (a frozen copy)")
    layers = [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "merged")]
    if any(m.merged for m in layers):
        raise RuntimeError("adapters_disabled on a merged model")
    for m in layers:
        m.merged = True
    try:
        yield model
    finally:
        for m in layers:
            m.merged = False


class Rollouts:
    """The Trainer's train_data for RL (module docstring). `batch_size` completions per optimizer step (a multiple
    of `group_size`), served as micro-batches of `micro` rows."""

    def __init__(self, model, tokenizer, template: str, prompts: list[Prompt], rewards: list[Reward], objective,
                 sampling, batch_size: int, micro: int, group_size: int = 4, num_iterations: int = 1,
                 scale_rewards: str = "group", mask_truncated: bool = False, beta: float = 0.0,
                 reference=None, pad_id: int = 0, stop_ids: Sequence[int] = (), seed: int = 0,
                 out: Path | None = None, sample_every: int = 10, samples: int = 4, autocast=None,
                 rank: int = 0, world: int = 1):
        if batch_size % group_size:
            raise ConfigError(f"batch_size {batch_size} is not a multiple of num_generations {group_size} (every "
                              "prompt's completions are one group)")
        if (batch_size // group_size) % world:
            raise ConfigError(f"batch_size {batch_size}: its {batch_size // group_size} prompts per step (of "
                              f"{group_size} completions each) do not split evenly over {world} processes; every "
                              f"process samples whole groups")
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.prompts, self.rewards, self.objective = prompts, rewards, objective
        self.sampling, self.batch_size, self.micro, self.group_size = sampling, batch_size, micro, group_size
        self.num_iterations, self.scale_rewards, self.mask_truncated = num_iterations, scale_rewards, mask_truncated
        self.beta, self.reference, self.pad_id, self.stop_ids = beta, reference, pad_id, set(stop_ids)
        self.seed, self.out, self.sample_every, self.samples = seed, out, sample_every, samples
        self.autocast = autocast or contextlib.nullcontext
        self.rank, self.world = rank, world  # under torchrun: this process samples its share of each step's prompts
        self.epoch, self.position, self.rollouts = 0, 0, 0
        self.order = self._order()
        self.buffer: list[dict] = []
        self.metrics: dict = {}
        self.weights = torch.tensor([r.weight for r in rewards], dtype=torch.float32)
        self.packed_sampling = True  # sample through sampling_copy (finetune/rl.py: off under bf16 / fp16 autocast)
        self.packed_head = {}  # sampling_copy's cache: a frozen tied head packed once

    # --- the data protocol the Trainer reads ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "rollouts": self.rollouts}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position, self.rollouts = state["epoch"], state["position"], state["rollouts"]
        self.order, self.buffer = self._order(), []

    def next_batch(self) -> dict:
        if not self.buffer:
            self._roll_out()
        return self.buffer.pop(0)

    def step_metrics(self, record: dict) -> dict:
        """The last rollout's figures, on the step that sampled it; sampling and training speed apart."""
        out, self.metrics = self.metrics, {}
        if "sample_s" in out and record.get("step_s"):
            train_s = max(record["step_s"] - out["sample_s"], 1e-9)
            out["train_tokens_per_s"] = round(out.pop("train_tokens") / train_s, 1)
        out.pop("train_tokens", None)
        return out

    # --- one rollout ---------------------------------------------------------------------------------------------
    def _order(self) -> list[int]:
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.prompts)).tolist()

    def _next_prompts(self, n: int) -> list[Prompt]:
        chosen = []
        while len(chosen) < n:
            if self.position >= len(self.order):
                self.epoch, self.position = self.epoch + 1, 0
                self.order = self._order()
            chosen.append(self.prompts[self.order[self.position]])
            self.position += 1
        return chosen

    @torch.no_grad()
    def _roll_out(self) -> None:
        model, G = self.model, self.group_size
        # every process walks the same prompt order and samples its own slice of the step's prompts (whole groups)
        every = self._next_prompts(self.batch_size // G)
        first = self.rank * len(every) // self.world
        prompts = every[first:first + len(every) // self.world]
        was_training = model.training
        model.eval()
        t0 = time.perf_counter()
        # completion i of the rollout samples with seed (seed x 1000003 + rollout x batch_size + i), i counted over
        # the whole step: resumable, and the same completions on any number of processes
        seeds = [(self.seed * 1_000_003 + self.rollouts * self.batch_size + (first + k) * G) % 2**62
                 for k in range(len(prompts))]
        with self.autocast():
            sampler = sampling_copy(model, self.packed_head) if self.packed_sampling else model
            completions = sample_completions(sampler, [p.ids for p in prompts], G, self.sampling, seeds)
            del sampler
        sample_s = time.perf_counter() - t0
        expanded = [p for p in prompts for _ in range(G)]
        truncated = [not c or c[-1] not in self.stop_ids for c in completions]
        texts = [self.tokenizer.decode(c[:-1] if not t else c) for c, t in zip(completions, truncated)]
        prompt_texts = [p.messages[-1]["content"] if p.messages else "" for p in expanded]
        per_reward = score(self.rewards, prompt_texts, texts, [p.record for p in expanded], [p.where for p in expanded])
        per_reward = torch.tensor([[math.nan if v is None else v for v in row] for row in per_reward],
                                  dtype=torch.float32)
        rows = self._rows(expanded, completions, truncated)
        loss_type = self.objective.loss_type
        need_old = self.num_iterations > 1 or (loss_type == "rloo" and self.beta)
        old = self._logps(rows, model) if need_old else None
        ref = None
        if self.beta:
            with adapters_disabled(model) if self.reference is None else contextlib.nullcontext():
                ref = self._logps(rows, self.reference if self.reference is not None else model)
        model.train(was_training)
        # the step's figures from every process, in prompt order: advantages (a batch-wide std included) and metrics
        # are those of the whole batch, as on one process
        kl = torch.stack([(o - r).sum() for o, r in zip(old, ref)]) if loss_type == "rloo" and self.beta else None
        lengths = torch.tensor([len(c) for c in completions], dtype=torch.float32)
        gathered = self._gather(torch.cat([per_reward, lengths[:, None], torch.tensor(truncated, dtype=torch.float32)
                                           [:, None]] + ([kl[:, None]] if kl is not None else []), 1))
        per_reward = gathered[:, :len(self.rewards)]
        lengths, truncated_all = gathered[:, len(self.rewards)], gathered[:, len(self.rewards) + 1]
        rewards = combine_rewards(per_reward, self.weights)
        scored = rewards.clone()
        if loss_type == "rloo":
            if self.beta:  # TRL's RLOO: the summed first-order KL of each completion is a penalty on its reward
                scored = scored - self.beta * gathered[:, -1]
            advantages = rloo_advantages(scored, G)
        elif loss_type == "reinforce":  # nanochat: the group mean as the baseline, no scaling
            advantages, _ = group_advantages(scored, G, "none")
        else:
            advantages, _ = group_advantages(scored, G, self.scale_rewards)
        zero_std = group_advantages(scored, G, "group")[1].view(-1, G)[:, 0]  # groups that teach nothing
        mine = slice(first * G, first * G + len(rows))  # this process's rows of the step
        for i, row in enumerate(rows):
            row["advantages"] = advantages[mine][i:i + 1]
            if old is not None:
                row["old_logps"] = old[i]
            if ref is not None and loss_type != "rloo":
                row["ref_logps"] = ref[i]
        micro_batches = [_collate(rows[i:i + self.micro], self.pad_id) for i in range(0, len(rows), self.micro)]
        self.buffer = [b for _ in range(self.num_iterations) for b in micro_batches]
        local_tokens = float(sum(int(b["attention_mask"].sum()) for b in micro_batches))
        timing = self._gather(torch.tensor([[sample_s, local_tokens]]))
        self.metrics = self._figures(per_reward, rewards, zero_std, lengths, truncated_all,
                                     float(timing[:, 0].max()), int(timing[:, 1].sum()))
        if self.out is not None and self.sample_every and self.rollouts % self.sample_every == 0:
            self._write_samples(expanded, prompt_texts, texts, truncated, per_reward[mine], advantages[mine])
        self.rollouts += 1

    def _figures(self, per_reward: torch.Tensor, rewards: torch.Tensor, zero_std: torch.Tensor, lengths: torch.Tensor,
                 truncated: torch.Tensor, sample_s: float, train_tokens: int) -> dict:
        """The step's logged figures from the whole batch's rewards (NaN: skipped), completion lengths and truncation;
        sample_s: the slowest process's sampling seconds."""
        scorable = ~torch.isnan(rewards)
        return {
            "reward": round(float(rewards[scorable].mean()), 4) if scorable.any() else None,
            "reward_std": round(float(rewards[scorable].std()), 4) if scorable.sum() > 1 else 0.0,
            **{f"reward/{r.name}": (round(float(torch.nanmean(per_reward[:, k])), 4)
                                    if (~torch.isnan(per_reward[:, k])).any() else None)
               for k, r in enumerate(self.rewards)},
            "reward_skipped": int(torch.isnan(per_reward).sum()),
            "zero_std_groups": round(float(zero_std.float().mean()), 4),
            "completion_len": round(float(lengths.mean()), 2), "completion_len_max": int(lengths.max()),
            "truncated": round(float(truncated.mean()), 4),
            "sample_s": round(sample_s, 3), "sample_tokens_per_s": round(float(lengths.sum()) / max(sample_s, 1e-9), 1),
            "train_tokens": train_tokens}

    def _write_samples(self, prompts: list[Prompt], prompt_texts: list[str], texts: list[str], truncated: list[bool],
                       per_reward: torch.Tensor, advantages: torch.Tensor) -> None:
        """completions.jsonl: the first --samples completions of this process's rollout (rank 0's: the step's
        first), with their rewards and advantage."""
        with open(self.out / "completions.jsonl", "a", encoding="utf-8") as f:
            for i in range(min(self.samples, len(texts))):
                f.write(json.dumps({"rollout": self.rollouts, "where": prompts[i].where, "prompt": prompt_texts[i],
                                    "completion": texts[i], "truncated": truncated[i],
                                    "rewards": {r.name: (None if math.isnan(per_reward[i, k]) else
                                                         float(per_reward[i, k]))
                                                for k, r in enumerate(self.rewards)},
                                    "advantage": round(float(advantages[i]), 4)}, ensure_ascii=False) + "\n")

    def _gather(self, rows: torch.Tensor) -> torch.Tensor:
        """Every process's `rows` (the same shape on each), concatenated in rank order (one process: `rows`)."""
        if self.world == 1:
            return rows
        import torch.distributed as dist

        parts = [torch.empty_like(rows) for _ in range(self.world)]
        dist.all_gather(parts, rows.contiguous())
        return torch.cat(parts)

    def _rows(self, prompts: list[Prompt], completions: list[list[int]], truncated: list[bool]) -> list[dict]:
        """Prompt + completion rows with the completion's tokens as targets (-100 for masked truncated ones)."""
        rows = []
        for p, c, cut in zip(prompts, completions, truncated):
            ids = torch.tensor(p.ids + c, dtype=torch.long)
            labels = torch.full_like(ids, -100)
            if c and not (cut and self.mask_truncated):
                labels[len(p.ids) - 1:len(ids) - 1] = ids[len(p.ids):]
            rows.append({"input_ids": ids, "labels": labels})
        return rows

    def _logps(self, rows: list[dict], model) -> list[torch.Tensor]:
        """Each row's per-token log-probabilities of its targets under `model` (eval mode, no gradient)."""
        device = next(model.parameters()).device
        out = []
        for i in range(0, len(rows), self.micro):
            batch = {k: v.to(device) if torch.is_tensor(v) else v
                     for k, v in _collate(rows[i:i + self.micro], self.pad_id).items()}
            with self.autocast():
                logps, index, _ = token_logps(model, batch)
            logps = logps.float().cpu()
            index = index.cpu()
            out += [logps[index == r] for r in range(len(batch["input_ids"]))]
        return out


def _collate(rows: list[dict], pad_id: int) -> dict:
    """Right-padded (B, T) input_ids / labels / attention_mask; per-row tensors concatenated in row order."""
    T = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = r["input_ids"], r["labels"], 1
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    if "advantages" in rows[0]:
        batch["advantages"] = torch.cat([r["advantages"] for r in rows])
    for key in ("old_logps", "ref_logps"):
        if key in rows[0]:
            batch[key] = torch.cat([r[key] for r in rows])
    return batch
