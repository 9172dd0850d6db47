"""What `pulumi up` (and the first `fab deploy` or rollout) will need from the subscription,
asked before anything is created, and every gap reported at once with what fixes it.

Checks: the deployer's roles on the subscription, resource providers and the EncryptionAtHost
feature, the VM size in the region (offered, not restricted, Trusted Launch, encryption at
host, zones), vCPU quota of its family and of the region, and the model and adapters the stack
names in its Blob storage (with their digests).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from serving.cloud import blobstore
from serving.cloud.azure import Azure, AzureAccessError
from serving.stack import layout
from serving.stack.catalog import AZURE_ROLES, aks_system_nodes
from serving.stack.spec import Spec

# A fresh subscription has only a few providers registered; creating a resource of an
# unregistered namespace fails with MissingSubscriptionRegistration.
BASE_PROVIDERS = ("Microsoft.Compute", "Microsoft.Network", "Microsoft.Storage",
                  "Microsoft.ManagedIdentity")
AKS_PROVIDER = "Microsoft.ContainerService"
# VM auto-shutdown is a DevTestLab schedule (microsoft.devtestlab/schedules), even without a lab.
SHUTDOWN_PROVIDER = "Microsoft.DevTestLab"
ENCRYPTION_AT_HOST = ("Microsoft.Compute", "EncryptionAtHost")
# Metrics (infra.monitoring): the Azure Monitor workspace, the data collection rule and
# endpoint, the Prometheus rule groups. Every cloud stack has them.
METRICS_PROVIDERS = ("Microsoft.Monitor", "Microsoft.Insights", "Microsoft.AlertsManagement")
# An Azure Monitor workspace is a Microsoft.Monitor "accounts" resource; not every region
# offers it, and the provider lists those that do (as display names: "Sweden Central").
WORKSPACE_TYPE = ("Microsoft.Monitor", "accounts")


@dataclass(frozen=True)
class Finding:
    check: str
    message: str
    fix: str
    # Whether `pulumi up` itself fails without it (else a later step does: upload, fab deploy).
    blocks_up: bool = True

    def __str__(self) -> str:
        return f"{self.check}: {self.message}; fix: {self.fix}"


@dataclass
class Report:
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def blocking(self) -> list[Finding]:
        return [f for f in self.findings if f.blocks_up]


def _where(spec: Spec) -> str:
    return f"Pulumi.{spec.stack}.yaml"


def _role_id(definition_id: str) -> str:
    return definition_id.rstrip("/").rsplit("/", 1)[-1].lower()


def _covers(scope: str, target: str) -> bool:
    """Whether an assignment at ``scope`` applies at ``target`` (inherited downwards)."""
    if scope == "/":
        return True
    scope, target = scope.rstrip("/").lower(), target.lower()
    if not scope:
        return False
    # A management group's assignment covers its subscriptions; which ones is not asked here.
    return (scope.startswith("/providers/microsoft.management/")
            or target == scope or target.startswith(scope + "/"))


def check_roles(spec: Spec, azure: Azure, principal: str, report: Report) -> None:
    from azure.mgmt.authorization import AuthorizationManagementClient

    client = AuthorizationManagementClient(azure.credential, azure.subscription_id,
                                           **azure.client_kwargs())
    sub = f"/subscriptions/{azure.subscription_id}"
    # assignedTo() also lists what the principal holds through its groups.
    held = list(client.role_assignments.list_for_subscription(
        filter=f"assignedTo('{principal}')"))

    def roles_on(target: str) -> set[str]:
        return {_role_id(a.role_definition_id) for a in held if _covers(a.scope or "", target)}

    on_sub = roles_on(sub)
    grant = f"az role assignment create --assignee {principal} --scope {sub} --role"
    if not on_sub & {AZURE_ROLES["Owner"], AZURE_ROLES["Contributor"]}:
        report.findings.append(Finding(
            "role", "the deployer is neither Owner nor Contributor on the subscription, so "
            "`pulumi up` cannot create the resource group and its resources",
            f'{grant} "Contributor"'))
    # Role assignments need Microsoft.Authorization/roleAssignments/write: Owner, User Access
    # Administrator or Role Based Access Control Administrator; Contributor lacks it.
    if not on_sub & {AZURE_ROLES["Owner"], AZURE_ROLES["User Access Administrator"],
                     AZURE_ROLES["Role Based Access Control Administrator"]}:
        report.findings.append(Finding(
            "role", "the deployer cannot create role assignments (the workload identity's "
            "Storage Blob Data Reader, AKS's Network Contributor on the subnet)",
            f'{grant} "Role Based Access Control Administrator" (or "User Access '
            'Administrator")'))
    # Management locks need Microsoft.Authorization/locks/*: of the built-in roles only Owner
    # and User Access Administrator have it.
    if spec.production and not on_sub & {AZURE_ROLES["Owner"],
                                         AZURE_ROLES["User Access Administrator"]}:
        report.findings.append(Finding(
            "role", "production: true locks the resource group, which needs Owner or User "
            "Access Administrator", f'{grant} "User Access Administrator"'))
    account = layout.storage_account_name(spec.stack, azure.subscription_id)
    account_id = (f"{sub}/resourceGroups/{layout.resource_group_name(spec.stack)}/providers/"
                  f"Microsoft.Storage/storageAccounts/{account}")
    # Owner manages the account but reads no blobs: data access is its own role (keys are off).
    if not roles_on(account_id) & {AZURE_ROLES["Storage Blob Data Contributor"],
                                   AZURE_ROLES["Storage Blob Data Owner"]}:
        report.findings.append(Finding(
            "role", "the deployer cannot write blobs in the stack's storage account "
            "(`python -m serving upload`), and preflight cannot check them",
            f'az role assignment create --assignee {principal} --scope {account_id} '
            '--role "Storage Blob Data Contributor" (after the first `pulumi up`)',
            blocks_up=False))


def needed_providers(spec: Spec) -> list[str]:
    needed = list(BASE_PROVIDERS)
    if spec.on.cloud:
        needed += METRICS_PROVIDERS
    if spec.on.kubernetes:
        needed.append(AKS_PROVIDER)
    if spec.on.ssh_hosts and spec.vm.auto_shutdown_time and not spec.production:
        needed.append(SHUTDOWN_PROVIDER)
    return needed


def check_providers(spec: Spec, azure: Azure, report: Report) -> None:
    from azure.mgmt.resource.resources import ResourceManagementClient

    client = ResourceManagementClient(azure.credential, azure.subscription_id,
                                      **azure.client_kwargs())
    providers = list(client.providers.list())
    states = {(p.namespace or "").lower(): p.registration_state or "" for p in providers}
    check_workspace_region(spec, providers, report)
    for namespace in needed_providers(spec):
        state = states.get(namespace.lower(), "absent")
        if state != "Registered":
            report.findings.append(Finding(
                "provider", f"{namespace} is {state} on the subscription",
                f"az provider register --namespace {namespace} --wait"))
    if spec.vm.encryption_at_host:
        from azure.mgmt.resource.features import FeatureClient

        features = FeatureClient(azure.credential, azure.subscription_id,
                                 **azure.client_kwargs())
        feature = features.features.get(*ENCRYPTION_AT_HOST)
        state = feature.properties.state if feature.properties else "unknown"
        if state != "Registered":
            report.findings.append(Finding(
                "feature", f"Microsoft.Compute/EncryptionAtHost is {state}, and "
                f"{_where(spec)} asks encryptionAtHost: true",
                "az feature register --namespace Microsoft.Compute --name EncryptionAtHost, "
                "then az provider register --namespace Microsoft.Compute; or set "
                "encryptionAtHost: false"))


def _region(name: str) -> str:
    return name.replace(" ", "").lower()


def check_workspace_region(spec: Spec, providers: list[Any], report: Report) -> None:
    """The stack's metrics workspace lives in its region: refuse a region that has none."""
    namespace, kind = WORKSPACE_TYPE
    types = [t for p in providers if (p.namespace or "").lower() == namespace.lower()
             for t in p.resource_types or [] if (t.resource_type or "").lower() == kind]
    regions = sorted({_region(loc) for t in types for loc in t.locations or []})
    if types and _region(spec.location) not in regions:
        report.findings.append(Finding(
            "location", f"location {spec.location} has no Azure Monitor workspace "
            f"({namespace}/{kind}), where {_where(spec)} writes its metrics; allowed: "
            f"{', '.join(regions)}",
            "set location to a region that offers both the GPU size and the workspace"))


