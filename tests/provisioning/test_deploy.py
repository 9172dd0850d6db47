"""`fab deploy` end to end onto a real host with systemd (nspawn), Blob from Azurite, and the
CPU profile of vLLM, so the unit really serves. Tests run in file order on one host: first
deploy, no-change re-deploy, SIGKILL, a cut session, bad adapters, status, teardown.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from deploy_env import ADAPTERS, CONN_ENV, FAB, REPO, DeployEnv, make_env

from serving.adapters.client import VllmClient
from serving.local.loramaker import make_adapter
from serving.render import proxy_unit
from serving.stack import layout as layouts
from serving.stack import stackfile

pytestmark = pytest.mark.integration

UNIT = "exaone-vllm.service"
RESTART_TIMEOUT_SECONDS = 240
PROMPT = "Hello! How are you today?"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DeployEnv]:
    world = make_env(tmp_path_factory.mktemp("deploy"))
    try:
        yield world
    finally:
        world.stop()


@pytest.fixture(scope="module")
def stack(env: DeployEnv) -> Path:
    return env.write_stack("cpuhost")


def report_of(env: DeployEnv, name: str) -> dict:
    return json.loads((env.work / name).read_text())["hosts"][0]


def statuses(report: dict) -> dict[str, str]:
    return {s["step"]: s["status"] for s in report["steps"]}


def client(env: DeployEnv) -> VllmClient:
    """A client with the key, on the API port: through the API proxy."""
    return VllmClient(f"http://127.0.0.1:{env.port}", env.api_key_file.read_text().strip())


def loopback(env: DeployEnv) -> VllmClient:
    """vLLM itself, on the host's loopback, where only the project's tools go. (The test host
    shares this machine's network, so the test reaches it too.)"""
    spec = stackfile.load(config=env.work / "Pulumi.cpuhost.yaml")
    return VllmClient(f"http://127.0.0.1:{layouts.vllm_port(spec)}",
                      env.api_key_file.read_text().strip())


def admin_through_the_api_port(env: DeployEnv, route: str, body: dict) -> httpx.Response:
    key = env.api_key_file.read_text().strip()
    return httpx.post(f"http://127.0.0.1:{env.port}/v1/{route}", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {key}"})


def answers(env: DeployEnv, models: list[str]) -> dict[str, str]:
    with client(env) as c:
        return {m: c.complete(m, PROMPT, max_tokens=12).text for m in models}


def unit_state(env: DeployEnv) -> dict[str, str]:
    out = env.host.ssh(f"systemctl show {UNIT} -p ActiveState -p MainPID -p NRestarts "
                       "-p User").stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def unit_digest(env: DeployEnv) -> str:
    return env.host.sudo(f"sha256sum /etc/systemd/system/{UNIT}").stdout.split()[0]


def test_first_deploy_serves_every_adapter(env: DeployEnv, stack: Path) -> None:
    done = env.fab("deploy", "--report", str(env.work / "first.json"), stack=stack)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    report = report_of(env, "first.json")
    steps = statuses(report)
    assert steps["drivers"] == "skipped"  # no NVIDIA hardware in the test host
    for step in ("runtime", "config", "model", "patch-exaone", "adapters", "service", "proxy"):
        assert steps[step] == "changed", (step, report)
    assert steps["health"] == "passed"
    state = unit_state(env)
    assert state["ActiveState"] == "active" and state["User"] == "exaone"
    # The legacy remote code needed the patch; the original is kept beside it.
    model_dir = env.host.sudo("ls /var/lib/exaone/models/*/*/configuration_exaone.py.orig")
    assert model_dir.returncode == 0
    names = [n for n, *_ in ADAPTERS]
    got = answers(env, ["exaone-tiny", *names])
    for name in names:
        assert got[name] != got["exaone-tiny"], got
    # The proxy runs as its own unprivileged unit; the distribution's nginx stays off.
    proxy = env.host.ssh(f"systemctl show {proxy_unit.UNIT_NAME} -p ActiveState -p "
                         "DynamicUser").stdout
    assert "ActiveState=active" in proxy and "DynamicUser=yes" in proxy, proxy
    assert env.host.ssh(f"systemctl is-enabled {proxy_unit.DISTRIBUTION_UNIT}",
                        check=False).stdout.strip() == "masked"


def test_second_deploy_changes_nothing(env: DeployEnv, stack: Path) -> None:
    before = unit_state(env)
    done = env.fab("deploy", "--report", str(env.work / "second.json"), stack=stack)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    steps = statuses(report_of(env, "second.json"))
    assert {s for n, s in steps.items() if n != "health"} <= {"unchanged", "skipped"}, steps
    assert steps["health"] == "passed"
    assert unit_state(env)["MainPID"] == before["MainPID"]  # not restarted


def test_sigkill_is_restarted_by_systemd(env: DeployEnv, stack: Path) -> None:
    before = unit_state(env)
    env.host.sudo(f"kill -KILL {before['MainPID']}")
    deadline = time.monotonic() + RESTART_TIMEOUT_SECONDS
    while True:
        state = unit_state(env)
        if state["NRestarts"] != before["NRestarts"] and state["ActiveState"] == "active":
            break
        assert time.monotonic() < deadline, state
        time.sleep(2)
    assert state["MainPID"] != before["MainPID"]
    done = env.fab("deploy", "--only", "health", "--report", str(env.work / "kill.json"),
                   stack=stack)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert statuses(report_of(env, "kill.json"))["health"] == "passed"


def _upload_version(env: DeployEnv, name: str, version: str, rank: int, seed: int) -> Path:
    folder = make_adapter(env.work / "adapters" / name / version, base=env.model_dir, rank=rank,
                          seed=seed, base_model_id="test/exaone-3.5-tiny")
    env.azurite.upload_folder("adapters", f"{name}/{version}", folder)
    return folder


def test_cut_session_then_rerun_converges(env: DeployEnv) -> None:
    folder = _upload_version(env, "tone-formal", "2", 8, 201)
    entries = [env.adapter_entry("tone-formal", "2", 8, folder),
               env.adapter_entry("tone-casual", "1", 16, env.adapter_dirs["tone-casual"])]
    stack = env.write_stack("cpuhost", adapters=entries)
    proc = _start_fab(env, stack)
    cut_at = ""
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "service: restart" in line or "adapters: fetch" in line:
                cut_at = line.strip()
                # The operator's machine loses the connection mid-step.
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert cut_at, "the deploy never reached the adapters or service step"
    done = env.fab("deploy", "--report", str(env.work / "rerun.json"), stack=stack)
    assert done.returncode == 0, f"cut at {cut_at!r}\n" + done.stdout[-5000:] + done.stderr
    rerun = statuses(report_of(env, "rerun.json"))
    assert rerun["health"] == "passed"
    # The cut run really stopped short: the re-run still had work to finish.
    assert "changed" in rerun.values(), rerun
    with client(env) as c:
        assert c.adapters()["tone-formal"].endswith("/tone-formal/2")
    # settle removed nothing it still needs: v1 stays on the history for a rollback.
    assert env.host.sudo("test -d /var/lib/exaone/adapters/tone-formal/1", check=False
                         ).returncode == 0


def _start_fab(env: DeployEnv, stack: Path) -> subprocess.Popen[str]:
    command = [str(FAB), "deploy", "--config", str(stack), "--hosts", env.host.host_string,
               "--blob-connection-string-env", CONN_ENV]
    return subprocess.Popen(command, cwd=REPO, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT,
                            # Unbuffered, so each progress line arrives as it is printed.
                            env={**os.environ, CONN_ENV: env.azurite.connection_string,
                                 "PYTHONUNBUFFERED": "1"})


@pytest.mark.parametrize("fault", ["sha256", "rank"])
def test_bad_adapter_stops_before_the_unit_changes(env: DeployEnv, fault: str) -> None:
    before_unit, before = unit_digest(env), unit_state(env)
    with client(env) as c:
        before_loaded = c.adapters()
    if fault == "sha256":
        folder = _upload_version(env, "tone-casual", "7", 16, 301)
        entry = env.adapter_entry("tone-casual", "7", 16, folder)
        # A digest of other bytes (not a filler like 0*64, which the gate refuses up front):
        # only fetching the blob shows the mismatch.
        entry["sha256"] = hashlib.sha256(b"other bytes").hexdigest()
    else:
        # The blob holds a rank-32 adapter; the stack declares 16 and caps vLLM at 16.
        folder = _upload_version(env, "tone-casual", "8", 32, 302)
        entry = env.adapter_entry("tone-casual", "8", 16, folder)
    formal = env.adapter_entry("tone-formal", "2", 8,
                               env.work / "adapters" / "tone-formal" / "2")
    stack = env.write_stack(f"bad{fault}", adapters=[formal, entry], maxLoraRank=16)
    done = env.fab("deploy", "--report", str(env.work / f"bad-{fault}.json"), stack=stack)
    assert done.returncode == 1, done.stdout[-3000:]
    report = report_of(env, f"bad-{fault}.json")
    assert statuses(report)["adapters"] == "failed" and "service" not in statuses(report)
    assert ("sha256" if fault == "sha256" else "rank") in report["error"]
    assert unit_digest(env) == before_unit
    assert unit_state(env)["MainPID"] == before["MainPID"]
    with client(env) as c:
        assert c.adapters() == before_loaded
    # Nothing of the bad version was installed.
    version = entry["version"]
    assert env.host.sudo(f"test -e /var/lib/exaone/adapters/tone-casual/{version}",
                         check=False).returncode != 0


def test_fab_adapter_operations_on_the_vm(env: DeployEnv) -> None:
    """Day two through Fabric: add, hotfix, roll back and remove on the VM, each verified."""
    stack = env.work / "Pulumi.cpuhost.yaml"
    v1 = _upload_version(env, "tone-pirate", "1", 8, 401)
    v2 = _upload_version(env, "tone-pirate", "2", 8, 402)
    base = answers(env, ["exaone-tiny"])["exaone-tiny"]

    def fab_ok(*args: str) -> str:
        done = env.fab(*args, stack=stack)
        assert done.returncode == 0, f"{args}\n{done.stdout[-3000:]}\n{done.stderr[-2000:]}"
        return done.stdout

    def resolver_points_at() -> str:
        return env.host.sudo("readlink /var/lib/exaone/lora-resolver/tone-pirate",
                             check=False).stdout.strip()

    entry = env.adapter_entry("tone-pirate", "1", 8, v1)
    fab_ok("adapters.add", "tone-pirate", "1", "--source", entry["source"],
           "--sha256", entry["sha256"])
    first = answers(env, ["tone-pirate"])["tone-pirate"]
    assert first != base
    entry = env.adapter_entry("tone-pirate", "2", 8, v2)
    out = fab_ok("adapters.hotfix", "tone-pirate", "2", "--source", entry["source"],
                 "--sha256", entry["sha256"])
    assert "settled" in out and "not settled" not in out  # nothing else asks for it here
    assert resolver_points_at() == ".entries/tone-pirate/2"
    second = answers(env, ["tone-pirate"])["tone-pirate"]
    assert second not in (first, base)
    fab_ok("adapters.rollback", "--name", "tone-pirate")
    assert answers(env, ["tone-pirate"])["tone-pirate"] == first
    assert resolver_points_at() == ".entries/tone-pirate/1"
    # A client with the key, through the API port, can neither unload the adapter nor load
    # other weights under its name; the fab tasks above did both on the host's loopback.
    for route, body in (("unload_lora_adapter", {"lora_name": "tone-pirate"}),
                        ("load_lora_adapter", {"lora_name": "tone-pirate", "load_inplace": True,
                                               "lora_path": "/var/lib/exaone/adapters/"
                                                            "tone-formal/1"})):
        refused = admin_through_the_api_port(env, route, body)
        assert refused.status_code == 403, (route, refused.text)
        assert "adapter administration is not served" in refused.text
    assert answers(env, ["tone-pirate"])["tone-pirate"] == first
    # vLLM, as the service user inside the unit's sandbox, reads the resolver entry: a name
    # unloaded behind the tools' back (on loopback, as only a host user can) is loaded from it
    # on the next request.
    with loopback(env) as c:
        c.unload("tone-pirate")
    assert answers(env, ["tone-pirate"])["tone-pirate"] == first
    assert "nothing was loaded in place" in fab_ok("adapters.settle")
    fab_ok("adapters.remove", "--name", "tone-pirate")
    with client(env) as c:
        assert "tone-pirate" not in c.adapters()
    assert resolver_points_at() == ""
    # A wrong digest is refused on the host before anything is loaded.
    done = env.fab("adapters.add", "tone-pirate", "3", "--source", entry["source"],
                   "--sha256", "f" * 64, stack=stack)
    assert done.returncode == 1 and "sha256" in done.stdout + done.stderr


def test_status_then_teardown(env: DeployEnv) -> None:
    stack = env.work / "Pulumi.cpuhost.yaml"  # the good stack, as the cut test left it
    done = env.fab("status", stack=stack)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "active" in done.stdout and "tone-formal" in done.stdout
    done = env.fab("teardown", stack=stack)
    assert done.returncode == 0, done.stdout + done.stderr
    assert unit_state(env)["ActiveState"] == "inactive"
    assert env.host.ssh(f"systemctl is-enabled {UNIT}", check=False).stdout.strip() == "disabled"
    done = env.fab("teardown", "--purge", stack=stack)
    assert done.returncode == 0, done.stdout + done.stderr
    assert env.host.ssh("test -e /opt/exaone || test -e /var/lib/exaone", check=False
                        ).returncode != 0
