"""The vLLM server on AKS as plain Kubernetes objects, in apply order.

The container runs ``serving.render.vllm_args.command(spec, layout.POD)``: the pod and the systemd
unit share one command line. Objects are dicts so Pulumi applies them and ``render`` writes
them as YAML without either restating a field.
"""

from __future__ import annotations

import math
from typing import Any

from k8s import drain, fetch, meta, proxy
from k8s.gpu import GPU_NODE_SELECTOR, GPU_RESOURCE, GPU_TOLERATION, device_plugin
from k8s.meta import Value
from serving.render import proxy as proxy_config
from serving.render import vllm_args
from serving.stack import layout
from serving.stack.catalog import DTYPE_BYTES, EXAONE_MODELS, adapter_params, weight_params
from serving.stack.spec import Spec

__all__ = ["api_key_secret", "device_plugin", "vllm_objects"]

# Placeholders that still give valid objects when the cloud side is not known yet (render).
PLACEHOLDER_STORAGE_ACCOUNT = "storageaccountname"
PLACEHOLDER_ID = "00000000-0000-0000-0000-000000000000"

SERVICE_NAME = meta.APP_NAME
API_KEY_SECRET_NAME = f"{meta.APP_NAME}-api-key"
API_KEY_SECRET_KEY = "api-key"
FETCH_CONFIG_NAME = f"{meta.APP_NAME}-fetch"
PORT_NAME = "http"
HEALTH_PATH = proxy_config.HEALTH_PATH  # answers without the API key
RUN_AS_ID = 10001
WORKLOAD_IDENTITY = "azure.workload.identity"
MANAGED_PROMETHEUS_LABELS = {"rsName": "ama-metrics"}

# Share of a node's vCPUs and memory the vLLM pods request; the rest is left to the kubelet,
# AKS reservations and the DaemonSets on the node.
_NODE_SHARE = 0.75
_GIB = 1024**3
_SHM_GIB = 16
_TMP_GIB = 4
_COMPILE_CACHE_GIB = 10  # torch.compile, Triton and vLLM caches
_UNKNOWN_MODEL_GIB = 128
_UNKNOWN_ADAPTER_GIB = 2
# Model load, torch.compile and CUDA graph capture take minutes (~75 s on an H100 for 2.4B,
# far more for 32B or for a model vLLM downloads itself): allow up to 30 min before restarts.
_STARTUP_PERIOD_SECONDS = 10
_STARTUP_FAILURES = 180


def _gib(n_bytes: float) -> int:
    return max(1, math.ceil(n_bytes / _GIB))


def model_gib(spec: Spec) -> int:
    """Disk for the base model's weights, from its dimensions (plus a quarter for headroom);
    ``auto`` counts as two bytes a weight, as the checkpoints are bf16."""
    dims = EXAONE_MODELS.get(spec.model.id)
    if dims is None:
        return _UNKNOWN_MODEL_GIB
    size = max(2, DTYPE_BYTES.get(spec.model.dtype, 2))
    return _gib(weight_params(dims) * size * 1.25)


def adapters_gib(spec: Spec) -> int:
    """Disk for the adapter set: LoRA A and B for every module and layer, saved as fp32."""
    dims = EXAONE_MODELS.get(spec.model.id)
    if dims is None:
        return 1 + _UNKNOWN_ADAPTER_GIB * len(spec.adapters)
    return 1 + _gib(sum(adapter_params(dims, a.rank) * 4 for a in spec.adapters) * 1.5)


def cache_gib(spec: Spec) -> int:
    # A model from "hf" is downloaded by vLLM itself into HF_HOME, under the cache dir.
    fetched_by_vllm = spec.model.source_kind == "hf"
    return _COMPILE_CACHE_GIB + (model_gib(spec) if fetched_by_vllm else 0)


