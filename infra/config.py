"""The one place the Pulumi program reads config: the stack's values into the serving spec.

Every key declared in ``Pulumi.yaml`` is read here and handed, un-namespaced, to
``serving.stack.stackfile.from_values``, which fills in the schema's defaults and validates
everything at once. Bad input raises ``SpecError`` (each problem naming its key) before any
resource is registered. The API key's value is read only where a resource needs it.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from typing import Any

import pulumi
from pulumi.runtime.config import is_config_secret

from serving.plan import gate
from serving.stack import secretref, stackfile
from serving.stack.errors import Problem, SpecError
from serving.stack.spec import Spec

# AKS overlay networking: pod and service ranges live outside the VNet and must not overlap it.
AKS_POD_CIDR = "192.168.0.0/16"
AKS_SERVICE_CIDR = "172.16.0.0/16"
AKS_DNS_SERVICE_IP = "172.16.0.10"
# Every VNet gets one workload subnet of this size (or the whole VNet if it is smaller).
SUBNET_PREFIX = 22
MIN_VNET_PREFIX = 26

# Passed to from_values in place of a clear-text apiKey so that the value never travels.
_CLEAR_TEXT = "<set in clear text>"


@dataclass(frozen=True)
class StackConfig:
    """The validated spec plus what only the cloud side needs."""

    spec: Spec
    # The vLLM API key as a secret Output, for targets that hand it to a resource (aks).
    api_key: pulumi.Output[str] | None

    @property
    def subnet_cidr(self) -> str:
        return workload_subnet(self.spec.network.vnet_cidr)


def workload_subnet(vnet_cidr: str) -> str:
    net = ipaddress.ip_network(vnet_cidr)
    return str(next(net.subnets(new_prefix=max(net.prefixlen, SUBNET_PREFIX))))


def _decode(raw: str, decl: dict[str, Any]) -> Any:
    """The engine passes strings raw and everything else as JSON text."""
    if decl.get("type") == "string":
        return raw
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):  # malformed, overlong digits, nested past the stack
        return raw  # left for the spec to reject, naming the key


def read_values(config: pulumi.Config) -> dict[str, Any]:
    """Un-namespaced values of every key in the schema that the stack sets."""
    values: dict[str, Any] = {}
    for key, decl in stackfile.known_keys().items():
        raw = config.get(key)
        if raw is None:
            continue
        if key in stackfile.SECRET_KEYS:
            # Only whether it is set, and set as a secret, enters the spec; never the value.
            if raw:
                secret = is_config_secret(config.full_key(key))
                values[key] = stackfile.SECRET_PRESENT if secret else _CLEAR_TEXT
            continue
        values[key] = _decode(raw, decl)
    return values


def infra_checks(spec: Spec, where: str) -> list[Problem]:
    """Rules only the cloud side has: address plan and who may reach the AKS API server."""
    ns = stackfile.namespace()
    problems: list[Problem] = []
    if not spec.on.cloud:
        return problems
    vnet = ipaddress.ip_network(spec.network.vnet_cidr)
    if vnet.version != 4 or vnet.prefixlen > MIN_VNET_PREFIX:
        problems.append(Problem(f"{where}: {ns}:vnetCidr",
                                f"{vnet} is too small; allowed: an IPv4 range of "
                                f"/{MIN_VNET_PREFIX} or larger"))
    if spec.on.kubernetes:
        for other in (AKS_POD_CIDR, AKS_SERVICE_CIDR):
            if vnet.version == 4 and vnet.overlaps(ipaddress.ip_network(other)):
                problems.append(Problem(f"{where}: {ns}:vnetCidr",
                                        f"{vnet} overlaps the AKS pod/service range {other};"
                                        f" allowed: a range outside {AKS_POD_CIDR} and "
                                        f"{AKS_SERVICE_CIDR}"))
        if not spec.network.ssh_cidrs:
            problems.append(Problem(f"{where}: {ns}:sshCidrs",
                                    "is empty: the AKS API server admits only the operators' "
                                    "networks; allowed: their CIDRs"))
    return problems


def api_key(spec: Spec, config: pulumi.Config, where: str) -> pulumi.Output[str] | None:
    """The key's value as a secret, from wherever the spec says it lives: Pulumi's encrypted
    config, or the one resolver every other consumer uses (``secretref``, which also refuses a
    key file readable by group or others)."""
    ref = spec.api_key
    if ref.kind == "pulumi":
        return config.require_secret("apiKey")
    if ref.kind not in ("env", "file"):
        return None
    try:
        return pulumi.Output.secret(secretref.resolve(ref, root=stackfile.ROOT))
    except SpecError as exc:
        ns = stackfile.namespace()
        raise SpecError([Problem(f"{where}: {ns}:apiKeyRef", p.message)
                         for p in exc.problems]) from None


def file_checks(stack: str, where: str) -> list[Problem]:
    """What ``python -m serving validate`` checks of the stack file beyond its values: every
    key the engine hands over in the project's namespace (or a provider's), and the file
    itself, where it is, read within bounds with no key twice (the engine keeps one value
    of a duplicated key; which one decides whether production is protected) and each value
    of its declared type."""
    problems: list[Problem] = []
    every_key = {key: None for key in pulumi.runtime.config.CONFIG.get()}
    try:
        stackfile.config_values({"config": every_key}, where)
    except SpecError as exc:
        problems += exc.problems
    path = stackfile.stack_path(stack)
    if path.is_file():
        try:
            # The engine hands every value over as text: only the file shows "1" or "true"
            # where the schema declares an integer or a boolean.
            problems += stackfile.type_problems(stackfile.read_config(path, where), where)
        except SpecError as exc:
            problems += [p for p in exc.problems if p not in problems]
    return problems


def load() -> StackConfig:
    """Read and validate the current stack's config; raise before anything is created."""
    stack = pulumi.get_stack()
    where = f"Pulumi.{stack}.yaml"
    config = pulumi.Config(stackfile.namespace())
    problems = file_checks(stack, where) if not stackfile.stack_name_problem(stack) else []
    if problems:  # the file is read first: its values may be ambiguous (a key twice)
        raise SpecError(problems)
    spec = stackfile.from_values(read_values(config), stack=stack, where=where)
    # The one gate `serving validate` and `fab deploy` pass too: capacity, no example values.
    problems = infra_checks(spec, where) + gate.problems(spec, where=where)
    if problems:
        raise SpecError(problems)
    # Only the AKS target puts the key into a resource (a Kubernetes Secret); on VMs
    # `fab deploy` installs it, so `pulumi up` never needs to read it there.
    key = api_key(spec, config, where) if spec.on.kubernetes else None
    return StackConfig(spec=spec, api_key=key)
