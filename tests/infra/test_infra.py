"""Tier 1: the Pulumi program under mocks, for every checked-in stack, read as policies.

Each policy is a function returning its violations, every one naming the resource's URN; the
tests assert there are none, and ``test_policies_catch_*`` prove each policy can fail.
"""

from __future__ import annotations

import copy
import functools
import importlib
import inspect
import ipaddress
import json
import shlex
from collections.abc import Callable
from typing import Any

import pytest
from pulumi_mocks import (
    Registered,
    Run,
    example_values,
    run_program,
    run_program_capture,
    stack_values,
)

from serving.render import systemd_unit, vllm_args
from serving.stack import layout, stackfile
from serving.stack.catalog import GPU_SKUS, OPEN_SOURCES, VM_IMAGES
from serving.stack.errors import SpecError
from serving.stack.spec import Spec

STACKS = stackfile.stack_names()
API_KEY_ENV = {"EXAONE_API_KEY": "test-api-key-not-real"}
READER_ROLE = "2a2b9908-6ea1-4ae2-8e65-a410df84e7d1"
MONITORING_READER_ROLE = "b0d8363b-8ddd-447d-831f-62ca05bff136"
PUBLISHER_ROLE = "3913510d-42f4-4e42-8a64-420c390055eb"
DCR = "azure-native:monitor:DataCollectionRule"
WORKSPACE = "azure-native:monitor:AzureMonitorWorkspace"
TAG_KEYS = ("project", "stack", "target", "role", "managed-by")
SSH_PORT = 22

RG = "azure-native:resources:ResourceGroup"
NSG = "azure-native:network:NetworkSecurityGroup"
SECURITY_RULE = "azure-native:network:SecurityRule"
SUBNET = "azure-native:network:Subnet"
ACCOUNT = "azure-native:storage:StorageAccount"
BLOB_SERVICE = "azure-native:storage:BlobServiceProperties"
CONTAINER = "azure-native:storage:BlobContainer"
IDENTITY = "azure-native:managedidentity:UserAssignedIdentity"
ROLE = "azure-native:authorization:RoleAssignment"
LOCK = "azure-native:authorization:ManagementLockAtResourceGroupLevel"
VM = "azure-native:compute:VirtualMachine"
SCHEDULE = "azure-native:devtestlab:GlobalSchedule"
CLUSTER = "azure-native:containerservice:ManagedCluster"
POOL = "azure-native:containerservice:AgentPool"
FEDERATION = "azure-native:managedidentity:FederatedIdentityCredential"
DEPLOYMENT = "kubernetes:apps/v1:Deployment"
DAEMONSET = "kubernetes:apps/v1:DaemonSet"
K8S_SECRET = "kubernetes:core/v1:Secret"
K8S_PROVIDER = "pulumi:providers:kubernetes"


@functools.cache
def spec_of(stack: str) -> Spec:
    return stackfile.from_values(stack_values(stack), stack=stack)


@functools.cache
def run_of(stack: str) -> Run:
    return run_program(stack, stack_values(stack), env=API_KEY_ENV)


def _plain(value: Any) -> Any:
    """Inputs of a secret are wrapped by the engine's secret sigil; unwrap them."""
    if isinstance(value, dict) and "4dabf18193072939515e22adb298388d" in value:
        return _plain(value.get("value"))
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


# ---------------------------------------------------------------- policies (violations out)

def _ports_cover(rule: dict[str, Any], port: int) -> bool:
    ranges = [rule.get("destinationPortRange"), *(rule.get("destinationPortRanges") or [])]
    for item in filter(None, ranges):
        text = str(item)
        if text == "*":
            return True
        low, _, high = text.partition("-")
        if int(low) <= port <= int(high or low):
            return True
    return False


def _is_open(source: str) -> bool:
    text = source.strip().lower()
    if text in OPEN_SOURCES:
        return True
    try:
        return ipaddress.ip_network(text, strict=False).prefixlen == 0
    except ValueError:
        return False