def pod_resources(spec: Spec) -> dict[str, Any]:
    """GPUs from tensorParallelSize; CPU and memory a fair share of the node per pod.

    Requests equal limits (Guaranteed QoS): the kubelet then keeps the pod last in line for
    eviction under memory pressure.
    """
    sku, tp = spec.vm.sku, spec.vllm.tensor_parallel_size
    pods_per_node = max(1, sku.gpus // tp)
    cpu = max(1, math.floor(sku.vcpus / pods_per_node * _NODE_SHARE))
    memory = max(1, math.floor(sku.ram_gib / pods_per_node * _NODE_SHARE))
    amounts = {"cpu": str(cpu), "memory": f"{memory}Gi", GPU_RESOURCE: str(tp)}
    disk = model_gib(spec) + adapters_gib(spec) + cache_gib(spec) + _TMP_GIB
    return {
        "requests": {**amounts, "ephemeral-storage": f"{disk}Gi"},
        "limits": dict(amounts),
    }


def image(spec: Spec) -> str:
    ref = f"{spec.vllm.image}:v{spec.vllm.version}"
    return f"{ref}@{spec.vllm.image_digest}" if spec.vllm.image_digest else ref


def _container_security() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_ID,
        "runAsGroup": RUN_AS_ID,
        "privileged": False,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _pod_security() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_ID,
        "runAsGroup": RUN_AS_ID,
        "fsGroup": RUN_AS_ID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _volumes(spec: Spec) -> list[dict[str, Any]]:
    def disk(name: str, gib: int) -> dict[str, Any]:
        return {"name": name, "emptyDir": {"sizeLimit": f"{gib}Gi"}}

    return [
        disk("models", model_gib(spec)),
        disk("adapters", adapters_gib(spec)),
        disk("cache", cache_gib(spec)),
        disk("tmp", _TMP_GIB),
        # vLLM's workers and NCCL exchange tensors through /dev/shm; the runtime's default
        # is 64 MiB. Memory-backed, so it counts against the pod's memory limit.
        {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{_SHM_GIB}Gi"}},
        {"name": "fetch", "configMap": {"name": FETCH_CONFIG_NAME, "defaultMode": 0o444}},
    ]


def _state_mounts(*, read_only: bool) -> list[dict[str, Any]]:
    pod = layout.POD
    return [
        {"name": "models", "mountPath": pod.models_dir, "readOnly": read_only},
        {"name": "adapters", "mountPath": pod.adapters_dir, "readOnly": read_only},
        {"name": "tmp", "mountPath": "/tmp"},
    ]


def _env(spec: Spec) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": k, "value": v} for k, v in vllm_args.environment(spec, layout.POD).items()
    ]
    # The image's root user is replaced by a UID with no passwd entry: torch looks the user
    # name up (getpass) and other libraries write under HOME, which is read-only.
    env += [
        {"name": "HOME", "value": "/tmp"},
        {"name": "USER", "value": layout.SERVICE_USER},
    ]
    if _has_api_key(spec):
        env.append({
            "name": layout.API_KEY_ENV,
            "valueFrom": {
                "secretKeyRef": {"name": API_KEY_SECRET_NAME, "key": API_KEY_SECRET_KEY},
            },
        })
    return env


def _has_api_key(spec: Spec) -> bool:
    return spec.api_key.kind != "none"


def _probe(spec: Spec, **timing: int) -> dict[str, Any]:
    """vLLM's /health on loopback, from inside its container: the kubelet's own requests come
    from the node and reach only the proxy's port (vLLM binds 127.0.0.1)."""
    url = f"http://127.0.0.1:{layout.vllm_port(spec)}{HEALTH_PATH}"
    check = "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=4)"
    return {"exec": {"command": ["python3", "-c", check, url]}, **timing}


def _vllm_container(spec: Spec) -> dict[str, Any]:
    interpreter, *arguments = vllm_args.command(spec, layout.POD)
    return {
        "name": "vllm",
        "image": image(spec),
        "imagePullPolicy": "Always",
        "command": [interpreter],
        "args": arguments,
        "env": _env(spec),
        # No ports: vLLM listens on the pod's loopback only; clients come through the proxy.
        "resources": pod_resources(spec),
        "startupProbe": _probe(
            spec,
            periodSeconds=_STARTUP_PERIOD_SECONDS,
            timeoutSeconds=5,
            failureThreshold=_STARTUP_FAILURES,
        ),
        "readinessProbe": _probe(spec, periodSeconds=10, timeoutSeconds=5, failureThreshold=3),
        "livenessProbe": _probe(spec, periodSeconds=20, timeoutSeconds=10, failureThreshold=3),
        # Scale-down lets running requests finish (k8s.drain).
        "lifecycle": {"preStop": drain.vllm_pre_stop(spec)},
        "securityContext": _container_security(),
        "volumeMounts": [
            *_state_mounts(read_only=True),
            {"name": "cache", "mountPath": layout.POD.cache_dir},
            {"name": "shm", "mountPath": "/dev/shm"},
            drain.mount(),
        ],
    }


def _deployment_skips(spec: Spec) -> dict[str, str]:
    skips = {}
    if _has_api_key(spec):
        skips["CKV_K8S_35"] = (
            "vLLM reads its API key only from the VLLM_API_KEY variable or from argv, which "
            "every process can read; the variable comes from a Secret"
        )
    unpinned = [i for i, d in ((image(spec), spec.vllm.image_digest),
                               (fetch.image(), fetch.AZURE_CLI_DIGEST),
                               (proxy.image(), proxy.NGINX_DIGEST)) if not d]
    if unpinned:
        skips["CKV_K8S_43"] = (
            "pinned by version tag, no digest configured for " + ", ".join(unpinned)
            + " (vllmImageDigest / k8s.fetch.AZURE_CLI_DIGEST / k8s.proxy.NGINX_DIGEST)"
        )
    return skips


def deployment(spec: Spec, *, storage_account: Value) -> dict[str, Any]:
    labels = meta.labels(spec)
    config_digest = fetch.config_digest(fetch.config_data(spec))
    pod_spec = {
        "serviceAccountName": meta.APP_NAME,
        # The workload identity webhook mounts its own projected token for Entra ID; the
        # Kubernetes API token is not needed.
        "automountServiceAccountToken": False,
        # Service links would inject <SERVICE>_PORT variables, and vLLM reads every VLLM_*
        # variable as its own setting (a Service named "vllm" breaks VLLM_PORT).
        "enableServiceLinks": False,
        "securityContext": _pod_security(),
        "nodeSelector": dict(GPU_NODE_SELECTOR),
        "tolerations": [dict(GPU_TOLERATION)],
        "topologySpreadConstraints": [{
            "maxSkew": 1,
            "topologyKey": "kubernetes.io/hostname",
            "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": {"matchLabels": meta.selector_labels(spec)},
        }],
        "terminationGracePeriodSeconds": drain.GRACE_SECONDS,
        "initContainers": [fetch.init_container(
            spec,
            storage_account=storage_account,
            security_context=_container_security(),
            mounts=_state_mounts(read_only=False),
        )],
        "containers": [
            _vllm_container(spec),
            proxy.container(spec, port_name=PORT_NAME, security_context=_container_security()),
        ],
        "volumes": [*_volumes(spec), *proxy.volumes(), drain.volume()],
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta.metadata(
            meta.APP_NAME, labels, namespace=spec.aks.namespace,
            annotations=meta.skip_annotations(_deployment_skips(spec)),
        ),
        "spec": {
            "replicas": spec.aks.replicas,
            "selector": {"matchLabels": meta.selector_labels(spec)},
            # Every GPU of the pool is taken by a replica, so a surge pod would wait for a GPU
            # forever: replace one pod at a time instead (capacity dips by one pod; with a
            # single replica that is a restart).
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1},
            },
            # The default 10 minutes is shorter than a model download plus startup.
            "progressDeadlineSeconds": 3600,
            "revisionHistoryLimit": 5,
            "template": {
                "metadata": {
                    "labels": {**labels, f"{WORKLOAD_IDENTITY}/use": "true"},
                    "annotations": {
                        f"{meta.part_of()}/fetch-config-sha256": config_digest,
                        f"{meta.part_of()}/proxy-config-sha256": proxy.config_digest(spec),
                    },
                },
                "spec": pod_spec,
            },
        },
    }


