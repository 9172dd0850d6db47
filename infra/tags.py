"""The one tag dict every taggable Azure resource carries."""

from __future__ import annotations

from serving.stack import stackfile
from serving.stack.spec import Spec

TAG_KEYS = ("project", "stack", "target", "role", "managed-by")


def tags(spec: Spec, role: str) -> dict[str, str]:
    """Tags for a resource of ``role`` (network, storage, identity, gpu-vm, aks...)."""
    return {
        "project": stackfile.namespace(),
        "stack": spec.stack,
        "target": spec.target,
        "role": role,
        "managed-by": "pulumi",
    }
