"""The pod's preStop wait (k8s.drain) run as the pod runs it: python3 with the script and argv
from the Deployment, against a stand-in for vLLM's /metrics whose running and waiting counts
the test moves."""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from k8s import drain
from serving.render import monitoring
from serving.stack import stackfile

LABELS = '{engine="0",model_name="exaone"}'


BUSY = {"running": 1, "waiting": 1}


class _Metrics(http.server.BaseHTTPRequestHandler):

    def do_GET(self) -> None:
        body = (f"# HELP {monitoring.REQUESTS_RUNNING} Running.\n"
                f"{monitoring.REQUESTS_RUNNING}{LABELS} {BUSY['running']}.0\n"
                f"{monitoring.REQUESTS_WAITING}{LABELS} {BUSY['waiting']}.0\n"
                f"{monitoring.KV_CACHE_USAGE}{LABELS} 0.5\n").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def metrics() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Metrics)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def _argv(port: int, mark: Path, limit: float) -> list[str]:
    command = drain.vllm_pre_stop(stackfile.load("prod"))["exec"]["command"]
    python, flag, script, url, _settle, _limit, _poll, _mark = command
    assert (python, flag) == ("python3", "-c") and _mark == drain.IDLE_MARK
    url = url.replace(url.split("/")[2], f"127.0.0.1:{port}")
    return [sys.executable, flag, script, url, "0", str(limit), "0.05", str(mark)]


def test_waits_for_running_and_waiting_requests_then_marks_idle(metrics: int,
                                                                 tmp_path: Path) -> None:
    mark = tmp_path / "idle"
    BUSY.update(running=1, waiting=1)
    process = subprocess.Popen(_argv(metrics, mark, limit=60))
    time.sleep(0.5)
    assert process.poll() is None and not mark.exists(), "returned while requests ran"
    BUSY.update(waiting=0)
    time.sleep(0.5)
    assert process.poll() is None, "returned while a request was still running"
    BUSY.update(running=0)
    assert process.wait(timeout=30) == 0
    assert mark.exists()


def test_gives_up_at_its_limit_and_still_marks(metrics: int, tmp_path: Path) -> None:
    mark = tmp_path / "idle"
    BUSY.update(running=3, waiting=0)
    assert subprocess.run(_argv(metrics, mark, limit=0.5), timeout=30).returncode == 0
    assert mark.exists()

