"""How a load balancer decides a host is in rotation, stated once for the cloud side (infra's
Azure Load Balancer), the proxy (which answers the probe) and the rollout (which fails the
probe on purpose to take a host out, and waits as long as the balancer takes to notice).

Azure surprises:
- Every Azure Load Balancer probe comes from 168.63.129.16 (service tag AzureLoadBalancer), not
  from the clients' networks: the NSG and the proxy must admit that one address on the API port.
- A host whose probe fails gets no new flows, but flows already open stay on it: an HTTP
  keep-alive connection keeps sending requests to a host out of rotation. The rollout therefore
  waits for the balancer to notice, then has the proxy close idle connections (a graceful nginx
  reload) and waits for the requests in flight before it touches vLLM.
- A Standard Load Balancer rule drops a flow idle for longer than its idle timeout (4 minutes by
  default, 30 at most): a long prompt behind a queue is silent until its first token.
"""

from __future__ import annotations

# Paths a probe may use: the proxy routes them to vLLM and vLLM answers 200 without the API
# key once its engine is up (/v1/models needs the key, /metrics answers before the engine is
# ready). `probePath` is checked against this list.
PROBE_PATHS = ("/health",)
# Azure's platform address that sends every Load Balancer health probe.
AZURE_PROBE_SOURCE = "168.63.129.16"
AZURE_PROBE_TAG = "AzureLoadBalancer"
# Probe cadence: a host is out after PROBE_THRESHOLD failed probes PROBE_INTERVAL_SECONDS apart
# and back after as many good ones.
PROBE_INTERVAL_SECONDS = 5
PROBE_THRESHOLD = 2
IDLE_TIMEOUT_MINUTES = 30  # Azure's maximum for a load-balancing rule

# Where the rollout marks a host out of rotation: the proxy answers the probe path 503 while
# this file exists. Under /run: a reboot puts the host back, and its health gate (vLLM's engine
# up) decides from there.
ROTATION_DIR = "/run/exaone-rotation"
OUT_OF_ROTATION_FILE = f"{ROTATION_DIR}/out"


def seconds_to_notice() -> int:
    """How long the balancer may still send new flows after the probe starts failing (or keep
    the host out after it recovers): the probes it needs, plus one interval in flight."""
    return PROBE_INTERVAL_SECONDS * (PROBE_THRESHOLD + 1)
