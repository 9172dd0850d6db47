"""The AKS GPU pool as Kubernetes sees it, and the NVIDIA device plugin that exposes its GPUs.

The Pulumi node pool and the pod specs both read the taint and label from here.
"""

from __future__ import annotations

from typing import Any

from k8s import meta
from serving.stack.spec import Spec

GPU_POOL_NAME = "gpu"
GPU_TAINT_KEY = "sku"
GPU_TAINT_VALUE = "gpu"
GPU_TAINT_EFFECT = "NoSchedule"
# AKS node pools take taints as "key=value:Effect" strings.
GPU_NODE_TAINT = f"{GPU_TAINT_KEY}={GPU_TAINT_VALUE}:{GPU_TAINT_EFFECT}"
# Set as node labels on the GPU pool; the pods select on them.
GPU_NODE_LABELS = {GPU_TAINT_KEY: GPU_TAINT_VALUE}
GPU_NODE_SELECTOR = dict(GPU_NODE_LABELS)
GPU_TOLERATION = {
    "key": GPU_TAINT_KEY,
    "operator": "Equal",
    "value": GPU_TAINT_VALUE,
    "effect": GPU_TAINT_EFFECT,
}
GPU_RESOURCE = "nvidia.com/gpu"

DEVICE_PLUGIN_NAME = "nvidia-device-plugin"
DEVICE_PLUGIN_VERSION = "0.18.2"
DEVICE_PLUGIN_IMAGE = f"nvcr.io/nvidia/k8s-device-plugin:v{DEVICE_PLUGIN_VERSION}"
DEVICE_PLUGIN_NAMESPACE = "kube-system"
_KUBELET_PLUGINS_DIR = "/var/lib/kubelet/device-plugins"

_DEVICE_PLUGIN_SKIPS = {
    "CKV_K8S_8": "the device plugin serves no health endpoint; kubelet tracks it over its socket",
    "CKV_K8S_9": "the device plugin serves no health endpoint; kubelet tracks it over its socket",
    "CKV_K8S_23": "the plugin registers a socket in kubelet's root-owned device-plugins directory",
    "CKV_K8S_40": "the plugin registers a socket in kubelet's root-owned device-plugins directory",
    "CKV_K8S_43": "NVIDIA publishes the plugin by version tag; the tag is pinned here",
    "CKV2_K8S_6": "the plugin has no network traffic: it talks to kubelet over a unix socket",
}


def _labels(spec: Spec) -> dict[str, str]:
    return {
        **_selector(spec),
        "app.kubernetes.io/version": DEVICE_PLUGIN_VERSION,
        "app.kubernetes.io/component": "device-plugin",
        "app.kubernetes.io/part-of": meta.part_of(),
        "app.kubernetes.io/managed-by": meta.MANAGED_BY,
    }


def _selector(spec: Spec) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": DEVICE_PLUGIN_NAME,
        "app.kubernetes.io/instance": f"{DEVICE_PLUGIN_NAME}-{spec.stack}",
    }


def _container() -> dict[str, Any]:
    return {
        "name": DEVICE_PLUGIN_NAME,
        "image": DEVICE_PLUGIN_IMAGE,
        "imagePullPolicy": "Always",
        # A node whose driver is not ready yet keeps the plugin running (it re-checks)
        # instead of crash-looping.
        "env": [{"name": "FAIL_ON_INIT_ERROR", "value": "false"}],
        "resources": {
            "requests": {"cpu": "50m", "memory": "64Mi"},
            "limits": {"cpu": "100m", "memory": "128Mi"},
        },
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [{"name": "device-plugins", "mountPath": _KUBELET_PLUGINS_DIR}],
    }


def device_plugin(spec: Spec) -> list[dict[str, Any]]:
    """The NVIDIA device plugin DaemonSet on the GPU pool (AKS installs the driver, not the
    plugin: without it no pod can request ``nvidia.com/gpu``)."""
    pod_spec = {
        "priorityClassName": "system-node-critical",
        "automountServiceAccountToken": False,
        "nodeSelector": dict(GPU_NODE_SELECTOR),
        "tolerations": [dict(GPU_TOLERATION)],
        "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [_container()],
        "volumes": [{
            "name": "device-plugins",
            "hostPath": {"path": _KUBELET_PLUGINS_DIR, "type": "Directory"},
        }],
    }
    return [{
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": meta.metadata(
            DEVICE_PLUGIN_NAME,
            _labels(spec),
            namespace=DEVICE_PLUGIN_NAMESPACE,
            annotations=meta.skip_annotations(_DEVICE_PLUGIN_SKIPS),
        ),
        "spec": {
            "selector": {"matchLabels": _selector(spec)},
            "updateStrategy": {"type": "RollingUpdate"},
            "template": {"metadata": {"labels": _labels(spec)}, "spec": pod_spec},
        },
    }]