def _text(value: Any) -> str:
    """An SDK enum member as Azure spells it."""
    return str(getattr(value, "value", value))


def _capabilities(sku: Any) -> dict[str, str]:
    return {c.name: c.value for c in sku.capabilities or []}


def _restricted(sku: Any, location: str) -> list[Any]:
    # The SDK's models are mappings: the REST field "values" is ``values_property``.
    return [r for r in sku.restrictions or []
            if location.lower() in [v.lower() for v in r.values_property or []]]


def check_sizes(spec: Spec, azure: Azure, report: Report) -> dict[str, Any]:
    """The region's SKU entries of the stack's sizes (by name), findings for what they lack."""
    from azure.mgmt.compute import ComputeManagementClient

    client = ComputeManagementClient(azure.credential, azure.subscription_id,
                                     **azure.client_kwargs())
    location = spec.location
    sizes = {spec.vm.size: "vmSize"}
    if spec.on.kubernetes:
        sizes[spec.aks.system_vm_size] = "aksSystemVmSize"
    found: dict[str, Any] = {}
    for sku in client.resource_skus.list(filter=f"location eq '{location}'"):
        if sku.resource_type == "virtualMachines" and sku.name in sizes:
            found[sku.name] = sku
    listing = f"az vm list-skus --location {location} --size {{}} --all --output table"
    for size, key in sizes.items():
        sku = found.get(size)
        if sku is None:
            report.findings.append(Finding(
                "size", f"{size} is not offered in {location}",
                f"another location or {key} ({listing.format(size)})"))
            continue
        blocked = [r for r in _restricted(sku, location) if r.type == "Location"]
        if blocked:
            report.findings.append(Finding(
                "size", f"{size} is restricted in {location} for this subscription "
                f"({_text(blocked[0].reason_code)})", f"another location, or ask Azure support to "
                f"enable {size} ({listing.format(size)})"))
        zones = [z for info in sku.location_info or [] for z in info.zones or []]
        zone_blocked = {z for r in _restricted(sku, location) if r.type == "Zone"
                        for info in [r.restriction_info] if info for z in info.zones or []}
        open_zones = sorted(set(zones) - zone_blocked)
        report.notes.append(f"{size} in {location}: zones {', '.join(open_zones) or 'none'}")
        if key != "vmSize":
            continue
        caps = _capabilities(sku)
        if "V2" not in caps.get("HyperVGenerations", "V2"):
            report.findings.append(Finding("size", f"{size} takes no Gen2 image", "vmSize"))
        if spec.on.ssh_hosts and caps.get("TrustedLaunchDisabled", "False") == "True":
            report.findings.append(Finding(
                "size", f"{size} does not support Trusted Launch in {location}",
                "vmSize (the VMs boot with Trusted Launch and Secure Boot)"))
        if spec.vm.encryption_at_host and caps.get("EncryptionAtHostSupported") != "True":
            report.findings.append(Finding(
                "size", f"{size} does not support encryption at host",
                "set encryptionAtHost: false"))
    return found


