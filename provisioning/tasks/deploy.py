"""`fab deploy`: every step on every host, rolling by default, with a summary table.

Hosts go one at a time and the rollout stops at the first failure, leaving the hosts after it
untouched; ``--parallel N`` deploys N hosts at once (fresh hosts). Everything the run needs is
read and checked before the first host is touched (``provisioning.settings``).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from rich.table import Table
from rich.text import Text

from provisioning import rotation
from provisioning.bundle import ToolsStep
from provisioning.remote import Host, RemoteError
from provisioning.settings import DeploySettings
from provisioning.steps.adapters import AdaptersStep, RecordStep
from provisioning.steps.config import ConfigStep
from provisioning.steps.converge import (
    CHANGED,
    FAILED,
    PLANNED,
    SKIPPED,
    UNCHANGED,
    StepError,
    StepResult,
    Target,
    converge,
)
from provisioning.steps.drivers import DriversStep
from provisioning.steps.health import HealthGate
from provisioning.steps.metrics import MetricsStep
from provisioning.steps.model import ModelStep
from provisioning.steps.patch import PatchStep
from provisioning.steps.proxy import ProxyStep
from provisioning.steps.runtime import RuntimeStep
from provisioning.steps.service import ServiceStep

STEPS = (ToolsStep(), DriversStep(), RuntimeStep(), ConfigStep(), ModelStep(), PatchStep(),
         AdaptersStep(), ServiceStep(), ProxyStep(), MetricsStep(), HealthGate(),
         RecordStep())
STEP_NAMES = tuple(s.name for s in STEPS)
# Always run: later steps read the tools and the host's stack file.
REQUIRED = ("tools", "config")
NOT_STARTED = "not started"


@dataclass
class HostReport:
    host: str
    results: list[StepResult] = field(default_factory=list)
    error: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.error and bool(self.results)

    def status(self, step: str) -> str:
        for r in self.results:
            if r.step == step:
                return r.status
        return ""


def select(only: str) -> list:
    if not only:
        return list(STEPS)
    names = {n.strip() for n in only.split(",") if n.strip()}
    unknown = names - set(STEP_NAMES)
    if unknown:
        raise ValueError(f"--only: unknown step(s) {', '.join(sorted(unknown))}; allowed: "
                         + ", ".join(STEP_NAMES))
    return [s for s in STEPS if s.name in names or s.name in REQUIRED]


def deploy_host(settings: DeploySettings, host: Host, *, steps: Sequence, dry: bool,
                say: Callable[[str], None]) -> HostReport:
    report = HostReport(host.name)
    started = time.monotonic()
    t = Target(host=host, spec=settings.spec, settings=settings, dry=dry,
               say=lambda m: say(f"[{host.name}] {m}"))
    try:
        for step in steps:
            step_started = time.monotonic()
            try:
                result = step.run(t) if hasattr(step, "run") else converge(step, t)
            except StepError as exc:
                report.results.append(StepResult(step.name, FAILED,
                                                 time.monotonic() - step_started, exc.message))
                report.error = str(exc)
                break
            except RemoteError as exc:
                report.results.append(StepResult(step.name, FAILED,
                                                 time.monotonic() - step_started, str(exc)))
                report.error = f"{step.name}: {exc}"
                break
            report.results.append(result)
            t.say(f"{step.name}: {result.status} ({result.seconds:.1f} s)")
    finally:
        host.close()
        report.seconds = time.monotonic() - started
    return report


def deploy_all(settings: DeploySettings, *, connect: Callable[[str], Host], parallel: int = 1,
           dry: bool = False, only: str = "", say: Callable[[str], None] = print
           ) -> list[HostReport]:
    """Deploy every host; reports in host order (NOT_STARTED ones have no results)."""
    steps = select(only)
    if parallel <= 1 and rotation.wanted(len(settings.hosts), dry):
        # One host at a time out of the load balancer's rotation (provisioning.rotation):
        # out before anything on it changes, back once its health gate passed.
        turn = rotation.Rotation()
        at = next(i for i, s in enumerate(steps) if s.name not in REQUIRED)
        steps = [*steps[:at], rotation.RotateOut(turn), *steps[at:]]
        gate = next((i for i, s in enumerate(steps) if s.name == HealthGate.name), len(steps) - 1)
        steps.insert(gate + 1, rotation.RotateIn(turn))
    reports = {h: HostReport(h, error=NOT_STARTED) for h in settings.hosts}
    stop = threading.Event()

    def one(name: str) -> HostReport:
        if stop.is_set():
            return reports[name]
        report = deploy_host(settings, connect(name), steps=steps, dry=dry, say=say)
        if not report.ok:
            stop.set()
        return report

    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        pending: dict[Future, str] = {}
        queue = list(settings.hosts)
        while queue or pending:
            while queue and len(pending) < max(1, parallel) and not stop.is_set():
                name = queue.pop(0)
                pending[pool.submit(one, name)] = name
            if not pending:
                break
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                reports[pending.pop(fut)] = fut.result()
    return [reports[h] for h in settings.hosts]


_STYLE = {CHANGED: "yellow", UNCHANGED: "green", SKIPPED: "dim", PLANNED: "cyan",
          FAILED: "bold red", "passed": "green"}


def summary(reports: list[HostReport], *, title: str = "fab deploy") -> Table:
    steps: list[str] = []
    for report in reports:
        steps += [r.step for r in report.results if r.step not in steps]
    table = Table(title=title)
    table.add_column("host")
    for name in steps:
        table.add_column(name)
    table.add_column("seconds", justify="right")
    for report in reports:
        cells = []
        for name in steps:
            status = report.status(name)
            cells.append(Text(status, style=_STYLE.get(status, "")))
        seconds = f"{report.seconds:.1f}" if report.results else ""
        table.add_row(report.host, *cells, seconds if report.error != NOT_STARTED else
                      NOT_STARTED)
    return table



def write_report(path: Path, reports: list[HostReport], **extra: object) -> None:
    doc = {**extra, "hosts": [
        {"host": r.host, "ok": r.ok, "error": r.error, "seconds": round(r.seconds, 3),
         "steps": [{"step": s.step, "status": s.status, "seconds": round(s.seconds, 3),
                    "detail": s.detail} for s in r.results]} for r in reports]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")


from fabric import task  # noqa: E402
from invoke.exceptions import Exit  # noqa: E402

from provisioning.tasks import options as cli_options  # noqa: E402
from serving.stack.errors import Problem  # noqa: E402


@task(help={
    **cli_options.HELP,
    "parallel": "hosts deployed at once (default 1: rolling, stop at the first failure)",
    "dry": "probe and print the plan; change nothing",
    "only": "comma-separated steps to run (tools and config always run): "
    + ",".join(STEP_NAMES),
    "health_timeout_s": "seconds the health gate waits for vLLM to answer",
    "report": "also write the per-host, per-step results to this JSON file",
})
def deploy(c, stack="", config="", hosts="", parallel=1, dry=False, only="", blob_url="",
           blob_connection_string_env="", health_timeout_s=0.0, report="", connect_timeout=0.0):
    """Roll the stack's VMs forward: drivers, runtime, model, patch, adapters, unit, health."""
    extra = {"health_timeout_s": float(health_timeout_s)} if health_timeout_s else {}
    also: list[Problem] = []
    try:
        select(only)
    except ValueError as exc:
        also.append(Problem("--only", str(exc).removeprefix("--only: ")))
    s = cli_options.load(c, stack=stack, config=config, hosts=hosts, blob_url=blob_url,
                         blob_connection_string_env=blob_connection_string_env,
                         connect_timeout=connect_timeout, dry=bool(dry), also=also, **extra)
    console = cli_options.console
    console.print(f"fab deploy: stack {s.spec.stack}, {len(s.hosts)} host(s)"
                  f"{', dry run' if dry else ''}, {max(1, int(parallel))} at a "
                  f"time, SSH connect timeout {s.connect_timeout_s:g} s", markup=False)
    if s.unread:
        console.print(f"dry run without {', '.join(s.unread)}: what holds it is planned as a "
                      "write (a real run needs it)", markup=False)
    say = lambda m: console.print(m, markup=False)  # noqa: E731
    reports = deploy_all(s, connect=cli_options.connector(s, say), parallel=int(parallel),
                         dry=bool(dry), only=only, say=say)
    console.print(summary(reports))
    if report:
        write_report(Path(report), reports, dry=bool(dry), parallel=int(parallel))
    failed = [r for r in reports if r.error and r.error != NOT_STARTED]
    if failed:
        untouched = [r.host for r in reports if r.error == NOT_STARTED]
        raise Exit(f"{failed[0].host}: {failed[0].error}"
                   + (f"\nnot started: {', '.join(untouched)}" if untouched else ""), code=1)