def namespace(spec: Spec) -> dict[str, Any]:
    pss = {
        f"pod-security.kubernetes.io/{mode}": "restricted" for mode in ("enforce", "audit", "warn")
    }
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": meta.metadata(spec.aks.namespace, {**meta.labels(spec), **pss}),
    }


def service_account(spec: Spec, *, client_id: Value, tenant_id: Value) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": meta.metadata(
            meta.APP_NAME, meta.labels(spec), namespace=spec.aks.namespace,
            annotations={
                f"{WORKLOAD_IDENTITY}/client-id": client_id,
                f"{WORKLOAD_IDENTITY}/tenant-id": tenant_id,
            },
        ),
        "automountServiceAccountToken": False,
    }


def fetch_config(spec: Spec) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": meta.metadata(
            FETCH_CONFIG_NAME, meta.labels(spec), namespace=spec.aks.namespace
        ),
        "data": fetch.config_data(spec),
    }


def service(spec: Spec) -> dict[str, Any]:
    """ClusterIP when no client network is named; else an internal (VNet-only) load balancer."""
    port = {"name": PORT_NAME, "port": spec.vllm.port, "targetPort": PORT_NAME, "protocol": "TCP"}
    body: dict[str, Any] = {"selector": meta.selector_labels(spec), "ports": [port]}
    annotations = None
    if spec.network.api_cidrs:
        annotations = {"service.beta.kubernetes.io/azure-load-balancer-internal": "true"}
        body.update({
            "type": "LoadBalancer",
            "loadBalancerSourceRanges": list(spec.network.api_cidrs),
            # Keeps the client's address (no SNAT to a node) so the NetworkPolicy's ipBlock
            # rules see who is calling.
            "externalTrafficPolicy": "Local",
        })
    else:
        body["type"] = "ClusterIP"
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta.metadata(
            SERVICE_NAME, meta.labels(spec), namespace=spec.aks.namespace, annotations=annotations
        ),
        "spec": body,
    }


