"""Tier 3: the metrics agent's rendered units on a host booted with systemd (nspawn), the
files the `metrics` step of `fab deploy` writes: the token refresher and the agent share one
dynamic user, so the agent reads the token the refresher wrote (a folder only that user may
enter), sends it as its bearer token, and sends a refreshed one without a restart.

The distribution's prometheus (Debian's, installed in the host with apt) runs the rendered
agent unit unchanged; the refresher unit asks 169.254.169.254 (an address this test puts on
the loopback interface, which the host shares, for a server that answers as the instance
metadata service does) and the agent writes to a local receiver that records the
Authorization header. Needs root, systemd-nspawn and the Debian mirror.
"""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest
from imds_server import serve_imds
from local_server import free_port
from provisioning_helpers import settings_for, spec_with, target
from testhost import TestHost, boot, build_rootfs, make_keypair

from provisioning.settings import MetricsAccess
from provisioning.steps import metrics
from serving.render import metrics_unit as mu

pytestmark = pytest.mark.integration

ARRIVAL_TIMEOUT_SECONDS = 90  # the agent replays its write-ahead log before its first send


class _Receiver(BaseHTTPRequestHandler):
    seen: ClassVar[list[str]] = []

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        _Receiver.seen.append(self.headers.get("Authorization", ""))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def _serving(address: str, port: int, handler: type[BaseHTTPRequestHandler]) -> Iterator[None]:
    server = ThreadingHTTPServer((address, port), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def _imds_address() -> Iterator[None]:
    address = f"{mu.IMDS_ADDRESS}/32"
    added = subprocess.run(["ip", "addr", "add", address, "dev", "lo"],
                           capture_output=True).returncode == 0
    try:
        yield
    finally:
        if added:
            subprocess.run(["ip", "addr", "del", address, "dev", "lo"], check=False)


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestHost]:
    work = tmp_path_factory.mktemp("metrics-host")
    key_file, pubkey = make_keypair(work / "ssh")
    booted = boot(build_rootfs(), work / "hosts", "metricshost", pubkey=pubkey,
                  key_file=key_file)
    try:
        yield booted
    finally:
        booted.stop(remove_root=True)


def _wait_for(predicate: Callable[[], bool], timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.5)
    return False


def test_agent_reads_the_refreshers_token_and_follows_a_refresh(host: TestHost) -> None:
    spec = spec_with(vmCount=2)
    receiver = free_port()
    host.sudo("DEBIAN_FRONTEND=noninteractive apt-get install -y -q prometheus >/dev/null && "
              f"systemctl disable --now {' '.join(mu.DISTRIBUTION_UNITS)}", timeout=600)
    access = MetricsAccess(ingestion_url=f"http://127.0.0.1:{receiver}/write",
                           client_id="client-1")
    t = target(spec=spec, settings=settings_for(spec, metrics=access))[0]
    for path, (text, mode) in metrics.files(t, "h1").items():  # what the step writes
        host.write_file(path, text, mode=f"0{mode}")
    _Receiver.seen = []
    with _imds_address(), serve_imds(mu.IMDS_ADDRESS, 80) as imds, \
            _serving("127.0.0.1", receiver, _Receiver):
        imds.token = "tok-first"
        host.sudo(f"systemctl daemon-reload && systemctl enable --now {mu.TOKEN_TIMER_NAME} "
                  f"&& systemctl start {mu.UNIT_NAME}")
        # The agent's unit pulled the refresher in first; both ran as one dynamic user.
        owners = host.sudo(f"stat -c %u /var/lib/private/{mu.TOKEN_DIRECTORY}/token; "
                           f"ps -o uid= -p $(systemctl show -p MainPID --value {mu.UNIT_NAME})"
                           ).stdout.split()
        assert len(owners) == 2 and owners[0] == owners[1] and owners[0] != "0", owners
        assert _wait_for(lambda: "Bearer tok-first" in _Receiver.seen,
                         ARRIVAL_TIMEOUT_SECONDS), (_Receiver.seen[-3:], host.sudo(
                             f"journalctl -u {mu.UNIT_NAME} --no-pager | tail -20",
                             check=False).stdout)
        pid = host.sudo(f"systemctl show -p MainPID --value {mu.UNIT_NAME}").stdout.strip()
        imds.token = "tok-second"
        host.sudo(f"systemctl start {mu.TOKEN_UNIT_NAME}")
        _Receiver.seen = []
        assert _wait_for(lambda: "Bearer tok-second" in _Receiver.seen,
                         ARRIVAL_TIMEOUT_SECONDS), _Receiver.seen[-3:]
        assert host.sudo(f"systemctl show -p MainPID --value {mu.UNIT_NAME}"
                         ).stdout.strip() == pid, "the agent was restarted"
        journal = host.sudo(f"journalctl -u {mu.UNIT_NAME} -u {mu.TOKEN_UNIT_NAME} "
                            "--no-pager", check=False).stdout
        assert "tok-first" not in journal and "tok-second" not in journal
