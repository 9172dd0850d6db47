"""The dashboard picture's plotting (``bench/dashboard_png.py``) against a stand-in Prometheus
HTTP API: every panel asks ``query_range`` for each of its queries and lands in one PNG."""

from __future__ import annotations

import importlib.util
import json
import threading
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType

import pytest

from serving.render import monitoring

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "dashboard_png.py"


def _module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("dashboard_png", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def prometheus() -> Iterator[tuple[str, list[str]]]:
    asked: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            query = urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query)
            asked.append(query["query"][0])
            metric = {"instance": "local", "model_name": "exaone-tiny",
                      "running_lora_adapters": "a1"}
            body = json.dumps({"status": "success", "data": {"resultType": "matrix", "result": [
                {"metric": metric, "values": [[100, "1"], [105, "2"]]}]}}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", asked
    finally:
        server.shutdown()


def test_every_panel_query_is_asked_and_drawn(prometheus: tuple[str, list[str]],
                                              tmp_path: Path) -> None:
    base, asked = prometheus
    out = tmp_path / "d.png"
    _module().plot(base, "exaone-vllm-local", 100.0, 105.0, out, "test")
    wanted = [expr for p in monitoring.dashboard_panels(monitoring.selector("exaone-vllm-local"))
              for _, expr in p.queries]
    assert asked == wanted
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_legends_fill_labels_and_mark_missing_ones() -> None:
    legend = _module()._legend
    assert legend("{{instance}} running: {{running_lora_adapters}}",
                  {"instance": "h1"}) == "h1 running: -"
