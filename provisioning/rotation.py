"""Take a host out of the load balancer's rotation before it is touched, and back after its
health gate: `fab deploy` and `fab adapters.*` roll a fleet without dropping a request.

Out: the API proxy answers the probe path 503 (``serving.stack.balancer``). The balancer keeps
open flows on a host it took out, so clients on keep-alive connections would stay: the proxy
ends every connection older than ``proxy.KEEPALIVE_TIME_SECONDS`` with a response that says
"Connection: close", which moves busy clients without a race. Once the balancer has had time
to notice and that age has passed, nginx reloads gracefully so connections that are still
idle close too, and the rollout waits until no client connection is open on the API port and
vLLM runs and queues nothing. In: the probe passes
again, and the rollout waits as long as the balancer takes to send traffic back before the
next host goes out, so two hosts are never out at once.

A fleet of one host has no other host to send to: it is not taken out (the rollout says so).
A drain that does not finish within its limit puts the host back and fails: nothing is
restarted under running requests.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from provisioning.steps.converge import PLANNED, StepError, StepResult, Target
from serving.render import proxy
from serving.stack import balancer, layout

SCRIPT = Path(__file__).resolve().parent / "steps" / "scripts" / "rotation.sh"
# What rotation.sh calls on the host besides coreutils: curl (the probe's answer, vLLM's
# queue) and ss from iproute2 (client connections). Azure's Ubuntu images have both; a
# minimal Debian or Ubuntu image may not, and a drain that cannot count connections fails.
# The runtime step installs them (provisioning.steps.runtime.os_packages).
HOST_PACKAGES = ("curl", "iproute2")
NAME = "rotation"
# The longest request the drain waits for: the proxy's read timeout for a silent request.
DRAIN_TIMEOUT_SECONDS = proxy.READ_TIMEOUT_SECONDS
POLL_SECONDS = 1.0
IDLE_SAMPLES = 2  # consecutive idle readings before the host counts as drained
OUT_CODE = "503"
IN_CODE = "200"
NOTHING_CODE = "000"  # curl's code when nothing answers on the API port


@dataclass
class Rotation:
    """Timing of one host's time out of rotation, kept for the rollout's report."""

    notice_s: float = float(balancer.seconds_to_notice())
    drain_timeout_s: float = float(DRAIN_TIMEOUT_SECONDS)
    poll_s: float = POLL_SECONDS
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic
    out_seconds: dict[str, float] = field(default_factory=dict)
    # Where the API proxy's nginx keeps its pid (serving.render.proxy.VM on a VM).
    proxy_pid_file: str = proxy.VM.pid_file
    # How long busy keep-alive clients take to be told "Connection: close" (the proxy's
    # keepalive_time) plus one request's worth of slack.
    leave_s: float = float(proxy.KEEPALIVE_TIME_SECONDS + 2)

    def _script(self, t: Target, *args: str) -> dict[str, str]:
        code, out, err = t.host.script(SCRIPT, *args, check=False)
        if code:
            raise StepError(NAME, f"rotation.sh {args[0]} failed: {err.strip() or out.strip()}")
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def _probe_args(self, t: Target) -> tuple[str, str, str]:
        return (balancer.OUT_OF_ROTATION_FILE, str(t.spec.vllm.port),
                t.spec.balancer.probe_path)

    def take_out(self, t: Target) -> float:
        """Fail the probe, wait for the balancer and the requests in flight; the start time."""
        started = self.clock()
        state = self._script(t, "out", *self._probe_args(t))
        if state.get("probe") == NOTHING_CODE:
            # A fresh VM (no proxy yet: the first `fab deploy` of a fleet) or one whose proxy
            # is down: the balancer's probe fails as well, so it sends nothing here and there
            # is nothing to drain. The mark stays: a proxy deployed by this rollout fails
            # the probe until the host's health gate has passed.
            t.say(f"{NAME}: out; nothing answers port {t.spec.vllm.port} (no proxy yet, or "
                  "it is down), so the balancer sends nothing here")
            return started
        if state.get("probe") != OUT_CODE:
            self._script(t, "in", *self._probe_args(t))
            raise StepError(NAME, f"the proxy answers the probe {state.get('probe')} after the "
                            f"host was marked out, not {OUT_CODE}: is it the project's proxy "
                            "(`fab deploy` renders it)?")
        t.say(f"{NAME}: out; the balancer notices within {self.notice_s:.0f} s")
        self.sleep(self.notice_s)
        # Only now does no new flow arrive; every connection older than the proxy's
        # keepalive_time is told "close" on its next response. After that, what is still open
        # is idle (or a long request): a graceful reload closes the idle ones.
        close_idle_at = self.clock() + self.leave_s
        closed_idle = False
        idle, deadline = 0, self.clock() + self.drain_timeout_s
        reading: dict[str, str] = {}
        while idle < IDLE_SAMPLES:
            if not closed_idle and self.clock() >= close_idle_at:
                self._script(t, "close-idle", self.proxy_pid_file)
                closed_idle = True
            reading = self._script(t, "inflight", str(t.spec.vllm.port),
                                   str(layout.vllm_port(t.spec)))
            busy = int(reading.get("connections", "1")) + int(reading.get("busy", "1"))
            idle = idle + 1 if busy == 0 else 0
            if idle >= IDLE_SAMPLES:
                break
            if self.clock() > deadline:
                self._script(t, "in", *self._probe_args(t))
                raise StepError(NAME, f"requests still in flight after "
                                f"{self.drain_timeout_s:.0f} s ({reading}); the host is back in "
                                "rotation and was not touched")
            self.sleep(self.poll_s)
        t.say(f"{NAME}: drained after {self.clock() - started:.1f} s")
        return started

    def bring_back(self, t: Target, started: float | None = None) -> None:
        """Pass the probe again; wait until the balancer sends traffic here again."""
        state = self._script(t, "in", *self._probe_args(t))
        if state.get("probe") != IN_CODE:
            raise StepError(NAME, f"the probe answers {state.get('probe')} after the host was "
                            f"put back, not {IN_CODE}; the host stays out of rotation")
        self.sleep(self.notice_s)
        if started is not None:
            self.out_seconds[t.host.name] = round(self.clock() - started, 1)
        t.say(f"{NAME}: back in"
              + (f" after {self.out_seconds[t.host.name]} s out" if started is not None else ""))

    def state(self, t: Target) -> str:
        """What the load balancer sees of the host: "in", or "out" with why (for `fab status`:
        a host whose rollout failed stays out, and this is where an operator sees it)."""
        state = self._script(t, "probe", *self._probe_args(t))
        marked, code = state.get("out") == "yes", state.get("probe", "")
        if marked:
            return "out (marked by a rollout)"
        return "in" if code == IN_CODE else f"out (probe answers {code or 'nothing'})"

    def around(self, t: Target, body: Callable[[Target], None]) -> None:
        """``body`` with the host out of rotation; back only if it succeeded (a host that
        failed stays out: the balancer keeps sending to the others)."""
        started = self.take_out(t)
        body(t)
        self.bring_back(t, started)


def wanted(hosts: int, dry: bool) -> bool:
    """Rotation only where another host can take the traffic, and never in a dry run."""
    return hosts > 1 and not dry


class RotateOut:
    """Deploy step: the host out of rotation before anything on it changes."""

    name = "rotate-out"

    def __init__(self, rotation: Rotation) -> None:
        self.rotation = rotation

    def run(self, t: Target) -> StepResult:
        if t.dry:
            return StepResult(self.name, PLANNED, 0.0, "dry run: would take the host out")
        started = self.rotation.take_out(t)
        t.facts["rotation_started"] = started
        return StepResult(self.name, "out", self.rotation.clock() - started, "drained")


class RotateIn:
    """Deploy step: back in rotation once the health gate passed."""

    name = "rotate-in"

    def __init__(self, rotation: Rotation) -> None:
        self.rotation = rotation

    def run(self, t: Target) -> StepResult:
        if t.dry:
            return StepResult(self.name, PLANNED, 0.0, "dry run: would bring the host back")
        started = t.facts.get("rotation_started")
        before = self.rotation.clock()
        self.rotation.bring_back(t, started)
        out = self.rotation.out_seconds.get(t.host.name)
        return StepResult(self.name, "in", self.rotation.clock() - before,
                          f"{out} s out of rotation" if out is not None else "")
