"""Run the Pulumi program under ``pulumi.runtime.set_mocks``, one checked-in stack at a time.

No Pulumi CLI or provider plugin is involved: a mock monitor records every registered
resource (inputs, outputs and the options the engine would get, such as ``protect``) and
answers the few invokes the program makes.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import runpy
import sys
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pulumi
import yaml
from example_values import filled_in
from pulumi.runtime import mocks as pulumi_mocks
from pulumi.runtime import rpc
from pulumi.runtime.settings import ROOT

ROOT_DIR = Path(__file__).resolve().parent.parent
PROGRAM = ROOT_DIR / "infra" / "__main__.py"
PROJECT = "exaone-serving"

SUBSCRIPTION_ID = "11111111-2222-3333-4444-555555555555"
TENANT_ID = "99999999-8888-7777-6666-555555555555"
KUBECONFIG = """apiVersion: v1
kind: Config
clusters: [{name: aks, cluster: {server: "https://aks.example.invalid:443"}}]
contexts: [{name: aks, context: {cluster: aks, user: clusterUser}}]
current-context: aks
users: [{name: clusterUser, user: {token: mock-token}}]
"""

# The input holding each Azure type's own name (else azure-native autonames it).
_NAME_INPUTS = {
    "azure-native:resources:ResourceGroup": "resourceGroupName",
    "azure-native:storage:StorageAccount": "accountName",
    "azure-native:storage:BlobContainer": "containerName",
    "azure-native:storage:BlobServiceProperties": "blobServicesName",
    "azure-native:compute:VirtualMachine": "vmName",
    "azure-native:authorization:ManagementLockAtResourceGroupLevel": "lockName",
    "azure-native:devtestlab:GlobalSchedule": "name",
    "azure-native:containerservice:AgentPool": "agentPoolName",
    "azure-native:dashboard:Grafana": "workspaceName",
}


def _uuid(*parts: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "/".join(parts)))


class AzureMocks(pulumi.runtime.Mocks):
    """Outputs as Azure would return them, for the properties the program reads."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self._ips = 0

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict]:
        typ, inputs = args.typ, dict(args.inputs)
        if not typ.startswith("azure-native:"):
            return f"{args.name}-id", inputs
        name = inputs.get(_NAME_INPUTS.get(typ, ""), "") or f"{args.name}1a2b3c4d"
        group = inputs.get("resourceGroupName", name)
        provider = typ.split(":")[1]
        rid = (f"/subscriptions/{SUBSCRIPTION_ID}/resourceGroups/{group}/providers/"
               f"Microsoft.{provider}/{typ.split(':')[2]}/{name}")
        state: dict[str, Any] = {**inputs, "name": name, "id": rid}
        if typ == "azure-native:managedidentity:UserAssignedIdentity":
            state.update(clientId=_uuid("client", name), principalId=_uuid("principal", name),
                         tenantId=TENANT_ID)
        elif typ == "azure-native:compute:VirtualMachine":
            # A list of identity ids goes in; Azure answers with a map keyed by them.
            identity = dict(inputs.get("identity") or {})
            ids = identity.get("userAssignedIdentities") or []
            identity["userAssignedIdentities"] = {
                i: {"principalId": _uuid("principal", i), "clientId": _uuid("client", i)}
                for i in ids}
            state["identity"] = identity
        elif typ == "azure-native:network:PublicIPAddress":
            self._ips += 1
            state["ipAddress"] = f"20.91.0.{self._ips}"
        elif typ == "azure-native:containerservice:ManagedCluster":
            state["identity"] = {**(inputs.get("identity") or {}),
                                 "principalId": _uuid("principal", name), "tenantId": TENANT_ID}
            # The wire name is issuerURL (the SDK maps it to issuer_url).
            state["oidcIssuerProfile"] = {
                "enabled": True, "issuerURL": f"https://oidc.example.invalid/{TENANT_ID}/{name}/"}
            state["fqdn"] = f"{name}.hcp.example.invalid"
        elif typ == "azure-native:monitor:AzureMonitorWorkspace":
            state["metrics"] = {
                "internalId": f"mac_{_uuid('workspace', name)}",
                "prometheusQueryEndpoint": f"https://{name}.{inputs.get('location')}"
                                           ".prometheus.monitor.azure.com"}
        elif typ == "azure-native:monitor:DataCollectionEndpoint":
            # Azure names the host after the endpoint and its region.
            state["metricsIngestion"] = {
                "endpoint": f"https://{name}.{inputs.get('location')}-1.metrics.ingest"
                            ".monitor.azure.com"}
        elif typ == "azure-native:monitor:DataCollectionRule":
            state["immutableId"] = f"dcr-{_uuid('dcr', name).replace('-', '')}"
        elif typ == "azure-native:dashboard:Grafana":
            state["identity"] = {**(inputs.get("identity") or {}),
                                 "principalId": _uuid("principal", name), "tenantId": TENANT_ID}
            state["properties"] = {**(inputs.get("properties") or {}),
                                   "endpoint": f"https://{name}-abcd.weu.grafana.azure.com"}
        elif typ == "azure-native:storage:StorageAccount":
            state["primaryEndpoints"] = {"blob": f"https://{name}.blob.core.windows.net/"}
        return rid, state

    def call(self, args: pulumi.runtime.MockCallArgs) -> tuple[dict, list[tuple[str, str]]]:
        self.calls.append(args.token)
        if args.token == "azure-native:authorization:getClientConfig":
            return {"clientId": _uuid("client", "operator"), "objectId": _uuid("operator"),
                    "subscriptionId": SUBSCRIPTION_ID, "tenantId": TENANT_ID}, []
        if args.token == "azure-native:containerservice:listManagedClusterUserCredentials":
            value = base64.b64encode(KUBECONFIG.encode()).decode()
            return {"kubeconfigs": [{"name": "clusterUser", "value": value}]}, []
        raise NotImplementedError(f"no mock for invoke {args.token}")


