"""``python -m serving adapters ...``: runtime adapter operations against a running vLLM.

    adapters list      --stack local
    adapters add       NAME VERSION [--from FOLDER]
    adapters hotfix    NAME VERSION [--from FOLDER] [--settle-wait SECONDS]
    adapters rollback  NAME [--settle-wait SECONDS]
    adapters remove    NAME [--deadline SECONDS]
    adapters reconcile [--deadline SECONDS] [--settle-wait SECONDS] [--rebuild]
    adapters settle    [NAME ...] [--settle-wait SECONDS]

Every change is verified by which weights answer (``serving.adapters.answer``); a failed hotfix
or rollback is rolled back automatically and the old version verified. On vLLM before 0.33.0,
hotfix and rollback swap in place and then "settle" the name (load it once more, plainly),
because that vLLM re-reads in-place loaded weights on every step; `settle` does it later.

Exit codes: 0 done and verified; 2 refused, nothing changed (one line naming what); 3 failed,
rolled back to the recorded version and verified; 4 failed, and the state is recorded as the
message says (a version marked unverified, or a change left in place): run the command it
names. An operation cut by a lost connection, a timeout, Ctrl-C or SIGTERM after it changed
something exits 4 too, saying what the record holds; the next command names the cut one
until `adapters reconcile` has verified the server.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

from rich.console import Console
from rich.table import Table
from rich.text import Text

from serving.adapters.client import VllmClient, VllmError
from serving.adapters.journal import Terminated
from serving.adapters.ops import SETTLE_WAIT_SECONDS, AdapterOps, OperationError, Outcome
from serving.adapters.record import RecordStore
from serving.stack import layout as layouts
from serving.stack import secretref, stackfile
from serving.stack.errors import Problem, SpecError, one_line
from serving.stack.spec import Spec

# Names, paths, messages and the model's answers are printed as written: no markup, no emoji
# codes (an answer holding "[red]" or ":x:" must not restyle the output).
out = Console(width=None if sys.stdout.isatty() else 160, markup=False, emoji=False,
              highlight=False)
EXIT_ROLLED_BACK = 3
EXIT_CHANGED = 4


def _spec(args: argparse.Namespace) -> Spec:
    if args.config:
        return stackfile.load(config=Path(args.config))
    return stackfile.load(stack=args.stack)


def default_endpoint(spec: Spec) -> str:
    return f"http://127.0.0.1:{layouts.vllm_port(spec)}"


# Given the stack, its layout and the API key: restarts the local target's server. The
# top-level CLI passes serving.local's (the VMs' bundle carries no serving.local).
RestartFactory = Callable[[Spec, layouts.Layout, "str | None"], Callable[[], None]]


def make_ops(spec: Spec, *, endpoint: str | None = None, state_dir: str | None = None,
             root: Path = stackfile.ROOT, say=None,
             restart_local: RestartFactory | None = None) -> AdapterOps:
    """Operations for ``spec``: its API key, its layout's record, the server at ``endpoint``;
    ``restart_local`` lets them restart a local target's server after a failed load."""
    layout = layouts.for_target(spec, root)
    key = secretref.resolve(spec.api_key, root=root, stack=spec.stack)
    client = VllmClient(endpoint or default_endpoint(spec), key)
    store = RecordStore(state_dir or layout.state_dir)
    ops = AdapterOps(spec, layout, client, store, say=say or (lambda _m: None))
    if spec.on.local_files:
        if restart_local is not None:
            ops.restart = restart_local(spec, layout, key)
        ops.restart_hint = (f"restart it (`python -m serving local stop --stack {spec.stack}` "
                            f"and `python -m serving local start --stack {spec.stack}`)")
    else:
        ops.restart_hint = (f"restart it on the host (`sudo systemctl restart "
                            f"{layouts.SERVICE_NAME}.service`)")
    return ops