def nsg_violations(run: Run, api_port: int) -> list[str]:
    """No inbound Allow rule reaches SSH or the API port from the whole Internet."""
    out = []
    rules: list[tuple[Registered, dict[str, Any]]] = [
        (nsg, rule) for nsg in run.of_type(NSG) for rule in nsg.inputs.get("securityRules") or []]
    rules += [(r, r.inputs) for r in run.of_type(SECURITY_RULE)]
    for owner, rule in rules:
        if str(rule.get("direction", "")).lower() != "inbound":
            continue
        if str(rule.get("access", "")).lower() != "allow":
            continue
        sources = [rule.get("sourceAddressPrefix"), *(rule.get("sourceAddressPrefixes") or [])]
        open_sources = [s for s in filter(None, sources) if _is_open(str(s))]
        for port in (SSH_PORT, api_port):
            if open_sources and _ports_cover(rule, port):
                out.append(f"{owner.urn}: rule {rule.get('name')!r} opens port {port} "
                           f"to {open_sources}")
    return out


def storage_violations(run: Run, spec: Spec) -> list[str]:
    out = []
    subnets = {s.state["id"] for s in run.of_type(SUBNET)}
    operators = [ipaddress.ip_network(c) for c in spec.network.ssh_cidrs]
    for account in run.of_type(ACCOUNT):
        i, urn = account.inputs, account.urn
        expected = {"allowBlobPublicAccess": False, "enableHttpsTrafficOnly": True,
                    "minimumTlsVersion": "TLS1_2", "allowSharedKeyAccess": False}
        out += [f"{urn}: {k} is {i.get(k)!r}, must be {v!r}"
                for k, v in expected.items() if i.get(k) != v]
        rules = i.get("networkRuleSet") or {}
        if rules.get("defaultAction") != "Deny":
            out.append(f"{urn}: network rules must deny by default, "
                       f"got {rules.get('defaultAction')}")
        # Unset means "AzureServices" to Azure: it must say None.
        if rules.get("bypass") != "None":
            out.append(f"{urn}: network rules bypass {rules.get('bypass')!r}, must be None")
        for vnet_rule in rules.get("virtualNetworkRules") or []:
            if vnet_rule.get("virtualNetworkResourceId") not in subnets:
                out.append(f"{urn}: VNet rule for a foreign subnet {vnet_rule}")
        for ip_rule in rules.get("ipRules") or []:
            net = ipaddress.ip_network(ip_rule.get("iPAddressOrRange", ""), strict=False)
            if not any(net.subnet_of(op) for op in operators if op.version == net.version):
                out.append(f"{urn}: IP rule {net} is not one of the operators' networks")
        name = account.state["name"]
        services = [b for b in run.of_type(BLOB_SERVICE) if b.inputs.get("accountName") == name]
        if not services:
            out.append(f"{urn}: no blob service properties (soft delete, versioning)")
        for svc in services:
            for key in ("deleteRetentionPolicy", "containerDeleteRetentionPolicy"):
                if not (svc.inputs.get(key) or {}).get("enabled"):
                    out.append(f"{svc.urn}: {key} is not enabled")
            if svc.inputs.get("isVersioningEnabled") is not True:
                out.append(f"{svc.urn}: blob versioning is not enabled")
        containers = {c.inputs.get("containerName"): c for c in run.of_type(CONTAINER)
                      if c.inputs.get("accountName") == name}
        if set(containers) != {"models", "adapters"}:
            out.append(f"{urn}: containers are {sorted(containers)}, must be models and adapters")
        out += [f"{c.urn}: public access {c.inputs.get('publicAccess')!r}"
                for c in containers.values() if c.inputs.get("publicAccess") not in (None, "None")]
    return out


def identity_violations(run: Run) -> list[str]:
    """Each identity: one read-only role on one resource: Storage Blob Data Reader on the account
    (the vLLM workload), or Monitoring Data Reader on the Azure Monitor workspace (KEDA reading
    the load signal); the VMs' identity also Monitoring Metrics Publisher on the data collection
    rule (their Prometheus agents write through it), and nothing else."""
    out = []
    scopes = {READER_ROLE: [a.state["id"] for a in run.of_type(ACCOUNT)],
              MONITORING_READER_ROLE: [w.state["id"] for w in run.of_type(WORKSPACE)],
              PUBLISHER_ROLE: [r.state["id"] for r in run.of_type(DCR)]}
    names = {READER_ROLE: "account", MONITORING_READER_ROLE: "metrics workspace",
             PUBLISHER_ROLE: "data collection rule"}
    for identity in run.of_type(IDENTITY):
        roles = [r for r in run.of_type(ROLE)
                 if r.inputs.get("principalId") == identity.state["principalId"]]
        kinds = sorted(str(r.inputs.get("roleDefinitionId", "")).rsplit("/", 1)[-1]
                       for r in roles)
        if len(roles) != 1 and kinds != sorted([READER_ROLE, PUBLISHER_ROLE]):
            out.append(f"{identity.urn}: has {len(roles)} role assignments, must have exactly 1 "
                       "(2 only for Blob reading and metrics publishing)")
        for role in roles:
            role_id = str(role.inputs.get("roleDefinitionId", "")).rsplit("/", 1)[-1]
            if role_id not in scopes:
                out.append(f"{role.urn}: role {role.inputs.get('roleDefinitionId')} is not "
                           "Storage Blob Data Reader, Monitoring Data Reader or Monitoring "
                           "Metrics Publisher")
            elif scopes[role_id] != [role.inputs.get("scope")]:
                out.append(f"{role.urn}: scope {role.inputs.get('scope')} is not the "
                           f"{names[role_id]}")
    return out