@dataclass
class Registered:
    """One resource as the engine would see it."""

    urn: str
    type: str
    name: str
    custom: bool
    parent: str
    protect: bool
    retain_on_delete: bool
    provider: str
    # URNs this resource waits for: explicit dependsOn and those its inputs come from.
    dependencies: list[str] = field(default_factory=list)
    inputs: dict[str, Any] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)
    ignore_changes: list[str] = field(default_factory=list)


class RecordingMonitor(pulumi_mocks.MockMonitor):
    """The SDK's mock monitor, also keeping the resource options it is sent."""

    def __init__(self, mocks: AzureMocks) -> None:
        super().__init__(mocks)
        self.registered: list[Registered] = []

    def RegisterResource(self, request: Any) -> Any:
        response = super().RegisterResource(request)
        if request.type != "pulumi:pulumi:Stack":
            inputs = rpc.deserialize_properties(request.object)
            registration = self.resources[response.urn]
            self.registered.append(Registered(
                urn=response.urn, type=request.type, name=request.name,
                custom=bool(request.custom), parent=request.parent,
                protect=bool(request.protect), retain_on_delete=bool(request.retainOnDelete),
                provider=request.provider, dependencies=list(request.dependencies),
                inputs=inputs, state=dict(registration.state),
                ignore_changes=list(request.ignoreChanges)))
        return response


@dataclass
class Run:
    """What one program run registered and exported."""

    stack: str
    resources: list[Registered]
    outputs: dict[str, Any]
    secret_outputs: set[str]
    calls: list[str]

    def of_type(self, token: str) -> list[Registered]:
        return [r for r in self.resources if r.type == token]

    def by_urn(self, urn: str) -> Registered:
        return next(r for r in self.resources if r.urn == urn)


def example_values(stack: str) -> dict[str, Any]:
    """The un-namespaced config of a checked-in ``Pulumi.<stack>.yaml``, as checked in."""
    document = yaml.safe_load((ROOT_DIR / f"Pulumi.{stack}.yaml").read_text()) or {}
    prefix = f"{PROJECT}:"
    return {k[len(prefix):]: v for k, v in (document.get("config") or {}).items()
            if k.startswith(prefix)}


def stack_values(stack: str) -> dict[str, Any]:
    """A checked-in stack as an operator fills it in (its example values replaced): the
    program refuses example values before registering anything."""
    return filled_in(example_values(stack))


def _engine_value(value: Any) -> str:
    """How the engine hands config to a program: strings raw, everything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value)


@contextmanager
def _environ(env: Mapping[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def run_program(stack: str, values: Mapping[str, Any], *, secrets: tuple[str, ...] = (),
                env: Mapping[str, str] | None = None) -> Run:
    """Run ``infra/__main__.py`` for ``stack`` with ``values``; raise what the program raises
    (``run_program_capture`` also hands back what was registered before the error)."""
    run, error = run_program_capture(stack, values, secrets=secrets, env=env)
    if error is not None:
        raise error
    return run


def run_program_capture(stack: str, values: Mapping[str, Any], *, secrets: tuple[str, ...] = (),
                        env: Mapping[str, str] | None = None,
                        ) -> tuple[Run, BaseException | None]:
    mocks = AzureMocks()
    monitor = RecordingMonitor(mocks)
    ROOT.set(None)  # a fresh root Stack resource per run
    # Pulumi's mocks run on the thread's current event loop; an earlier asyncio.run() in the
    # same process (httpx clients, the benchmark) leaves the main thread without one.
    asyncio.set_event_loop(asyncio.new_event_loop())
    pulumi.runtime.set_mocks(mocks, project=PROJECT, stack=stack, preview=False, monitor=monitor)
    pulumi.runtime.set_all_config(
        {f"{PROJECT}:{k}": _engine_value(v) for k, v in values.items()},
        [f"{PROJECT}:{k}" for k in secrets])
    # A fresh import of the program's own modules for every stack.
    for module in [m for m in sys.modules if m == "infra" or m.startswith("infra.")]:
        del sys.modules[module]

    outputs: dict[str, Any] = {}
    secret_outputs: set[str] = set()

    async def program() -> None:
        runpy.run_path(str(PROGRAM), run_name="__main__")
        stack_resource = pulumi.runtime.get_root_resource()
        for key, value in dict(stack_resource.outputs).items():  # type: ignore[union-attr]
            output = pulumi.Output.from_input(value)
            outputs[key] = await output.future()
            if await output.is_secret():
                secret_outputs.add(key)

    error: BaseException | None = None
    with _environ(env or {}):
        try:
            pulumi.runtime.test(program)()
        except Exception as exc:
            error = exc
    run = Run(stack=stack, resources=list(monitor.registered), outputs=outputs,
              secret_outputs=secret_outputs, calls=list(mocks.calls))
    return run, error
