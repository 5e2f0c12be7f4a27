"""`lmforge studio`: the web app over a workspace of runs (docs/studio.md)."""

from __future__ import annotations

import argparse
import sys


def cmd_studio(args: argparse.Namespace) -> int:
    import uvicorn

    from lmforge.cli import UserError, build_parser
    from lmforge.serve.security import is_loopback, new_token
    from lmforge.studio.app import Studio, create_studio_app
    from lmforge.studio.commands import LAUNCHABLE, subcommand_parser

    root = build_parser()  # the CLI's own parsers: the forms are built from them
    studio = Studio(args.runs, {c: subcommand_parser(root, c) for c in LAUNCHABLE})
    if not studio.workspace.is_dir():
        studio.workspace.mkdir(parents=True, exist_ok=True)
    if not is_loopback(args.host) and not args.token:
        raise UserError(f"--host {args.host} reaches this machine from others: give --token SECRET too (every "
                        "request then needs it; the studio starts processes)")
    token = args.token or new_token()
    shown = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host
    shown = f"[{shown}]" if ":" in shown else shown
    print(f"lmforge studio over {studio.workspace} (runs are started in {studio.launcher.cwd})\n"
          f"  open http://{shown}:{args.port}/#token={token}\n"
          f"  (the token authorises launching and stopping runs; keep it to yourself) Ctrl-C stops the studio, "
          f"not its runs", file=sys.stderr)
    app = create_studio_app(studio, host=args.host, port=args.port, token=token)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("studio", help="web app: watch, compare and launch runs, preview data (docs/studio.md)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="A local web app over a workspace of run directories: every run with its status "
                                   "and live curves, forms for pretrain / finetune / classify / eval / data run built "
                                   "from the CLI's own flags, start / stop / resume. Loopback only unless --host and "
                                   "--token are given.",
                       epilog="examples:\n  lmforge studio\n  lmforge studio --runs experiments/ --port 7861")
    s.add_argument("--runs", default="runs", help="the workspace: the folder of run directories (default: runs)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=7860)
    s.add_argument("--token", help="the session token (default: a random one, printed at start); required with a "
                                   "non-loopback --host")
    s.set_defaults(func=cmd_studio, _parser=s)