def vm_violations(run: Run, spec: Spec) -> list[str]:
    out = []
    images = set(VM_IMAGES.values())
    identities = {i.state["id"] for i in run.of_type(IDENTITY)}
    for vm in run.of_type(VM):
        i, urn = vm.inputs, vm.urn
        sec = i.get("securityProfile") or {}
        uefi = sec.get("uefiSettings") or {}
        if sec.get("securityType") != "TrustedLaunch":
            out.append(f"{urn}: security type {sec.get('securityType')!r}, must be TrustedLaunch")
        if not (uefi.get("secureBootEnabled") and uefi.get("vTpmEnabled")):
            out.append(f"{urn}: secure boot and vTPM must both be on, got {uefi}")
        if bool(sec.get("encryptionAtHost")) != spec.vm.encryption_at_host:
            out.append(f"{urn}: encryption at host {sec.get('encryptionAtHost')!r}, stack asks "
                       f"{spec.vm.encryption_at_host}")
        os_profile = i.get("osProfile") or {}
        linux = os_profile.get("linuxConfiguration") or {}
        password_off = linux.get("disablePasswordAuthentication") is True
        if not password_off or os_profile.get("adminPassword"):
            out.append(f"{urn}: password authentication is not disabled")
        if not (linux.get("ssh") or {}).get("publicKeys"):
            out.append(f"{urn}: no SSH public key")
        ref = (i.get("storageProfile") or {}).get("imageReference") or {}
        image = (ref.get("publisher"), ref.get("offer"), ref.get("sku"), ref.get("version"))
        if image not in images:
            out.append(f"{urn}: image {image} is not one of the Gen2 images")
        if uefi.get("secureBootEnabled") and ref.get("publisher") != "Canonical":
            # fab deploy installs Canonical-signed drivers; other images' modules stay unloaded.
            out.append(f"{urn}: Secure Boot with a {ref.get('publisher')} image: its NVIDIA "
                       "module is not signed by a key the firmware trusts")
        if (i.get("hardwareProfile") or {}).get("vmSize") not in GPU_SKUS:
            out.append(f"{urn}: size is not NC H100 v5")
        attached = set((vm.state.get("identity") or {}).get("userAssignedIdentities") or {})
        if attached != identities:
            out.append(f"{urn}: identities {sorted(attached)} are not the workload identity")
    return out


def pool_violations(run: Run) -> list[str]:
    out = []
    gpu_pools = [p for p in run.of_type(POOL) if p.inputs.get("vmSize") in GPU_SKUS]
    if run.of_type(CLUSTER) and not gpu_pools:
        out.append(f"{run.of_type(CLUSTER)[0].urn}: no GPU pool")
    for pool in gpu_pools:
        if "sku=gpu:NoSchedule" not in (pool.inputs.get("nodeTaints") or []):
            out.append(f"{pool.urn}: GPU pool is not tainted sku=gpu:NoSchedule")
        if pool.inputs.get("osSKU") != "Ubuntu":
            out.append(f"{pool.urn}: GPU pool OS SKU {pool.inputs.get('osSKU')!r}, must be Ubuntu")
        if not pool.inputs.get("nodeLabels"):
            out.append(f"{pool.urn}: GPU pool has no labels")
    return out


