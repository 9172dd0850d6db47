"""Tier 1: the decisions of `fab deploy` without a host (deploy task).

Steps are probed through a real ``provisioning.remote.Host`` around invoke's ``MockContext``
(``provisioning_helpers``): the tests see exactly what would go over SSH."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from typing import Any

import pytest
from invoke import MockContext
from provisioning_helpers import (
    deploy,
    settings_for,
)
from rich.console import Console

from provisioning.remote import Host, RemoteError
from provisioning.settings import DeploySettings
from provisioning.steps.converge import (
    FAILED,
    StepError,
    Target,
)

# --- deploy_all ---------------------------------------------------------------------------------


class Tracker:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.active = 0
        self.max_active = 0
        self.calls: list[tuple[str, str]] = []
        self.connected: list[str] = []
        self.applied: list[tuple[str, str]] = []


class TrackedStep:
    """Plans one action per host; ``fail`` hosts raise; ``barrier`` makes hosts meet."""

    def __init__(self, name: str, tracker: Tracker, *, fail: Callable[[str], Exception | None]
                 = lambda h: None, barrier: threading.Barrier | None = None):
        self.name, self.tracker, self.fail, self.barrier = name, tracker, fail, barrier

    def probe(self, t: Target) -> str:
        tr = self.tracker
        with tr.lock:
            tr.calls.append((t.host.name, self.name))
            tr.active += 1
            tr.max_active = max(tr.max_active, tr.active)
        try:
            if self.barrier is not None:
                try:
                    self.barrier.wait()
                except threading.BrokenBarrierError:
                    raise StepError(self.name, "no other host ran at the same time") from None
            error = self.fail(t.host.name)
            if error is not None:
                raise error
        finally:
            with tr.lock:
                tr.active -= 1
        return "done" if (t.host.name, self.name) in tr.applied else "todo"

    def plan(self, t: Target, state: str) -> list[str]:
        return [] if state == "done" else [f"{self.name} on {t.host.name}"]

    def apply(self, t: Target, actions: list[str], state: str) -> None:
        with self.tracker.lock:
            self.tracker.applied.append((t.host.name, self.name))


def _fake_deploy(monkeypatch: pytest.MonkeyPatch, steps: list[Any], hosts: int,
                 tracker: Tracker) -> tuple[DeploySettings, Callable[[str], Host]]:
    monkeypatch.setattr(deploy, "STEPS", tuple(steps))
    # Taking hosts out of the balancer's rotation has its own tests (test_rotation.py).
    monkeypatch.setattr(deploy.rotation, "wanted", lambda hosts, dry: False)
    monkeypatch.setattr(deploy, "STEP_NAMES", tuple(s.name for s in steps))
    names = tuple(f"h{i}" for i in range(1, hosts + 1))
    s = dataclasses.replace(settings_for(), hosts=names)

    def connect(name: str) -> Host:
        with tracker.lock:
            tracker.connected.append(name)
        return Host(MockContext(run={}), name=name)

    return s, connect


def _status(report: deploy.HostReport) -> list[str]:
    return [f"{r.step}={r.status}" for r in report.results]


@pytest.mark.parametrize("error", [
    pytest.param(StepError("work", "boom"), id="step-error"),
    pytest.param(RemoteError("do work", 255, "", "SSH connection lost"), id="remote-error"),
])
def test_rolling_deploy_stops_at_the_first_failing_host(monkeypatch: pytest.MonkeyPatch,
                                                        error: Exception) -> None:
    tr = Tracker()
    steps = [TrackedStep("tools", tr), TrackedStep("config", tr),
             TrackedStep("work", tr, fail=lambda h: error if h == "h2" else None)]
    s, connect = _fake_deploy(monkeypatch, steps, 4, tr)
    reports = deploy.deploy_all(s, connect=connect, say=lambda m: None)
    assert [r.host for r in reports] == ["h1", "h2", "h3", "h4"]
    assert tr.connected == ["h1", "h2"] and tr.max_active == 1
    assert reports[0].ok and _status(reports[0]) == ["tools=changed", "config=changed",
                                                     "work=changed"]
    assert not reports[1].ok and _status(reports[1])[-1] == "work=failed"
    assert reports[1].error.startswith("work: ") and reports[1].error != deploy.NOT_STARTED
    assert [(r.error, r.results) for r in reports[2:]] == [(deploy.NOT_STARTED, [])] * 2
    console = Console(record=True, width=200)
    console.print(deploy.summary(reports))
    table = console.export_text()
    assert table.count(deploy.NOT_STARTED) == 2 and FAILED in table


def test_parallel_deploy_runs_two_hosts_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    tr = Tracker()
    barrier = threading.Barrier(2, timeout=5)
    steps = [TrackedStep("tools", tr), TrackedStep("config", tr),
             TrackedStep("work", tr, barrier=barrier)]
    s, connect = _fake_deploy(monkeypatch, steps, 4, tr)
    reports = deploy.deploy_all(s, connect=connect, parallel=2, say=lambda m: None)
    assert [r.ok for r in reports] == [True] * 4, [r.error for r in reports]
    assert tr.max_active == 2
    assert sorted(tr.connected) == ["h1", "h2", "h3", "h4"]


def test_dry_deploy_plans_everything_and_applies_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    tr = Tracker()
    steps = [TrackedStep("tools", tr), TrackedStep("config", tr), TrackedStep("work", tr)]
    s, connect = _fake_deploy(monkeypatch, steps, 2, tr)
    reports = deploy.deploy_all(s, connect=connect, dry=True, say=lambda m: None)
    assert [_status(r) for r in reports] == [["tools=planned", "config=planned",
                                              "work=planned"]] * 2
    assert tr.applied == []


def test_only_keeps_the_required_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    tr = Tracker()
    steps = [TrackedStep(n, tr) for n in ("tools", "other", "config", "work")]
    s, connect = _fake_deploy(monkeypatch, steps, 1, tr)
    [report] = deploy.deploy_all(s, connect=connect, only="work", say=lambda m: None)
    assert [r.step for r in report.results] == ["tools", "config", "work"]


@pytest.mark.parametrize(("only", "want"), [
    pytest.param("", list(deploy.STEP_NAMES), id="everything"),
    pytest.param("model", ["tools", "config", "model"], id="model"),
    pytest.param(" adapters , record ", ["tools", "config", "adapters", "record"],
                 id="adapters-record"),
])
def test_select(only: str, want: list[str]) -> None:
    assert [s.name for s in deploy.select(only)] == want


def test_select_rejects_unknown_steps_listing_the_allowed() -> None:
    with pytest.raises(ValueError, match="unknown step") as err:
        deploy.select("model,modle")
    text = str(err.value)
    assert "modle" in text and "allowed: " + ", ".join(deploy.STEP_NAMES) in text
    assert "model," not in text.split("allowed")[0]


def test_fab_deploy_against_a_closed_port_ends_within_seconds(tmp_path) -> None:
    """The real CLI, as an operator runs it: a dry run against a port nothing listens on
    fails on first contact, saying what it waited for, instead of backing off for minutes."""
    import socket
    import subprocess
    import sys
    import time
    from pathlib import Path

    import yaml
    from provisioning_helpers import dev_values

    from serving.stack import stackfile

    key = tmp_path / "id_ed25519"
    key.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nunit\n")
    key.chmod(0o600)
    ns = stackfile.namespace()
    stack = tmp_path / "Pulumi.unit.yaml"
    values = dev_values(sshPrivateKeyPath=str(key), apiKeyRef="env:UNIT_UNSET_API_KEY")
    stack.write_text(yaml.safe_dump({"config": {f"{ns}:{k}": v for k, v in values.items()}}))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    fab = Path(sys.executable).with_name("fab")
    started = time.monotonic()
    done = subprocess.run(
        [str(fab), "deploy", "--config", str(stack), "--dry", "--hosts", f"ops@127.0.0.1:{port}",
         "--blob-url", "https://acct.blob.core.windows.net", "--connect-timeout", "5"],
        cwd=stackfile.ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert time.monotonic() - started < 60, "a refused connection must not be retried"
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"connecting to ops@127.0.0.1:{port}" in done.stdout, done.stdout
    assert "connection refused" in done.stdout + done.stderr
    assert "UNIT_UNSET_API_KEY" not in done.stderr  # a dry run reads no secret
