"""The init container that fills the pod's model and adapter volumes before vLLM starts.

It runs ``scripts/fetch-adapters.sh`` (mounted from a ConfigMap) on a manifest computed here
from the spec, so the destinations are the very paths ``serving.render.vllm_args`` hands to vLLM.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from k8s.meta import Value
from serving.stack import layout
from serving.stack.spec import Spec

SCRIPT_PATH = Path(__file__).resolve().parent / "scripts" / "fetch-adapters.sh"
SCRIPT_KEY = "fetch-adapters.sh"
MANIFEST_KEY = "manifest.tsv"
MOUNT_DIR = "/opt/fetch"

AZURE_CLI_VERSION = "2.91.0"
# Set to "sha256:<64 hex>" to pin the init image beyond its tag.
AZURE_CLI_DIGEST = ""
AZURE_CLI_IMAGE = f"mcr.microsoft.com/azure-cli:{AZURE_CLI_VERSION}"


def image() -> str:
    return f"{AZURE_CLI_IMAGE}@{AZURE_CLI_DIGEST}" if AZURE_CLI_DIGEST else AZURE_CLI_IMAGE


def script() -> str:
    return SCRIPT_PATH.read_text()


def manifest_rows(spec: Spec) -> list[tuple[str, str, str, str]]:
    """(kind, source, destination, sha256 or "-") for everything the init container fetches.

    A model from ``hf`` is not listed: on AKS vLLM fetches it itself at its revision.
    """
    pod = layout.POD
    rows: list[tuple[str, str, str, str]] = []
    if spec.model.source_kind == "blob":
        rows.append(("model", spec.model.source, pod.model_path(spec), "-"))
    for adapter in spec.adapters:
        rows.append(("adapter", adapter.source, pod.adapter_path(spec, adapter), adapter.sha256))
    return rows


def manifest(spec: Spec) -> str:
    return "".join("\t".join(row) + "\n" for row in manifest_rows(spec))


def config_data(spec: Spec) -> dict[str, str]:
    return {SCRIPT_KEY: script(), MANIFEST_KEY: manifest(spec)}


def config_digest(data: dict[str, str]) -> str:
    """Changes whenever the script or the manifest does, so the pods roll with it."""
    text = "".join(f"{key}\0{data[key]}\0" for key in sorted(data))
    return hashlib.sha256(text.encode()).hexdigest()


def init_container(
    spec: Spec,
    *,
    storage_account: Value,
    security_context: dict[str, Any],
    mounts: list[dict[str, Any]],
) -> dict[str, Any]:
    """The fetch step; the workload identity webhook adds the AZURE_* variables and the token."""
    return {
        "name": "fetch",
        "image": image(),
        "imagePullPolicy": "Always",
        "command": ["bash", f"{MOUNT_DIR}/{SCRIPT_KEY}", f"{MOUNT_DIR}/{MANIFEST_KEY}"],
        "env": [
            {"name": "STORAGE_ACCOUNT", "value": storage_account},
            # The root filesystem is read-only and the user has no home: az keeps its
            # login cache in AZURE_CONFIG_DIR.
            {"name": "HOME", "value": "/tmp"},
            {"name": "AZURE_CONFIG_DIR", "value": "/tmp/azure"},
            {"name": "PYTHONDONTWRITEBYTECODE", "value": "1"},
        ],
        "resources": {
            "requests": {"cpu": "2", "memory": "4Gi"},
            "limits": {"cpu": "2", "memory": "4Gi"},
        },
        "securityContext": security_context,
        "volumeMounts": [
            {"name": "fetch", "mountPath": MOUNT_DIR, "readOnly": True},
            *mounts,
        ],
    }
