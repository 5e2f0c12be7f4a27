"""`lmforge synth self-instruct | evol-instruct`."""

from __future__ import annotations

import argparse
import json
import sys

from lmforge.config import add_field_arg
from lmforge.synth.config import EvolConfig, SelfInstructConfig

EXAMPLES = """examples:
  lmforge serve --model ./Qwen2.5-0.5B-Instruct --port 8000 &
  lmforge synth self-instruct --seed-tasks builtin:seeds-en --endpoint http://localhost:8000/v1 --num 50 --out runs/si
  lmforge synth self-instruct --seed-tasks builtin:seeds-zh --model DIR --num 20 --out runs/si_zh
  lmforge synth evol-instruct --seed-tasks runs/si/data/alpaca.jsonl --endpoint URL --rounds 3 --out runs/evol
  lmforge finetune --model DIR --data runs/si/data/alpaca.jsonl --out runs/sft_si
"""


def cmd_self_instruct(args) -> int:
    from lmforge.infer.client import client_from_args
    from lmforge.synth.common import seed_path
    from lmforge.synth.selfinstruct import SelfInstruct, read_seeds

    cfg = SelfInstructConfig(num=args.num, prompts_per_round=args.prompts_per_round, max_rounds=args.max_rounds,
                             stall_rounds=args.stall_rounds,
                             max_tokens=args.max_tokens,
                             temperature=args.temperature, seed=args.seed, eval_data=args.eval_data)
    # a refused prompt is a reject with the endpoint's reason, the run goes on
    client = client_from_args(args, request_errors="keep")
    stats = SelfInstruct(client, read_seeds(seed_path(args.seed_tasks)), cfg).run(
        args.out, args.resume, args.overwrite)
    _report(stats, args)
    return 0


def cmd_evol(args) -> int:
    from lmforge.infer.client import client_from_args
    from lmforge.synth.common import seed_path
    from lmforge.synth.evol import EvolInstruct, read_instructions

    cfg = EvolConfig(rounds=args.rounds, num=args.num, max_tokens=args.max_tokens, temperature=args.temperature,
                     seed=args.seed, eval_data=args.eval_data)
    client = client_from_args(args, request_errors="keep")
    stats = EvolInstruct(client, read_instructions(seed_path(args.seed_tasks)), cfg).run(
        args.out, args.resume, args.overwrite)
    _report(stats, args)
    return 0


def _report(stats: dict, args) -> None:
    shown = {k: stats[k] for k in ("generated", "kept", "rejected", "rejection_reasons", "rounds", "seconds",
                                   "instructions_per_minute", "tokens") if k in stats}
    print(json.dumps(shown, ensure_ascii=False, indent=None if args.json else 2))
    print(f"kept items: {args.out}/data/alpaca.jsonl (and sharegpt.jsonl); every rejected one with its reason: "
          f"{args.out}/rejects/rejects.jsonl; stats: {args.out}/stats.json", file=sys.stderr)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth", help="synthetic instruction data: self-instruct, Evol-Instruct",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
                       description="Generate instruction data with a model (lmforge's engine or any OpenAI-compatible "
                                   "endpoint), filtered by ROUGE-L novelty, the papers' heuristics and elimination "
                                   "rules, and the data stage's dedup and contamination checks. See docs/synthetic.md.")
    ssub = p.add_subparsers(dest="synth_command", metavar="ACTION", parser_class=type(p))
    p.set_defaults(func=lambda a: p.print_help())
    from lmforge.infer.client import add_client_args

    common = argparse.ArgumentParser(add_help=False)
    add_client_args(common, max_tokens=SelfInstructConfig.max_tokens)  # EvolConfig's is the same
    common.add_argument("--seed-tasks", required=True, metavar="FILE",
                        help="seed tasks (self-instruct's JSONL schema; builtin:seeds-en / builtin:seeds-zh), or for "
                             "evol-instruct any instruction data")
    common.add_argument("--out", required=True, metavar="DIR")
    add_field_arg(common, SelfInstructConfig, "temperature")  # EvolConfig's is the same
    common.add_argument("--eval-data", metavar="FILE", help="a held-out eval set: generated items overlapping it "
                                                            "are rejected (contamination)")
    common.add_argument("--resume", action="store_true", help="continue the run in --out")
    common.add_argument("--overwrite", action="store_true", help="start over in an --out that holds a run")
    si = ssub.add_parser("self-instruct", parents=[common], help="self-instruct (Wang et al. 2022)")
    for name in ("num", "prompts_per_round", "max_rounds", "stall_rounds"):
        add_field_arg(si, SelfInstructConfig, name)
    si.set_defaults(func=cmd_self_instruct)
    ev = ssub.add_parser("evol-instruct", parents=[common], help="Evol-Instruct (Xu et al. 2023, WizardLM)")
    add_field_arg(ev, EvolConfig, "rounds")
    add_field_arg(ev, EvolConfig, "num")
    ev.set_defaults(func=cmd_evol)
