"""Azure's answers replayed under the SDKs' own HTTP layer.

The management and Blob clients run unchanged with azure-core's ``RequestsTransport``; only the
``requests`` session underneath gets an adapter that answers from a fixture file (responses in
the REST API reference's shapes: ARM JSON, Blob XML) instead of opening sockets. A host the
fixture does not know fails like an unresolvable name (a storage account not created yet); a
path it does not know fails the test, so every request preflight makes is accounted for.
"""

from __future__ import annotations

import base64
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import requests
from azure.core.credentials import AccessToken
from azure.core.pipeline.transport import RequestsTransport
from requests.adapters import BaseAdapter
from requests.structures import CaseInsensitiveDict
from urllib3.response import HTTPResponse

from serving.cloud.azure import Azure

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "azure"
DEPLOYER_OID = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"


@dataclass
class ReplayAdapter(BaseAdapter):
    responses: list[dict[str, Any]]
    seen: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__()

    def _match(self, method: str, host: str, path: str, query: dict[str, list[str]]
               ) -> dict[str, Any] | None:
        for entry in self.responses:
            if (entry["method"], entry["host"]) != (method, host):
                continue
            if entry["path"].lower() != path.lower():
                continue
            if all(query.get(k, [None])[0] == v for k, v in (entry.get("query") or {}).items()):
                return entry
        return None

    def send(self, request: requests.PreparedRequest, stream: bool = False, timeout: Any = None,
             verify: Any = True, cert: Any = None, proxies: Any = None) -> requests.Response:
        url = urlsplit(str(request.url))
        method = str(request.method)
        self.seen.append(f"{method} {url.netloc}{url.path}")
        if not any(e["host"] == url.netloc for e in self.responses):
            raise requests.exceptions.ConnectionError(
                f"Failed to resolve '{url.netloc}' ([Errno -2] Name or service not known)")
        entry = self._match(method, url.netloc, url.path, parse_qs(url.query))
        if entry is None:
            raise AssertionError(f"no recorded response for {method} {request.url}")
        if "json" in entry:
            body, kind = json.dumps(entry["json"]).encode(), "application/json; charset=utf-8"
        else:
            body, kind = entry.get("xml", "").encode(), "application/xml"
        response = requests.Response()
        response.status_code = int(entry["status"])
        response.headers = CaseInsensitiveDict({
            "Content-Type": kind, "Content-Length": str(len(body)),
            "x-ms-request-id": "00000000-0000-0000-0000-000000000000",
            **(entry.get("headers") or {})})
        response.raw = HTTPResponse(body=io.BytesIO(body), headers=dict(response.headers),
                                    status=response.status_code, preload_content=False)
        response._content = body
        response._content_consumed = True
        response.url = str(request.url)
        response.request = request
        response.reason = "OK" if response.status_code < 400 else "Error"
        return response

    def close(self) -> None:
        pass


class StaticToken:
    """A token credential for the replay: a JWT whose ``oid`` is the deployer's."""

    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        def part(obj: dict[str, Any]) -> str:
            return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")

        claims = {"oid": DEPLOYER_OID, "aud": "https://management.azure.com"}
        return AccessToken(f"{part({'alg': 'none'})}.{part(claims)}.sig", int(time.time()) + 3600)


def replay(name: str) -> tuple[Azure, ReplayAdapter]:
    fixture = json.loads((FIXTURES / f"{name}.json").read_text())
    adapter = ReplayAdapter(fixture["responses"])
    session = requests.Session()
    session.mount("https://", adapter)
    transport = RequestsTransport(session=session, session_owner=False)
    return Azure(StaticToken(), fixture["subscription"], transport), adapter
