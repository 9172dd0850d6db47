"""A real nginx (Debian's package) with the project's rendered proxy configuration, in front
of a vLLM server started by the tests.

The configuration is ``serving.render.proxy.render_config`` for the spec; only where nginx
keeps its files (a temp folder) and the two ports (free ones) differ from a VM's.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from checkers import find_tool
from local_server import free_port

from serving.render import proxy
from serving.stack.spec import Spec

START_TIMEOUT_SECONDS = 15
STOP_TIMEOUT_SECONDS = 15


def _accepts(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@contextmanager
def serve_proxy(spec: Spec, folder: Path, *, upstream_port: int,
                rotation_file: str = "") -> Iterator[str]:
    """Start nginx on a free loopback port in front of 127.0.0.1:``upstream_port``; yields
    its base URL. ``rotation_file``: the file that takes it out of rotation, as on a VM."""
    nginx = find_tool("nginx", Path("/usr/sbin"))
    folder.mkdir(parents=True, exist_ok=True)
    place = proxy.ProxyPlace(run_dir=str(folder), access_log=str(folder / "access.log"),
                             listen="127.0.0.1", rotation_file=rotation_file)
    port = free_port()
    config = folder / "nginx.conf"
    config.write_text(proxy.render_config(spec, place, port=port, upstream_port=upstream_port))
    log = (folder / "nginx.stderr").open("wb")
    process = subprocess.Popen([nginx, "-c", str(config)], stdin=subprocess.DEVNULL,
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while not _accepts(port):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("nginx did not start:\n"
                                   + (folder / "nginx.stderr").read_text(errors="replace"))
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        # SIGQUIT: nginx's graceful stop, as the unit's KillSignal.
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGQUIT)
        try:
            process.wait(timeout=STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=STOP_TIMEOUT_SECONDS)
        log.close()
