"""vLLM pods scaled on vLLM's own load signal, on what AKS offers: its KEDA add-on reading
Azure Monitor managed Prometheus, which scrapes the pods (``PodMonitor``) into the stack's
Azure Monitor workspace (``infra.monitoring``).

KEDA and Azure surprises:
- KEDA's Prometheus scaler compares a query's value per pod (``AverageValue``) unless told
  ``metricType: Value``: the waiting queue is summed over pods and divided by KEDA, the KV-cache
  use is already a mean and is compared as it is.
- Managed Prometheus is queried with an Entra ID token: KEDA's operator runs as the service
  account ``kube-system/keda-operator`` and exchanges its token for an identity that holds
  Monitoring Data Reader on the workspace (a ``TriggerAuthentication`` with ``azure-workload``).
- With no pod left there is no vLLM metric to wake the Deployment: scale-to-zero (``scaleToZero``)
  needs an operator or another signal to come back, which is why production refuses it unless
  the stack asks for it.
- The managed scraper reads CRDs of the group ``azmonitoring.coreos.com``, not the Prometheus
  operator's ``monitoring.coreos.com``.
"""

from __future__ import annotations

from typing import Any

from k8s import meta
from k8s.meta import Value
from serving.render import monitoring
from serving.stack.spec import Spec

KEDA_NAMESPACE = "kube-system"
KEDA_SERVICE_ACCOUNT = "keda-operator"
KEDA_SUBJECT = f"system:serviceaccount:{KEDA_NAMESPACE}:{KEDA_SERVICE_ACCOUNT}"
SCALED_OBJECT_NAME = meta.APP_NAME
TRIGGER_AUTH_NAME = f"{meta.APP_NAME}-prometheus"
POD_MONITOR_NAME = meta.APP_NAME
POD_MONITOR_API = "azmonitoring.coreos.com/v1"
KEDA_API = "keda.sh/v1alpha1"
# What ``render`` places where the cloud values go (infra/ passes the workspace's query endpoint
# and KEDA's identity as Pulumi Outputs).
PLACEHOLDER_QUERY_ENDPOINT = "https://workspace.region.prometheus.monitor.azure.com"
PLACEHOLDER_CLIENT_ID = "00000000-0000-0000-0000-000000000000"
POLLING_SECONDS = 15
# Add a pod quickly (a new one needs minutes to load the model); remove one at a time and only
# after the load stayed low for a while, each removal draining its requests (k8s.drain).
SCALE_UP_WINDOW_SECONDS = 0
SCALE_DOWN_WINDOW_SECONDS = 600
SCALE_DOWN_PERIOD_SECONDS = 300


def _selector(spec: Spec) -> str:
    return f'{{job="{monitoring.job_name(spec)}", namespace="{spec.aks.namespace}"}}'


def queries(spec: Spec) -> dict[str, str]:
    """The two load signals, as KEDA asks them of the workspace."""
    sel = _selector(spec)
    return {
        "waiting": f"sum({monitoring.REQUESTS_WAITING}{sel})",
        "kv-cache": f"avg({monitoring.KV_CACHE_USAGE}{sel})",
    }


def min_replicas(spec: Spec) -> int:
    return 0 if spec.scale.to_zero else spec.aks.replicas


def scaled_object(spec: Spec, *, server_address: Value) -> dict[str, Any]:
    q = queries(spec)
    auth = {"name": TRIGGER_AUTH_NAME}

    def trigger(name: str, threshold: str, metric_type: str) -> dict[str, Any]:
        return {"type": "prometheus", "name": name, "metricType": metric_type,
                "metadata": {"serverAddress": server_address, "query": q[name],
                             "threshold": threshold},
                "authenticationRef": auth}

    return {
        "apiVersion": KEDA_API,
        "kind": "ScaledObject",
        "metadata": meta.metadata(SCALED_OBJECT_NAME, meta.labels(spec),
                                  namespace=spec.aks.namespace),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment",
                               "name": meta.APP_NAME},
            "minReplicaCount": min_replicas(spec),
            "maxReplicaCount": spec.scale.replicas_max,
            "pollingInterval": POLLING_SECONDS,
            "cooldownPeriod": SCALE_DOWN_WINDOW_SECONDS,
            "advanced": {"horizontalPodAutoscalerConfig": {"behavior": {
                "scaleUp": {"stabilizationWindowSeconds": SCALE_UP_WINDOW_SECONDS},
                "scaleDown": {
                    "stabilizationWindowSeconds": SCALE_DOWN_WINDOW_SECONDS,
                    "policies": [{"type": "Pods", "value": 1,
                                  "periodSeconds": SCALE_DOWN_PERIOD_SECONDS}],
                },
            }}},
            "triggers": [
                trigger("waiting", str(spec.scale.waiting_requests), "AverageValue"),
                trigger("kv-cache", f"{spec.scale.kv_cache_usage:g}", "Value"),
            ],
        },
    }


def trigger_authentication(spec: Spec, *, client_id: Value) -> dict[str, Any]:
    return {
        "apiVersion": KEDA_API,
        "kind": "TriggerAuthentication",
        "metadata": meta.metadata(TRIGGER_AUTH_NAME, meta.labels(spec),
                                  namespace=spec.aks.namespace),
        "spec": {"podIdentity": {"provider": "azure-workload", "identityId": client_id}},
    }


def pod_monitor(spec: Spec, *, port_name: str) -> dict[str, Any]:
    """Managed Prometheus scrapes each vLLM pod's /metrics through its proxy port, under the
    job name the alert rules select (``serving.render.monitoring``)."""
    return {
        "apiVersion": POD_MONITOR_API,
        "kind": "PodMonitor",
        "metadata": meta.metadata(POD_MONITOR_NAME, meta.labels(spec),
                                  namespace=spec.aks.namespace),
        "spec": {
            "selector": {"matchLabels": meta.selector_labels(spec)},
            "podMetricsEndpoints": [{
                "port": port_name,
                "path": monitoring.METRICS_PATH,
                "interval": monitoring.SCRAPE_INTERVAL,
                "scrapeTimeout": monitoring.SCRAPE_TIMEOUT,
                "relabelings": [
                    {"targetLabel": "job", "replacement": monitoring.job_name(spec)},
                    {"targetLabel": "stack", "replacement": spec.stack},
                    {"sourceLabels": ["__meta_kubernetes_namespace"],
                     "targetLabel": "namespace"},
                ],
            }],
        },
    }


def autoscale_objects(spec: Spec, *, server_address: Value = PLACEHOLDER_QUERY_ENDPOINT,
                      client_id: Value = PLACEHOLDER_CLIENT_ID,
                      port_name: str) -> list[dict[str, Any]]:
    """The scrape always (metrics land in the workspace); KEDA's objects when autoscale is on."""
    out = [pod_monitor(spec, port_name=port_name)]
    if spec.scale.enabled:
        out += [trigger_authentication(spec, client_id=client_id),
                scaled_object(spec, server_address=server_address)]
    return out
