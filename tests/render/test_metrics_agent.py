"""The VMs' Prometheus agent: its configuration and hardened unit, for every VM stack."""

from __future__ import annotations

import re
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
import yaml
from checkers import find_tool

from serving.render import metrics_unit, monitoring, proxy
from serving.stack import layout, stackfile

VM_STACKS = [n for n in stackfile.stack_names() if stackfile.load(n).on.ssh_hosts]
SPECS = {name: stackfile.load(name) for name in VM_STACKS}
MAX_EXPOSURE = 2.5
# The values Prometheus's remote_write accepts for azuread.cloud (storage/remote/azuread).
AZURE_CLOUDS = {"AzurePublic", "AzureChina", "AzureGovernment"}


def _config(stack: str, **kw: str) -> dict:
    host = layout.vm_host_names(SPECS[stack])[0]
    return yaml.safe_load(metrics_unit.render_config(SPECS[stack], instance=host, **kw))


@pytest.mark.parametrize("stack", VM_STACKS)
def test_agent_scrapes_vllm_on_loopback_under_the_alerts_job(stack: str) -> None:
    spec = SPECS[stack]
    [scrape] = _config(stack)["scrape_configs"]
    assert scrape["job_name"] == monitoring.job_name(spec)
    assert f'job="{scrape["job_name"]}"' in monitoring.alert_rules(spec)["groups"][0]["rules"][0][
        "expr"]
    [static] = scrape["static_configs"]
    assert static["targets"] == [f"127.0.0.1:{proxy.vllm_port(spec)}"]
    assert static["labels"]["instance"] == layout.vm_host_names(spec)[0]


@pytest.mark.parametrize("stack", VM_STACKS)
def test_agent_writes_with_the_managed_identity_only(stack: str) -> None:
    client = str(uuid.uuid4())
    url = monitoring.ingestion_url("https://dce-x.swedencentral-1.metrics.ingest.monitor.azure"
                                   ".com/", "dcr-abc")
    [write] = _config(stack, remote_write_url=url, client_id=client)["remote_write"]
    assert write["url"] == ("https://dce-x.swedencentral-1.metrics.ingest.monitor.azure.com/"
                            "dataCollectionRules/dcr-abc/streams/Microsoft-PrometheusMetrics/"
                            "api/v1/write?api-version=2023-04-24")
    # Prometheus refuses a client_id that is not a UUID, and any second credential beside it.
    assert write["azuread"] == {"cloud": "AzurePublic", "managed_identity": {"client_id": client}}
    assert write["azuread"]["cloud"] in AZURE_CLOUDS
    uuid.UUID(monitoring.PLACEHOLDER_CLIENT_ID)
    assert set(write) == {"url", "azuread"}, "no key, password or token in the file"


@pytest.mark.tools
@pytest.mark.parametrize("stack", VM_STACKS)
def test_promtool_checks_the_agent_config(stack: str, tmp_path: Path) -> None:
    """promtool in agent mode. The distribution's promtool (2.42) predates
    ``remote_write.azuread`` (2.45): with an older one the block is checked above by shape and
    the rest of the file by promtool; a newer one checks all of it."""
    promtool = find_tool("promtool")
    config = _config(stack)
    version = subprocess.run([promtool, "--version"], capture_output=True, text=True).stdout
    found = re.search(r"version (\d+)\.(\d+)", version)
    assert found, version
    if (int(found.group(1)), int(found.group(2))) < (2, 45):
        for write in config["remote_write"]:
            write.pop("azuread")
    (tmp_path / "agent.yml").write_text(yaml.safe_dump(config))
    done = subprocess.run([promtool, "check", "config", "--agent", "agent.yml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    # It can fail: rules have no place in an agent.
    config["rule_files"] = ["rules.yml"]
    (tmp_path / "rules.yml").write_text("groups: []\n")
    (tmp_path / "bad.yml").write_text(yaml.safe_dump(config))
    done = subprocess.run([promtool, "check", "config", "--agent", "bad.yml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0


@pytest.fixture(scope="module")
def unit_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("metricsroot")
    (root / "etc/systemd/system").mkdir(parents=True)
    for units in {Path("/usr/lib/systemd/system").resolve(), Path("/lib/systemd/system").resolve()}:
        if units.is_dir():
            shutil.copytree(units, root / "usr/lib/systemd/system", symlinks=True,
                            dirs_exist_ok=True)
    for binary in (metrics_unit.PROMETHEUS, "/bin/kill"):
        stub = root / binary.lstrip("/")
        stub.parent.mkdir(parents=True, exist_ok=True)
        stub.write_text("#!/bin/sh\nexit 0\n")
        stub.chmod(0o755)
    return root


@pytest.mark.tools
@pytest.mark.parametrize("stack", VM_STACKS)
def test_agent_unit_passes_systemd_analyze(stack: str, unit_root: Path) -> None:
    tool = find_tool("systemd-analyze")
    (unit_root / "etc/systemd/system" / metrics_unit.UNIT_NAME).write_text(
        metrics_unit.render_unit(SPECS[stack]))
    done = subprocess.run([tool, "verify", f"--root={unit_root}", metrics_unit.UNIT_NAME],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    done = subprocess.run([tool, "security", "--offline=yes", f"--root={unit_root}",
                           metrics_unit.UNIT_NAME], capture_output=True, text=True, timeout=120)
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", done.stdout)
    assert match, done.stdout + done.stderr
    print(f"{stack}: metrics agent exposure {match.group(1)}")
    assert float(match.group(1)) <= MAX_EXPOSURE, done.stdout
