"""The VMs' Prometheus agent: its configuration, its hardened unit and its token refresher's
units, for every VM stack."""

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
def test_agent_writes_with_the_token_file_only(stack: str) -> None:
    url = monitoring.ingestion_url("https://dce-x.swedencentral-1.metrics.ingest.monitor.azure"
                                   ".com/", "dcr-abc")
    [write] = _config(stack, remote_write_url=url)["remote_write"]
    assert write["url"] == ("https://dce-x.swedencentral-1.metrics.ingest.monitor.azure.com/"
                            "dataCollectionRules/dcr-abc/streams/Microsoft-PrometheusMetrics/"
                            "api/v1/write?api-version=2023-04-24")
    # Not azuread: the distributions' builds lack it. The file's path, never a token.
    assert write["authorization"] == {"type": "Bearer",
                                      "credentials_file": metrics_unit.TOKEN_FILE}
    assert set(write) == {"url", "authorization"}, "no key, password or token in the file"


def test_the_refresher_asks_imds_for_azure_monitor_with_the_identity() -> None:
    client = str(uuid.uuid4())
    uuid.UUID(monitoring.PLACEHOLDER_CLIENT_ID)
    assert metrics_unit.token_argv(client) == [
        metrics_unit.TOKEN_SCRIPT,
        "http://169.254.169.254/metadata/identity/oauth2/token?api-version=2018-02-01",
        "https://monitor.azure.com/", client, metrics_unit.TOKEN_FILE]
    unit = metrics_unit.render_token_unit(SPECS[VM_STACKS[0]], client)
    assert client in unit and "IPAddressAllow=169.254.169.254\n" in unit


@pytest.mark.parametrize("stack", VM_STACKS)
def test_agent_and_refresher_share_the_user_and_the_token_folder(stack: str) -> None:
    agent = metrics_unit.render_unit(SPECS[stack])
    token = metrics_unit.render_token_unit(SPECS[stack])
    timer = metrics_unit.render_token_timer(SPECS[stack])

    def values(unit: str, key: str) -> list[str]:
        return [w for line in unit.splitlines() if line.startswith(f"{key}=")
                for w in line.split("=", 1)[1].split()]

    assert values(agent, "User") == values(token, "User") == [metrics_unit.USER]
    assert values(agent, "DynamicUser") == values(token, "DynamicUser") == ["yes"]
    assert values(token, "StateDirectory") == [metrics_unit.TOKEN_DIRECTORY]
    assert metrics_unit.TOKEN_DIRECTORY in values(agent, "StateDirectory")
    assert metrics_unit.TOKEN_FILE.startswith(f"/var/lib/{metrics_unit.TOKEN_DIRECTORY}/")
    assert metrics_unit.TOKEN_UNIT_NAME in values(agent, "Wants")
    assert metrics_unit.TOKEN_UNIT_NAME in values(agent, "After")
    assert values(timer, "Unit") == [metrics_unit.TOKEN_UNIT_NAME]
    assert values(timer, "OnUnitActiveSec") == [metrics_unit.TOKEN_REFRESH]


@pytest.mark.tools
@pytest.mark.parametrize("stack", VM_STACKS)
def test_promtool_checks_the_agent_config(stack: str, tmp_path: Path) -> None:
    """promtool in agent mode, on the whole file as rendered (the distribution's promtool knows
    every field of it, the bearer token's file included)."""
    promtool = find_tool("promtool")
    text = metrics_unit.render_config(SPECS[stack], instance=layout.vm_host_names(
        SPECS[stack])[0])
    (tmp_path / "agent.yml").write_text(text)
    done = subprocess.run([promtool, "check", "config", "--agent", "agent.yml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    # It can fail: the block the agent used to render is refused by the distribution's build.
    config = yaml.safe_load(text)
    config["remote_write"][0]["azuread"] = {
        "cloud": "AzurePublic", "managed_identity": {"client_id": str(uuid.uuid4())}}
    del config["remote_write"][0]["authorization"]
    (tmp_path / "azuread.yml").write_text(yaml.safe_dump(config))
    done = subprocess.run([promtool, "check", "config", "--agent", "azuread.yml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "azuread" in done.stdout + done.stderr
    # Nor may the token be given beside its file.
    config = yaml.safe_load(text)
    config["remote_write"][0]["authorization"]["credentials"] = "x"
    (tmp_path / "both.yml").write_text(yaml.safe_dump(config))
    done = subprocess.run([promtool, "check", "config", "--agent", "both.yml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0, done.stdout


@pytest.fixture(scope="module")
def unit_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("metricsroot")
    (root / "etc/systemd/system").mkdir(parents=True)
    for units in {Path("/usr/lib/systemd/system").resolve(), Path("/lib/systemd/system").resolve()}:
        if units.is_dir():
            shutil.copytree(units, root / "usr/lib/systemd/system", symlinks=True,
                            dirs_exist_ok=True)
    for binary in (metrics_unit.PROMETHEUS, metrics_unit.TOKEN_SCRIPT, "/bin/kill"):
        stub = root / binary.lstrip("/")
        stub.parent.mkdir(parents=True, exist_ok=True)
        stub.write_text("#!/bin/sh\nexit 0\n")
        stub.chmod(0o755)
    return root


def _analyze(tool: str, root: Path, name: str, text: str) -> subprocess.CompletedProcess[str]:
    (root / "etc/systemd/system" / name).write_text(text)
    return subprocess.run([tool, "verify", f"--root={root}", name],
                          capture_output=True, text=True, timeout=120)


def _exposure(tool: str, root: Path, name: str) -> float:
    done = subprocess.run([tool, "security", "--offline=yes", f"--root={root}", name],
                          capture_output=True, text=True, timeout=120)
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", done.stdout)
    assert match, done.stdout + done.stderr
    return float(match.group(1))


@pytest.mark.tools
@pytest.mark.parametrize("stack", VM_STACKS)
def test_agent_and_token_units_pass_systemd_analyze(stack: str, unit_root: Path) -> None:
    tool = find_tool("systemd-analyze")
    spec = SPECS[stack]
    # The refresher and its timer first: the agent's unit names the refresher.
    for name, text in ((metrics_unit.TOKEN_UNIT_NAME, metrics_unit.render_token_unit(spec)),
                       (metrics_unit.TOKEN_TIMER_NAME, metrics_unit.render_token_timer(spec)),
                       (metrics_unit.UNIT_NAME, metrics_unit.render_unit(spec))):
        done = _analyze(tool, unit_root, name, text)
        assert done.returncode == 0 and done.stderr == "", f"{name}: {done.stderr}"
    for name in (metrics_unit.UNIT_NAME, metrics_unit.TOKEN_UNIT_NAME):
        exposure = _exposure(tool, unit_root, name)
        print(f"{stack}: {name} exposure {exposure}")
        assert exposure <= MAX_EXPOSURE, name


@pytest.mark.tools
def test_systemd_analyze_catches_a_bad_token_unit(unit_root: Path) -> None:
    tool = find_tool("systemd-analyze")
    text = metrics_unit.render_token_unit(SPECS[VM_STACKS[0]]).replace(
        "Type=oneshot", "Type=oneshot\nStateDirectoryMod=0700")
    done = _analyze(tool, unit_root, "bad-token.service", text)
    assert done.returncode != 0 or done.stderr, "an unknown key must be reported"