def quota_pools(spec: Spec) -> list[tuple[str, int]]:
    """(VM size, nodes) the stack may run at its largest: an autoscaled GPU pool counts at
    gpuNodesMax, the most the cluster autoscaler may add (it fails quietly at the quota)."""
    gpu_nodes = spec.scale.gpu_nodes_max if spec.scale.enabled else spec.vm.count
    pools = [(spec.vm.size, gpu_nodes)]
    if spec.on.kubernetes:
        pools.append((spec.aks.system_vm_size, aks_system_nodes(spec.production)))
    return pools


def check_quota(spec: Spec, azure: Azure, skus: dict[str, Any], report: Report) -> None:
    from azure.mgmt.compute import ComputeManagementClient
    from azure.mgmt.resource.resources import ResourceManagementClient

    client = ComputeManagementClient(azure.credential, azure.subscription_id,
                                     **azure.client_kwargs())
    groups = ResourceManagementClient(azure.credential, azure.subscription_id,
                                      **azure.client_kwargs())
    # On a later run the stack's own VMs are already counted as in use: compare with the limit.
    existing = groups.resource_groups.check_existence(layout.resource_group_name(spec.stack))
    usages = {(u.name.value or "").lower(): u for u in client.usage.list(spec.location)}
    need: dict[str, int] = {}
    for size, count in quota_pools(spec):
        sku = skus.get(size)
        if sku is None:
            continue
        vcpus = int(_capabilities(sku).get("vCPUs", "0")) * count
        for family in ((sku.family or "").lower(), "cores"):
            need[family] = need.get(family, 0) + vcpus
    for family, wanted in need.items():
        usage = usages.get(family)
        if usage is None:
            continue
        left = usage.limit - (0 if existing else usage.current_value)
        if wanted > left:
            label = usage.name.localized_value or family
            report.findings.append(Finding(
                "quota", f"{label} in {spec.location}: the stack needs {wanted} vCPUs "
                f"({'gpuNodesMax' if spec.scale.enabled else 'vmCount'} {quota_pools(spec)[0][1]} "
                f"x {spec.vm.size}), {left} of the limit "
                f"{usage.limit} are free",
                f"az quota update --resource-name {usage.name.value} --scope /subscriptions/"
                f"{azure.subscription_id}/providers/Microsoft.Compute/locations/"
                f"{spec.location} --limit-object value={usage.limit + wanted - left}, or a "
                f"smaller {'gpuNodesMax' if spec.scale.enabled else 'vmCount'}"))


