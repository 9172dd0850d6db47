"""Scale-down and rollouts that let running requests finish.

When a pod is deleted (KEDA scales in, the cluster autoscaler empties a node, a rollout),
Kubernetes removes it from the Service's endpoints and runs the preStop hooks at the same time;
SIGTERM follows when a hook returns. nginx stops at once on SIGTERM and vLLM's engine goes down
with its API server, so without the hooks every stream on the pod is cut.

- vLLM's hook waits for the endpoint removal to reach every node (kube-proxy/Cilium and the
  Azure load balancer's probe), then until vLLM reports no running and no waiting request twice
  in a row (its /metrics on loopback), bounded; then it leaves a mark in a shared emptyDir.
- The proxy's hook waits for that mark, so nginx keeps passing the last tokens of every stream.
- ``terminationGracePeriodSeconds`` covers both waits; the cluster autoscaler honours it up to
  its own ``max-graceful-termination-sec`` (``infra.aks`` sets that to the same value).
"""

from __future__ import annotations

from typing import Any

from serving.render import monitoring
from serving.stack import layout
from serving.stack.spec import Spec

VOLUME = "drain"
MOUNT = "/drain"
IDLE_MARK = f"{MOUNT}/idle"
# Endpoint removal reaches the nodes' dataplane and the Azure load balancer in seconds; the
# balancer's probe of an externalTrafficPolicy Local Service needs up to two intervals.
ENDPOINT_SETTLE_SECONDS = 15
# The longest request the pod waits for: the proxy's read timeout for a silent request.
DRAIN_TIMEOUT_SECONDS = 600
POLL_SECONDS = 2
GRACE_SECONDS = ENDPOINT_SETTLE_SECONDS + DRAIN_TIMEOUT_SECONDS + 30

# Runs inside the vLLM image (python3, no project code): argv is the metrics URL, the settle
# and drain seconds, the poll interval and the mark to leave.
_WAIT = """\
import pathlib, sys, time, urllib.request
url, settle, limit, poll, mark = sys.argv[1], *map(float, sys.argv[2:5]), sys.argv[5]
time.sleep(settle)
names = ("{running}", "{waiting}")
idle, deadline = 0, time.monotonic() + limit
while idle < 2 and time.monotonic() < deadline:
    try:
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        busy = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(names))
    except OSError:
        break
    idle = idle + 1 if busy == 0 else 0
    if idle < 2:
        time.sleep(poll)
pathlib.Path(mark).touch()
"""


def vllm_pre_stop(spec: Spec) -> dict[str, Any]:
    url = f"http://127.0.0.1:{layout.vllm_port(spec)}{monitoring.METRICS_PATH}"
    script = _WAIT.format(running=monitoring.REQUESTS_RUNNING,
                          waiting=monitoring.REQUESTS_WAITING)
    return {"exec": {"command": [
        "python3", "-c", script, url, str(ENDPOINT_SETTLE_SECONDS), str(DRAIN_TIMEOUT_SECONDS),
        str(POLL_SECONDS), IDLE_MARK]}}


def proxy_pre_stop() -> dict[str, Any]:
    # The unprivileged nginx image is Alpine: busybox sh. Bounded by the grace period.
    return {"exec": {"command": [
        "sh", "-c", f"until [ -e {IDLE_MARK} ]; do sleep {POLL_SECONDS}; done"]}}


def volume() -> dict[str, Any]:
    return {"name": VOLUME, "emptyDir": {"sizeLimit": "1Mi"}}


def mount() -> dict[str, Any]:
    return {"name": VOLUME, "mountPath": MOUNT}