def protection_violations(run: Run, spec: Spec) -> list[str]:
    """Production: storage protected and the group locked. Otherwise nothing blocks destroy."""
    out = []
    kept = run.of_type(ACCOUNT) + run.of_type(CONTAINER)
    if spec.production:
        out += [f"{r.urn}: production storage is neither protected nor retained on delete"
                for r in kept if not (r.protect or r.retain_on_delete)]
        groups = {g.state["name"] for g in run.of_type(RG)}
        locks = [lk for lk in run.of_type(LOCK) if lk.inputs.get("level") == "CanNotDelete"
                 and lk.inputs.get("resourceGroupName") in groups]
        if not locks:
            out += [f"{g.urn}: production resource group has no CanNotDelete lock"
                    for g in run.of_type(RG)]
    else:
        out += [f"{r.urn}: non-production resource blocks destroy"
                for r in run.resources if r.protect or r.retain_on_delete]
        out += [f"{lk.urn}: non-production stack has a lock" for lk in run.of_type(LOCK)]
    return out


@functools.cache
def _takes_tags(token: str) -> bool:
    _, module, kind = token.split(":")
    cls = getattr(importlib.import_module(f"pulumi_azure_native.{module}"), kind)
    return "tags" in inspect.signature(cls._internal_init).parameters


def tag_violations(run: Run, spec: Spec) -> list[str]:
    out = []
    expected = {"project": "exaone-serving", "stack": spec.stack, "target": spec.target,
                "managed-by": "pulumi"}
    for r in run.resources:
        if not (r.custom and r.type.startswith("azure-native:") and _takes_tags(r.type)):
            continue
        tags = r.inputs.get("tags") or {}
        missing = [k for k in TAG_KEYS if not tags.get(k)]
        wrong = {k: tags.get(k) for k, v in expected.items() if tags.get(k) not in (None, v)}
        if missing or wrong:
            out.append(f"{r.urn}: tags missing {missing} or wrong {wrong}")
    return out


def naming_violations(run: Run) -> list[str]:
    """Children are named after their component, so two instances never collide."""
    components = {r.urn: r.name for r in run.resources if not r.custom}
    return [f"{r.urn}: not named after its component {components[r.parent]!r}"
            for r in run.resources
            if r.parent in components and not r.name.startswith(components[r.parent] + "-")]


# ---------------------------------------------------------------- the policies, per stack

@pytest.fixture(params=STACKS)
def stack(request: pytest.FixtureRequest) -> str:
    return request.param


def test_no_nsg_rule_opens_ssh_or_api_to_the_internet(stack: str) -> None:
    assert nsg_violations(run_of(stack), spec_of(stack).vllm.port) == []


def test_vm_subnet_has_the_nsg_and_denies_the_rest(stack: str) -> None:
    run, spec = run_of(stack), spec_of(stack)
    if spec.target != "vm":
        # AKS manages the NSG of its node resource group; local creates nothing.
        assert run.of_type(NSG) == []
        return
    (nsg,) = run.of_type(NSG)
    (subnet,) = run.of_type(SUBNET)
    assert (subnet.inputs.get("networkSecurityGroup") or {}).get("id") == nsg.state["id"], \
        f"{subnet.urn}: the NSG is not on the subnet"
    rules = nsg.inputs["securityRules"]
    last = max(rules, key=lambda r: r["priority"])
    assert (last["access"], last["sourceAddressPrefix"], last["destinationPortRange"]) == \
        ("Deny", "*", "*"), f"{nsg.urn}: no deny-all inbound rule below the allows"
    allowed: dict[str, set[str]] = {}
    for r in rules:
        if r["access"] == "Allow":
            sources = r.get("sourceAddressPrefixes") or [r["sourceAddressPrefix"]]
            allowed.setdefault(r["destinationPortRange"], set()).update(sources)
    # The API port: its clients and Azure's load balancer probe (tests/infra/test_fleet.py).
    assert allowed == {"22": set(spec.network.ssh_cidrs),
                       str(spec.vllm.port): {*spec.network.api_cidrs, "AzureLoadBalancer"}}, \
        nsg.urn
    # The API port is the proxy's; vLLM's own port (its LoRA admin routes) is never opened.
    assert str(layout.vllm_port(spec)) not in allowed, nsg.urn


def test_storage_is_private_with_soft_delete_and_versioning(stack: str) -> None:
    assert storage_violations(run_of(stack), spec_of(stack)) == []


def _workload_only(run: Run, token: str) -> list[Registered]:
    """The vLLM workload's own identity objects (KEDA's live in infra.monitoring)."""
    return [r for r in run.of_type(token) if "exaone:infra:Metrics$" not in r.urn]


def test_identity_reads_exactly_that_account(stack: str) -> None:
    assert identity_violations(run_of(stack)) == []


