"""Talking to one host over SSH: commands, sudo, uploads, JSON from host-side tools.

Privileged work goes through ``sudo -n`` as the non-root admin user, as on Azure (root login
is off there). The first contact with a host is one attempt within the connect timeout: a
refused connection, an unknown name or a refused key is final at once, with what to check.
Only after the project itself rebooted a host (``await_reboot``) is connecting retried with
back-off until a deadline: a VM that reboots after the driver install refuses or drops SSH
for a minute or two.
"""

from __future__ import annotations

import io
import json
import math
import shlex
import socket
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import paramiko
from fabric import Connection
from invoke.exceptions import CommandTimedOut, UnexpectedExit

CONNECT_TIMEOUT_SECONDS = 15.0
RECONNECT_TIMEOUT_SECONDS = 600
RECONNECT_FIRST_WAIT_SECONDS = 2.0
RECONNECT_MAX_WAIT_SECONDS = 20.0
COMMAND_TIMEOUT_SECONDS = 1800
# Long remote changes hold this lock: a run whose SSH session was cut may leave its command
# running on the host (no pty, so no SIGHUP); the next run waits for it instead of racing it.
LOCK_FILE = "/run/lock/exaone-deploy.lock"

_CONNECT_ERRORS = (
    paramiko.ssh_exception.NoValidConnectionsError,
    paramiko.ssh_exception.SSHException,
    socket.timeout,
    ConnectionError,
    EOFError,
    OSError,
)


class _WholeStream(io.StringIO):
    """stdin for a remote command, handed over in one piece.

    invoke reads a non-terminal ``in_stream`` one character per 10 ms loop turn
    (``bytes_to_read`` is 1 without a tty): a 3 kB script would take 30 s to arrive.
    """

    def read(self, size: int | None = -1) -> str:
        return super().read()


class RemoteError(Exception):
    """A remote command failed; carries its exit code and output tail."""

    def __init__(self, command: str, code: int, stdout: str, stderr: str):
        self.command, self.code, self.stdout, self.stderr = command, code, stdout, stderr
        tail = (stderr.strip() or stdout.strip()).splitlines()[-12:]
        super().__init__(f"`{_short(command)}` exited {code}" + ("\n  " + "\n  ".join(tail)
                                                                 if tail else ""))


def _short(command: str, limit: int = 160) -> str:
    return command if len(command) <= limit else command[: limit - 3] + "..."


def parse_host(text: str, *, default_user: str, default_port: int = 22) -> tuple[str, str, int]:
    """``[user@]host[:port]`` -> (user, host, port); a bare IPv6 address needs [brackets]."""
    user, _, rest = text.rpartition("@")
    user = user or default_user
    port = default_port
    if rest.startswith("["):
        host, closed, tail = rest[1:].partition("]")
        if not closed or (tail and not tail.startswith(":")):
            raise ValueError(f"{text!r}: an IPv6 address is written [address]:port")
        if tail:
            port = int(tail[1:])
    elif rest.count(":") == 1:
        host, _, p = rest.partition(":")
        port = int(p)
    else:
        host = rest
    if not host:
        raise ValueError(f"{text!r} has no host name")
    return user, host, port


def connect_failure(exc: BaseException, *, where: str, timeout_s: float) -> str:
    """Why a connection attempt failed, in words that say what to check."""
    if isinstance(exc, socket.gaierror):
        return f"the name of {where} is not known ({exc.strerror}); check the address in --hosts"
    if isinstance(exc, paramiko.ssh_exception.NoValidConnectionsError):
        causes = list(getattr(exc, "errors", {}).values())
        if causes and not all(isinstance(c, ConnectionRefusedError) for c in causes):
            why = "; ".join(sorted({getattr(c, "strerror", None) or str(c) for c in causes}))
            return f"cannot reach {where}: {why}; check the address and the network path"
        return (f"connection refused at {where}: nothing listens there (is the VM running, "
                "sshd up, the port right?)")
    if isinstance(exc, ConnectionRefusedError):
        return f"connection refused at {where}: nothing listens there"
    if isinstance(exc, socket.timeout | TimeoutError):
        return (f"no answer from {where} within {timeout_s:g} s (--connect-timeout); check the "
                "address and that sshCidrs admits this machine")
    if isinstance(exc, paramiko.ssh_exception.AuthenticationException):
        return (f"{where} refused the key: check sshPrivateKeyPath is the private key of "
                "sshPublicKey, and the user")
    return f"cannot connect to {where}: {type(exc).__name__}: {exc}"


