"""Tier 1: the decisions of `fab deploy` without a host (remote).

Steps are probed through a real ``provisioning.remote.Host`` around invoke's ``MockContext``
(``provisioning_helpers``): the tests see exactly what would go over SSH."""

from __future__ import annotations

from pathlib import Path

import pytest
from invoke import MockContext, Result
from provisioning_helpers import (
    OK,
    as_json,
    rx,
    sent,
)

from provisioning.remote import LOCK_FILE, Host, RemoteError, parse_host

# --- parse_host ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "want"), [
    pytest.param("azureuser@10.0.0.4:2222", ("azureuser", "10.0.0.4", 2222), id="user@host:port"),
    pytest.param("vm1.example.net", ("admin", "vm1.example.net", 22), id="bare-host"),
    pytest.param("ops@vm1", ("ops", "vm1", 22), id="user@host"),
    pytest.param("vm1:2200", ("admin", "vm1", 2200), id="host:port"),
    pytest.param("[2001:db8::5]:2200", ("admin", "2001:db8::5", 2200), id="[v6]:port"),
    pytest.param("ops@[2001:db8::5]", ("ops", "2001:db8::5", 22), id="user@[v6]"),
])
def test_parse_host(text: str, want: tuple[str, str, int]) -> None:
    assert parse_host(text, default_user="admin") == want


@pytest.mark.parametrize("text", [
    pytest.param("admin@", id="no-host"),
    pytest.param(":22", id="port-only"),
    pytest.param("[]:22", id="empty-brackets"),
    pytest.param("vm1:ssh", id="port-not-a-number"),
])
def test_parse_host_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_host(text, default_user="admin")


# --- Host ---------------------------------------------------------------------------------------


def test_host_run_builds_env_lock_and_sudo_and_keeps_stdin_out_of_argv() -> None:
    mc = MockContext(run={rx("echo hi"): Result(stdout="hi\n")})
    host = Host(mc, name="h1")
    code, out, _ = host.run("echo hi", sudo=True, lock=True, env={"A": "x y"}, stdin="s3cret",
                            timeout_s=60)
    assert (code, out) == (0, "hi\n")
    [(line, stdin)] = sent(mc)
    assert line == f"sudo -n flock -w 60 {LOCK_FILE} env A='x y' echo hi"
    assert stdin == "s3cret" and "s3cret" not in line


def test_host_run_raises_remote_error_with_output_tail_unless_check_false() -> None:
    mc = MockContext(run={rx("false"): Result(stdout="", stderr="boom\nreason", exited=3)})
    host = Host(mc, name="h1")
    with pytest.raises(RemoteError, match=r"exited 3\n  boom\n  reason") as err:
        host.run("false")
    assert err.value.code == 3
    assert host.run("false", check=False)[0] == 3


@pytest.mark.parametrize(("result", "match"), [
    pytest.param(as_json({"error": "no such model"}, exited=2), "no such model", id="tool-error"),
    pytest.param(Result(stdout="not json\n", exited=0), "exited 0", id="not-json"),
    pytest.param(as_json({"ok": 1}, exited=1), "exited 1", id="nonzero-exit"),
])
def test_host_json_failures(result: Result, match: str) -> None:
    host = Host(MockContext(run={rx("tool"): result}), name="h1")
    with pytest.raises(RemoteError, match=match):
        host.json("tool")


def test_host_script_feeds_the_script_on_stdin_and_refuses_other_stdin(tmp_path: Path) -> None:
    script = tmp_path / "s.sh"
    script.write_text("echo from-script\n")
    mc = MockContext(run={rx("bash -s"): OK})
    host = Host(mc, name="h1")
    host.script(script, "probe", "a b")
    assert sent(mc) == [("sudo -n bash -s -- probe 'a b'", "echo from-script\n")]
    with pytest.raises(ValueError, match="stdin"):
        host.script(script, "x", stdin="secret")


# --- first contact ------------------------------------------------------------------------------

# Far above any real refusal (milliseconds) and far below the reboot back-off (600 s).
FINAL_WITHIN_SECONDS = 30


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # nothing listens once it is closed


@pytest.mark.parametrize(("address", "why"), [
    pytest.param(lambda: f"ops@127.0.0.1:{_closed_port()}", "connection refused", id="refused"),
    pytest.param(lambda: "ops@no-such-host.invalid:22", "is not known", id="unknown-name"),
])
def test_first_contact_failure_is_final_and_says_why(address, why: str, tmp_path: Path) -> None:
    import time

    heard: list[str] = []
    host = Host.connect(address(), user="ops", key_file=None, say=heard.append,
                        connect_timeout_s=5)
    started = time.monotonic()
    with pytest.raises(RemoteError, match=why) as err:
        host.ensure_connected()
    assert time.monotonic() - started < FINAL_WITHIN_SECONDS
    assert (err.value.code == 255 and "check" in str(err.value)) or "is the VM" in str(err.value)
    assert heard and heard[0].startswith("connecting to ops@")


class _FlakyConnection:
    """Refuses ``refusals`` times, then connects (a host coming back from a reboot)."""

    host, port, user = "10.0.0.4", 22, "ops"

    def __init__(self, refusals: int):
        self.refusals, self.opens, self.is_connected = refusals, 0, False

    def open(self) -> None:
        self.opens += 1
        if self.opens <= self.refusals:
            raise ConnectionRefusedError(111, "Connection refused")
        self.is_connected = True

    def close(self) -> None:
        self.is_connected = False


def test_back_off_only_after_the_project_rebooted_the_host(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from provisioning import remote

    monkeypatch.setattr(remote, "RECONNECT_FIRST_WAIT_SECONDS", 0.01)
    heard: list[str] = []
    first = Host(_FlakyConnection(refusals=2), name="h1", say=heard.append)  # type: ignore[arg-type]
    with pytest.raises(RemoteError, match="connection refused"):
        first.ensure_connected()
    assert first.conn.opens == 1  # first contact: one attempt, final

    rebooted = Host(_FlakyConnection(refusals=2), name="h1", say=heard.append)  # type: ignore[arg-type]
    rebooted.await_reboot(timeout_s=30)
    assert rebooted.conn.opens == 3 and rebooted.conn.is_connected
    waits = [m for m in heard if "to come back after the reboot" in m]
    assert [m.split("attempt ")[1].split(",")[0] for m in waits] == ["1", "2"]
    assert any(m.startswith("back after the reboot") for m in heard)