def test_vms_are_gen2_trusted_launch_with_ssh_keys_only(stack: str) -> None:
    run, spec = run_of(stack), spec_of(stack)
    assert vm_violations(run, spec) == []
    assert len(run.of_type(VM)) == (spec.vm.count if spec.target == "vm" else 0)


def test_gpu_pool_is_tainted(stack: str) -> None:
    run, spec = run_of(stack), spec_of(stack)
    assert pool_violations(run) == []
    if spec.target == "aks":
        (pool,) = run.of_type(POOL)
        assert pool.inputs["vmSize"] == spec.vm.size and pool.inputs["count"] == spec.vm.count
        assert pool.inputs["gpuProfile"]["driver"] == "Install", pool.urn
        # Finding 5: a GPU pool with a driver from AKS still needs the device plugin.
        assert run.of_type(DAEMONSET), "no NVIDIA device plugin: GPU pods stay Pending"


def test_cluster_has_rbac_network_policy_and_workload_identity(stack: str) -> None:
    run, spec = run_of(stack), spec_of(stack)
    if spec.target != "aks":
        assert run.of_type(CLUSTER) == []
        return
    (cluster,) = run.of_type(CLUSTER)
    i = cluster.inputs
    assert i["enableRBAC"] is True, cluster.urn
    assert i["networkProfile"]["networkPolicy"] in ("azure", "calico", "cilium"), cluster.urn
    assert i["oidcIssuerProfile"]["enabled"] is True, cluster.urn
    assert i["securityProfile"]["workloadIdentity"]["enabled"] is True, cluster.urn
    ranges = i["apiServerAccessProfile"]["authorizedIPRanges"]
    assert ranges and not any(_is_open(r) for r in ranges), f"{cluster.urn}: API server open"
    (system,) = i["agentPoolProfiles"]
    assert system["mode"] == "System" and system["count"] <= 3, cluster.urn


def _unit_argv(unit: str) -> list[str]:
    """ExecStart= of a rendered unit as argv: joined continuations, systemd's quoting undone."""
    text = unit.replace("\\\n", " ")
    line = next(ln for ln in text.splitlines() if ln.startswith("ExecStart="))
    return [w.replace("%%", "%").replace("$$", "$") for w in shlex.split(line[len("ExecStart="):])]


def test_deployment_runs_the_systemd_units_argv(stack: str) -> None:
    run, spec = run_of(stack), spec_of(stack)
    if spec.target != "aks":
        assert run.of_type(DEPLOYMENT) == []
        return
    (deployment,) = run.of_type(DEPLOYMENT)
    (container,) = [c for c in deployment.inputs["spec"]["template"]["spec"]["containers"]
                    if c["name"] == "vllm"]
    pod_argv = container["command"][1:] + container["args"]
    unit_argv = _unit_argv(systemd_unit.render_unit(spec, layout.VM))[1:]
    assert pod_argv == unit_argv, f"{deployment.urn}: the pod and the unit run different vLLM"
    assert pod_argv == [*vllm_args.ENTRYPOINT, *vllm_args.args(spec, layout.POD)]
    served = [m for m in pod_argv if m.startswith("{")]
    assert [json.loads(m)["name"] for m in served] == \
        [a.name for a in spec.adapters], deployment.urn


def test_workload_identity_is_federated_to_the_vllm_service_account(stack: str) -> None:
    run, spec = run_of(stack), spec_of(stack)
    if spec.target != "aks":
        assert _workload_only(run, FEDERATION) == []
        return
    (federation,) = _workload_only(run, FEDERATION)
    (identity,) = _workload_only(run, IDENTITY)
    (cluster,) = run.of_type(CLUSTER)
    (account,) = run.of_type(ACCOUNT)
    (sa,) = run.of_type("kubernetes:core/v1:ServiceAccount")
    meta = sa.inputs["metadata"]
    assert federation.inputs["resourceName"] == identity.state["name"]
    assert federation.inputs["issuer"] == cluster.state["oidcIssuerProfile"]["issuerURL"]
    assert federation.inputs["subject"] == \
        f"system:serviceaccount:{meta['namespace']}:{meta['name']}"
    assert meta["annotations"]["azure.workload.identity/client-id"] == \
        identity.state["clientId"], sa.urn
    fetch_env = str(run.of_type(DEPLOYMENT)[0].inputs["spec"]["template"]["spec"])
    assert account.state["name"] in fetch_env, "the init container is not told the account"


