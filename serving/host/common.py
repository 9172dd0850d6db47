"""What the host-side tools share: the stack file fab deploy left, Blob access, JSON output.

Every host-side tool prints exactly one JSON object as its last line (``{"error": ...}`` and
exit 2 on failure), which ``provisioning.remote.Host.json`` reads.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from serving.stack import stackfile
from serving.stack.errors import SpecError
from serving.stack.spec import Spec


class HostError(Exception):
    pass


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="the stack file fab deploy wrote")


def add_blob(p: argparse.ArgumentParser) -> None:
    p.add_argument("--account-url", default="")
    p.add_argument("--client-id", default="")
    p.add_argument("--secrets-stdin", action="store_true",
                   help="read a JSON object of secrets (connection_string, hf_token) from stdin")


def spec_of(args: argparse.Namespace) -> Spec:
    return stackfile.load(config=Path(args.config))


def secrets(args: argparse.Namespace) -> dict[str, str]:
    if not getattr(args, "secrets_stdin", False):
        return {}
    text = sys.stdin.read().strip()
    return dict(json.loads(text)) if text else {}


def blob_access(args: argparse.Namespace, secret: dict[str, str]) -> dict[str, str]:
    """The keyword arguments of ``blobfetch.mirror`` from ``add_blob``'s options."""
    return {"account_url": args.account_url, "client_id": args.client_id,
            "connection_string": secret.get("connection_string", "")}


def publish(staged: Path, dest: Path) -> None:
    """Make ``staged`` readable by the service user and put it at ``dest`` in one rename; an
    existing ``dest`` is moved aside first and removed after, so readers never see half."""
    for path in [staged, *staged.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    dest.parent.mkdir(parents=True, exist_ok=True)
    old = dest.with_name(dest.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        dest.rename(old)
    staged.rename(dest)
    shutil.rmtree(old, ignore_errors=True)
    fd = os.open(dest.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself survives a crash
    finally:
        os.close(fd)


def run(body: Callable[[], dict[str, Any]]) -> int:
    try:
        out = body()
    except SpecError as exc:
        print(json.dumps({"error": "; ".join(str(p) for p in exc.problems)}))
        return 2
    except HostError as exc:
        print(json.dumps({"error": str(exc)}))
        return 2
    print(json.dumps(out, sort_keys=True))
    return 0
