"""The API proxy's nginx configuration: the only way clients reach vLLM.

vLLM has one API key for everything: whoever may ask for a completion may also call
``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter`` (vLLM's docs: runtime LoRA loading is
"not a secure operation", for trusted operators only) and load any path under any name. So
vLLM binds loopback (``serving.stack.layout.vllm_port``) and nginx, the distribution's package
on a VM and a sidecar in the pod, serves the API port with the routes below and nothing else.
The project's own tools (``adapters``, ``fab adapters.*``, the health gate) run on the host and
talk to vLLM on loopback.

Every value comes from the spec and ``ProxyPlace`` (where the files of one kind of host go);
the routes are listed once, here. Deny by default: the two LoRA admin routes answer 403 with a
message, every other path 404, a route asked with another method 403; clients outside the
allowed networks get 403 (VM; in the pod the NetworkPolicy and the load balancer's source
ranges do that, as kubelet probes come from node addresses the spec does not name).

nginx surprises this file works around:
- ``proxy_pass`` with a URI inside an exact-match location sends that fixed URI upstream, not
  the client's raw one: a path nginx normalises to an allowed route (``//v1/models``,
  ``/v1/x/../completions``, percent-encoded slashes) reaches vLLM only as that route.
- Response buffering would hold back server-sent events until the buffer fills: it is off.
- Without a ``*_temp_path`` nginx creates its compiled-in folders under /var/lib/nginx at
  start, which an unprivileged nginx cannot: all five point into the run folder.
"""

from __future__ import annotations

import ipaddress
import json
import math
from dataclasses import dataclass

from serving.render.monitoring import METRICS_PATH
from serving.stack.balancer import AZURE_PROBE_SOURCE, OUT_OF_ROTATION_FILE
from serving.stack.layout import vllm_port
from serving.stack.spec import Spec

UPSTREAM = "vllm"
HEALTH_PATH = "/health"


@dataclass(frozen=True)
class Route:
    path: str
    methods: tuple[str, ...]


# What clients may call: the OpenAI inference routes, the model list, and what the probes and
# the Prometheus scrape (serving.render.monitoring) read. Nothing else reaches vLLM.
INFERENCE_ROUTES = (
    Route("/v1/completions", ("POST",)),
    Route("/v1/chat/completions", ("POST",)),
    Route("/v1/models", ("GET",)),
    Route(HEALTH_PATH, ("GET",)),
    Route(METRICS_PATH, ("GET",)),
)
# vLLM's runtime LoRA routes (VLLM_ALLOW_RUNTIME_LORA_UPDATING): refused with a message that
# says where they are served, so an operator does not go looking for a network fault.
ADMIN_ROUTES = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter")
ADMIN_REFUSAL = ("adapter administration is not served on this port; run `python -m serving "
                 "adapters ...` on the host or `fab adapters.*`")
NOT_SERVED = "not served here; this port serves " + ", ".join(r.path for r in INFERENCE_ROUTES)

# Body limit: a prompt of maxModelLen tokens as JSON. Korean text escaped as \\uXXXX is six
# bytes a character, chat framing adds more: 64 bytes a token, at least 1 MiB.
BODY_BYTES_PER_TOKEN = 64
MIN_BODY_MIB = 1
# A non-streamed completion is silent until its last token; a long generation behind a queue
# takes minutes. The unit's drain (TimeoutStopSec) is 300 s; allow twice that.
READ_TIMEOUT_SECONDS = 600
CONNECT_TIMEOUT_SECONDS = 5
SEND_TIMEOUT_SECONDS = 60
CLIENT_TIMEOUT_SECONDS = 60
KEEPALIVE_SECONDS = 75
# A keep-alive connection lives at most this long: the response to its first request after
# that says "Connection: close" and nginx closes it once sent. A load balancer keeps an open
# flow on a host it took out of rotation (Azure's does), so this is how busy clients leave
# such a host without a race: closing a connection the client may be writing to at that
# moment (a reload closes idle ones) can drop its next request; a response that says "close"
# cannot. The rollout waits this long before it closes what is left (provisioning.rotation).
# (nginx 1.19.10 and later: Ubuntu 24.04 has 1.24, the sidecar's image newer.)
KEEPALIVE_TIME_SECONDS = 10
# On SIGQUIT (the unit's stop) workers finish open requests for at most this long.
SHUTDOWN_TIMEOUT_SECONDS = 50
WORKER_PROCESSES = 2  # a proxy at token rates is light; "auto" would count the node's cores
WORKER_CONNECTIONS = 4096
UPSTREAM_KEEPALIVE = 32
TEMP_KINDS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