def test_kubernetes_objects_use_the_cluster_provider(stack: str) -> None:
    run, spec = run_of(stack), spec_of(stack)
    k8s = [r for r in run.resources if r.type.startswith("kubernetes:")]
    if spec.target != "aks":
        assert k8s == []
        return
    (provider,) = run.of_type(K8S_PROVIDER)
    assert all(r.provider.startswith(provider.urn) for r in k8s), "an object misses the provider"
    kinds = {r.type.split(":")[-1] for r in k8s}
    assert {"Namespace", "ServiceAccount", "ConfigMap", "Deployment", "Service",
            "PodDisruptionBudget", "NetworkPolicy", "DaemonSet", "Secret"} <= kinds
    (secret,) = run.of_type(K8S_SECRET)
    assert _plain(secret.inputs["stringData"]) == {"api-key": API_KEY_ENV["EXAONE_API_KEY"]}
    assert "4dabf18193072939515e22adb298388d" in secret.inputs["stringData"], \
        f"{secret.urn}: the API key is not kept secret"
    assert secret.inputs["metadata"]["name"], f"{secret.urn}: metadata should stay readable"


def test_production_is_protected_and_locked(stack: str) -> None:
    assert protection_violations(run_of(stack), spec_of(stack)) == []


def test_auto_shutdown_only_outside_production(stack: str) -> None:
    run, spec = run_of(stack), spec_of(stack)
    schedules = run.of_type(SCHEDULE)
    if spec.target != "vm" or spec.production or not spec.vm.auto_shutdown_time:
        assert schedules == []
        return
    names = {s.inputs["name"] for s in schedules}
    assert names == {f"shutdown-computevm-{n}" for n in layout.vm_host_names(spec)}
    assert {s.inputs["dailyRecurrence"]["time"] for s in schedules} == \
        {spec.vm.auto_shutdown_time.replace(":", "")}


def test_every_taggable_resource_is_tagged(stack: str) -> None:
    assert tag_violations(run_of(stack), spec_of(stack)) == []


def test_children_are_named_after_their_component(stack: str) -> None:
    assert naming_violations(run_of(stack)) == []


def test_outputs(stack: str) -> None:
    run, spec = run_of(stack), spec_of(stack)
    out = run.outputs
    assert out["target"] == spec.target
    if spec.target == "local":
        assert run.resources == [] and run.calls == [], "target local must create nothing"
        return
    (account,) = run.of_type(ACCOUNT)
    (identity,) = _workload_only(run, IDENTITY)
    assert out["storageAccount"] == account.state["name"]
    assert (out["modelsContainer"], out["adaptersContainer"]) == ("models", "adapters")
    assert out["identityClientId"] == identity.state["clientId"]
    assert out["apiEndpoint"].startswith("http") and f":{spec.vllm.port}/v1" in out["apiEndpoint"]
    if spec.target == "vm":
        assert [h["name"] for h in out["hosts"]] == layout.vm_host_names(spec)
        assert all(h["adminUser"] == spec.vm.admin_user and h["address"] for h in out["hosts"])
        assert "kubeconfig" not in out
    else:
        assert "apiVersion: v1" in out["kubeconfig"]
        assert "kubeconfig" in run.secret_outputs


def test_every_checked_in_stack_is_covered() -> None:
    assert {"dev", "prod", "local"} <= set(STACKS)
    assert {spec_of(s).target for s in STACKS} == {"vm", "aks", "local"}


# ---------------------------------------------------------------- the policies can fail

def _mutated(stack: str, token: str, change: Callable[[Registered], None]) -> Run:
    run = copy.deepcopy(run_of(stack))
    target = run.of_type(token)[0]
    change(target)
    return run


def test_policies_catch_an_open_ssh_rule() -> None:
    def open_ssh(nsg: Registered) -> None:
        nsg.inputs["securityRules"][0]["sourceAddressPrefixes"] = ["Internet"]

    run = _mutated("dev", NSG, open_ssh)
    (violation,) = nsg_violations(run, spec_of("dev").vllm.port)
    assert run.of_type(NSG)[0].urn in violation and "port 22" in violation


