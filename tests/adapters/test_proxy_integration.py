"""Tier 3: the API proxy (Debian's nginx, the rendered configuration) in front of a real vLLM
CPU server with runtime LoRA updating on.

A client holding the API key, through the proxy's port, can run completions (streamed too),
list models, read /health and /metrics, and nothing else: the LoRA admin routes answer 403 in
every spelling, other routes 404, and the adapter set is unchanged afterwards. The project's
own adapter operations (``serving.adapters.cli.make_ops``, what ``python -m serving adapters``
runs) still load and unload on vLLM's own port.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from local_server import Served, serve_local_copy
from proxy_server import serve_proxy

from serving.adapters.cli import default_endpoint, make_ops
from serving.adapters.client import VllmError
from serving.local.loramaker import make_adapter
from serving.render import proxy

pytestmark = pytest.mark.integration

PROMPT = "Hello! How are you today?"


@dataclasses.dataclass
class World:
    served: Served
    public: str  # the proxy: what clients reach
    work: Path

    def client(self, key: str | None = None) -> httpx.Client:
        key = self.served.key if key is None else key
        return httpx.Client(base_url=self.public, timeout=120,
                            headers={"Authorization": f"Bearer {key}"})

    def direct(self) -> httpx.Client:
        return httpx.Client(base_url=default_endpoint(self.served.spec), timeout=120,
                            headers={"Authorization": f"Bearer {self.served.key}"})

    def adapter(self, name: str, version: str, seed: int) -> Path:
        model = Path(self.served.layout.model_path(self.served.spec))
        return make_adapter(self.work / "incoming" / name / version, base=model, rank=8,
                            seed=seed, base_model_id=self.served.spec.model.id)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("proxied")
    with serve_local_copy(root, "proxied") as served, serve_proxy(
            served.spec, root / "proxy", upstream_port=served.spec.vllm.port) as public:
        yield World(served, public, root)


def loaded(world: World) -> dict[str, str | None]:
    with world.direct() as c:
        return {m["id"]: m.get("root") for m in c.get("/v1/models").json()["data"]}


def complete(c: httpx.Client, model: str) -> str:
    done = c.post("/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 8,
                                           "temperature": 0})
    assert done.status_code == 200, done.text
    return done.json()["choices"][0]["text"]


def test_inference_routes_answer_through_the_proxy(world: World) -> None:
    with world.client() as c:
        names = {m["id"] for m in c.get("/v1/models").json()["data"]}
        assert {"exaone-tiny", "tone-formal", "tone-casual"} <= names
        assert complete(c, "tone-formal") != complete(c, "exaone-tiny")
        chat = c.post("/v1/chat/completions", json={
            "model": "tone-casual", "max_tokens": 8,
            "messages": [{"role": "user", "content": PROMPT}]})
        assert chat.status_code == 200, chat.text
        assert c.get("/health").status_code == 200
        metrics = c.get("/metrics")
        assert metrics.status_code == 200 and "vllm:" in metrics.text
    # The key still guards the inference routes: the proxy passes it on, it does not add one.
    with world.client(key="wrong") as c:
        assert c.get("/v1/models").status_code == 401


def test_streaming_arrives_event_by_event(world: World) -> None:
    events = []
    with world.client() as c, c.stream("POST", "/v1/completions", json={
            "model": "tone-formal", "prompt": PROMPT, "max_tokens": 12, "stream": True,
            "temperature": 0}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line.startswith("data:")]
    assert events[-1] == "data: [DONE]"
    assert len(events) > 3, events


def test_an_old_keep_alive_connection_is_told_to_close(world: World) -> None:
    """What moves busy clients off a host taken out of rotation without a race: a connection
    past the proxy's keepalive_time gets its next answer with "Connection: close" (and then
    nginx closes it); a young one stays open."""
    # httpx drops a connection idle for 5 s itself: keep it for the test.
    with httpx.Client(base_url=world.public, timeout=120,
                      limits=httpx.Limits(keepalive_expiry=proxy.KEEPALIVE_SECONDS),
                      headers={"Authorization": f"Bearer {world.served.key}"}) as c:
        first = c.get("/v1/models")
        assert first.headers.get("connection", "").lower() == "keep-alive"
        time.sleep(proxy.KEEPALIVE_TIME_SECONDS + 0.5)
        old = c.post("/v1/completions", json={"model": "exaone-tiny", "prompt": PROMPT,
                                               "max_tokens": 2})
        assert old.status_code == 200, old.text
        assert old.headers.get("connection", "").lower() == "close"
        again = c.get("/v1/models")  # a fresh connection: young, kept
        assert again.headers.get("connection", "").lower() == "keep-alive"


# Spellings a client might try to reach the admin routes with, and what it must get.
ADMIN_TRIES = [
    ("POST", "/v1/load_lora_adapter", 403),
    ("POST", "/v1/unload_lora_adapter", 403),
    ("POST", "//v1/load_lora_adapter", 403),
    ("POST", "/v1/./unload_lora_adapter", 403),
    ("POST", "/v1/models/../load_lora_adapter", 403),
    ("POST", "/v1/%6coad_lora_adapter", 403),
    ("POST", "/v1/load_lora_adapter/", 403),
    ("POST", "/v1/load_lora_adapter?x=1", 403),
    ("PUT", "/v1/load_lora_adapter", 403),
    ("POST", "/v1/completions/../unload_lora_adapter", 403),
    ("POST", "/V1/load_lora_adapter", 404),
]


def test_a_client_with_the_key_cannot_load_or_unload(world: World) -> None:
    before = loaded(world)
    with world.client() as c:
        base = complete(c, "exaone-tiny")
        formal = complete(c, "tone-formal")
        # Other weights (here the casual adapter's) under a served name, and a new name.
        casual = str(world.served.layout.adapter_path(world.served.spec,
                                                      world.served.spec.adapters[1]))
        for method, path, status in ADMIN_TRIES:
            for body in ({"lora_name": "tone-formal", "lora_path": casual, "load_inplace": True},
                         {"lora_name": "evil", "lora_path": casual}):
                # httpx would normalise the path: send it exactly as written.
                request = c.build_request(method, "/", json=body)
                request.url = request.url.copy_with(raw_path=path.encode())
                answer = c.send(request)
                assert answer.status_code == status, (method, path, answer.text)
                if status == 403:
                    assert "adapter administration is not served" in answer.json()[
                        "error"]["message"], answer.text
        # The inference routes take no admin body either: an extra field changes nothing.
        bogus = c.post("/v1/completions?lora_path=/tmp", json={
            "model": "tone-formal", "prompt": PROMPT, "max_tokens": 8, "temperature": 0,
            "lora_name": "evil", "lora_path": casual})
        assert bogus.status_code in (200, 400), bogus.text
        assert loaded(world) == before
        assert complete(c, "tone-formal") == formal
        assert complete(c, "exaone-tiny") == base


def test_everything_else_is_not_served(world: World) -> None:
    with world.client() as c:
        for method, path in (("POST", "/v1/embeddings"), ("POST", "/tokenize"),
                             ("GET", "/version"), ("POST", "/reset_prefix_cache"),
                             ("GET", "/docs"), ("GET", "/openapi.json"), ("POST", "/sleep"),
                             ("GET", "/v1/models/exaone-tiny")):
            answer = c.request(method, path)
            assert answer.status_code == 404, (path, answer.text)
            assert answer.json()["error"]["type"] == "not_served"
        # The right route with the wrong method is refused before vLLM.
        assert c.get("/v1/completions").status_code == 403
        assert c.post("/v1/models").status_code == 403


def test_bodies_above_the_limit_are_refused(world: World) -> None:
    limit = proxy.max_body_mib(world.served.spec) * 2**20
    with world.client() as c:
        answer = c.post("/v1/completions", content=b"x" * (limit + 1),
                        headers={"Content-Type": "application/json"})
    assert answer.status_code == 413


def test_the_project_tools_still_load_and_unload_on_loopback(world: World) -> None:
    spec, root = world.served.spec, world.served.root
    ops = make_ops(spec, root=root)
    with ops.client:
        outcome = ops.add("proxied-add", "1", world.adapter("proxied-add", "1", seed=71))
        assert outcome.probe is not None
        assert "proxied-add" in loaded(world)
        # Clients see the new adapter through the proxy, and can use it, not remove it.
        with world.client() as c:
            assert complete(c, "proxied-add") != complete(c, "exaone-tiny")
            gone = c.post("/v1/unload_lora_adapter", json={"lora_name": "proxied-add"})
            assert gone.status_code == 403
        assert "proxied-add" in loaded(world)
        ops.remove("proxied-add", deadline_s=30)
    assert "proxied-add" not in loaded(world)
    with world.client() as c:
        answer = c.post("/v1/completions", json={"model": "proxied-add", "prompt": PROMPT,
                                                 "max_tokens": 4})
        assert answer.status_code == 404, answer.text


def test_tools_pointed_at_the_proxy_say_where_to_go(world: World) -> None:
    ops = make_ops(world.served.spec, root=world.served.root, endpoint=world.public)
    with ops.client, pytest.raises(VllmError) as caught:
        ops.client.unload("tone-formal")
    assert caught.value.kind == "not_served" and "--endpoint" in caught.value.message
    assert "tone-formal" in loaded(world)


def test_the_access_log_holds_no_key(world: World) -> None:
    log = (world.work / "proxy" / "access.log").read_text()
    assert "load_lora_adapter" in log
    assert world.served.key not in log
    assert not any(json.dumps(world.served.key) in line for line in log.splitlines())