def _raise_terminated(_signum: int, _frame: FrameType | None) -> None:
    raise Terminated()


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM ends an operation the way Ctrl-C does: through its journal, with a message."""
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(args: argparse.Namespace) -> int:
    spec = _spec(args)
    ops = make_ops(spec, endpoint=args.endpoint, state_dir=args.state_dir,
                   say=lambda m: out.print(Text(one_line(m), style="dim")),
                   restart_local=getattr(args, "restart_local", None))
    if getattr(args, "settle_wait", None) is not None:
        ops.settle_wait_s = args.settle_wait
    what = f"adapters {args.op}" + (f" {args.name}" if getattr(args, "name", None) else "")
    started = time.monotonic()
    try:
        with ops.client, _sigterm_interrupts():
            if args.op == "list":
                out.print(_table(ops))
                pending = ops.store.pending()
                if pending is not None:
                    print(f"NOT in sync: `{pending.command}` did not end verified "
                          f"({pending.problem or 'it was cut off'}); run `adapters reconcile`")
                    return EXIT_CHANGED
                return 0
            outcome = _dispatch(ops, args)
    except OperationError as exc:
        if exc.changed or exc.rolled_back:
            print(f"{what}: {exc.message}", file=sys.stderr)
            return EXIT_CHANGED if exc.changed else EXIT_ROLLED_BACK
        raise SpecError([Problem(what, exc.message)]) from None
    except VllmError as exc:
        raise SpecError([Problem(what, exc.message)]) from None
    except KeyboardInterrupt:  # before the operation changed anything (its journal says so)
        raise SpecError([Problem(what, "interrupted before it changed anything; nothing "
                                 "changed")]) from None
    except Exception as exc:  # the journal re-raises only what changed nothing
        raise SpecError([Problem(what, f"failed before it changed anything "
                                 f"({type(exc).__name__}: {exc}); nothing changed")]) from None
    seconds = time.monotonic() - started
    answer = f" — answers {outcome.probe.text!r}" if outcome.probe else ""
    out.print(Text.assemble(("✓", "green"), " ",
                            one_line(f"{outcome.message} ({seconds:.2f} s){answer}")))
    return 0


def _dispatch(ops: AdapterOps, args: argparse.Namespace) -> Outcome:
    source = Path(args.source) if getattr(args, "source", None) else None
    if args.op == "add":
        return ops.add(args.name, args.version, source)
    if args.op == "hotfix":
        return ops.hotfix(args.name, args.version, source)
    if args.op == "rollback":
        return ops.rollback(args.name)
    if args.op == "remove":
        return ops.remove(args.name, deadline_s=args.deadline)
    if args.op == "settle":
        return ops.settle(args.names or None, force=True if args.force else None)
    return ops.reconcile(deadline_s=args.deadline, rebuild=args.rebuild)


def _table(ops: AdapterOps) -> Table:
    table = Table(title=f"Adapters on {ops.client.base_url} (base {ops.spec.model.served_name})")
    for column in ("name", "version", "earlier", "loaded", "in sync", "settled", "verified",
                   "path"):
        table.add_column(column)
    for row in ops.rows():
        table.add_row(
            row["name"], row["version"] or "(removed)", ", ".join(row["history"]) or "-",
            "yes" if row["loaded"] else "no",
            Text("yes", "green") if row["in_sync"] else Text("no: run reconcile", "red"),
            "yes" if row["settled"] else Text("no: run settle", "yellow"),
            "yes" if row["verified"] else Text("no: run reconcile", "red"), row["path"],
        )
    return table


def add_parser(sub, *, restart_local: RestartFactory | None = None) -> None:
    """Register ``adapters`` on the CLI's subparsers object."""
    p = sub.add_parser("adapters", help="add, hotfix, roll back, remove adapters at runtime")
    ops = p.add_subparsers(dest="op", required=True)

    def common(parser: argparse.ArgumentParser) -> None:
        group = parser.add_mutually_exclusive_group(required=True)
        group.add_argument("--stack", help="a checked-in stack: Pulumi.<STACK>.yaml")
        group.add_argument("--config", help="a config file of the same shape")
        parser.add_argument("--endpoint", help="vLLM base URL (default: 127.0.0.1:<vllmPort>)")
        parser.add_argument("--state-dir", help="folder of the adapter record "
                            "(default: the target's state folder)")
        parser.set_defaults(func=_run, restart_local=restart_local)

    def settle_wait(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--settle-wait", type=float, metavar="SECONDS",
            help=f"seconds to wait for a pause in the adapter's requests to settle it (default "
                 f"{SETTLE_WAIT_SECONDS:g}; 0: leave it for `adapters settle`)")

    common(ops.add_parser("list", help="record versus what vLLM has loaded"))
    for op, text in (("add", "load a new adapter and check it answers differently"),
                     ("hotfix", "replace an adapter's weights in place; rolls back on failure")):
        q = ops.add_parser(op, help=text)
        q.add_argument("name")
        q.add_argument("version")
        q.add_argument("--from", dest="source", metavar="FOLDER",
                       help="PEFT adapter folder to install as <adapters>/NAME/VERSION")
        if op == "hotfix":
            settle_wait(q)
        common(q)
    q = ops.add_parser("rollback", help="back to the previous recorded version")
    q.add_argument("name")
    settle_wait(q)
    common(q)
    for op, text in (("remove", "wait for running requests, unload, confirm 404"),
                     ("reconcile", "load/unload until vLLM matches the record")):
        q = ops.add_parser(op, help=text)
        if op == "remove":
            q.add_argument("name")
        else:
            settle_wait(q)
            q.add_argument("--rebuild", action="store_true",
                           help="rebuild a damaged adapter record from what vLLM serves and "
                                "the adapter folders first (the damaged file is kept aside)")
        q.add_argument("--deadline", type=float, default=60.0,
                       help="seconds to wait for an adapter's requests to finish (default 60)")
        common(q)
    q = ops.add_parser("settle", help="load in-place loaded adapters once more, plainly, so "
                       "vLLM stops re-reading their weights on every step")
    q.add_argument("names", nargs="*", metavar="NAME",
                   help="default: every name the record has unsettled")
    q.add_argument("--force", action="store_true",
                   help="settle when the wait ends even without a pause in the requests "
                        "(a request admitted in that same moment can get a 404)")
    settle_wait(q)
    common(q)


def main(argv: list[str] | None = None) -> int:
    """``python -m serving.adapters.cli OP ...``: the same as ``python -m serving adapters OP``,
    without the rest of the CLI (the VMs' tool bundle carries only what runs there)."""
    p = argparse.ArgumentParser(prog="python -m serving.adapters.cli")
    sub = p.add_subparsers(dest="command", required=True)
    add_parser(sub)
    args = p.parse_args(["adapters", *(sys.argv[1:] if argv is None else argv)])
    try:
        return int(args.func(args))
    except SpecError as exc:
        return exc.report()


if __name__ == "__main__":
    sys.exit(main())