def test_policies_catch_public_storage_and_extra_roles() -> None:
    run = _mutated("dev", ACCOUNT, lambda a: a.inputs.update(allowBlobPublicAccess=True))
    assert any(run.of_type(ACCOUNT)[0].urn in v for v in storage_violations(run, spec_of("dev")))
    run = copy.deepcopy(run_of("dev"))
    extra = copy.deepcopy(run.of_type(ROLE)[0])
    extra.urn += "-extra"
    extra.inputs["scope"] = run.of_type(RG)[0].state["id"]
    run.resources.append(extra)
    assert any("3 role assignments" in v for v in identity_violations(run))
    assert any(extra.urn in v and "is not the" in v for v in identity_violations(run))
    # The VMs' metrics publisher may write through the rule only, not on the workspace.
    run = copy.deepcopy(run_of("dev"))
    publisher = next(r for r in run.of_type(ROLE)
                     if r.inputs["roleDefinitionId"].endswith(PUBLISHER_ROLE))
    publisher.inputs["scope"] = run.of_type(WORKSPACE)[0].state["id"]
    assert any(publisher.urn in v and "data collection rule" in v
               for v in identity_violations(run))


def test_policies_catch_a_password_vm_and_an_untainted_pool() -> None:
    def password(vm: Registered) -> None:
        vm.inputs["osProfile"]["linuxConfiguration"]["disablePasswordAuthentication"] = False

    run = _mutated("dev", VM, password)
    assert any("password" in v for v in vm_violations(run, spec_of("dev")))
    run = _mutated("dev", VM, lambda vm: vm.inputs["storageProfile"]["imageReference"].update(
        publisher="microsoft-dsvm", offer="ubuntu-hpc", sku="2204"))
    assert any("Secure Boot" in v for v in vm_violations(run, spec_of("dev")))
    run = _mutated("prod", POOL, lambda p: p.inputs.update(nodeTaints=[]))
    assert any(run.of_type(POOL)[0].urn in v for v in pool_violations(run))


def test_policies_catch_unprotected_production_and_missing_tags() -> None:
    run = _mutated("prod", ACCOUNT, lambda a: setattr(a, "protect", False))
    violations = protection_violations(run, spec_of("prod"))
    assert any(run.of_type(ACCOUNT)[0].urn in v for v in violations)
    run = _mutated("dev", VM, lambda vm: vm.inputs["tags"].pop("role"))
    assert any(run.of_type(VM)[0].urn in v for v in tag_violations(run, spec_of("dev")))


# ---------------------------------------------------------------- invalid stacks

