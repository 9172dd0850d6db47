"""Everything a deploy needs, read and checked on this machine before any host is touched.

Option precedence: task argument > stack config (Pulumi.<stack>.yaml / --config) > the
config schema's defaults. Stack outputs (hosts, storage account, identity) come from
``pulumi stack output`` when the CLI is present, else from the task's options.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from provisioning.remote import CONNECT_TIMEOUT_SECONDS, parse_host
from serving.stack import layout as layouts
from serving.stack import secretref, stackfile
from serving.stack.errors import Problem, SpecError
from serving.stack.spec import SecretRef, Spec

PULUMI_TIMEOUT_SECONDS = 60
HEALTH_TIMEOUT_SECONDS = 900  # a cold vLLM start on a GPU VM: weights + torch.compile
BLOB_SUFFIX = "blob.core.windows.net"
UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}\Z")


@dataclass(frozen=True)
class BlobAccess:
    """How hosts reach Blob: the account URL and either the VM's managed identity or a
    connection string (Azurite, or an operator's SAS) that travels over stdin."""

    account_url: str = ""
    client_id: str = ""  # user-assigned managed identity of the VMs
    connection_string: str = field(default="", repr=False)

    @property
    def configured(self) -> bool:
        return bool(self.account_url or self.connection_string)


@dataclass(frozen=True)
class MetricsAccess:
    """Where each VM's Prometheus agent writes (the stack's ``metricsIngestionUrl`` output)
    and as whom (the VMs' user-assigned identity, ``identityClientId``); empty when the stack
    exports none (vmMetrics false, or hosts given by hand)."""

    ingestion_url: str = ""
    client_id: str = ""

    @property
    def configured(self) -> bool:
        return bool(self.ingestion_url and self.client_id)


@dataclass(frozen=True)
class DeploySettings:
    spec: Spec
    config_file: Path  # the stack file the spec came from
    hosts: tuple[str, ...]
    ssh_key_file: str
    api_key: str = field(repr=False)
    blob: BlobAccess
    hf_token: str = field(default="", repr=False)
    health_timeout_s: float = HEALTH_TIMEOUT_SECONDS
    connect_timeout_s: float = CONNECT_TIMEOUT_SECONDS
    dry: bool = False
    metrics: MetricsAccess = MetricsAccess()
    # Secrets a dry run went on without (their values are empty): files that hold them are
    # planned as writes, never compared.
    unread: tuple[str, ...] = ()

    def host_stack_document(self) -> str:
        """The stack as the host-side tools read it: the values the spec resolved here (every
        default explicit, so the host never re-derives them), no secret and no path of the
        operator's machine; the key comes from a root-only file."""
        ns = stackfile.namespace()
        values = {k: v for k, v in stackfile.to_values(self.spec).items()
                  if k not in stackfile.OPERATOR_ONLY_KEYS}
        values["apiKeyRef"] = f"file:{layouts.VM_API_KEY_FILE}"
        header = (f"# Written by fab deploy from {self.config_file.name}: the host-side tools "
                  "read the spec from here.\n")
        return header + yaml.safe_dump({"config": {f"{ns}:{k}": v for k, v in values.items()}},
                                       sort_keys=True)


def _problem(where: str, message: str) -> SpecError:
    return SpecError([Problem(where, message)])


def stack_outputs(stack: str) -> dict[str, Any]:
    """``pulumi stack output --json``; empty when there is no pulumi CLI or no such stack."""
    if not shutil.which("pulumi"):
        return {}
    done = subprocess.run(
        ["pulumi", "stack", "output", "--json", "--show-secrets", "--stack", stack],
        capture_output=True, text=True, timeout=PULUMI_TIMEOUT_SECONDS, check=False,
        cwd=stackfile.ROOT)
    if done.returncode:
        return {}
    try:
        return dict(json.loads(done.stdout or "{}"))
    except json.JSONDecodeError:
        return {}


def _resolve(ref_text: str) -> str:
    """A secret named by ``env:NAME`` or ``file:PATH`` (relative to the checkout)."""
    scheme, _, name = ref_text.partition(":")
    return secretref.resolve(SecretRef(kind=scheme, name=name), root=stackfile.ROOT)


def load(*, stack: str = "", config: str = "", hosts: str = "", blob_url: str = "",
         blob_connection_string_env: str = "", health_timeout_s: float = HEALTH_TIMEOUT_SECONDS,
         connect_timeout_s: float = CONNECT_TIMEOUT_SECONDS, dry: bool = False,
         gate: bool = True, outputs: dict[str, Any] | None = None) -> DeploySettings:
    """Build the settings; a SpecError naming every bad key/option at once. The stack passes
    the same gate as `serving validate` and `pulumi up` (capacity, no example values).

    ``gate=False`` skips that gate for what only reads or stops (status, teardown).
    A dry run needs no secret: one it cannot read is left out (``unread``), and what it would
    write with it is planned as a change.
    """
    if bool(stack) == bool(config):
        raise _problem("--stack/--config", "give exactly one: a stack name or a config file")
    path = Path(config) if config else stackfile.stack_path(stack)
    spec = stackfile.load(config=path) if config else stackfile.load(stack=stack)
    if not spec.on.ssh_hosts:
        raise _problem(f"{path.name}: target", (
            f"is {spec.target!r}; fab deploy rolls out VMs: allowed: vm "
            "(aks is deployed by `pulumi up`, local by `make demo`)"))
    from serving.plan import gate as gate_mod

    problems = gate_mod.problems(spec, where=path.name) if gate else []
    if connect_timeout_s <= 0:
        problems.append(Problem("--connect-timeout", (
            f"{connect_timeout_s:g} s; allowed: seconds above 0 to wait for a host's SSH")))
    outs = stack_outputs(spec.stack) if outputs is None else outputs

    host_list = [h.strip() for h in hosts.split(",") if h.strip()]
    if not host_list:
        for entry in outs.get("hosts") or []:
            address = entry.get("address") or entry.get("privateAddress")
            if address:
                host_list.append(f"{entry.get('adminUser') or spec.vm.admin_user}@{address}")
    if not host_list:
        problems.append(Problem("--hosts", (
            f"no hosts: stack {spec.stack!r} has no `hosts` output (is the pulumi CLI on PATH "
            "and the stack up?); allowed: --hosts user@address[:port],...")))
    for entry in host_list:
        try:
            parse_host(entry, default_user=spec.vm.admin_user)
        except ValueError as exc:
            problems.append(Problem("--hosts", f"{entry!r}: {exc}; allowed: user@address[:port]"))
    if len(set(host_list)) != len(host_list):
        problems.append(Problem("--hosts", "lists a host twice"))

    key_file = str(Path(spec.vm.ssh_private_key_path).expanduser())
    if not Path(key_file).is_file():
        problems.append(Problem(f"{path.name}: sshPrivateKeyPath", (
            f"{key_file} does not exist; allowed: the private key of sshPublicKey")))

    unread: list[str] = []

    def secret(read: Callable[[], str], what: str) -> str:
        """A secret's value; a dry run goes on without one it cannot read (an empty string
        stands in, and the plan says so)."""
        try:
            return read()
        except SpecError as exc:
            if dry:
                unread.append(what)
            else:
                problems.extend(exc.problems)
            return ""

    api_key = secret(lambda: secretref.resolve(spec.api_key, root=stackfile.ROOT,
                                               stack=spec.stack), f"the API key ({spec.api_key})")
    conn_str = ""
    if blob_connection_string_env:
        conn_str = os.environ.get(blob_connection_string_env, "")
        if not conn_str and dry:
            unread.append(f"the Blob connection string (${blob_connection_string_env})")
        elif not conn_str:
            problems.append(Problem("--blob-connection-string-env", (
                f"environment variable {blob_connection_string_env} is unset or empty")))
    account = outs.get("storageAccount") or ""
    url = blob_url or (f"https://{account}.{BLOB_SUFFIX}" if account else "")
    blob = BlobAccess(account_url=url, client_id=str(outs.get("identityClientId") or ""),
                      connection_string=conn_str)
    uses_blob = spec.model.source_kind == "blob" or any(
        a.source_kind == "blob" for a in spec.adapters)
    named = dry and bool(blob_connection_string_env)  # the secret a dry run does not read
    if uses_blob and not blob.configured and not named:
        problems.append(Problem("--blob-url", (
            "the model or adapters come from Blob but the storage account is unknown (no "
            "`storageAccount` stack output); allowed: --blob-url https://ACCOUNT.blob.core."
            "windows.net")))
    metrics = MetricsAccess(ingestion_url=str(outs.get("metricsIngestionUrl") or ""),
                            client_id=blob.client_id)
    if metrics.ingestion_url and not metrics.ingestion_url.startswith("https://"):
        problems.append(Problem("metricsIngestionUrl", (
            "the stack output is not an https URL; allowed: the data collection rule's "
            "Prometheus stream (`pulumi up` exports it)")))
    if metrics.ingestion_url and not UUID_RE.match(metrics.client_id):
        problems.append(Problem("identityClientId", (
            "the stack output is not the VMs' identity's client id (a UUID), which the metrics "
            "agent writes as; allowed: the output `pulumi up` exports")))
    hf_ref = spec.vm.hf_token_ref
    hf_token = secret(lambda: _resolve(hf_ref), f"the HF token ({hf_ref})") if hf_ref else ""
    if problems:
        raise SpecError(problems)
    return DeploySettings(spec=spec, config_file=path, hosts=tuple(host_list),
                          ssh_key_file=key_file, api_key=api_key, blob=blob, hf_token=hf_token,
                          health_timeout_s=health_timeout_s,
                          connect_timeout_s=connect_timeout_s, dry=dry, unread=tuple(unread),
                          metrics=metrics)
