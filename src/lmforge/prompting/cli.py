"""`lmforge prompt cot | agent | auto-cot | eval | tot | chain`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lmforge.config import add_config_args, config_from_args
from lmforge.prompting.config import MAX_TOKENS, AgentCommand, AutoCotCommand, ChainCommand, CotCommand, EvalCommand, TotCommand

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
    """A parent parser with the options of every command that talks to a model (infer/client.py)."""
    from lmforge.infer.client import add_client_args

    model = argparse.ArgumentParser(add_help=False)
    add_client_args(model, max_tokens)
    return model


def cmd_cot(args) -> int:
    from lmforge.infer.client import client_from_args
    from lmforge.prompting.reasoning import ChainOfThought, Sampling, read_demos, self_consistency

    c = config_from_args(CotCommand, args)
    client = client_from_args(args)
    demos = read_demos(c.demos)
    if c.samples > 1:
        vote = self_consistency(client, c.question, c.samples, c.temperature, c.rule, demos, args.max_tokens,
                                args.seed)
        out = {"answer": vote.answer, "votes": vote.votes, "tie": vote.tie, "failures": vote.failures,
               "chains": [c["reasoning"] for c in vote.samples]}
    else:
        r = ChainOfThought(client, demos, sampling=Sampling(temperature=0.0, max_tokens=args.max_tokens,
                                                            stop=["\n\nQ:", "\nQ:"])).answer(c.question, c.rule)[0]
        out = {"answer": r["answer"], "reasoning": r["reasoning"]}
    print(json.dumps(out, ensure_ascii=False, indent=None if args.json else 2))
    return 0


def cmd_agent(args) -> int:
    from lmforge.infer.client import Sampling, client_from_args
    from lmforge.prompting.agent import ReActAgent
    from lmforge.prompting.tools import build_tools

    c = config_from_args(AgentCommand, args)
    agent = ReActAgent(client_from_args(args), build_tools(c.tools, c.tool_module), c.mode, c.max_steps,
                       sampling=Sampling(temperature=0.0, max_tokens=args.max_tokens))
    result = agent.run(c.question, c.trace)
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
    from lmforge.infer.client import client_from_args
    from lmforge.prompting.reasoning import auto_cot

    c = config_from_args(AutoCotCommand, args)
    rows = [json.loads(line) for line in Path(c.questions).read_text(encoding="utf-8").splitlines() if line.strip()]
    questions = [r["question"] if isinstance(r, dict) else str(r) for r in rows]
    demos = auto_cot(client_from_args(args), questions, c.clusters, seed=args.seed)
    with atomic_write(Path(c.out)) as f:
        for d in demos:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    print(f"{len(demos)} demonstrations from {c.clusters} clusters -> {c.out} (use with --demos)", file=sys.stderr)
    return 0


def cmd_eval(args) -> int:
    from lmforge.eval.tasks import read_gsm8k
    from lmforge.infer.client import client_from_args
    from lmforge.prompting.reasoning import compare_methods, read_demos

    c = config_from_args(EvalCommand, args)
    docs = read_gsm8k(Path(c.data))[:c.limit or None]
    report = compare_methods(client_from_args(args), docs, c.methods.split(","), read_demos(c.demos), c.samples,
                             c.temperature, args.max_tokens, args.seed)
    if c.out:
        from lmforge.files import write_json

        write_json(Path(c.out), report)
    if args.json:
        print(json.dumps({"examples": report["examples"], "methods": report["methods"]}))
    else:
        for name, m in report["methods"].items():
            print(f"{name:<18} accuracy {m['accuracy']:.4f}  (no answer found: {m['failures']})")
    return 0


def cmd_tot(args) -> int:
    from lmforge.config import ConfigError
    from lmforge.infer.client import client_from_args
    from lmforge.prompting.tot import TreeOfThoughts, builtin_puzzles, cot_solve, write_trace

    c = config_from_args(TotCommand, args)
    puzzles = [" ".join(c.puzzle.split())] if c.puzzle else builtin_puzzles(c.ranks)
    if c.puzzle and (len(puzzles[0].split()) != 4 or not all(n.isdigit() for n in puzzles[0].split())):
        raise ConfigError(f"--puzzle {c.puzzle!r}: four whole numbers, e.g. '4 9 10 13'")
    client = client_from_args(args)
    solver = TreeOfThoughts(client, search=c.search, breadth=c.breadth, evaluate_samples=c.evaluate_samples,
                            temperature=c.temperature, max_states=c.max_states, max_tokens=args.max_tokens,
                            seed=args.seed)
    rows = []
    for i, p in enumerate(puzzles, 1):
        rows.append(solver.solve(p))
        print(f"[{i}/{len(puzzles)}] {p:<14} {'ok ' if rows[-1]['correct'] else 'no '} {rows[-1]['answer'] or '-'}",
              file=sys.stderr, flush=True)  # stderr: --json's report stays alone on stdout
        if c.trace:  # rewritten whole (atomically) after each puzzle: a stopped run keeps the puzzles it solved
            write_trace(Path(c.trace), rows)
    report = {"puzzles": len(puzzles), "model": client.name,
              f"tot-{c.search}": sum(r["correct"] for r in rows) / len(rows)}
    if c.search == "bfs":
        report["tot-bfs-any"] = sum(r["any_correct"] for r in rows) / len(rows)
    if c.compare_cot:
        cot = cot_solve(client, puzzles, args.max_tokens)
        rows += cot
        report["cot"] = sum(r["correct"] for r in cot) / len(cot)
    if c.trace:
        write_trace(Path(c.trace), rows)
    print(json.dumps(report) if args.json else "\n".join(f"{k:<12} {v:.3f}" if isinstance(v, float) else f"{k:<12} {v}"
                                                          for k, v in report.items()))
    return 0


def cmd_chain(args) -> int:
    from lmforge.infer.client import client_from_args
    from lmforge.prompting.chain import Chain, run_chain

    c = config_from_args(ChainCommand, args)
    chain = Chain.load(args.chain)
    needs_model = any(s.kind == "prompt" for s in chain.steps)
    client = client_from_args(args) if needs_model or args.model or args.endpoint else None
    result = run_chain(chain, client, c.inputs, c.out, c.batch_size)
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
    model = model_options(max_tokens=MAX_TOKENS)
    c = psub.add_parser("cot", parents=[model], help="chain-of-thought answer (self-consistency with --samples)")
    add_config_args(c, CotCommand)
    c.set_defaults(func=cmd_cot)
    a = psub.add_parser("agent", parents=[model], help="a ReAct agent with tools")
    add_config_args(a, AgentCommand)
    a.set_defaults(func=cmd_agent)
    ac = psub.add_parser("auto-cot", parents=[model], help="build Auto-CoT demonstrations from questions")
    add_config_args(ac, AutoCotCommand)
    ac.set_defaults(func=cmd_auto_cot)
    e = psub.add_parser("eval", parents=[model], help="GSM8K-style accuracy: greedy vs CoT vs self-consistency")
    add_config_args(e, EvalCommand)
    e.set_defaults(func=cmd_eval)
    t = psub.add_parser("tot", parents=[model], help="Tree of Thoughts on the Game of 24 (success rate, vs CoT)",
                        description="Tree of Thoughts (Yao et al. 2023): propose next steps, value the states (sure / "
                                    "likely / impossible), search by BFS or DFS. Puzzles: the paper's built-in list "
                                    "(--ranks) or --puzzle. See docs/prompting.md.")
    add_config_args(t, TotCommand)
    t.set_defaults(func=cmd_tot)
    ch = psub.add_parser("chain", parents=[model], help="a prompt chain from a YAML file over a JSONL of inputs",
                         description="Steps whose outputs feed later templates (model prompts, retrieval from an "
                                     "lmforge index, calculator / python tools), run over every input record; "
                                     "rerun with the same --out to go on where it stopped. See docs/prompting.md.")
    ch.add_argument("chain", metavar="FILE.yaml", help="the chain: a list of steps under 'steps'")
    add_config_args(ch, ChainCommand)
    ch.set_defaults(func=cmd_chain)
