"""Values that only stand in for the operator's own: the checked-in cloud stacks carry them so
that they validate and render as examples, and nothing may create or roll out resources with
them (`pulumi up`, `fab deploy`). One place says what an example value is.

- the example SSH key (its comment says ``replace-with-your-key``; the key material is ours);
- an adapter digest that is one of the checked-in examples or a filler pattern (``0`` x 64,
  ``deadbeef`` x 8): the weights behind it were never digested;
- documentation address ranges (RFC 5737, RFC 3849) as who may reach SSH or the API.
"""

from __future__ import annotations

import ipaddress

from serving.stack import stackfile
from serving.stack.errors import Problem
from serving.stack.spec import Spec

SSH_KEY_MARK = "replace-with-your-key"
SSH_KEY_MATERIAL = "AAAAC3NzaC1lZDI1NTE5AAAAINXo7c6mmuiEzfaQmNPrvojpWuvUC+5orc9YbzEpYccu"
DIGESTS = frozenset({
    "5b1f0e7c2a9d4c3e8f6a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60",
    "0d9c8b7a6f5e4d3c2b1a09f8e7d6c5b4a39281706f5e4d3c2b1a0f9e8d7c6b5a",
})
_FILLER_UNIT_MAX = 8
DOCUMENTATION_NETWORKS = tuple(ipaddress.ip_network(n) for n in (
    "192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32"))
ALLOW_HINT = "validate --allow-examples checks the shape alone"


def is_filler_digest(digest: str) -> bool:
    """A digest written by hand: one short unit repeated (``0000...``, ``deadbeef...``)."""
    return any(len(digest) % n == 0 and digest == digest[:n] * (len(digest) // n)
               for n in range(1, _FILLER_UNIT_MAX + 1))


def _documentation(cidr: str) -> bool:
    net = ipaddress.ip_network(cidr, strict=False)
    return any(net.version == doc.version and net.subnet_of(doc)  # type: ignore[arg-type]
               for doc in DOCUMENTATION_NETWORKS)


def problems(spec: Spec, where: str) -> list[Problem]:
    """Each example value a cloud stack still carries, naming its key and what replaces it."""
    if not spec.on.cloud:
        return []
    found: list[Problem] = []
    ns = stackfile.namespace()

    def key(alias: str) -> str:
        return f"{where}: {ns}:{alias}"

    public_key = spec.vm.ssh_public_key
    if SSH_KEY_MARK in public_key or SSH_KEY_MATERIAL in public_key:
        found.append(Problem(key("sshPublicKey"), (
            "is the example key; replace it with your own public key (the contents of "
            "e.g. ~/.ssh/id_ed25519.pub), whose private key sshPrivateKeyPath names")))
    for alias, cidrs in (("sshCidrs", spec.network.ssh_cidrs),
                         ("apiCidrs", spec.network.api_cidrs)):
        docs = [str(c) for c in cidrs if _documentation(str(c))]
        if docs:
            found.append(Problem(key(alias), (
                f"{', '.join(docs)} is a documentation range (RFC 5737/3849) from the example; "
                "replace it with the CIDRs of your operators' and clients' own networks")))
    for i, adapter in enumerate(spec.adapters):
        if adapter.sha256 in DIGESTS or (adapter.sha256 and is_filler_digest(adapter.sha256)):
            found.append(Problem(key(f"adapters[{i}].sha256"), (
                f"{adapter.sha256[:12]}... is an example digest; replace it with the digest of "
                f"{adapter.name} {adapter.version} as uploaded (`python -m serving digest "
                "FOLDER`)")))
    return found