BAD_INPUTS = {
    "ssh-open-to-internet": ("dev", {"sshCidrs": ["0.0.0.0/0"]}, "sshCidrs"),
    "ssh-open-star": ("dev", {"sshCidrs": ["*"]}, "sshCidrs"),
    "api-open-internet-tag": ("dev", {"apiCidrs": ["Internet"]}, "apiCidrs"),
    "api-open-ipv6": ("prod", {"apiCidrs": ["::/0"]}, "apiCidrs"),
    "malformed-cidr": ("dev", {"sshCidrs": ["203.0.113.0/33"]}, "sshCidrs"),
    "not-nc-h100": ("dev", {"vmSize": "Standard_ND96isr_H100_v5"}, "vmSize"),
    "not-nc-h100-aks": ("prod", {"vmSize": "Standard_NC24ads_A100_v4"}, "vmSize"),
    "unknown-target": ("dev", {"target": "gke"}, "target"),
    "unpinned-revision": ("dev", {"modelRevision": "main"}, "modelRevision"),
    "vllm-before-0.22": ("prod", {"vllmVersion": "0.21.9"}, "vllmVersion"),
    "no-api-key-with-runtime-lora": ("dev", {"apiKeyRef": ""}, "apiKey"),
    "api-key-in-clear-text": ("prod", {"apiKey": "clear-text-key", "apiKeyRef": ""}, "apiKey"),
    "aks-api-server-open": ("prod", {"sshCidrs": []}, "sshCidrs"),
    "vnet-overlaps-aks-services": ("prod", {"vnetCidr": "172.16.0.0/16"}, "vnetCidr"),
    "aks-api-key-env-missing": ("prod", {"apiKeyRef": "env:EXAONE_TEST_UNSET_KEY"}, "apiKeyRef"),
    # Finding 5: no driver from AKS and no device plugin: the vLLM pods would stay Pending.
    "aks-gpu-driver-none": ("prod", {"aksGpuDriver": "none"}, "aksGpuDriver"),
    # Finding 6: the HPC images' DKMS-built driver does not load under Secure Boot.
    "hpc-image-under-secure-boot": ("dev", {"vmImage": "ubuntu-hpc-2204"}, "vmImage"),
    "aks-unknown-phase": ("prod", {"aksPhase": "all"}, "aksPhase"),
    # The one gate of `serving validate` and `fab deploy`: capacity and example values.
    "32b-does-not-fit-at-0.5": ("dev", {"modelId": "LGAI-EXAONE/EXAONE-3.5-32B-Instruct",
                                         "gpuMemoryUtilization": "0.5"}, "gpuMemoryUtilization"),
    "example-ssh-key": ("dev", {"sshPublicKey": example_values("dev")["sshPublicKey"]},
                        "sshPublicKey"),
    "example-digest": ("prod", {"adapters": example_values("prod")["adapters"]},
                       "adapters[0].sha256"),
    "documentation-cidr": ("prod", {"apiCidrs": ["198.51.100.0/24"]}, "apiCidrs"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_invalid_stack_raises_before_any_resource(case: str) -> None:
    stack, override, key = BAD_INPUTS[case]
    values = {**stack_values(stack), **override}
    run, error = run_program_capture(stack, values, env=API_KEY_ENV)
    assert isinstance(error, SpecError), f"{case}: expected a SpecError, got {error!r}"
    assert any(f"exaone-serving:{key}" in p.where for p in error.problems), str(error)
    assert run.resources == [], f"{case}: registered {[r.urn for r in run.resources]}"
    assert run.calls == [], f"{case}: invoked {run.calls} before failing"


def test_a_pulumi_secret_api_key_reaches_the_cluster_secret() -> None:
    values = {**stack_values("prod"), "apiKey": "from-pulumi-secret", "apiKeyRef": ""}
    run = run_program("prod", values, secrets=("apiKey",))
    (secret,) = run.of_type(K8S_SECRET)
    assert _plain(secret.inputs["stringData"]) == {"api-key": "from-pulumi-secret"}


def test_vm_stack_needs_no_api_key_at_pulumi_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """On VMs `fab deploy` installs the key; `pulumi up` must not need to read it."""
    monkeypatch.delenv("EXAONE_API_KEY", raising=False)
    run = run_program("dev", stack_values("dev"))
    assert run.of_type(VM)


# ---------------------------------------------------------------- variants of the examples

VARIANTS = {
    "vm-private-two-hosts": ("dev", {"publicIp": "none", "vmCount": 2, "loadBalancer": "internal",
                                     "vmImage": "ubuntu-2204", "vmMetrics": False,
                                     "encryptionAtHost": False}),
    "vm-production": ("dev", {"production": True, "autoShutdownTime": ""}),
    "aks-first-run": ("prod", {"aksPhase": "cluster", "production": False}),
    "vm-grafana": ("dev", {"grafana": True}),
    "aks-grafana": ("prod", {"grafana": True}),
}


@pytest.mark.parametrize("case", list(VARIANTS), ids=list(VARIANTS))
def test_variants_keep_every_policy(case: str) -> None:
    stack, override = VARIANTS[case]
    values = {**stack_values(stack), **override}
    spec = stackfile.from_values(values, stack=stack)
    run = run_program(stack, values, env=API_KEY_ENV)
    violations = (nsg_violations(run, spec.vllm.port) + storage_violations(run, spec)
                  + identity_violations(run) + vm_violations(run, spec) + pool_violations(run)
                  + protection_violations(run, spec) + tag_violations(run, spec)
                  + naming_violations(run))
    assert violations == []
    if case == "vm-private-two-hosts":
        assert run.of_type("azure-native:network:PublicIPAddress")[0].name.endswith("nat-ip")
        assert len(run.of_type("azure-native:network:PublicIPAddress")) == 1, "VMs got IPs"
        (subnet,) = run.of_type(SUBNET)
        assert subnet.inputs["natGateway"]["id"], "private VMs have no outbound path"
        assert [h["address"] for h in run.outputs["hosts"]] == ["10.40.0.4", "10.40.0.5"]
        # ubuntu-2204 cannot run the metrics agent: vmMetrics false, and no workspace for it.
        assert "metricsIngestionUrl" not in run.outputs
        assert not run.of_type("azure-native:monitor:AzureMonitorWorkspace")
    if case == "vm-production":
        assert run.of_type(SCHEDULE) == [] and run.of_type(LOCK)
    if case == "aks-first-run":
        assert run.of_type(DEPLOYMENT) == [] and run.of_type(POOL)
