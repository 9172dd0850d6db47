"""Talking to one host over SSH: commands, sudo, uploads, JSON from host-side tools.

Privileged work goes through ``sudo -n`` as the non-root admin user, as on Azure (root login
is off there). Connecting is retried with back-off until a deadline: a VM that reboots after
the driver install refuses or drops SSH for a minute or two.
"""

from __future__ import annotations

import io
import json
import shlex
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import paramiko
from fabric import Connection
from invoke.exceptions import CommandTimedOut, UnexpectedExit

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


class Host:
    """One host: a Fabric connection plus the conventions every step relies on."""

    def __init__(self, conn: Connection, *, name: str | None = None,
                 reconnect_timeout_s: float = RECONNECT_TIMEOUT_SECONDS):
        self.conn = conn
        self.name = name or getattr(conn, "original_host", "host")
        self.reconnect_timeout_s = reconnect_timeout_s

    @classmethod
    def connect(cls, text: str, *, user: str, key_file: str | None, name: str | None = None,
                connect_timeout_s: float = 15) -> Host:
        user, host, port = parse_host(text, default_user=user)
        kwargs: dict[str, Any] = {"timeout": connect_timeout_s}
        if key_file:
            kwargs["key_filename"] = str(Path(key_file).expanduser())
        conn = Connection(host, user=user, port=port, connect_kwargs=kwargs)
        return cls(conn, name=name or text)

    # -- commands ------------------------------------------------------------------------
    def ensure_connected(self) -> None:
        """Open the SSH connection, retrying with back-off until the reconnect deadline."""
        deadline = time.monotonic() + self.reconnect_timeout_s
        wait = RECONNECT_FIRST_WAIT_SECONDS
        while True:
            try:
                # getattr: invoke's MockContext (unit tests) has no connection to open.
                if getattr(self.conn, "is_connected", True) is False:
                    self.conn.open()
                return
            except _CONNECT_ERRORS as exc:
                self.close()
                if time.monotonic() + wait > deadline:
                    raise RemoteError(f"ssh {self.name}", 255, "", (
                        f"cannot connect within {self.reconnect_timeout_s:.0f} s: {exc}; check "
                        "the address, sshCidrs and the key (sshPrivateKeyPath)")) from None
                time.sleep(wait)
                wait = min(wait * 2, RECONNECT_MAX_WAIT_SECONDS)

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