@dataclass(frozen=True)
class ProxyPlace:
    """Where nginx keeps its files on one kind of host, and whether it filters sources."""

    run_dir: str  # pid file and temp folders; writable by nginx
    access_log: str  # an access_log destination
    # Allow only the spec's networks (VM). The pod leaves it to its NetworkPolicy.
    restrict_sources: bool = True
    listen: str = "0.0.0.0"
    # While this file exists the health route answers 503, so the load balancer takes the host
    # out of rotation (serving.stack.balancer; the rollout creates and removes it). Empty: none.
    rotation_file: str = ""

    @property
    def pid_file(self) -> str:
        return f"{self.run_dir}/nginx.pid"


# The VM: systemd's RuntimeDirectory for the unit (serving.render.proxy_unit), access log to
# the journal through syslog (nginx cannot open a journal stream as a file).
VM = ProxyPlace(run_dir="/run/exaone-proxy",
                access_log="syslog:server=unix:/dev/log,tag=exaone_proxy,nohostname",
                rotation_file=OUT_OF_ROTATION_FILE)
# The pod's sidecar: its own emptyDir at /tmp, logs to the container's stdout.
POD = ProxyPlace(run_dir="/tmp", access_log="/dev/stdout", restrict_sources=False)


def client_networks(spec: Spec) -> list[str]:
    """The networks clients and the scraper come from: apiCidrs and the VNet, normalised."""
    out: list[str] = []
    for net in (*spec.network.api_cidrs, spec.network.vnet_cidr):
        text = str(ipaddress.ip_network(net))
        if text not in out:
            out.append(text)
    return out


def max_body_mib(spec: Spec) -> int:
    return max(MIN_BODY_MIB, math.ceil(spec.vllm.max_model_len * BODY_BYTES_PER_TOKEN / 2**20))


def _json_body(message: str) -> str:
    """An nginx string literal holding an OpenAI-style error object."""
    text = json.dumps({"error": {"message": message, "type": "not_served"}})
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "\\n'"


def _listens(spec: Spec, place: ProxyPlace, port: int) -> list[str]:
    out = [f"listen {place.listen}:{port};"]
    # IPv6 only where a client network is IPv6: binding [::] fails where IPv6 is disabled.
    if place.listen == "0.0.0.0" and any(
        ipaddress.ip_network(n).version == 6 for n in spec.network.api_cidrs
    ):
        out.append(f"listen [::]:{port};")
    return out


def _sources(spec: Spec, place: ProxyPlace) -> list[str]:
    if not place.restrict_sources:
        return []
    # Azure's load balancer probes from its platform address, not from a client network.
    nets = ["127.0.0.1", "::1", AZURE_PROBE_SOURCE, *client_networks(spec)]
    return [*(f"allow {n};" for n in nets), "deny all;"]


OUT_OF_ROTATION = "taken out of rotation for maintenance; the load balancer sends to other hosts"


def _route(route: Route, place: ProxyPlace) -> list[str]:
    rotation = []
    if route.path == HEALTH_PATH and place.rotation_file:
        # `if` with `return` is the one use of nginx's `if` inside a location that is safe.
        rotation = [f"    if (-f {place.rotation_file}) {{",
                    f"        return 503 {_json_body(OUT_OF_ROTATION)};",
                    "    }"]
    return [
        f"location = {route.path} {{",
        *rotation,
        f"    limit_except {' '.join(route.methods)} {{ deny all; }}",
        f"    proxy_pass http://{UPSTREAM}{route.path};",
        "}",
    ]


