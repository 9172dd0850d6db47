"""Tier 1: the decisions of `fab deploy` without a host (proxy step)."""

from __future__ import annotations

from typing import Any

import pytest
from invoke import Result
from provisioning_helpers import ANY, OK, as_json, commands, rx, target

from provisioning.steps import proxy
from provisioning.steps.config import sha
from provisioning.steps.converge import Target
from provisioning.tasks.status import host_status
from serving.render import metrics_unit, proxy_unit

UNIT = proxy_unit.UNIT_NAME


def _state(t: Target, **over: Any) -> dict[str, Any]:
    """A host converged for ``t``, with overrides."""
    digests = {path: sha(content) for path, (content, _) in proxy.files(t).items()}
    digests.update(over.pop("digests", {}))
    state = {"package": "yes", "distro": "masked", "enabled": "enabled", "active": "active",
             "digests": digests, "marker": proxy.inputs_hash(t)}
    return {**state, **over}


def test_files_are_the_renderings() -> None:
    t = target()[0]
    files = proxy.files(t)
    assert files[proxy_unit.CONFIG_FILE][0] == proxy_unit.render_config(t.spec)
    assert files[proxy_unit.UNIT_FILE][0] == proxy_unit.render_unit(t.spec)


def test_converged_host_needs_nothing() -> None:
    t = target()[0]
    assert proxy.ProxyStep().plan(t, _state(t)) == []


def test_fresh_host_installs_masks_writes_and_starts() -> None:
    t = target()[0]
    state = _state(t, package="no", distro="", enabled="", active="inactive",
                   digests={p: None for p in proxy.files(t)}, marker="")
    assert proxy.ProxyStep().plan(t, state) == [
        "install the nginx package",
        "stop and mask nginx.service",
        f"write {proxy_unit.CONFIG_FILE}",
        f"write {proxy_unit.UNIT_FILE}",
        "systemctl daemon-reload",
        f"systemctl enable {UNIT}",
        f"start {UNIT} (it is inactive)",
    ]


@pytest.mark.parametrize(("over", "last"), [
    pytest.param({"digests": {proxy_unit.CONFIG_FILE: "0" * 64}},
                 f"reload {UNIT} (its configuration changed)", id="config-edited"),
    pytest.param({"marker": "stale"}, f"reload {UNIT} (its configuration changed)",
                 id="cut-before-reload"),
    pytest.param({"digests": {proxy_unit.UNIT_FILE: "0" * 64}},
                 f"restart {UNIT} (its unit changed)", id="unit-edited"),
    pytest.param({"active": "failed"}, f"start {UNIT} (it is failed)", id="failed"),
])
def test_changes_reload_or_restart(over: dict[str, Any], last: str) -> None:
    t = target()[0]
    assert proxy.ProxyStep().plan(t, _state(t, **over))[-1] == last


def test_a_distribution_nginx_that_came_back_is_masked_again() -> None:
    t = target()[0]
    assert proxy.ProxyStep().plan(t, _state(t, distro="enabled")) == [
        f"stop and mask {proxy_unit.DISTRIBUTION_UNIT}"]


def test_apply_on_a_fresh_host_installs_then_starts_and_records_the_marker() -> None:
    t, mc, _ = target({rx("serving.host.files put"): as_json({"changed": True}), ANY: OK})
    state = _state(t, package="no", distro="", enabled="", active="inactive",
                   digests={p: None for p in proxy.files(t)}, marker="")
    step = proxy.ProxyStep()
    step.apply(t, step.plan(t, state), state)
    sent = commands(mc)
    order = [next(i for i, c in enumerate(sent) if needle in c) for needle in (
        "bash -s -- install nginx nginx.service", f"put {proxy_unit.CONFIG_FILE}",
        f"put {proxy_unit.UNIT_FILE}", "systemctl daemon-reload",
        f"systemctl enable --quiet {UNIT}", f"systemctl start {UNIT}", f"put {proxy.MARKER}")]
    assert order == sorted(order), sent


def test_status_shows_the_proxy() -> None:
    t, _, _ = target({
        rx(f"systemctl is-active {proxy_unit.UNIT_NAME}"): Result(stdout="failed\n", exited=3),
        rx("systemctl is-active"): Result(stdout="active\n"),
        rx("serving.host.health"): as_json({"health": True, "adapters": ["a"]}),
        ANY: OK,
    })
    row = host_status(t)
    assert row["service"] == "active" and row["proxy"] == "failed"


@pytest.mark.parametrize(("probe", "shown"), [
    ("out=no\nprobe=200\n", "in"),
    ("out=yes\nprobe=503\n", "out (marked by a rollout)"),
    ("out=no\nprobe=000\n", "out (probe answers 000)"),
], ids=["in", "left-out-by-a-rollout", "proxy-down"])
def test_status_shows_whether_the_balancer_sends_to_the_host(probe: str, shown: str) -> None:
    """A host whose rollout failed stays out of rotation: `fab status` is where it shows."""
    t, _, _ = target({
        rx("bash -s -- probe /run/exaone-rotation/out"): Result(stdout=probe),
        rx(f"systemctl is-active {metrics_unit.UNIT_NAME}"): Result(stdout="inactive\n",
                                                                   exited=3),
        rx("systemctl is-active"): Result(stdout="active\n"),
        rx("serving.host.health"): as_json({"health": True, "adapters": ["a"]}),
        ANY: OK,
    })
    row = host_status(t)
    assert row["rotation"] == shown
    assert row["metrics agent"] == ("inactive" if t.spec.metrics.vm_agent
                                    else "off (vmMetrics false)")
