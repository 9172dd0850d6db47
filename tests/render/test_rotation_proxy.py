"""Tier 2: the API proxy's out-of-rotation switch, through Debian's nginx itself.

While the rotation file exists the probe path answers 503 (the load balancer takes the host
out) and every inference route still reaches vLLM (requests already routed here finish); when
it is gone the probe passes again. The upstream is a stand-in that answers every path 200.
"""

from __future__ import annotations

import http.server
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from proxy_server import serve_proxy

from serving.stack import stackfile
from serving.stack.balancer import PROBE_PATHS

pytestmark = pytest.mark.tools


class _Upstream(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b'{"ok": true}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def upstream() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_the_rotation_file_fails_only_the_probe(upstream: int, tmp_path: Path) -> None:
    spec = stackfile.load("dev")
    # nginx's workers test the file as its unprivileged user (nobody when started as root
    # here, www-data on a VM): the folder must be searchable by everyone, as the rollout makes
    # /run/exaone-rotation. pytest's own tmp_path is not (0700).
    folder = Path(tempfile.mkdtemp(prefix="rotation-"))
    folder.chmod(0o755)
    flag = folder / "out"
    try:
        _check(spec, flag, upstream, tmp_path)
    finally:
        shutil.rmtree(folder)


def _check(spec, flag: Path, upstream: int, tmp_path: Path) -> None:
    with serve_proxy(spec, tmp_path / "nginx", upstream_port=upstream,
                     rotation_file=str(flag)) as base, httpx.Client(base_url=base) as client:
        for path in PROBE_PATHS:
            assert client.get(path).status_code == 200
        flag.write_text("")
        for path in PROBE_PATHS:
            answer = client.get(path)
            assert answer.status_code == 503, answer.text
            assert "out of rotation" in answer.json()["error"]["message"]
        # Inference still passes: what the balancer routed here before it noticed finishes.
        assert client.get("/v1/models").status_code == 200
        flag.unlink()
        for path in PROBE_PATHS:
            assert client.get(path).status_code == 200
