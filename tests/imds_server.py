"""A local server that answers as Azure's instance metadata service (IMDS) answers a managed
identity's token request (its documented JSON), for the metrics token refresher's tests: on
loopback at a free port, or on IMDS's own address and port where a test put that address on
an interface."""

from __future__ import annotations

import contextlib
import json
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from local_server import free_port

from serving.render import metrics_unit

CLIENT_ID = "7d9b1c1e-4a1f-4e55-9d6a-2f3b8e0c1a22"
IMDS_PATH = "/metadata/identity/oauth2/token"


@dataclass
class Imds:
    """Answers the token endpoint as IMDS does; ``answer`` decides (status, body)."""

    url: str
    token: str = "eyJ0eXAiOiJKV1QifQ.first.c2lnbmF0dXJl"
    answer: Callable[[Imds], tuple[int, str]] | None = None
    asked: list[dict[str, Any]] = field(default_factory=list)

    def documented(self) -> tuple[int, str]:
        now = int(time.time())
        return 200, json.dumps({
            "access_token": self.token, "client_id": CLIENT_ID, "expires_in": "86399",
            "expires_on": str(now + 86399), "ext_expires_in": "86399",
            "not_before": str(now), "resource": metrics_unit.AUDIENCE, "token_type": "Bearer"})


@contextlib.contextmanager
def serve_imds(address: str = "127.0.0.1", port: int = 0) -> Iterator[Imds]:
    port = port or free_port()
    imds = Imds(url=f"http://{address}:{port}{IMDS_PATH}?api-version=2018-02-01")
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            imds.asked.append({"path": url.path, "query": urllib.parse.parse_qs(url.query),
                               "metadata": self.headers.get("Metadata")})
            if self.headers.get("Metadata") != "true":
                status, body = 400, json.dumps({"error": "bad_request",
                                                "error_description": "Required metadata header "
                                                "not specified"})
            else:
                status, body = (imds.answer or Imds.documented)(imds)
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer((address, port), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield imds
    finally:
        server.shutdown()
        server.server_close()
