"""Names, labels and annotations shared by every object: each fact stated once."""

from __future__ import annotations

from typing import Any

from serving.stack import layout, stackfile
from serving.stack.spec import Spec

# A field value the builders place as given and never format: a string, or a value the caller
# resolves later (infra/ passes Pulumi Outputs for the storage account, identity and key).
Value = Any

APP_NAME = layout.SERVICE_NAME
MANAGED_BY = "pulumi"
COMPONENT_SERVER = "server"

# Kubernetes label values: at most 63 characters.
_LABEL_MAX = 63


def part_of() -> str:
    return stackfile.namespace()


def instance(spec: Spec) -> str:
    return f"{APP_NAME}-{spec.stack}"[:_LABEL_MAX].rstrip("-._")


def selector_labels(spec: Spec) -> dict[str, str]:
    """The labels a selector matches: stable across versions (a selector is immutable)."""
    return {"app.kubernetes.io/name": APP_NAME, "app.kubernetes.io/instance": instance(spec)}


def labels(spec: Spec, component: str = COMPONENT_SERVER) -> dict[str, str]:
    return {
        **selector_labels(spec),
        "app.kubernetes.io/version": spec.vllm.version,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/part-of": part_of(),
        "app.kubernetes.io/managed-by": MANAGED_BY,
    }


def skip_annotations(skips: dict[str, str]) -> dict[str, str]:
    """checkov's per-resource skips: ``checkov.io/skipN: CHECK_ID=reason``."""
    return {f"checkov.io/skip{i}": f"{check}={reason}" for i, (check, reason) in
            enumerate(sorted(skips.items()), start=1)}


def metadata(
    name: str,
    labels_: dict[str, str],
    *,
    namespace: str | None = None,
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    meta["labels"] = dict(labels_)
    if annotations:
        meta["annotations"] = dict(annotations)
    return meta
