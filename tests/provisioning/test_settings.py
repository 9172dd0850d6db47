"""Tier 1: the decisions of `fab deploy` without a host (settings).

Steps are probed through a real ``provisioning.remote.Host`` around invoke's ``MockContext``
(``provisioning_helpers``): the tests see exactly what would go over SSH."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml
from provisioning_helpers import (
    ACCOUNT_URL,
    API_KEY,
    CONN_STR,
    SECRETS,
    dev_values,
    settings_for,
)

from provisioning import settings as settings_mod
from provisioning.settings import BlobAccess, MetricsAccess
from serving.stack import layout as layouts
from serving.stack import stackfile
from serving.stack.errors import SpecError

# --- settings.load ------------------------------------------------------------------------------


@pytest.fixture
def key_files(tmp_path: Path) -> tuple[Path, Path]:
    ssh_key = tmp_path / "id_ed25519"
    ssh_key.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nunit\n")
    ssh_key.chmod(0o600)
    api_key = tmp_path / "api-key"
    api_key.write_text(API_KEY + "\n")
    api_key.chmod(0o600)
    return ssh_key, api_key


def write_stack(tmp_path: Path, key_files: tuple[Path, Path], **overrides: Any) -> Path:
    ssh_key, api_key = key_files
    values = dev_values(**{"sshPrivateKeyPath": str(ssh_key), "apiKeyRef": f"file:{api_key}",
                           **overrides})
    values = {k: v for k, v in values.items() if v is not None}
    ns = stackfile.namespace()
    path = tmp_path / "Pulumi.unit.yaml"
    path.write_text(yaml.safe_dump({"config": {f"{ns}:{k}": v for k, v in values.items()}}))
    return path


def _problem(exc: pytest.ExceptionInfo[SpecError]) -> str:
    [problem] = exc.value.problems
    return problem.where


@pytest.mark.parametrize("stack", [pytest.param("prod", id="aks"),
                                   pytest.param("local", id="local")])
def test_load_rejects_targets_other_than_vm(stack: str) -> None:
    with pytest.raises(SpecError) as err:
        settings_mod.load(stack=stack, hosts="admin@10.0.0.4", outputs={})
    assert _problem(err) == f"Pulumi.{stack}.yaml: target"
    assert "allowed: vm" in str(err.value)


def test_load_needs_exactly_one_of_stack_and_config() -> None:
    with pytest.raises(SpecError) as err:
        settings_mod.load(stack="dev", config="x.yaml", outputs={})
    assert _problem(err) == "--stack/--config"


def test_load_without_hosts_names_the_option(tmp_path: Path,
                                             key_files: tuple[Path, Path]) -> None:
    path = write_stack(tmp_path, key_files)
    with pytest.raises(SpecError) as err:
        settings_mod.load(config=str(path), blob_url=ACCOUNT_URL, outputs={})
    assert _problem(err) == "--hosts"
    assert "--hosts user@address" in str(err.value)


def test_load_takes_hosts_from_stack_outputs(tmp_path: Path,
                                             key_files: tuple[Path, Path]) -> None:
    path = write_stack(tmp_path, key_files)
    outputs = {"hosts": [{"address": "20.1.2.3", "adminUser": "ops"},
                         {"privateAddress": "10.0.0.5"}, {"address": ""}],
               "storageAccount": "exaonedev", "identityClientId": "cid-9"}
    s = settings_mod.load(config=str(path), outputs=outputs)
    assert s.hosts == ("ops@20.1.2.3", f"{s.spec.vm.admin_user}@10.0.0.5")
    assert s.blob == BlobAccess(account_url="https://exaonedev.blob.core.windows.net",
                                client_id="cid-9")
    assert s.api_key == API_KEY and s.ssh_key_file == str(key_files[0])
    assert s.config_file == path


def test_load_hosts_option_wins_and_rejects_duplicates(tmp_path: Path,
                                                       key_files: tuple[Path, Path]) -> None:
    path = write_stack(tmp_path, key_files)
    outputs = {"hosts": [{"address": "20.1.2.3"}], "storageAccount": "a"}
    s = settings_mod.load(config=str(path), hosts=" a@h1 , b@h2:2222 ,", outputs=outputs)
    assert s.hosts == ("a@h1", "b@h2:2222")
    with pytest.raises(SpecError) as err:
        settings_mod.load(config=str(path), hosts="a@h1,a@h1", outputs=outputs)
    assert _problem(err) == "--hosts" and "twice" in str(err.value)


@pytest.mark.parametrize("hosts", [pytest.param("admin@vm1,admin@vm2:ssh", id="bad-port"),
                                   pytest.param("admin@vm1,admin@", id="no-host")])
def test_load_rejects_a_malformed_host_before_any_host_is_touched(
        tmp_path: Path, key_files: tuple[Path, Path], hosts: str) -> None:
    path = write_stack(tmp_path, key_files)
    with pytest.raises(SpecError) as err:
        settings_mod.load(config=str(path), hosts=hosts, blob_url=ACCOUNT_URL, outputs={})
    assert _problem(err) == "--hosts"


def test_load_missing_ssh_key_names_ssh_private_key_path(tmp_path: Path,
                                                         key_files: tuple[Path, Path]) -> None:
    path = write_stack(tmp_path, key_files, sshPrivateKeyPath=str(tmp_path / "nope"))
    with pytest.raises(SpecError) as err:
        settings_mod.load(config=str(path), hosts="h1", blob_url=ACCOUNT_URL, outputs={})
    assert _problem(err) == "Pulumi.unit.yaml: sshPrivateKeyPath"
    assert str(tmp_path / "nope") in str(err.value)


def test_load_blob_source_without_account_names_blob_url(tmp_path: Path,
                                                         key_files: tuple[Path, Path]) -> None:
    path = write_stack(tmp_path, key_files)
    with pytest.raises(SpecError) as err:
        settings_mod.load(config=str(path), hosts="h1", outputs={})
    assert _problem(err) == "--blob-url"
    s = settings_mod.load(config=str(path), hosts="h1", blob_url=ACCOUNT_URL, outputs={})
    assert s.blob.account_url == ACCOUNT_URL and s.blob.configured


def test_load_hf_source_needs_no_blob(tmp_path: Path, key_files: tuple[Path, Path]) -> None:
    path = write_stack(tmp_path, key_files, modelSource="hf", adapters=[])
    s = settings_mod.load(config=str(path), hosts="h1", outputs={})
    assert not s.blob.configured


def test_load_connection_string_from_the_named_env(tmp_path: Path, key_files: tuple[Path, Path],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_stack(tmp_path, key_files)
    monkeypatch.delenv("UNIT_BLOB_CONN", raising=False)
    with pytest.raises(SpecError) as err:
        settings_mod.load(config=str(path), hosts="h1", outputs={}, blob_url=ACCOUNT_URL,
                          blob_connection_string_env="UNIT_BLOB_CONN")
    assert _problem(err) == "--blob-connection-string-env"
    monkeypatch.setenv("UNIT_BLOB_CONN", CONN_STR)
    s = settings_mod.load(config=str(path), hosts="h1", outputs={},
                          blob_connection_string_env="UNIT_BLOB_CONN")
    assert s.blob.connection_string == CONN_STR and s.blob.configured
    assert CONN_STR not in repr(s) and API_KEY not in repr(s)


def test_load_refuses_a_group_readable_api_key_file(tmp_path: Path,
                                                    key_files: tuple[Path, Path]) -> None:
    path = write_stack(tmp_path, key_files)
    key_files[1].chmod(0o640)
    with pytest.raises(SpecError, match="chmod 600"):
        settings_mod.load(config=str(path), hosts="h1", blob_url=ACCOUNT_URL, outputs={})


@pytest.mark.parametrize("secret_keys", [
    pytest.param({}, id="apiKeyRef-file"),
    pytest.param({"apiKeyRef": None, "apiKey": {"secure": "v1:AAAApulumiCipher"}},
                 id="pulumi-secret"),
    pytest.param({"hfTokenRef": "env:HF_TOKEN"}, id="hf-token-ref"),
])
def test_host_stack_document_carries_no_secret(tmp_path: Path, key_files: tuple[Path, Path],
                                               secret_keys: dict[str, Any]) -> None:
    path = write_stack(tmp_path, key_files, **secret_keys)
    spec = stackfile.load(config=path)
    s = dataclasses.replace(settings_for(spec), config_file=path)
    text = s.host_stack_document()
    ns = stackfile.namespace()
    config = yaml.safe_load(text)["config"]
    assert config[f"{ns}:apiKeyRef"] == f"file:{layouts.VM_API_KEY_FILE}"
    for key in ("apiKey", "sshPrivateKeyPath", "hfTokenRef"):
        assert f"{ns}:{key}" not in config
    for secret in (*SECRETS, "AAAApulumiCipher", str(key_files[0]), str(key_files[1])):
        assert secret not in text
    # The host-side tools read it back as the same spec (only the key's whereabouts differ).
    on_host = tmp_path / "Pulumi.dev.yaml"
    on_host.write_text(text)
    host_spec = stackfile.load(config=on_host)
    skip = {"api_key": True, "stack": True, "vm": {"ssh_private_key_path", "hf_token_ref"}}
    assert host_spec.model_dump(exclude=skip) == spec.model_dump(exclude=skip)
    assert str(host_spec.api_key) == f"file:{layouts.VM_API_KEY_FILE}"


def test_host_stack_document_of_the_dev_stack_sets_the_root_only_key_file() -> None:
    text = settings_for().host_stack_document()
    assert text.startswith("# Written by fab deploy from Pulumi.dev.yaml")
    assert f"apiKeyRef: file:{layouts.VM_API_KEY_FILE}" in text
    assert "EXAONE_API_KEY" not in text


def test_load_reports_every_setup_problem_at_once(tmp_path: Path, key_files: tuple[Path, Path],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """No hosts, a missing key file, an unset API key and an unknown Blob account: one run."""
    monkeypatch.delenv("UNIT_API_KEY", raising=False)
    path = write_stack(tmp_path, key_files, sshPrivateKeyPath=str(tmp_path / "nope"),
                       apiKeyRef="env:UNIT_API_KEY")
    with pytest.raises(SpecError) as err:
        settings_mod.load(config=str(path), outputs={})
    wheres = [p.where for p in err.value.problems]
    assert wheres[0] == "--hosts" and "Pulumi.unit.yaml: sshPrivateKeyPath" in wheres
    assert "--blob-url" in wheres
    assert any("UNIT_API_KEY" in str(p) for p in err.value.problems), wheres


def test_dry_run_needs_no_secret(tmp_path: Path, key_files: tuple[Path, Path],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("UNIT_API_KEY", raising=False)
    monkeypatch.delenv("UNIT_BLOB_CONN", raising=False)
    path = write_stack(tmp_path, key_files, apiKeyRef="env:UNIT_API_KEY",
                       hfTokenRef="env:UNIT_HF_TOKEN")
    with pytest.raises(SpecError):
        settings_mod.load(config=str(path), hosts="h1", outputs={},
                          blob_connection_string_env="UNIT_BLOB_CONN")
    s = settings_mod.load(config=str(path), hosts="h1", outputs={}, dry=True,
                          blob_connection_string_env="UNIT_BLOB_CONN")
    assert s.dry and s.api_key == "" and s.hf_token == ""
    assert [u.split(" (")[0] for u in s.unread] == [
        "the API key", "the Blob connection string", "the HF token"]


@pytest.mark.parametrize(("override", "key"), [
    pytest.param({"sshPublicKey": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAINXo7c6mmuiEzfaQmNPrvojpWu"
                                  "vUC+5orc9YbzEpYccu replace-with-your-key"}, "sshPublicKey",
                 id="example-ssh-key"),
    pytest.param({"sshCidrs": ["192.0.2.0/24"]}, "sshCidrs", id="documentation-cidr"),
    pytest.param({"adapters": [{"name": "a", "version": "1", "source": "blob://adapters/a/1",
                                "sha256": "deadbeef" * 8, "rank": 16}]}, "adapters[0].sha256",
                 id="filler-digest"),
    pytest.param({"modelId": "LGAI-EXAONE/EXAONE-3.5-32B-Instruct",
                  "gpuMemoryUtilization": "0.5"}, "gpuMemoryUtilization", id="does-not-fit"),
])
def test_load_passes_the_one_gate_before_any_host_is_touched(
        tmp_path: Path, key_files: tuple[Path, Path], override: dict[str, Any], key: str) -> None:
    """The same gate as `serving validate` and the Pulumi program: example values, capacity."""
    path = write_stack(tmp_path, key_files, **override)
    with pytest.raises(SpecError) as err:
        settings_mod.load(config=str(path), hosts="h1", blob_url=ACCOUNT_URL, outputs={},
                          dry=True)
    wheres = [p.where for p in err.value.problems]
    assert f"Pulumi.unit.yaml: {stackfile.namespace()}:{key}" in wheres, wheres


def test_fab_validate_is_the_same_gate(tmp_path: Path, key_files: tuple[Path, Path]) -> None:
    """`fab validate` refuses what `serving validate` refuses: a stack that does not fit its
    GPUs (32B at gpuMemoryUtilization 0.5) and the checked-in example values."""
    from invoke import MockContext
    from invoke.exceptions import Exit

    from provisioning import validate

    path = write_stack(tmp_path, key_files, modelId="LGAI-EXAONE/EXAONE-3.5-32B-Instruct",
                       gpuMemoryUtilization="0.5")
    with pytest.raises(Exit) as err:
        validate(MockContext(), config=str(path))
    assert err.value.code == 2 and "gpuMemoryUtilization" in str(err.value.message)
    with pytest.raises(Exit) as err:
        validate(MockContext(), stack="dev")
    assert err.value.code == 2 and "sshPublicKey: is the example key" in str(err.value.message)
    validate(MockContext(), config=str(write_stack(tmp_path, key_files)))


def test_task_option_problems_come_with_the_settings_problems(
        tmp_path: Path, key_files: tuple[Path, Path]) -> None:
    """`fab deploy --only nope` and `fab adapters.add BAD!` on a stack whose key file is
    missing: one run names both."""
    from invoke import MockContext
    from invoke.exceptions import Exit

    from provisioning.tasks import adapters as adapter_tasks
    from provisioning.tasks.deploy import deploy

    path = write_stack(tmp_path, key_files, sshPrivateKeyPath=str(tmp_path / "nope"))
    common = {"config": str(path), "hosts": "h1", "blob_url": ACCOUNT_URL}
    with pytest.raises(Exit) as err:
        deploy(MockContext(), only="nope", **common)
    assert err.value.code == 2
    assert "--only: unknown step(s) nope" in err.value.message
    assert "sshPrivateKeyPath" in err.value.message
    with pytest.raises(Exit) as err:
        adapter_tasks.add(MockContext(), "BAD!", "1", **common)
    assert err.value.code == 2
    assert "NAME" in err.value.message and "sshPrivateKeyPath" in err.value.message


def test_load_takes_the_metrics_agent_s_target_from_stack_outputs(
        tmp_path: Path, key_files: tuple[Path, Path]) -> None:
    path = write_stack(tmp_path, key_files)
    client = "7d9b1c1e-4a1f-4e55-9d6a-2f3b8e0c1a22"
    url = "https://dce.swedencentral-1.metrics.ingest.monitor.azure.com/dataCollectionRules/d/x"
    outputs = {"hosts": [{"address": "20.1.2.3"}], "storageAccount": "exaonedev",
               "identityClientId": client, "metricsIngestionUrl": url}
    s = settings_mod.load(config=str(path), outputs=outputs)
    assert s.metrics == MetricsAccess(ingestion_url=url, client_id=client)
    assert s.metrics.configured
    s = settings_mod.load(config=str(path), outputs={**outputs, "metricsIngestionUrl": ""})
    assert not s.metrics.configured
    with pytest.raises(SpecError) as err:
        settings_mod.load(config=str(path), outputs={**outputs, "identityClientId": "cid-9"})
    assert "identityClientId" in str(err.value)
    with pytest.raises(SpecError) as err:
        settings_mod.load(config=str(path),
                          outputs={**outputs, "metricsIngestionUrl": "http://x/write"})
    assert "metricsIngestionUrl" in str(err.value)
