"""Tier 3: the test-host and Azurite fixtures themselves, before rollouts are tested on them.

One container booted for the module (the cached rootfs is built once, about 3 min), one
Azurite for the module.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from azurite import Azurite, start_azurite
from testhost import PIP_BINDS, TestHost, boot, build_rootfs, host_pip_conf, make_keypair

pytestmark = pytest.mark.integration

RESTART_TIMEOUT_SECONDS = 15

PROBE_UNIT = """\
[Unit]
Description=test-host probe: a hardened service restarted after a crash

[Service]
ExecStart=/usr/bin/python3 -c "import time; print('probe up', flush=True); time.sleep(3600)"
DynamicUser=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateUsers=yes
PrivateDevices=yes
NoNewPrivileges=yes
CapabilityBoundingSet=
SystemCallFilter=@system-service
SystemCallArchitectures=native
RestrictNamespaces=yes
IPAddressDeny=any
IPAddressAllow=localhost
DevicePolicy=closed
Restart=on-failure
RestartSec=200ms
"""


@pytest.fixture(scope="session")
def rootfs() -> Path:
    return build_rootfs()


@pytest.fixture(scope="module")
def host(rootfs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestHost]:
    workdir = tmp_path_factory.mktemp("testhost")
    key_file, pubkey = make_keypair(workdir / "keys")
    started = boot(rootfs, workdir, "exaone-vm1", pubkey=pubkey, key_file=key_file,
                   binds=PIP_BINDS, pip_conf=host_pip_conf())
    try:
        yield started
    finally:
        started.stop(remove_root=True)


@pytest.fixture(scope="module")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Azurite]:
    with start_azurite(tmp_path_factory.mktemp("azurite")) as running:
        yield running


def test_ssh_key_login_as_non_root_admin(host: TestHost) -> None:
    assert host.host_string == f"azureuser@127.0.0.1:{host.port}"
    done = host.ssh("id -un; id -u; hostname")
    user, uid, hostname = done.stdout.split()
    assert (user, hostname) == ("azureuser", "exaone-vm1")
    assert uid != "0"


def test_passwordless_sudo(host: TestHost) -> None:
    assert host.ssh("sudo -n true", check=False).returncode == 0
    assert host.sudo("id -u").stdout.strip() == "0"


def test_password_login_is_off(host: TestHost) -> None:
    config = host.sudo("sshd -T").stdout.lower().splitlines()
    assert "passwordauthentication no" in config
    assert f"listenaddress 127.0.0.1:{host.port}" in config


def test_pid1_is_systemd(host: TestHost) -> None:
    assert host.ssh("ps -p 1 -o comm=").stdout.strip() == "systemd"
    assert host.sudo("readlink /proc/1/exe").stdout.strip().endswith("/systemd")
    state = host.ssh("systemctl is-system-running --wait", check=False, timeout=60).stdout
    assert state.strip() in {"running", "degraded"}


def test_hardened_unit_is_restarted_after_sigkill(host: TestHost) -> None:
    host.write_file("/etc/systemd/system/probe.service", PROBE_UNIT)
    host.sudo("systemctl daemon-reload && systemctl start probe.service")
    first = _main_pid(host, "probe.service")
    assert first > 0
    host.sudo(f"kill -KILL {first}")
    deadline = time.monotonic() + RESTART_TIMEOUT_SECONDS
    while _main_pid(host, "probe.service") in {0, first}:
        assert time.monotonic() < deadline, host.sudo("systemctl status probe.service",
                                                      check=False).stdout
        time.sleep(0.2)
    assert int(host.ssh("systemctl show -P NRestarts probe.service").stdout) >= 1
    host.sudo("systemctl stop probe.service")


def test_ip_firewall_is_enforced(host: TestHost) -> None:
    # Connect to the container's own sshd on 127.0.0.1: allowed, then denied by IPAddressDeny.
    probe = (f"python3 -c \"import socket; socket.create_connection(('127.0.0.1', {host.port}),"
             " 1); print('connected')\"")
    assert "connected" in host.sudo(f"systemd-run --quiet --wait --pipe {probe}").stdout
    denied = host.sudo(f"systemd-run --quiet --wait --pipe -p IPAddressDeny=any {probe}",
                       check=False)
    assert denied.returncode != 0
    assert "connected" not in denied.stdout


def test_pip_in_a_venv_uses_the_bound_package_index(host: TestHost) -> None:
    # six is in /opt/pypi on these machines; pointing index-url there keeps this off the network.
    if not Path("/opt/pypi/simple/six").is_dir():
        pytest.skip("no local package index with six on this machine")
    assert host.ssh("touch /opt/pypi/x", check=False).returncode != 0
    done = host.ssh("python3 -m venv /tmp/v && PIP_INDEX_URL=file:///opt/pypi/simple "
                    "/tmp/v/bin/pip download -q --no-deps -d /tmp/dl six && ls /tmp/dl",
                    timeout=120)
    assert done.stdout.strip().startswith("six-")


def test_blob_round_trip_with_md5(azurite: Azurite, tmp_path: Path) -> None:
    folder = tmp_path / "adapter"
    (folder / "nested").mkdir(parents=True)
    files = {"adapter_config.json": b'{"r": 8}', "nested/weights.bin": bytes(range(256)) * 64}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    names = azurite.upload_folder("adapters", "sql-v1", folder)
    assert sorted(names) == sorted(f"sql-v1/{name}" for name in files)
    box = azurite.client().get_container_client("adapters")
    listed = {b.name: b for b in box.list_blobs(name_starts_with="sql-v1/")}
    assert sorted(listed) == sorted(names)
    for name, data in files.items():
        blob = listed[f"sql-v1/{name}"]
        assert bytes(blob.content_settings.content_md5) == hashlib.md5(data).digest()
        assert box.download_blob(blob.name).readall() == data
    assert azurite.delete_prefix("adapters", "sql-v1") == len(files)
    assert not list(box.list_blobs(name_starts_with="sql-v1/"))


def _main_pid(host: TestHost, unit: str) -> int:
    return int(host.ssh(f"systemctl show -P MainPID {unit}").stdout.strip() or 0)
