"""``python -m serving local ...``: the spec's vLLM server on this machine's CPU.

    local setup  --stack local   tiny model, sample adapters, API key file, vLLM venv
    local start  --stack local   run vLLM in the background, wait for /health
    local stop   --stack local   SIGTERM, then SIGKILL after a deadline
    local status --stack local   pid, health, models
    local reset  --stack local   stop our server, forget runtime adapters and the demo's state
                                 (keeps the model, sample adapters, key and the 5 GB venv)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from serving.adapters.client import VllmError
from serving.console import console, literal, marked
from serving.local import run as localrun
from serving.local.progress import Phases
from serving.stack import layout as layouts
from serving.stack import secretref, stackfile
from serving.stack.errors import Problem, SpecError
from serving.stack.spec import Spec

out = console()


def _server(args: argparse.Namespace) -> localrun.LocalServer:
    spec: Spec = (stackfile.load(config=Path(args.config)) if args.config
                  else stackfile.load(stack=args.stack))
    if not spec.on.local_files:
        raise SpecError([Problem(f"stack {spec.stack}", (
            f"target is {spec.target}; `local` runs only target local stacks (e.g. --stack local)"
        ))])
    return localrun.LocalServer(spec, layouts.local(stackfile.ROOT))


def _key(server: localrun.LocalServer) -> str:
    return secretref.resolve(server.spec.api_key, root=stackfile.ROOT, stack=server.spec.stack)


def cmd_setup(args: argparse.Namespace) -> int:
    server = _server(args)
    for line in localrun.setup_files(server.spec, server.layout, root=stackfile.ROOT):
        out.print(marked("✓", "green", line))
    if not args.skip_venv:
        with Phases(out, "vLLM venv") as phases:
            localrun.install_venv(server.spec, server.layout, on_phase=phases.update)
        out.print(marked("✓", "green", f"vLLM venv {server.layout.venv_dir} "
                                       f"({phases.elapsed_s:.0f} s)"))
    return 0


def cmd_start(args: argparse.Namespace) -> int:
    server = _server(args)
    with Phases(out, f"vLLM start at {server.endpoint}") as phases:
        pid = localrun.start(server, _key(server), deadline_s=args.deadline,
                             on_wait=phases.update)
    out.print(marked("✓", "green", f"vLLM at {server.endpoint} (pid {pid}, log "
                                   f"{server.log_file}, {phases.elapsed_s:.0f} s)"))
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    server = _server(args)
    stopped = localrun.stop(server, deadline_s=args.deadline)
    out.print(marked("✓", "green", "stopped") if stopped else "not running")
    return 0


def cmd_reset(args: argparse.Namespace) -> int:
    server = _server(args)
    done = localrun.reset(server)
    for line in done:
        out.print(f"[green]✓[/] {line}", markup=True, highlight=False)
    out.print("reset: nothing to do" if not done else
              "reset: the model, sample adapters, API key and vLLM venv are kept")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    server = _server(args)
    pid = server.pid()
    with server.client(_key(server)) as client:
        healthy = client.health()
        out.print(literal(f"pid {pid or '-'}, {server.endpoint} "
                          f"{'healthy' if healthy else 'not answering'}, log {server.log_file}"))
        if healthy:
            try:
                for card in client.models():
                    kind = f"adapter of {card.parent}" if card.parent else "base model"
                    out.print(literal(f"  {card.id}: {kind} ({card.root})"))
            except VllmError as exc:
                raise SpecError([Problem("local status", exc.message)]) from None
    return 0 if healthy else 1


def add_parser(sub) -> None:
    """Register ``local`` on the CLI's subparsers object."""
    p = sub.add_parser("local", help="run the stack's vLLM on this machine's CPU")
    cmds = p.add_subparsers(dest="local_command", required=True)
    for name, func, text in (
        ("setup", cmd_setup, "tiny model, sample adapters, API key file, vLLM venv"),
        ("start", cmd_start, "start vLLM in the background and wait for /health"),
        ("stop", cmd_stop, "stop vLLM (SIGTERM, then SIGKILL after --deadline)"),
        ("status", cmd_status, "pid, health and served models"),
        ("reset", cmd_reset, "stop the server this checkout started, remove runtime-added "
         "adapters, the record and the demo's state; keeps model, key and venv"),
    ):
        q = cmds.add_parser(name, help=text, description=text)
        group = q.add_mutually_exclusive_group(required=True)
        group.add_argument("--stack", help="a checked-in stack: Pulumi.<STACK>.yaml")
        group.add_argument("--config", help="a config file of the same shape")
        if name == "setup":
            q.add_argument("--skip-venv", action="store_true", help="do not install the vLLM venv")
        if name == "start":
            q.add_argument("--deadline", type=float, default=localrun.START_DEADLINE_SECONDS)
        if name == "stop":
            q.add_argument("--deadline", type=float, default=localrun.STOP_DEADLINE_SECONDS)
        q.set_defaults(func=func)