def blob_folders(spec: Spec) -> list[tuple[str, str, str]]:
    """(stack key, blob:// source, pinned digest or "") of everything the stack reads from Blob."""
    out = []
    if spec.model.source_kind == "blob":
        out.append(("modelSource", spec.model.source, ""))
    for i, adapter in enumerate(spec.adapters):
        if adapter.source_kind == "blob":
            out.append((f"adapters[{i}]", adapter.source, adapter.sha256))
    return out


def check_blobs(spec: Spec, azure: Azure, report: Report) -> None:
    from azure.core.exceptions import HttpResponseError, ServiceRequestError
    from azure.storage.blob import BlobServiceClient

    folders = blob_folders(spec)
    if not folders:
        return
    # The pods fetch during `pulumi up` in the workload phase; VMs fetch during fab deploy.
    blocks = spec.on.kubernetes and spec.aks.phase == "workload"
    account = layout.storage_account_name(spec.stack, azure.subscription_id)
    # No retries: Blob's policy backs off for about a minute and a half on an account name
    # that does not resolve yet, which is the first-run answer, not a transient one.
    service = BlobServiceClient(layout.blob_account_url(account), credential=azure.credential,
                                retry_total=0, **azure.client_kwargs())
    upload = f"python -m serving upload --stack {spec.stack} --account {account}"
    for key, source, pinned in folders:
        folder = blobstore.BlobFolder.parse(source)
        try:
            listed = blobstore.list_folder(service, folder)
        except ServiceRequestError:
            first = ("`pulumi up` with aksPhase: cluster first" if spec.on.kubernetes
                     else "`pulumi up` first")
            report.findings.append(Finding(
                "blob", f"storage account {account} does not answer (not created yet)",
                f"{first}, then {upload} ...", blocks_up=blocks))
            return
        except HttpResponseError as exc:
            code = getattr(exc, "error_code", None) or exc.status_code
            report.findings.append(Finding(
                "blob", f"storage account {account} refused the listing ({code})",
                "run from a network in sshCidrs, with Storage Blob Data Contributor on the "
                "account", blocks_up=blocks))
            return
        arg = "--model DIR" if key == "modelSource" else \
            f"--adapter {folder.prefix.split('/')[0]}=VERSION:DIR"
        if not listed.files:
            report.findings.append(Finding(
                "blob", f"{key} {source} is not in Blob", f"{upload} {arg}", blocks_up=blocks))
        elif pinned and listed.digest != pinned:
            report.findings.append(Finding(
                "blob", f"{key} {source} holds digest {listed.digest or 'unknown'}, the stack "
                f"pins {pinned}", f"{key}.sha256 in {_where(spec)}, or {upload} {arg} as a new "
                "version", blocks_up=blocks))


def run(spec: Spec, azure: Azure, *, say: Callable[[str], None] = lambda _: None) -> Report:
    """Every check; an Azure error in one is a finding, the others still run."""
    from azure.core.exceptions import AzureError, ClientAuthenticationError

    report = Report()

    def guarded(name: str, check: Callable[[], Any]) -> Any:
        say(f"checking {name}")
        try:
            return check()
        except AzureError as exc:
            message = str(getattr(exc, "message", "") or exc).splitlines()[0][:200]
            report.findings.append(Finding(name, f"could not be read: {message}",
                                           "the deployer needs Reader on the subscription"))
            return None

    try:
        principal = azure.principal_id()
    except (ClientAuthenticationError, AzureAccessError) as exc:
        # Without a token nothing else can be asked: one finding, not one per check.
        message = str(getattr(exc, "message", "") or exc).splitlines()[0][:200]
        report.findings.append(Finding("credentials", f"no ARM token: {message}",
                                       "az login (or fix the ARM_* variables)"))
        return report
    guarded("role", lambda: check_roles(spec, azure, principal, report))
    guarded("provider", lambda: check_providers(spec, azure, report))
    skus = guarded("size", lambda: check_sizes(spec, azure, report)) or {}
    guarded("quota", lambda: check_quota(spec, azure, skus, report))
    guarded("blob", lambda: check_blobs(spec, azure, report))
    return report
