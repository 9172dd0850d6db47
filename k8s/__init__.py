"""Kubernetes objects for the AKS target, built as plain data from the serving spec.

Pulumi (``pulumi-kubernetes``) applies them and the render CLI writes them out as YAML; both
call the builders here, so the pod runs exactly the vLLM command line of
``serving.render.vllm_args``.
"""

from k8s.gpu import (
    GPU_NODE_LABELS,
    GPU_NODE_SELECTOR,
    GPU_NODE_TAINT,
    GPU_POOL_NAME,
    GPU_TAINT_EFFECT,
    GPU_TAINT_KEY,
    GPU_TAINT_VALUE,
    GPU_TOLERATION,
    device_plugin,
)
from k8s.objects import api_key_secret, vllm_objects

__all__ = [
    "GPU_NODE_LABELS",
    "GPU_NODE_SELECTOR",
    "GPU_NODE_TAINT",
    "GPU_POOL_NAME",
    "GPU_TAINT_EFFECT",
    "GPU_TAINT_KEY",
    "GPU_TAINT_VALUE",
    "GPU_TOLERATION",
    "api_key_secret",
    "device_plugin",
    "vllm_objects",
]
