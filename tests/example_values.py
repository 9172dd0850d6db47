"""The checked-in cloud stacks as an operator fills them in: their example values
(``serving.stack.examples``) replaced by stand-ins of the operator's own. Tests that run the
Pulumi program or `fab deploy` on a checked-in stack use these; the files stay examples."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any

from serving.stack import examples

OWN_SSH_KEY = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGk7Oq1m0f0b9cJvYtQm3yM8xVt0nJ2Yw4s6pQe1rLZa "
               "ops@example")
# Each documentation range becomes a private range of the same size, one per example range.
_OWN_NETWORKS = {str(doc): f"10.{240 + i}.0.0/24" for i, doc in
                 enumerate(examples.DOCUMENTATION_NETWORKS) if doc.version == 4}


def own_digest(name: str, version: str) -> str:
    import hashlib

    return hashlib.sha256(f"{name}/{version}".encode()).hexdigest()


def _own_cidr(cidr: str) -> str:
    net = ipaddress.ip_network(cidr, strict=False)
    for doc, own in _OWN_NETWORKS.items():
        if net.version == 4 and net.subnet_of(ipaddress.ip_network(doc)):  # type: ignore[arg-type]
            return own
    return cidr


def filled_in(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` (un-namespaced config) with every example value replaced."""
    out = dict(values)
    key = str(out.get("sshPublicKey") or "")
    if examples.SSH_KEY_MARK in key or examples.SSH_KEY_MATERIAL in key:
        out["sshPublicKey"] = OWN_SSH_KEY
    for alias in ("sshCidrs", "apiCidrs"):
        if isinstance(out.get(alias), list):
            out[alias] = [_own_cidr(c) if isinstance(c, str) else c for c in out[alias]]
    if isinstance(out.get("adapters"), list):
        out["adapters"] = [
            {**a, "sha256": own_digest(str(a.get("name")), str(a.get("version")))}
            if isinstance(a, dict) and a.get("sha256") in examples.DIGESTS else a
            for a in out["adapters"]]
    return out
