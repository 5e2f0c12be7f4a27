"""`lmforge prompt cot | agent | auto-cot | eval | tot | chain`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lmforge.config import ConfigError

EXAMPLES = """examples:
  lmforge prompt cot --model runs/sft/merged --question "A pen costs 3 dollars. How much do 4 pens cost?"
  lmforge prompt cot --endpoint http://localhost:8000/v1 --question "..." --samples 10 --temperature 0.7
  lmforge prompt agent --model DIR --question "What is 17 * 23 + 4?" --tools calculator,python --trace trace.jsonl
  lmforge prompt agent --endpoint http://localhost:8000/v1 --mode openai --tools calculator,search:runs/index --question "..."
  lmforge prompt auto-cot --model DIR --questions gsm8k_train.jsonl --clusters 8 --out demos.jsonl
  lmforge prompt eval --model DIR --data gsm8k_test.jsonl --methods greedy,cot,self-consistency --limit 50
  lmforge prompt tot --model DIR --ranks 901-910 --breadth 5 --compare-cot --trace tot.jsonl
  lmforge prompt tot --endpoint http://localhost:8000/v1 --puzzle "4 9 10 13" --search dfs
  lmforge prompt chain chain.yaml --model DIR --inputs questions.jsonl --out answers.jsonl
"""


def model_options(max_tokens: int) -> argparse.ArgumentParser:
    """The flags every command that talks to a model shares (prompt, synth): a parent parser."""
    from lmforge.infer.load import add_inference_args

    model = argparse.ArgumentParser(add_help=False)
    add_inference_args(model, model_required=False, model_help="a model directory (or Hub id), run in this process; "
                                                               "--dtype, --quantize, --pack, --compile and --template "
                                                               "apply to it")
    model.add_argument("--endpoint", metavar="URL", help="an OpenAI-compatible base URL, e.g. http://localhost:8000/v1")
    model.add_argument("--served-model", default="default", help="the model name the endpoint expects")
    model.add_argument("--api-key", help="the endpoint's key (default: $OPENAI_API_KEY)")
    model.add_argument("--concurrency", type=int, default=8,
                       help="requests in flight to an endpoint (default 8: lmforge serve batches 8)")
    model.add_argument("--max-tokens", type=int, default=max_tokens)
    model.add_argument("--seed", type=int, default=0)
    model.add_argument("--json", action="store_true", help="print one JSON object")
    return model


def make_client(args: argparse.Namespace):
    from lmforge.prompting.client import EngineClient, HTTPClient

    if bool(args.model) == bool(args.endpoint):
        raise ConfigError("give the model: --model DIR (in this process) or --endpoint URL (an OpenAI-compatible API)")
    if args.endpoint:
        import os

        return HTTPClient(args.endpoint, args.served_model, args.api_key or os.environ.get("OPENAI_API_KEY"),
                          concurrency=args.concurrency, request_errors=getattr(args, "request_errors", "raise"))
    return EngineClient(args.model, template=args.template, compile=args.compile, dtype=args.dtype,
                        quantize=args.quantize, pack=args.pack)


def _demos(path: str | None) -> list[dict]:
    if not path:
        return []
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    for i, r in enumerate(rows, 1):
        if "question" not in r or "rationale" not in r:
            raise ConfigError(f"{path}:{i}: a demonstration needs 'question' and 'rationale'")
    return rows


def cmd_cot(args) -> int:
    from lmforge.prompting.reasoning import ChainOfThought, Sampling, self_consistency

    client = make_client(args)
    demos = _demos(args.demos)
    if args.samples > 1:
        vote = self_consistency(client, args.question, args.samples, args.temperature, args.rule, demos,
                                args.max_tokens, args.seed)
        out = {"answer": vote.answer, "votes": vote.votes, "tie": vote.tie, "failures": vote.failures,
               "chains": [c["reasoning"] for c in vote.samples]}
    else:
        r = ChainOfThought(client, demos, sampling=Sampling(temperature=0.0, max_tokens=args.max_tokens,
                                                            stop=["\n\nQ:", "\nQ:"])).answer(args.question, args.rule)[0]
        out = {"answer": r["answer"], "reasoning": r["reasoning"]}
    print(json.dumps(out, ensure_ascii=False, indent=None if args.json else 2))
    return 0


def build_tools(spec: str, user: list[str]) -> list:
    from lmforge.prompting import tools as T

    out = []
    for name in filter(None, spec.split(",")):
        kind, _, arg = name.partition(":")
        if kind == "calculator":
            out.append(T.calculator_tool())
        elif kind == "python":
            out.append(T.python_tool())
        elif kind == "search":
            if not arg:
                raise ConfigError("tools: search needs an index, as search:DIR (lmforge rag index --out DIR)")
            out.append(T.search_tool(arg))
        else:
            raise ConfigError(f"tools: {kind!r} is not calculator, python or search:INDEX (your own: --tool-module)")
    for spec_ in user:
        out += T.load_user_tools(spec_)
    if not out:
        raise ConfigError("tools: give at least one (--tools calculator,python,search:INDEX or --tool-module)")
    return out


def cmd_agent(args) -> int:
    from lmforge.prompting.agent import ReActAgent
    from lmforge.prompting.client import Sampling

    agent = ReActAgent(make_client(args), build_tools(args.tools, args.tool_module), args.mode, args.max_steps,
                       sampling=Sampling(temperature=0.0, max_tokens=args.max_tokens))
    result = agent.run(args.question, args.trace)
    if args.json:
        print(json.dumps({"answer": result.answer, "stopped": result.stopped, "steps": result.trace()},
                         ensure_ascii=False))
    else:
        for s in result.steps:
            if s.thought:
                print(f"Thought: {s.thought}")
            if s.action:
                print(f"Action: {s.action}[{s.input}]\nObservation: {s.observation}")
        print(f"Final Answer: {result.answer}" if result.answer is not None else f"(no answer: {result.stopped})")
    return 0 if result.answer is not None else 1


def cmd_auto_cot(args) -> int:
    from lmforge.files import atomic_write
    from lmforge.prompting.reasoning import auto_cot

    rows = [json.loads(line) for line in Path(args.questions).read_text(encoding="utf-8").splitlines() if line.strip()]
    questions = [r["question"] if isinstance(r, dict) else str(r) for r in rows]
    demos = auto_cot(make_client(args), questions, args.clusters, seed=args.seed)
    with atomic_write(Path(args.out)) as f:
        for d in demos:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    print(f"{len(demos)} demonstrations from {args.clusters} clusters -> {args.out} (use with --demos)", file=sys.stderr)
    return 0


def cmd_eval(args) -> int:
    from lmforge.eval.tasks import read_gsm8k
    from lmforge.prompting.reasoning import compare_methods

    docs = read_gsm8k(Path(args.data))[:args.limit or None]
    report = compare_methods(make_client(args), docs, args.methods.split(","), _demos(args.demos), args.samples,
                             args.temperature, args.max_tokens, args.seed)
    if args.out:
        from lmforge.files import write_json

        write_json(Path(args.out), report)
    if args.json:
        print(json.dumps({"examples": report["examples"], "methods": report["methods"]}))
    else:
        for name, m in report["methods"].items():
            print(f"{name:<18} accuracy {m['accuracy']:.4f}  (no answer found: {m['failures']})")
    return 0


def cmd_tot(args) -> int:
    from lmforge.prompting.tot import TreeOfThoughts, builtin_puzzles, cot_solve, write_trace

    puzzles = [" ".join(args.puzzle.split())] if args.puzzle else builtin_puzzles(args.ranks)
    if args.puzzle and (len(puzzles[0].split()) != 4 or not all(n.isdigit() for n in puzzles[0].split())):
        raise ConfigError(f"--puzzle {args.puzzle!r}: four whole numbers, e.g. '4 9 10 13'")
    client = make_client(args)
    solver = TreeOfThoughts(client, search=args.search, breadth=args.breadth, evaluate_samples=args.evaluate_samples,
                            temperature=args.temperature, max_states=args.max_states, max_tokens=args.max_tokens,
                            seed=args.seed)
    rows = []
    for p in puzzles:
        rows.append(solver.solve(p))
        if not args.json:
            print(f"{p:<14} {'ok ' if rows[-1]['correct'] else 'no '} {rows[-1]['answer'] or '-'}", file=sys.stderr)
    report = {"puzzles": len(puzzles), "model": client.name,
              f"tot-{args.search}": sum(r["correct"] for r in rows) / len(rows)}
    if args.search == "bfs":
        report["tot-bfs-any"] = sum(r["any_correct"] for r in rows) / len(rows)
    if args.compare_cot:
        cot = cot_solve(client, puzzles, args.max_tokens)
        rows += cot
        report["cot"] = sum(r["correct"] for r in cot) / len(cot)
    if args.trace:
        write_trace(Path(args.trace), rows)
    print(json.dumps(report) if args.json else "\n".join(f"{k:<12} {v:.3f}" if isinstance(v, float) else f"{k:<12} {v}"
                                                          for k, v in report.items()))
    return 0


def cmd_chain(args) -> int:
    from lmforge.prompting.chain import Chain, run_chain

    chain = Chain.load(args.chain)
    needs_model = any(s.kind == "prompt" for s in chain.steps)
    client = make_client(args) if needs_model or args.model or args.endpoint else None
    result = run_chain(chain, client, args.inputs, args.out, args.batch_size)
    print(json.dumps(result) if args.json else
          f"{result['done']} records -> {result['out']} ({result['skipped']} already there, skipped)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prompt", help="prompting: chain of thought, self-consistency, Auto-CoT, ReAct agents, Tree of Thoughts",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
                       description="Prompting methods over a model directory (lmforge's engine) or any "
                                   "OpenAI-compatible endpoint (lmforge serve, llama.cpp, a hosted API). "
                                   "See docs/prompting.md.")
    psub = p.add_subparsers(dest="prompt_command", metavar="ACTION", parser_class=type(p))
    p.set_defaults(func=lambda a: p.print_help())
    model = model_options(max_tokens=256)
    c = psub.add_parser("cot", parents=[model], help="chain-of-thought answer (self-consistency with --samples)")
    c.add_argument("--question", required=True)
    c.add_argument("--demos", metavar="FILE.jsonl", help="few-shot CoT demonstrations (question, rationale)")
    c.add_argument("--samples", type=int, default=1, help="sampled chains for self-consistency (1: greedy CoT)")
    c.add_argument("--temperature", type=float, default=0.7, help="self-consistency's sampling temperature")
    c.add_argument("--rule", default="number", help="answer extraction: number, letter, text, regex:PATTERN")
    c.set_defaults(func=cmd_cot)
    a = psub.add_parser("agent", parents=[model], help="a ReAct agent with tools")
    a.add_argument("--question", required=True)
    a.add_argument("--tools", default="calculator", help="calculator, python, search:INDEX_DIR (comma-separated)")
    a.add_argument("--tool-module", action="append", default=[], metavar="MODULE:FN[,FN]",
                   help="your own tools: functions of one string argument (module or file.py)")
    a.add_argument("--mode", default="text", choices=["text", "openai"],
                   help="text: Thought/Action/Observation lines; openai: the API's tool calling")
    a.add_argument("--max-steps", type=int, default=8)
    a.add_argument("--trace", metavar="FILE.jsonl", help="write every step here")
    a.set_defaults(func=cmd_agent)
    ac = psub.add_parser("auto-cot", parents=[model], help="build Auto-CoT demonstrations from questions")
    ac.add_argument("--questions", required=True, metavar="FILE.jsonl", help="records with a 'question' field")
    ac.add_argument("--clusters", type=int, default=8)
    ac.add_argument("--out", required=True, metavar="FILE.jsonl")
    ac.set_defaults(func=cmd_auto_cot)
    e = psub.add_parser("eval", parents=[model], help="GSM8K-style accuracy: greedy vs CoT vs self-consistency")
    e.add_argument("--data", required=True, metavar="FILE.jsonl", help="GSM8K jsonl (question, answer '... #### N')")
    e.add_argument("--methods", default="greedy,cot,self-consistency")
    e.add_argument("--demos", metavar="FILE.jsonl")
    e.add_argument("--samples", type=int, default=5, help="self-consistency: chains per question")
    e.add_argument("--temperature", type=float, default=0.7)
    e.add_argument("--limit", type=int, default=0)
    e.add_argument("--out", metavar="FILE.json", help="write the per-question predictions too")
    e.set_defaults(func=cmd_eval)
    t = psub.add_parser("tot", parents=[model], help="Tree of Thoughts on the Game of 24 (success rate, vs CoT)",
                        description="Tree of Thoughts (Yao et al. 2023): propose next steps, value the states (sure / "
                                    "likely / impossible), search by BFS or DFS. Puzzles: the paper's built-in list "
                                    "(ranks 901-1000 by default) or --puzzle. See docs/prompting.md.")
    t.add_argument("--puzzle", help="one puzzle, four numbers (default: the built-in list, --ranks)")
    t.add_argument("--ranks", default="901-1000", help="built-in puzzles by rank: 901-1000, or 901,905")
    t.add_argument("--search", choices=["bfs", "dfs"], default="bfs")
    t.add_argument("--breadth", type=int, default=5, help="BFS: states kept after each step (the paper's b)")
    t.add_argument("--evaluate-samples", type=int, default=1,
                   help="value replies per state (the paper: 3, sampled); 1 is greedy")
    t.add_argument("--temperature", type=float, default=0.7, help="sampling temperature of the value replies (n > 1)")
    t.add_argument("--max-states", type=int, default=30, help="DFS: states expanded at most per puzzle")
    t.add_argument("--compare-cot", action="store_true", help="also solve each puzzle by plain chain of thought")
    t.add_argument("--trace", metavar="FILE.jsonl", help="write every puzzle's result and search trace here")
    t.set_defaults(func=cmd_tot)
    ch = psub.add_parser("chain", parents=[model], help="a prompt chain from a YAML file over a JSONL of inputs",
                         description="Steps whose outputs feed later templates (model prompts, retrieval from an "
                                     "lmforge index, calculator / python tools), run over every input record; "
                                     "rerun with the same --out to go on where it stopped. See docs/prompting.md.")
    ch.add_argument("chain", metavar="FILE.yaml", help="the chain: a list of steps under 'steps'")
    ch.add_argument("--inputs", required=True, metavar="FILE.jsonl", help="one JSON object a line: the variables")
    ch.add_argument("--out", required=True, metavar="FILE.jsonl", help="each input plus one field per step")
    ch.add_argument("--batch-size", type=int, default=16, help="records per batch (model steps: one request each)")
    ch.set_defaults(func=cmd_chain)
