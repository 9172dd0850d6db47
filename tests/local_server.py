"""A private copy of the local stack served by a real vLLM CPU server, for integration tests.

Each user gets its own folder (model, adapters, API key, adapter record) and a free port, so
tests never touch the checkout's .local/ or a server someone started by hand.
"""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from serving.local import run as localrun
from serving.stack import layout as layouts
from serving.stack import secretref, stackfile
from serving.stack.layout import Layout
from serving.stack.spec import Spec

VLLM_PYTHON = stackfile.ROOT / ".venv-vllm" / "bin" / "python"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclasses.dataclass
class Served:
    spec: Spec
    root: Path
    layout: Layout
    server: localrun.LocalServer
    key: str
    key_file: Path


def local_copy(root: Path, name: str, **overrides: Any) -> tuple[dict[str, Any], Spec, Layout,
                                                                 str, Path]:
    """The local stack copied under ``root`` (model, adapters, key made there) on a free port:
    (un-namespaced config values, spec, layout, API key, key file)."""
    if not VLLM_PYTHON.is_file():
        pytest.fail(f"{VLLM_PYTHON} is missing: run `python -m serving local setup --stack local`")
    document = yaml.safe_load(stackfile.stack_path("local").read_text())
    config = document["config"]
    ns = stackfile.namespace()
    config[f"{ns}:vllmPort"] = free_port()
    # Absolute paths, so the spec means the same folders to the CLI and to the fixtures.
    config[f"{ns}:modelSource"] = str(root / config[f"{ns}:modelSource"])
    for adapter in config[f"{ns}:adapters"]:
        adapter["source"] = str(root / adapter["source"])
    key_file = root / ".local/api-key"
    config[f"{ns}:apiKeyRef"] = f"file:{key_file}"
    config.update({f"{ns}:{k}": v for k, v in overrides.items()})
    config_file = root / f"Pulumi.{name}.yaml"
    config_file.write_text(yaml.safe_dump(document))
    spec = stackfile.load(config=config_file)
    layout = dataclasses.replace(layouts.local(root), python=str(VLLM_PYTHON),
                                 venv_dir=str(VLLM_PYTHON.parent.parent))
    localrun.setup_files(spec, layout, root=root)
    key = secretref.resolve(spec.api_key, root=root)
    values = {k.split(":", 1)[1]: v for k, v in config.items()}
    return values, spec, layout, key, key_file


@contextmanager
def serve_local_copy(root: Path, name: str, **overrides: Any) -> Iterator[Served]:
    """Start vLLM on a copy of Pulumi.local.yaml under ``root``; ``overrides`` are config keys."""
    _, spec, layout, key, key_file = local_copy(root, name, **overrides)
    server = localrun.LocalServer(spec, layout)
    localrun.start(server, key)
    try:
        yield Served(spec, root, layout, server, key, key_file)
    finally:
        localrun.stop(server)