def disruption_budget(spec: Spec) -> dict[str, Any]:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": meta.metadata(meta.APP_NAME, meta.labels(spec), namespace=spec.aks.namespace),
        "spec": {
            # maxUnavailable rather than minAvailable: with one replica a node drain (AKS
            # upgrade) can still proceed instead of blocking forever.
            "maxUnavailable": 1,
            # A pod that never became ready (stuck loading) must not block a drain either.
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
            "selector": {"matchLabels": meta.selector_labels(spec)},
        },
    }


def network_policy(spec: Spec) -> dict[str, Any]:
    """Ingress: the API port (the proxy's), from apiCidrs and this namespace. Egress: DNS and
    HTTPS only (Entra ID token exchange, Blob storage, the Hugging Face Hub)."""
    sources: list[dict[str, Any]] = [{"ipBlock": {"cidr": c}} for c in spec.network.api_cidrs]
    sources.append({"podSelector": {}})
    # Azure Monitor managed Prometheus: its scraper (the ama-metrics ReplicaSet in kube-system)
    # reads /metrics through the proxy port (k8s.autoscale.pod_monitor).
    sources.append({
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
        "podSelector": {"matchLabels": dict(MANAGED_PROMETHEUS_LABELS)},
    })
    dns = [{"port": 53, "protocol": proto} for proto in ("UDP", "TCP")]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": meta.metadata(meta.APP_NAME, meta.labels(spec), namespace=spec.aks.namespace),
        "spec": {
            "podSelector": {"matchLabels": meta.selector_labels(spec)},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [{
                "from": sources,
                "ports": [{"port": spec.vllm.port, "protocol": "TCP"}],
            }],
            "egress": [
                {
                    "to": [{
                        "namespaceSelector": {
                            "matchLabels": {"kubernetes.io/metadata.name": "kube-system"},
                        },
                        "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
                    }],
                    "ports": dns,
                },
                {"ports": [{"port": 443, "protocol": "TCP"}]},
            ],
        },
    }


def vllm_objects(
    spec: Spec,
    *,
    storage_account: Value = PLACEHOLDER_STORAGE_ACCOUNT,
    client_id: Value = PLACEHOLDER_ID,
    tenant_id: Value = PLACEHOLDER_ID,
) -> list[dict[str, Any]]:
    """Everything the vLLM server needs in its namespace, in apply order (the API key Secret
    comes from ``api_key_secret``)."""
    return [
        namespace(spec),
        service_account(spec, client_id=client_id, tenant_id=tenant_id),
        fetch_config(spec),
        proxy.config_map(spec),
        deployment(spec, storage_account=storage_account),
        service(spec),
        disruption_budget(spec),
        network_policy(spec),
    ]


def api_key_secret(spec: Spec, api_key: Value) -> dict[str, Any]:
    """The Secret the Deployment reads VLLM_API_KEY from."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": meta.metadata(
            API_KEY_SECRET_NAME, meta.labels(spec), namespace=spec.aks.namespace
        ),
        "type": "Opaque",
        "stringData": {API_KEY_SECRET_KEY: api_key},
    }
