"""Tier 1: the decisions of `fab deploy` without a host (metrics step)."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from invoke import Result
from provisioning_helpers import ANY, OK, as_json, commands, rx, settings_for, spec_with, target

from provisioning.settings import MetricsAccess
from provisioning.steps import metrics
from provisioning.steps.config import sha
from provisioning.steps.converge import Skip, StepError, Target
from serving.render import metrics_unit

UNIT = metrics_unit.UNIT_NAME
TOKEN_UNIT = metrics_unit.TOKEN_UNIT_NAME
TIMER = metrics_unit.TOKEN_TIMER_NAME
URL = ("https://dce-1.swedencentral-1.metrics.ingest.monitor.azure.com/dataCollectionRules/"
       "dcr-0123/streams/Microsoft-PrometheusMetrics/api/v1/write?api-version=2023-04-24")
CLIENT_ID = "7d9b1c1e-4a1f-4e55-9d6a-2f3b8e0c1a22"
HOSTNAME = "exaone-dev-0"
ACCESS = MetricsAccess(ingestion_url=URL, client_id=CLIENT_ID)
DISTRO = {f"distro:{u}": "masked" for u in metrics_unit.DISTRIBUTION_UNITS}


def _target(run: dict[Any, Any] | None = None, **kw: Any) -> tuple[Target, Any, list[str]]:
    return target(run, settings=settings_for(metrics=ACCESS), **kw)


def _state(t: Target, **over: Any) -> dict[str, Any]:
    """A host converged for ``t``, with overrides."""
    digests = {path: sha(content) for path, (content, _) in metrics.files(t, HOSTNAME).items()}
    digests.update(over.pop("digests", {}))
    state = {"version": "2.45.3+ds-2ubuntu0.1", **DISTRO, "enabled": "enabled",
             "active": "active", "ready": "yes", "timer-enabled": "enabled",
             "timer-active": "active", "token": "yes", "hostname": HOSTNAME,
             "digests": digests, "marker": metrics.inputs_hash(t, HOSTNAME)}
    return {**state, **over}


def _fresh(t: Target) -> dict[str, Any]:
    return _state(t, version="", **{k: "" for k in DISTRO}, enabled="", active="inactive",
                  ready="no", digests={p: None for p in metrics.files(t, HOSTNAME)}, marker="",
                  **{"timer-enabled": "", "timer-active": "inactive", "token": "no"})


def test_config_is_filled_with_the_stack_outputs_and_the_host_name() -> None:
    t = _target()[0]
    config = yaml.safe_load(metrics.files(t, HOSTNAME)[metrics_unit.CONFIG_FILE][0])
    [write] = config["remote_write"]
    assert write["url"] == URL
    assert write["authorization"] == {"type": "Bearer",
                                      "credentials_file": metrics_unit.TOKEN_FILE}
    assert config["scrape_configs"][0]["static_configs"][0]["labels"]["instance"] == HOSTNAME
    assert metrics.files(t, HOSTNAME)[metrics_unit.UNIT_FILE][0] == metrics_unit.render_unit(
        t.spec)


def test_the_refresher_asks_for_the_stack_identity_and_is_installed_as_is() -> None:
    t = _target()[0]
    written = metrics.files(t, HOSTNAME)
    unit = written[metrics_unit.TOKEN_UNIT_FILE][0]
    start = unit[unit.index("ExecStart="):unit.index("TimeoutStartSec=")]
    assert start.startswith(f"ExecStart={metrics_unit.TOKEN_SCRIPT} ")
    assert CLIENT_ID in start and metrics_unit.AUDIENCE in start
    assert metrics_unit.TOKEN_FILE in start and metrics_unit.IMDS_TOKEN_URL in start
    assert written[metrics_unit.TOKEN_SCRIPT] == (metrics.TOKEN_SCRIPT.read_text(), "755")
    assert written[metrics_unit.TOKEN_TIMER_FILE][0] == metrics_unit.render_token_timer(t.spec)
    # The client id is in the refresher's unit only: the agent's files name the token's file.
    assert CLIENT_ID not in written[metrics_unit.CONFIG_FILE][0]


def test_the_unit_runs_the_distribution_binary_in_agent_mode() -> None:
    unit = metrics_unit.render_unit(_target()[0].spec)
    start = unit[unit.index("ExecStart="):unit.index("ExecReload=")]
    assert start.startswith(f"ExecStart={metrics_unit.PROMETHEUS} ")
    # Prometheus 2.45 (ubuntu-2404) refuses Prometheus 3's --agent flag.
    assert "--enable-feature=agent" in start and "--agent " not in start


def test_converged_host_needs_nothing() -> None:
    t = _target()[0]
    assert metrics.MetricsStep().plan(t, _state(t)) == []


def test_fresh_host_installs_masks_writes_and_starts() -> None:
    t = _target()[0]
    assert metrics.MetricsStep().plan(t, _fresh(t)) == [
        "install the prometheus package",
        "stop and mask prometheus.service",
        "stop and mask prometheus-node-exporter.service",
        f"write {metrics_unit.CONFIG_FILE}",
        f"write {metrics_unit.TOKEN_SCRIPT}",
        f"write {metrics_unit.TOKEN_UNIT_FILE}",
        f"write {metrics_unit.TOKEN_TIMER_FILE}",
        f"write {metrics_unit.UNIT_FILE}",
        "systemctl daemon-reload",
        f"systemctl enable {UNIT}",
        f"enable and start {TIMER}",
        f"refresh the token ({TOKEN_UNIT})",
        f"start {UNIT} (it is inactive)",
    ]


@pytest.mark.parametrize(("over", "last"), [
    pytest.param({"digests": {metrics_unit.CONFIG_FILE: "0" * 64}},
                 f"reload {UNIT} (its configuration changed)", id="config-edited"),
    pytest.param({"marker": "stale"}, f"reload {UNIT} (its configuration changed)",
                 id="cut-before-reload"),
    pytest.param({"hostname": "exaone-dev-1"}, f"reload {UNIT} (its configuration changed)",
                 id="another-host"),
    pytest.param({"digests": {metrics_unit.UNIT_FILE: "0" * 64}},
                 f"restart {UNIT} (its unit or binary changed)", id="unit-edited"),
    pytest.param({"digests": {metrics_unit.TOKEN_TIMER_FILE: "0" * 64}},
                 f"reload {UNIT} (its configuration changed)", id="timer-edited"),
    pytest.param({"version": "2.31.2+ds1-1ubuntu1"},
                 f"restart {UNIT} (its unit or binary changed)", id="too-old"),
    pytest.param({"active": "failed"}, f"start {UNIT} (it is failed)", id="failed"),
    pytest.param({"ready": "no"}, f"wait until {UNIT} is ready", id="not-ready"),
])
def test_changes_reload_restart_or_wait(over: dict[str, Any], last: str) -> None:
    t = _target()[0]
    assert metrics.MetricsStep().plan(t, _state(t, **over))[-1] == last


def test_a_distribution_unit_that_came_back_is_masked_again() -> None:
    t = _target()[0]
    state = _state(t, **{"distro:prometheus.service": "enabled"})
    assert metrics.MetricsStep().plan(t, state) == ["stop and mask prometheus.service"]


def test_skipped_without_a_workspace_or_when_the_stack_says_so() -> None:
    t, mc, _ = target()  # hosts given by hand: no stack outputs
    step = metrics.MetricsStep()
    assert step.plan(t, step.probe(t)) == Skip("the stack exports no metricsIngestionUrl")
    assert commands(mc) == [], "nothing is read from a host the step leaves alone"
    off = spec_with(vmMetrics=False)
    t = target(spec=off, settings=settings_for(off, metrics=ACCESS))[0]
    assert isinstance(metrics.MetricsStep().plan(t, {}), Skip)


@pytest.mark.parametrize(("text", "old"), [
    ("2.45.3+ds-2ubuntu0.1", False), ("2.53.0+ds1-1", False), ("1:3.5.0-1", False),
    ("2.42.0+ds-5+deb12u1", False), ("2.32.1+ds1-1", False),
    ("2.31.2+ds1-1ubuntu1", True), ("", True)])
def test_versions(text: str, old: bool) -> None:
    assert metrics.too_old(text) is old


def test_apply_on_a_fresh_host_installs_checks_then_starts_and_records_the_marker() -> None:
    t, mc, _ = _target({rx("bash -s -- install"): Result(stdout="version=2.45.3+ds-2\n"),
                        rx("serving.host.files put"): as_json({"changed": True}), ANY: OK})
    state = _fresh(t)
    step = metrics.MetricsStep()
    step.apply(t, step.plan(t, state), state)
    sent = commands(mc)
    order = [next(i for i, c in enumerate(sent) if needle in c) for needle in (
        "bash -s -- install prometheus prometheus.service prometheus-node-exporter.service",
        f"put {metrics_unit.CONFIG_FILE}", f"put {metrics_unit.TOKEN_SCRIPT}",
        f"put {metrics_unit.TOKEN_UNIT_FILE}", f"put {metrics_unit.UNIT_FILE}",
        "systemctl daemon-reload", f"systemctl enable --quiet {UNIT}",
        f"systemctl enable --now --quiet {TIMER}", f"systemctl start {TOKEN_UNIT}",
        f"bash -s -- check {metrics_unit.PROMTOOL} {metrics_unit.CONFIG_FILE}",
        f"systemctl start {UNIT}", f"bash -s -- wait-ready {metrics_unit.READY_URL}",
        f"put {metrics.MARKER}")]
    assert order == sorted(order), sent


def test_an_archive_without_a_new_enough_prometheus_fails_naming_vm_image() -> None:
    t, mc, _ = _target({rx("bash -s -- install"): Result(stdout="version=2.31.2+ds1-1\n"),
                        ANY: OK})
    state = _fresh(t)
    step = metrics.MetricsStep()
    with pytest.raises(StepError, match="vmImage"):
        step.apply(t, step.plan(t, state), state)
    assert not any("systemctl start" in c for c in commands(mc))


def test_a_configuration_promtool_refuses_never_reaches_the_agent() -> None:
    t, mc, _ = _target({
        rx("bash -s -- check"): Result(stdout="FAILED: field credentials_file not found\n",
                                       exited=1),
        rx("serving.host.files put"): as_json({"changed": True}), ANY: OK})
    state = _state(t, digests={metrics_unit.CONFIG_FILE: None})
    step = metrics.MetricsStep()
    with pytest.raises(StepError, match="credentials_file not found"):
        step.apply(t, step.plan(t, state), state)
    assert not any(f"systemctl reload {UNIT}" in c for c in commands(mc))


def test_an_agent_that_never_gets_ready_fails_with_its_journal() -> None:
    t, _, _ = _target({rx("bash -s -- wait-ready"): Result(stderr="not ready\n", exited=1),
                       rx("journalctl"): Result(stdout="remote_write: 403\n"), ANY: OK})
    state = _state(t, ready="no")
    step = metrics.MetricsStep()
    with pytest.raises(StepError, match="403"):
        step.apply(t, step.plan(t, state), state)


def test_probe_reads_the_script_lines() -> None:
    out = "\n".join(["version=2.45.3+ds-2", "distro:prometheus.service=masked",
                     "distro:prometheus-node-exporter.service=masked", "enabled=enabled",
                     "active=active", "ready=yes", "timer-enabled=enabled",
                     "timer-active=active", "token=yes", f"hostname={HOSTNAME}"]) + "\n"
    t, mc, _ = _target({rx("bash -s -- probe"): Result(stdout=out),
                        rx("serving.host.files probe"): as_json({}),
                        rx("cat "): Result(stdout="abc\n"), ANY: OK})
    state = metrics.MetricsStep().probe(t)
    assert state["hostname"] == HOSTNAME and state["distro:prometheus.service"] == "masked"
    assert state["ready"] == "yes" and state["marker"] == "abc"
    assert state["token"] == "yes" and state["timer-active"] == "active"
    [probe] = [c for c in commands(mc) if "bash -s -- probe" in c]
    assert f"{TIMER} {metrics_unit.TOKEN_FILE} prometheus.service" in probe
    # The step asks whether the token is there; it never reads it.
    assert not any(metrics_unit.TOKEN_FILE in c for c in commands(mc) if c != probe)


@pytest.mark.parametrize(("over", "wanted"), [
    pytest.param({"token": "no"}, [f"refresh the token ({TOKEN_UNIT})"], id="no-token"),
    pytest.param({"timer-active": "inactive"}, [f"enable and start {TIMER}"],
                 id="timer-stopped"),
    pytest.param({"timer-enabled": "disabled"}, [f"enable and start {TIMER}"],
                 id="timer-disabled"),
    pytest.param({"digests": {metrics_unit.TOKEN_SCRIPT: "0" * 64}},
                 [f"write {metrics_unit.TOKEN_SCRIPT}", f"refresh the token ({TOKEN_UNIT})",
                  f"reload {UNIT} (its configuration changed)"], id="script-edited"),
    pytest.param({"digests": {metrics_unit.TOKEN_UNIT_FILE: "0" * 64}},
                 [f"write {metrics_unit.TOKEN_UNIT_FILE}", "systemctl daemon-reload",
                  f"refresh the token ({TOKEN_UNIT})",
                  f"reload {UNIT} (its configuration changed)"], id="identity-changed"),
])
def test_the_token_and_its_timer_converge_without_restarting_the_agent(
        over: dict[str, Any], wanted: list[str]) -> None:
    t = _target()[0]
    assert metrics.MetricsStep().plan(t, _state(t, **over)) == wanted


def test_a_failed_refresh_stops_the_step_with_its_journal_before_the_agent_starts() -> None:
    t, mc, _ = _target({
        rx("bash -s -- install"): Result(stdout="version=2.45.3+ds-2\n"),
        rx(f"systemctl start {TOKEN_UNIT}"): Result(stderr="Job failed.\n", exited=1),
        rx(f"journalctl -u {TOKEN_UNIT}"): Result(
            stdout="metrics token: the instance metadata service did not answer\n"),
        rx("serving.host.files put"): as_json({"changed": True}), ANY: OK})
    state = _fresh(t)
    step = metrics.MetricsStep()
    with pytest.raises(StepError, match="did not answer") as failed:
        step.apply(t, step.plan(t, state), state)
    assert "vLLM is untouched" in str(failed.value)
    sent = commands(mc)
    assert not any(f"systemctl start {UNIT}" in c or "bash -s -- check" in c for c in sent)
    assert not any(metrics.MARKER in c for c in sent)