def render_config(spec: Spec, place: ProxyPlace, *, port: int | None = None,
                  upstream_port: int | None = None) -> str:
    """nginx.conf for the stack: ``port`` (default the API port) serves the inference routes
    of vLLM at 127.0.0.1:``upstream_port`` (default ``vllm_port``)."""
    port = spec.vllm.port if port is None else port
    upstream_port = vllm_port(spec) if upstream_port is None else upstream_port
    if port == upstream_port:
        raise ValueError(f"the proxy and vLLM cannot both listen on port {port}")
    body = f"{max_body_mib(spec)}m"
    run = place.run_dir
    server: list[str] = [
        *_listens(spec, place, port),
        *_sources(spec, place),
        f"client_max_body_size {body};",
        # Bodies stay in memory (never a temp file): the limit above bounds them.
        f"client_body_buffer_size {body};",
        "",
        *(line for route in INFERENCE_ROUTES for line in _route(route, place)),
        "",
        "location ~ ^/v1/(load|unload)_lora_adapter {",
        f"    return 403 {_json_body(ADMIN_REFUSAL)};",
        "}",
        "location / {",
        f"    return 404 {_json_body(NOT_SERVED)};",
        "}",
    ]
    http: list[str] = [
        "server_tokens off;",
        "default_type application/json;",
        # Neither the query string nor any header (the API key) is logged.
        "log_format exaone '$remote_addr \"$request_method $uri\" $status $body_bytes_sent "
        "$request_time $upstream_status';",
        f"access_log {place.access_log} exaone;",
        *(f"{kind}_temp_path {run}/{kind};" for kind in TEMP_KINDS),
        f"client_header_timeout {CLIENT_TIMEOUT_SECONDS}s;",
        f"client_body_timeout {CLIENT_TIMEOUT_SECONDS}s;",
        f"send_timeout {SEND_TIMEOUT_SECONDS}s;",
        f"keepalive_timeout {KEEPALIVE_SECONDS}s;",
        f"keepalive_time {KEEPALIVE_TIME_SECONDS}s;",
        "gzip off;",
        # Server-sent events (stream: true) go out token by token.
        "proxy_buffering off;",
        "proxy_request_buffering on;",
        "proxy_http_version 1.1;",
        'proxy_set_header Connection "";',
        "proxy_set_header Host $host;",
        # Replaced, not appended: a client's own X-Forwarded-For is not believed.
        "proxy_set_header X-Forwarded-For $remote_addr;",
        "proxy_set_header X-Real-IP $remote_addr;",
        f"proxy_connect_timeout {CONNECT_TIMEOUT_SECONDS}s;",
        f"proxy_send_timeout {SEND_TIMEOUT_SECONDS}s;",
        f"proxy_read_timeout {READ_TIMEOUT_SECONDS}s;",
        "",
        f"upstream {UPSTREAM} {{",
        f"    server 127.0.0.1:{upstream_port};",
        f"    keepalive {UPSTREAM_KEEPALIVE};",
        "}",
        "",
        "server {",
        *(f"    {line}" if line else "" for line in server),
        "}",
    ]
    lines = [
        f"# API proxy for stack {spec.stack}, rendered by serving.render.proxy from the spec; "
        "edits here are overwritten.",
        "# Serves only vLLM's inference routes; vLLM itself listens on loopback.",
        "daemon off;",
        "error_log stderr warn;",
        f"pid {place.pid_file};",
        f"worker_processes {WORKER_PROCESSES};",
        f"worker_shutdown_timeout {SHUTDOWN_TIMEOUT_SECONDS}s;",
        "",
        "events {",
        f"    worker_connections {WORKER_CONNECTIONS};",
        "}",
        "",
        "http {",
        *(f"    {line}" if line else "" for line in http),
        "}",
    ]
    return "\n".join(lines) + "\n"
