"""The converge shape every deploy step follows, and what a step reports.

    probe (read-only, also under --dry) -> plan (pure) -> apply (skipped under --dry)
    -> probe again -> the plan must now be empty, or the step fails loudly.

A step is a small object with a name, ``probe(target)`` and ``plan(target, state)``, and
``apply(target, actions, state)``. ``plan`` returns the actions still needed (empty when the
host already matches) or a ``Skip`` with the reason the step does not apply to this host.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

from provisioning.remote import Host
from serving.stack.spec import Spec

CHANGED, UNCHANGED, SKIPPED = "changed", "unchanged", "skipped"
PLANNED, FAILED = "planned", "failed"


class StepError(Exception):
    """A step could not bring the host to the wanted state; the message says what to do."""

    def __init__(self, step: str, message: str):
        super().__init__(f"{step}: {message}")
        self.step = step
        self.message = message


@dataclass(frozen=True)
class Skip:
    reason: str


@dataclass
class StepResult:
    step: str
    status: str
    seconds: float
    detail: str = ""


@dataclass
class Target:
    """One host being deployed, and everything the steps need to know about the run."""

    host: Host
    spec: Spec
    settings: Any  # provisioning.settings.DeploySettings
    dry: bool = False
    say: Callable[[str], None] = print
    # Facts steps leave for later ones in the same run (e.g. "model_dir", "restart_because").
    facts: dict[str, Any] = field(default_factory=dict)


class Step(Protocol):
    name: str

    def probe(self, t: Target) -> Any: ...

    def plan(self, t: Target, state: Any) -> list[str] | Skip: ...

    def apply(self, t: Target, actions: list[str], state: Any) -> None: ...


# A change can run for minutes on the host (the runtime's pip install, vLLM's first start
# behind the health gate) without printing: say every so often that it is still at work.
HEARTBEAT_SECONDS = 15.0


@contextmanager
def _heartbeat(name: str, say: Callable[[str], None], started: float) -> Iterator[None]:
    done = threading.Event()

    def beat() -> None:
        while not done.wait(HEARTBEAT_SECONDS):
            say(f"{name}: still at work ({time.monotonic() - started:.0f} s)")

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def converge(step: Step, t: Target) -> StepResult:
    """Run one step on one host in the converge shape; StepError on failure."""
    started = time.monotonic()

    def result(status: str, detail: str = "") -> StepResult:
        return StepResult(step.name, status, time.monotonic() - started, detail)

    state = step.probe(t)
    actions = step.plan(t, state)
    if isinstance(actions, Skip):
        t.say(f"{step.name}: skipped ({actions.reason})")
        return result(SKIPPED, actions.reason)
    if not actions:
        return result(UNCHANGED)
    for action in actions:
        t.say(f"{step.name}: {'would ' if t.dry else ''}{action}")
    if t.dry:
        return result(PLANNED, "; ".join(actions))
    with _heartbeat(step.name, t.say, started):
        step.apply(t, actions, state)
    after = step.plan(t, step.probe(t))
    if isinstance(after, Skip) or after:
        left = after.reason if isinstance(after, Skip) else "; ".join(after)
        raise StepError(step.name, f"still not converged after the change: {left}")
    return result(CHANGED, "; ".join(actions))
