"""Tier 1: the decisions of `fab deploy` without a host (model step).

Steps are probed through a real ``provisioning.remote.Host`` around invoke's ``MockContext``
(``provisioning_helpers``): the tests see exactly what would go over SSH."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from invoke import Result
from provisioning_helpers import (
    ACCOUNT_URL,
    DEV,
    MODEL_PATH,
    OK,
    as_json,
    commands,
    rx,
    sent,
    settings_for,
    spec_with,
    target,
)

from provisioning.settings import BlobAccess
from provisioning.steps.converge import (
    CHANGED,
    converge,
)
from provisioning.steps.model import ModelStep
from serving.stack import layout as layouts
from serving.stack.spec import Spec

# --- model --------------------------------------------------------------------------------------

LOCAL_DISK = spec_with(useLocalNvme=False)


def _fetch_action(resume: str = "") -> str:
    return (f"fetch {DEV.model.id}@{DEV.model.revision[:12]} from {DEV.model.source}{resume} "
            f"into {MODEL_PATH}")


@pytest.mark.parametrize(("model", "want"), [
    pytest.param({"state": "present", "path": MODEL_PATH, "files": 4}, [], id="present"),
    pytest.param({"state": "missing", "path": MODEL_PATH, "partial": False}, [_fetch_action()],
                 id="missing"),
    pytest.param({"state": "missing", "path": MODEL_PATH, "partial": True},
                 [_fetch_action(" (resuming)")], id="partial"),
    pytest.param({"state": "stale", "path": MODEL_PATH, "detail": "another source or revision"},
                 [_fetch_action()], id="stale"),
])
def test_model_plan(model: dict[str, Any], want: list[str]) -> None:
    t, _, _ = target(spec=LOCAL_DISK)
    assert ModelStep().plan(t, {"model": model}) == want


@pytest.mark.parametrize(("spec", "nvme_out", "want_mount"), [
    pytest.param(DEV, "mounted=no disk=/dev/nvme0n1", True, id="nvme-unmounted"),
    pytest.param(DEV, "mounted=yes disk=/dev/nvme0n1", False, id="nvme-mounted"),
    pytest.param(LOCAL_DISK, None, False, id="no-nvme-asked"),
])
def test_model_probe_and_plan_mount_only_with_local_nvme(spec: Spec, nvme_out: str | None,
                                                         want_mount: bool) -> None:
    run: dict[Any, Any] = {rx("serving.host.model probe"): as_json(
        {"state": "present", "path": MODEL_PATH, "files": 4})}
    if nvme_out is not None:
        run[f"sudo -n bash -s -- probe {layouts.VM.models_dir}"] = Result(stdout=nvme_out)
    t, mc, _ = target(run, spec=spec)  # strict: an unexpected nvme probe would fail
    step = ModelStep()
    actions = step.plan(t, step.probe(t))
    mount = f"mount the local NVMe disk (/dev/nvme0n1) at {layouts.VM.models_dir}"
    assert actions == ([mount] if want_mount else [])
    assert commands(mc)[-1].endswith(
        f"serving.host.model probe --config {layouts.vm_stack_file('dev')}")
    assert any("bash -s" in line for line in commands(mc)) is (nvme_out is not None)


def test_model_apply_mounts_then_fetches_with_blob_args() -> None:
    missing = {"state": "missing", "path": MODEL_PATH}
    t, mc, said = target({rx("bash -s -- apply"): OK,
                          rx("serving.host.model probe"): as_json(missing),
                          rx("serving.host.model fetch"): as_json(
                              {"files": 3, "bytes": 2_500_000, "seconds": 1.5})})
    state = {"nvme": {"mounted": "no", "disk": "/dev/nvme0n1"}, "model": missing}
    ModelStep().apply(t, ModelStep().plan(t, state), state)
    [mount] = [line for line in commands(mc) if "bash -s" in line]
    [fetch] = [line for line in commands(mc) if "host.model fetch" in line]
    assert commands(mc).index(mount) < commands(mc).index(fetch)
    assert mount.endswith(f"bash -s -- apply {layouts.VM.models_dir}") and "flock" in mount
    assert fetch.endswith(f"serving.host.model fetch --config {layouts.vm_stack_file('dev')} "
                          f"--account-url {ACCOUNT_URL} --client-id cid-1 --secrets-stdin")
    assert "model: 3 files, 2.5 MB in 1.5 s" in said
    assert t.facts["model_changed"] is True


def test_model_fetches_when_the_mount_hides_a_model_on_the_os_disk() -> None:
    present = as_json({"state": "present", "path": MODEL_PATH, "files": 4})
    missing = as_json({"state": "missing", "path": MODEL_PATH, "partial": False})
    t, mc, _ = target({
        f"sudo -n bash -s -- probe {layouts.VM.models_dir}": [
            Result(stdout="mounted=no disk=/dev/nvme0n1"),
            Result(stdout="mounted=yes disk=/dev/nvme0n1")],
        rx("serving.host.model probe"): [present, missing, present],
        rx("bash -s -- apply"): OK,
        rx("serving.host.model fetch"): as_json({"files": 4}),
    })
    assert converge(ModelStep(), t).status == CHANGED
    assert any("host.model fetch" in line for line in commands(mc))


def test_model_fetch_without_secrets_sends_no_stdin() -> None:
    plain = dataclasses.replace(settings_for(blob=BlobAccess(account_url=ACCOUNT_URL)),
                                hf_token="")
    t, mc, _ = target({rx("serving.host.model fetch"): as_json({"files": 1})}, settings=plain)
    state = {"model": {"state": "missing", "path": MODEL_PATH}}
    ModelStep().apply(t, [_fetch_action()], state)
    [(line, stdin)] = sent(mc)
    assert stdin is None and "--secrets-stdin" not in line and "--client-id" not in line
