"""The API proxy sidecar: nginx in the vLLM pod, the only container clients reach.

vLLM binds 127.0.0.1 in the pod (``serving.stack.layout.POD``), so its LoRA admin routes are
reachable only from inside the pod; the Service and the NetworkPolicy target the proxy's port,
which serves the routes of ``serving.render.proxy`` with the configuration rendered there
(mounted from a ConfigMap; a change rolls the pods through the digest annotation).
"""

from __future__ import annotations

import hashlib
from typing import Any

from k8s import drain, meta
from serving.render import proxy
from serving.stack.spec import Spec

CONFIG_NAME = f"{meta.APP_NAME}-proxy"
CONFIG_KEY = "nginx.conf"
CONFIG_DIR = "/etc/exaone-proxy"
CONFIG_VOLUME = "proxy-config"
TMP_VOLUME = "proxy-tmp"
_TMP_MIB = 64  # pid file and empty temp folders: bodies stay in memory, responses unbuffered

# nginx's unprivileged image (any UID, no root needed for a port above 1024), pinned by the
# digest of the tag's image index: a tag can be pushed again, a digest names the same bytes
# for good. This is the one place the sidecar's image is named (tests/k8s holds every pod
# to it); bump the tag and the digest together (`docker buildx imagetools inspect IMAGE:TAG`
# prints the index digest).
NGINX_VERSION = "1.28.0"
NGINX_IMAGE = f"docker.io/nginxinc/nginx-unprivileged:{NGINX_VERSION}-alpine"
NGINX_DIGEST = "sha256:c97ff0bf7cbae369953c6da1232ec14ad9f971d66360c5698db0856a4cd657a0"

RESOURCES = {"cpu": "1", "memory": "256Mi"}


def image() -> str:
    return f"{NGINX_IMAGE}@{NGINX_DIGEST}" if NGINX_DIGEST else NGINX_IMAGE


def config_text(spec: Spec) -> str:
    return proxy.render_config(spec, proxy.POD)


def config_digest(spec: Spec) -> str:
    return hashlib.sha256(config_text(spec).encode()).hexdigest()


def config_map(spec: Spec) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": meta.metadata(CONFIG_NAME, meta.labels(spec), namespace=spec.aks.namespace),
        "data": {CONFIG_KEY: config_text(spec)},
    }


def volumes() -> list[dict[str, Any]]:
    return [
        {"name": CONFIG_VOLUME, "configMap": {"name": CONFIG_NAME, "defaultMode": 0o444}},
        {"name": TMP_VOLUME, "emptyDir": {"sizeLimit": f"{_TMP_MIB}Mi"}},
    ]


def container(spec: Spec, *, port_name: str,
              security_context: dict[str, Any]) -> dict[str, Any]:
    """The sidecar; ``port_name`` is the port the Service targets."""
    health = {"httpGet": {"path": proxy.HEALTH_PATH, "port": port_name}}
    return {
        "name": "proxy",
        "image": image(),
        "imagePullPolicy": "Always",
        # Not the image's entrypoint scripts: they rewrite files under /etc/nginx, read-only here.
        "command": ["nginx", "-c", f"{CONFIG_DIR}/{CONFIG_KEY}"],
        "ports": [{"name": port_name, "containerPort": spec.vllm.port, "protocol": "TCP"}],
        "resources": {"requests": dict(RESOURCES), "limits": dict(RESOURCES)},
        # Ready when vLLM answers through it: the Service sends clients only then.
        "readinessProbe": {**health, "periodSeconds": 10, "timeoutSeconds": 5,
                           "failureThreshold": 3},
        # Alive while nginx accepts; vLLM's own liveness is probed on loopback.
        "livenessProbe": {"tcpSocket": {"port": port_name}, "periodSeconds": 20,
                          "timeoutSeconds": 5, "failureThreshold": 3},
        # Until vLLM has finished what it runs (k8s.drain): nginx passes the last tokens.
        "lifecycle": {"preStop": drain.proxy_pre_stop()},
        "securityContext": security_context,
        "volumeMounts": [
            {"name": CONFIG_VOLUME, "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": TMP_VOLUME, "mountPath": proxy.POD.run_dir},
            drain.mount(),
        ],
    }