class Host:
    """One host: a Fabric connection plus the conventions every step relies on."""

    def __init__(self, conn: Connection, *, name: str | None = None,
                 reconnect_timeout_s: float = RECONNECT_TIMEOUT_SECONDS,
                 connect_timeout_s: float = CONNECT_TIMEOUT_SECONDS,
                 say: Callable[[str], None] | None = None):
        self.conn = conn
        self.name = name or getattr(conn, "original_host", "host")
        self.reconnect_timeout_s = reconnect_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.say = say or (lambda _m: None)
        self._contacted = False  # a first attempt was made (successful or not)
        self._rebooting = False  # set by await_reboot: retry with back-off

    @classmethod
    def connect(cls, text: str, *, user: str, key_file: str | None, name: str | None = None,
                connect_timeout_s: float = CONNECT_TIMEOUT_SECONDS,
                say: Callable[[str], None] | None = None) -> Host:
        user, host, port = parse_host(text, default_user=user)
        # connect_timeout: the TCP connect (Fabric takes whole seconds); banner/auth: an sshd
        # that accepts and then stalls.
        kwargs: dict[str, Any] = {"banner_timeout": connect_timeout_s,
                                  "auth_timeout": connect_timeout_s}
        if key_file:
            kwargs["key_filename"] = str(Path(key_file).expanduser())
        conn = Connection(host, user=user, port=port, connect_kwargs=kwargs,
                          connect_timeout=max(1, math.ceil(connect_timeout_s)))
        return cls(conn, name=name or text, connect_timeout_s=connect_timeout_s, say=say)

    @property
    def address(self) -> str:
        host, port = getattr(self.conn, "host", self.name), getattr(self.conn, "port", 22)
        user = getattr(self.conn, "user", "")
        return f"{user}@{host}:{port}" if user else f"{host}:{port}"

    # -- commands ------------------------------------------------------------------------
    def ensure_connected(self) -> None:
        """Open the SSH connection: one attempt, final on failure, unless the project rebooted
        the host (``await_reboot``): then retry with back-off until the reconnect deadline."""
        # getattr: invoke's MockContext (unit tests) has no connection to open.
        if getattr(self.conn, "is_connected", True) is not False:
            return
        if not self._rebooting:
            if not self._contacted:
                self.say(f"connecting to {self.address} (up to {self.connect_timeout_s:g} s)")
            self._contacted = True
            try:
                self.conn.open()
                return
            except _CONNECT_ERRORS as exc:
                self.close()
                raise RemoteError(f"ssh {self.name}", 255, "", connect_failure(
                    exc, where=self.address, timeout_s=self.connect_timeout_s)) from None
        started = time.monotonic()
        deadline = started + self.reconnect_timeout_s
        wait = RECONNECT_FIRST_WAIT_SECONDS
        attempt = 0
        while True:
            attempt += 1
            try:
                self.conn.open()
                self._rebooting = False
                self.say(f"back after the reboot ({time.monotonic() - started:.0f} s)")
                return
            except _CONNECT_ERRORS as exc:
                self.close()
                why = connect_failure(exc, where=self.address, timeout_s=self.connect_timeout_s)
                if time.monotonic() + wait > deadline:
                    self._rebooting = False
                    raise RemoteError(f"ssh {self.name}", 255, "", (
                        f"not back within {self.reconnect_timeout_s:.0f} s of the reboot: "
                        f"{why}")) from None
                self.say(f"waiting for {self.address} to come back after the reboot: attempt "
                         f"{attempt}, {time.monotonic() - started:.0f} of "
                         f"{self.reconnect_timeout_s:.0f} s ({why.split(':')[0]})")
                time.sleep(wait)
                wait = min(wait * 2, RECONNECT_MAX_WAIT_SECONDS)

    def await_reboot(self, timeout_s: float) -> None:
        """The project rebooted this host: reconnect with back-off within ``timeout_s``."""
        old = self.reconnect_timeout_s
        self.reconnect_timeout_s, self._rebooting = timeout_s, True
        try:
            self.ensure_connected()
        finally:
            self.reconnect_timeout_s, self._rebooting = old, False

    def run(self, command: str, *, sudo: bool = False, check: bool = True,
            env: Mapping[str, str] | None = None, stdin: str | None = None,
            lock: bool = False, timeout_s: float = COMMAND_TIMEOUT_SECONDS,
            stream: bool = False) -> tuple[int, str, str]:
        """Run ``command`` (a shell line) and return (exit code, stdout, stderr).

        ``env`` is passed through ``env`` on the host side (sudo drops the caller's
        environment); ``stdin`` carries secrets so they never appear in argv or logs.
        """
        line = command
        if env:
            line = "env " + " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " " + line
        if lock:
            line = f"flock -w {int(timeout_s)} {LOCK_FILE} {line}"
        if sudo:
            line = f"sudo -n {line}"
        self.ensure_connected()
        try:
            result = self.conn.run(
                line, hide=not stream, warn=True, pty=False, timeout=timeout_s,
                in_stream=_WholeStream(stdin) if stdin is not None else False,
            )
        except CommandTimedOut as exc:
            raise RemoteError(command, 124, "", f"timed out after {exc.timeout} s") from None
        except UnexpectedExit as exc:  # only with warn=False; kept for safety
            result = exc.result
        except _CONNECT_ERRORS as exc:
            self.close()
            raise RemoteError(command, 255, "", f"SSH connection lost: {exc}") from None
        if check and result.exited != 0:
            raise RemoteError(command, result.exited, result.stdout, result.stderr)
        return result.exited, result.stdout, result.stderr

    def sudo(self, command: str, **kwargs: Any) -> tuple[int, str, str]:
        return self.run(command, sudo=True, **kwargs)

    def script(self, path: Path, *args: str, sudo: bool = True,
               **kwargs: Any) -> tuple[int, str, str]:
        """Run one of the project's shell scripts, fed over stdin (nothing left on the host)."""
        if "stdin" in kwargs:
            raise ValueError("a script reads its own text from stdin; pass secrets another way")
        argv = " ".join(shlex.quote(a) for a in args)
        return self.run(f"bash -s -- {argv}", sudo=sudo, stdin=path.read_text(), **kwargs)

    def json(self, command: str, **kwargs: Any) -> Any:
        """Run a host-side tool that prints one JSON document on its last stdout line."""
        code, out, err = self.run(command, check=False, **kwargs)
        lines = [line for line in out.splitlines() if line.strip()]
        try:
            document = json.loads(lines[-1]) if lines else None
        except json.JSONDecodeError:
            document = None
        if code != 0 or document is None:
            if isinstance(document, dict) and document.get("error"):
                raise RemoteError(command, code, "", str(document["error"]))
            raise RemoteError(command, code, out, err)
        return document

    def put_bytes(self, data: bytes, remote_path: str) -> None:
        """Upload to a path the admin user can write (its home or /tmp)."""
        self.ensure_connected()
        self.conn.put(io.BytesIO(data), remote=remote_path)

    def close(self) -> None:
        close = getattr(self.conn, "close", None)
        if close is not None:
            close()
