"""What the host-side tools share: the stack file fab deploy left, Blob access, JSON output.

Every host-side tool prints exactly one JSON object as its last line (``{"error": ...}`` and
exit 2 on failure), which ``provisioning.remote.Host.json`` reads.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from serving import stackfile
from serving.errors import SpecError
from serving.spec import Spec


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
