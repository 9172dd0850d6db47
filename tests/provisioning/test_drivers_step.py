"""Tier 1: the decisions of `fab deploy` without a host (drivers step).

Steps are probed through a real ``provisioning.remote.Host`` around invoke's ``MockContext``
(``provisioning_helpers``): the tests see exactly what would go over SSH."""

from __future__ import annotations

from typing import Any

import pytest
from invoke import Result
from provisioning_helpers import (
    CPU,
    DEV,
    OK,
    commands,
    rx,
    sent,
    spec_with,
    target,
)

from provisioning.remote import LOCK_FILE
from provisioning.steps import drivers
from provisioning.steps.converge import (
    Skip,
    StepError,
)
from serving.stack.spec import Spec

# --- drivers ------------------------------------------------------------------------------------


def _driver_state(**kw: str) -> dict[str, str]:
    return {"gpus": "1", "smi": "0", "smi_gpus": "0", "secure_boot": "enabled", "hpc": "0",
            "reboot": "no", **kw}


NC80 = spec_with(vmSize="Standard_NC80adis_H100_v5")


def test_drivers_probe_runs_the_script_unprivileged_and_parses_it() -> None:
    out = "gpus=2\nsmi=1\nsmi_gpus=2\nsecure_boot=enabled\nhpc=0\nreboot=no\n"
    t, mc, _ = target({"bash -s -- probe": Result(stdout=out)})
    state = drivers.DriversStep().probe(t)
    assert state == _driver_state(gpus="2", smi="1", smi_gpus="2")
    [(line, stdin)] = sent(mc)
    assert not line.startswith("sudo") and stdin == drivers.SCRIPT.read_text()


@pytest.mark.parametrize(("spec", "state", "want"), [
    pytest.param(DEV, _driver_state(smi="1", smi_gpus="1"), [], id="gpu-driver-works"),
    pytest.param(NC80, _driver_state(gpus="2", smi="1", smi_gpus="2"), [],
                 id="two-gpus-driver-works"),
    pytest.param(DEV, _driver_state(smi="1", smi_gpus="1", hpc="1"),
                 Skip("drivers preinstalled (ubuntu-hpc image), 1 GPU(s) work"),
                 id="ubuntu-hpc-driver-works"),
    pytest.param(CPU, _driver_state(gpus="0"),
                 Skip("no NVIDIA GPU on this host; the stack runs vllm-cpu"),
                 id="cpu-profile-no-gpu"),
    pytest.param(DEV, _driver_state(reboot="yes"),
                 ["reboot (a driver install is waiting for it)"], id="pending-reboot-only"),
])
def test_drivers_plan(spec: Spec, state: dict[str, str], want: Any) -> None:
    t, _, _ = target(spec=spec)
    assert drivers.DriversStep().plan(t, state) == want


@pytest.mark.parametrize(("branch", "secure_boot"), [
    pytest.param("570", "enabled", id="default-branch"),
    pytest.param("580", "disabled", id="other-branch"),
])
def test_drivers_plan_installs_the_stack_branch_then_reboots(branch: str,
                                                             secure_boot: str) -> None:
    t, _, _ = target(spec=spec_with(nvidiaDriverBranch=branch))
    actions = drivers.DriversStep().plan(t, _driver_state(secure_boot=secure_boot))
    assert len(actions) == 2 and actions[1] == "reboot"
    assert actions[0].startswith(f"install nvidia:{branch}-server with ubuntu-drivers")
    assert f"Secure Boot {secure_boot}" in actions[0]


@pytest.mark.parametrize(("spec", "state", "match"), [
    pytest.param(DEV, _driver_state(gpus="0"),
                 r"no NVIDIA GPU found by lspci, but Standard_NC40ads_H100_v5 has 1",
                 id="gpu-stack-no-gpu"),
    pytest.param(NC80, _driver_state(gpus="2", smi="1", smi_gpus="1"),
                 r"nvidia-smi sees 1 GPU\(s\), Standard_NC80adis_H100_v5 has 2",
                 id="wrong-gpu-count"),
    pytest.param(DEV, _driver_state(gpus="-1"), "lspci is missing", id="lspci-missing"),
    pytest.param(DEV, {}, "lspci is missing", id="empty-probe"),
])
def test_drivers_plan_errors(spec: Spec, state: dict[str, str], match: str) -> None:
    t, _, _ = target(spec=spec)
    with pytest.raises(StepError, match=match) as err:
        drivers.DriversStep().plan(t, state)
    assert err.value.step == "drivers"


@pytest.mark.parametrize(("actions", "want_install"), [
    pytest.param(["install nvidia:570-server ...", "reboot"], True, id="install-and-reboot"),
    pytest.param(["reboot (a driver install is waiting for it)"], False, id="reboot-only"),
])
def test_drivers_apply(monkeypatch: pytest.MonkeyPatch, actions: list[str],
                       want_install: bool) -> None:
    monkeypatch.setattr(drivers, "REBOOT_SETTLE_SECONDS", 0)
    t, mc, said = target({"sudo -n systemctl reboot": OK, rx("bash -s -- install"): OK})
    t.host.reconnect_timeout_s = 42
    drivers.DriversStep().apply(t, actions, _driver_state())
    lines = commands(mc)
    assert lines[-1] == "sudo -n systemctl reboot"
    installs = [line for line in lines if "install" in line]
    if want_install:
        assert installs == [f"sudo -n flock -w {drivers.INSTALL_TIMEOUT_SECONDS} "
                            f"{LOCK_FILE} bash -s -- install 570"]
    else:
        assert installs == []
    assert "drivers: rebooting" in said
    assert t.host.reconnect_timeout_s == 42  # the reboot's longer deadline was temporary
