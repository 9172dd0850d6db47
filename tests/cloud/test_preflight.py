"""Tier 1: preflight against Azure's answers, replayed under the SDKs' own HTTP layer
(``azure_replay``): a subscription that has everything, and one that lacks each prerequisite,
which must all be reported in one run, each with what fixes it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from azure_replay import DEPLOYER_OID, replay
from pulumi_mocks import run_program_capture, stack_values

from serving.cloud import blobstore, preflight
from serving.stack import stackfile
from serving.stack.errors import SpecError
from serving.stack.spec import Spec


def _dev_pinned_to(adapter) -> Spec:
    """The dev stack with its adapters pinned to the digests the recorded listing carries."""
    azure, _ = replay("ready")
    from azure.storage.blob import BlobServiceClient

    from serving.stack import layout

    account = layout.storage_account_name("dev", azure.subscription_id)
    service = BlobServiceClient(layout.blob_account_url(account), credential=azure.credential,
                                **azure.client_kwargs())
    values = stack_values("dev")
    for entry in values["adapters"]:
        listed = blobstore.list_folder(service, blobstore.BlobFolder.parse(entry["source"]))
        entry["sha256"] = adapter(listed.digest)
    return stackfile.from_values(values, stack="dev")


def test_a_ready_subscription_has_no_findings() -> None:
    spec = _dev_pinned_to(lambda digest: digest)
    azure, adapter = replay("ready")
    report = preflight.run(spec, azure)
    assert report.findings == []
    assert "Standard_NC40ads_H100_v5 in swedencentral: zones 1, 2, 3" in report.notes
    # Every check asked Azure: roles, providers, feature, SKUs, usage, group, three folders.
    assert len(adapter.seen) == 9, adapter.seen


def test_a_region_without_a_metrics_workspace_is_refused_by_its_key() -> None:
    spec = _dev_pinned_to(lambda digest: digest).model_copy(update={"location": "westus3"})
    azure, _ = replay("ready")
    report = preflight.Report()
    preflight.check_providers(spec, azure, report)
    found = [f for f in report.blocking if f.check == "location"]
    assert len(found) == 1, report.findings
    assert "location westus3 has no Azure Monitor workspace" in found[0].message
    assert "swedencentral" in found[0].message


def test_an_adapter_whose_digest_differs_from_the_pin_is_found() -> None:
    spec = _dev_pinned_to(lambda digest: "0" * 64)
    azure, _ = replay("ready")
    found = [f for f in preflight.run(spec, azure).findings if f.check == "blob"]
    assert len(found) == 2 and all("the stack pins " + "0" * 64 in f.message for f in found)
    assert all(".sha256" in f.fix for f in found)
    # VMs fetch during fab deploy: this does not stop `pulumi up`.
    assert not any(f.blocks_up for f in found)


@pytest.fixture(scope="module")
def lacking() -> preflight.Report:
    azure, _ = replay("lacking")
    return preflight.run(stackfile.load("prod"), azure)


# Each prerequisite the recorded subscription lacks: (check, words of the message, of the fix).
LACKING = {
    "no-role-assignment-write": ("role", "cannot create role assignments",
                                 "Role Based Access Control Administrator"),
    "no-lock-write": ("role", "locks the resource group", "User Access Administrator"),
    "no-blob-data-role": ("role", "cannot write blobs", "Storage Blob Data Contributor"),
    "aks-provider": ("provider", "Microsoft.ContainerService is NotRegistered",
                     "az provider register --namespace Microsoft.ContainerService"),
    "identity-provider": ("provider", "Microsoft.ManagedIdentity is NotRegistered",
                          "az provider register --namespace Microsoft.ManagedIdentity"),
    "encryption-at-host-feature": ("feature", "EncryptionAtHost is NotRegistered",
                                   "az feature register --namespace Microsoft.Compute --name "
                                   "EncryptionAtHost"),
    "size-restricted": ("size", "Standard_NC80adis_H100_v5 is restricted in swedencentral "
                        "for this subscription (NotAvailableForSubscription)",
                        "az vm list-skus --location swedencentral"),
    "size-without-encryption-at-host": ("size", "does not support encryption at host",
                                        "encryptionAtHost: false"),
    "system-size-not-offered": ("size", "Standard_D4ds_v5 is not offered in swedencentral",
                                "aksSystemVmSize"),
    # An autoscaled pool counts at gpuNodesMax: the most the cluster autoscaler may add.
    "gpu-family-quota": ("quota", "Standard NCadsH100v5 Family vCPUs in swedencentral: the stack "
                         "needs 320 vCPUs (gpuNodesMax 4",
                         "--resource-name standardNCadsH100v5Family"),
    "regional-quota": ("quota", "Total Regional vCPUs", "--resource-name cores"),
    "model-not-uploaded": ("blob", "modelSource blob://models/exaone-3.5-7.8b-instruct is not "
                           "in Blob", "python -m serving upload --stack prod"),
    "adapter-other-digest": ("blob", "adapters[0] blob://adapters/support-ko/3 holds digest",
                             "adapters[0].sha256"),
    "adapter-not-uploaded": ("blob", "adapters[1] blob://adapters/legal-summary/1 is not in "
                             "Blob", "--adapter legal-summary=VERSION:DIR"),
}


@pytest.mark.parametrize("case", list(LACKING), ids=list(LACKING))
def test_each_missing_prerequisite_is_reported(lacking: preflight.Report, case: str) -> None:
    check, message, fix = LACKING[case]
    matches = [f for f in lacking.findings
               if f.check == check and message in f.message and fix in f.fix]
    assert len(matches) == 1, "\n".join(map(str, lacking.findings))


def test_everything_missing_is_reported_in_one_run(lacking: preflight.Report) -> None:
    # Contributor holds no role-assignment or lock rights; the fixes name the deployer.
    assert len(lacking.findings) == len(LACKING), "\n".join(map(str, lacking.findings))
    assert all(DEPLOYER_OID in f.fix for f in lacking.findings if f.check == "role")
    # In the workload phase the pods fetch during `pulumi up`: missing blobs stop it.
    assert all(f.blocks_up for f in lacking.findings if f.check == "blob")
    assert "Standard_NC80adis_H100_v5 in swedencentral: zones 1, 2" in lacking.notes


def test_unreadable_roles_and_a_missing_account_are_findings_not_crashes() -> None:
    azure, _ = replay("no-role-read-no-account")
    values = {**stack_values("prod"), "location": "swedencentral"}
    report = preflight.run(stackfile.from_values(values, stack="prod"), azure)
    checks = {f.check: f for f in report.findings}
    assert "AuthorizationFailed" in checks["role"].message or \
        "does not have authorization" in checks["role"].message
    assert "does not answer" in checks["blob"].message
    assert "aksPhase: cluster" in checks["blob"].fix and checks["blob"].blocks_up


def test_the_program_refuses_before_creating_anything(monkeypatch: pytest.MonkeyPatch) -> None:
    """With credentials present, `pulumi up` runs preflight first and stops on what blocks it."""
    from serving.cloud import azure as azure_access

    azure, _ = replay("lacking")
    monkeypatch.setattr(azure_access, "credentials_present", lambda env=None: True)
    monkeypatch.setattr(azure_access, "connect", lambda subscription_id="": azure)
    run, error = run_program_capture("prod", stack_values("prod"),
                                     env={"EXAONE_API_KEY": "test-api-key-not-real"})
    assert isinstance(error, SpecError), error
    assert run.resources == []
    lines = [str(p) for p in error.problems]
    assert any("Microsoft.ContainerService" in line for line in lines)
    assert not any("cannot write blobs" in line for line in lines), "upload's role blocks up"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AZURE_", "ARM_"))} | {"PATH": os.path.dirname(sys.executable)}
    return subprocess.run([sys.executable, "-m", "serving", *args], capture_output=True,
                          text=True, env=env, cwd=stackfile.ROOT, timeout=60, check=False)


@pytest.mark.parametrize("args, words", [
    (("preflight", "--stack", "nosuch"), "no such stack file"),
    (("preflight", "--stack", "dev"), "no Azure credentials"),
    (("upload", "--stack", "dev", "--adapter", "support-ko"), "NAME=VERSION:DIR"),
], ids=["unknown-stack", "no-credentials", "malformed-adapter"])
def test_bad_input_is_one_line_and_exit_2(args: tuple[str, ...], words: str) -> None:
    started = time.monotonic()
    done = _cli(*args)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and words in done.stderr
    assert "Traceback" not in done.stderr
    assert time.monotonic() - started < 10


def test_fab_validate_runs_preflight(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    """After the spec and the gate pass (the prod example filled in as an operator would),
    `fab validate` asks the subscription and reports every gap at once."""
    import yaml
    from example_values import filled_in
    from invoke import MockContext
    from invoke.exceptions import Exit

    from provisioning import validate
    from serving.cloud import azure as azure_access

    document = yaml.safe_load(stackfile.stack_path("prod").read_text())
    values = filled_in({k.split(":", 1)[1]: v for k, v in document["config"].items()})
    config = tmp_path / "Pulumi.prod.yaml"
    config.write_text(yaml.safe_dump(
        {"config": {f"{stackfile.namespace()}:{k}": v for k, v in values.items()}}))
    azure, _ = replay("lacking")
    monkeypatch.setattr(azure_access, "credentials_present", lambda env=None: True)
    monkeypatch.setattr(azure_access, "connect", lambda subscription_id="": azure)
    with pytest.raises(Exit) as stopped:
        validate(MockContext(), config=str(config))
    assert stopped.value.code == 1
    lines = str(stopped.value.message).splitlines()
    assert len(lines) == len(LACKING) and "prod: valid" in capsys.readouterr().out


ROLE_ASSIGNMENT = "azure-native:authorization:RoleAssignment"
LOCK = "azure-native:authorization:ManagementLockAtResourceGroupLevel"


@pytest.mark.parametrize("stack", [s for s in stackfile.stack_names()
                                   if stackfile.load(s).on.cloud])
def test_a_contributor_is_told_what_the_program_would_fail_on(stack: str) -> None:
    """Finding 4: whatever the program registers that Contributor cannot create (role
    assignments, a management lock) is named by preflight for a Contributor-only deployer."""
    from pulumi_mocks import run_program

    run = run_program(stack, stack_values(stack), env={"EXAONE_API_KEY": "test-not-real"})
    azure, _ = replay("lacking")  # its deployer holds Contributor only
    report = preflight.Report()
    preflight.check_roles(stackfile.load(stack), azure, DEPLOYER_OID, report)
    messages = " ".join(f.message for f in report.findings)
    assert ("cannot create role assignments" in messages) == bool(run.of_type(ROLE_ASSIGNMENT))
    assert ("locks the resource group" in messages) == bool(run.of_type(LOCK))
    assert run.of_type(ROLE_ASSIGNMENT), "every cloud stack assigns the identity's role"


def test_an_expired_login_is_one_finding() -> None:
    from azure.core.exceptions import ClientAuthenticationError

    from serving.cloud.azure import Azure

    class Expired:
        def get_token(self, *scopes: str, **kwargs: object) -> None:
            raise ClientAuthenticationError("AADSTS700082: The refresh token has expired")

    _, adapter = replay("ready")
    report = preflight.run(stackfile.load("dev"), Azure(Expired(), "sub"))
    assert [f.check for f in report.findings] == ["credentials"]
    assert "az login" in report.findings[0].fix and adapter.seen == []
