"""Tier 1: more than one GPU under mocks, read as policies: the VM fleet's one endpoint (load
balancer, probe, NSG) and AKS autoscaling (pool bounds, KEDA, managed Prometheus).

Each policy returns its violations, every one naming the resource's URN; ``test_*_catch_*``
prove each policy can fail.
"""

from __future__ import annotations

import copy
import functools
import ipaddress
from typing import Any

import pytest
from pulumi_mocks import Run, run_program, run_program_capture, stack_values

from serving.stack import layout, stackfile
from serving.stack.balancer import AZURE_PROBE_TAG, PROBE_PATHS
from serving.stack.errors import SpecError
from serving.stack.spec import Spec

API_KEY_ENV = {"EXAONE_API_KEY": "test-api-key-not-real"}
LB = "azure-native:network:LoadBalancer"
NSG = "azure-native:network:NetworkSecurityGroup"
NIC = "azure-native:network:NetworkInterface"
PUBLIC_IP = "azure-native:network:PublicIPAddress"
VM = "azure-native:compute:VirtualMachine"
ROLE = "azure-native:authorization:RoleAssignment"
PUBLISHER_ROLE = "3913510d-42f4-4e42-8a64-420c390055eb"

VM_CASES = {
    "dev": ("dev", {}),
    "internal-two-hosts": ("dev", {"publicIp": "none", "vmCount": 2,
                                   "loadBalancer": "internal"}),
    "public-three-hosts": ("dev", {"vmCount": 3, "loadBalancer": "public"}),
}


@functools.cache
def vm_case(case: str) -> tuple[Run, Spec]:
    stack, override = VM_CASES[case]
    values = {**stack_values(stack), **override}
    return run_program(stack, values, env=API_KEY_ENV), stackfile.from_values(values, stack=stack)


def _nsg_rules(run: Run) -> list[tuple[str, dict[str, Any]]]:
    return [(nsg.urn, rule) for nsg in run.of_type(NSG)
            for rule in nsg.inputs.get("securityRules") or []]


def _sources(rule: dict[str, Any]) -> list[str]:
    return [s for s in (rule.get("sourceAddressPrefix"), *(rule.get("sourceAddressPrefixes")
                                                           or [])) if s]


def balancer_violations(run: Run, spec: Spec) -> list[str]:
    """One Standard load balancer on the API port, probing the proxy's health path over HTTP,
    every host in its pool, internal unless the stack says public, and apiEndpoint on it."""
    out: list[str] = []
    balancers = run.of_type(LB)
    if len(balancers) != 1:
        return [f"{run.stack}: {len(balancers)} load balancers, must be 1"]
    (lb,) = balancers
    i, urn = lb.inputs, lb.urn
    port = spec.vllm.port
    if (i.get("sku") or {}).get("name") != "Standard":
        out.append(f"{urn}: SKU {i.get('sku')}, must be Standard (Basic is retired)")
    probes = i.get("probes") or []
    for probe in probes:
        if (probe.get("protocol"), probe.get("port"), probe.get("requestPath")) != \
                ("Http", port, spec.balancer.probe_path):
            out.append(f"{urn}: probe {probe.get('name')} is {probe.get('protocol')} "
                       f"{probe.get('port')}{probe.get('requestPath') or ''}, must be Http "
                       f"{port}{spec.balancer.probe_path} (vLLM's health through the proxy)")
    rules = i.get("loadBalancingRules") or []
    if not probes or not rules:
        out.append(f"{urn}: needs a probe and a rule")
    probe_ids = [str(r.get("probe", {}).get("id", "")) for r in rules]
    for rule, probe_id in zip(rules, probe_ids, strict=True):
        if (rule.get("frontendPort"), rule.get("backendPort")) != (port, port):
            out.append(f"{urn}: rule {rule.get('name')} forwards {rule.get('frontendPort')} -> "
                       f"{rule.get('backendPort')}, must be the API port {port} only")
        if not any(probe_id.endswith(f"/probes/{p.get('name')}") for p in probes):
            out.append(f"{urn}: rule {rule.get('name')} has no probe of this balancer")
    if layout.vllm_port(spec) in {r.get("backendPort") for r in rules}:
        out.append(f"{urn}: vLLM's own port (its LoRA admin routes) is balanced")
    frontends = i.get("frontendIPConfigurations") or []
    public = [f for f in frontends if f.get("publicIPAddress")]
    if spec.balancer.kind == "internal" and (public or not all(f.get("subnet") for f in frontends)):
        out.append(f"{urn}: the stack asks an internal balancer; a frontend is public")
    if spec.balancer.kind == "public" and not public:
        out.append(f"{urn}: the stack asks a public balancer; no frontend has a public IP")
    pool_ids = {f"{lb.state['id']}/backendAddressPools/{p['name']}"
                for p in i.get("backendAddressPools") or []}
    for nic in run.of_type(NIC):
        joined = {p.get("id") for c in nic.inputs.get("ipConfigurations") or []
                  for p in c.get("loadBalancerBackendAddressPools") or []}
        if not joined & pool_ids:
            out.append(f"{nic.urn}: the host is not in the balancer's pool")
    endpoint = str(run.outputs.get("apiEndpoint", ""))
    host = endpoint.removeprefix("http://").rsplit(":", 1)[0]
    frontend_ips = {(f.get("publicIPAddress") or {}).get("id") for f in frontends}
    addresses = {f.get("privateIPAddress") for f in frontends} | {
        ip.state.get("ipAddress") for ip in run.of_type(PUBLIC_IP)
        if ip.state["id"] in frontend_ips}
    if host not in addresses or not endpoint.endswith(f":{port}/v1"):
        out.append(f"{urn}: apiEndpoint {endpoint!r} is not the balancer's frontend")
    if any(h["address"] == host for h in run.outputs.get("hosts", [])):
        out.append(f"{urn}: apiEndpoint is a host, not the balancer")
    return out


def probe_port_violations(run: Run, spec: Spec) -> list[str]:
    """The NSG admits the balancer's probe on the API port only, and the API port from
    apiCidrs and the probe only: no public probe port, no client from elsewhere."""
    out: list[str] = []
    port = str(spec.vllm.port)
    allowed_api = {*spec.network.api_cidrs, AZURE_PROBE_TAG}
    for urn, rule in _nsg_rules(run):
        if str(rule.get("access")).lower() != "allow":
            continue
        sources = _sources(rule)
        ports = [rule.get("destinationPortRange"), *(rule.get("destinationPortRanges") or [])]
        if AZURE_PROBE_TAG in sources and ports != [port]:
            out.append(f"{urn}: rule {rule.get('name')} admits the probe on {ports}, "
                       f"must be the API port {port} only")
        if port in ports or "*" in ports:
            stray = [s for s in sources if s not in allowed_api]
            if stray:
                out.append(f"{urn}: rule {rule.get('name')} admits {stray} to the API port; "
                           f"allowed: apiCidrs and {AZURE_PROBE_TAG}")
    if run.of_type(LB) and not any(AZURE_PROBE_TAG in _sources(r) for _, r in _nsg_rules(run)):
        out.append(f"{run.stack}: no NSG rule admits the balancer's probe: every host would "
                   "be out of rotation")
    return out


@pytest.mark.parametrize("case", list(VM_CASES))
def test_the_fleet_has_one_endpoint_behind_a_probed_balancer(case: str) -> None:
    run, spec = vm_case(case)
    assert balancer_violations(run, spec) == []
    assert probe_port_violations(run, spec) == []
    (lb,) = run.of_type(LB)
    if spec.balancer.kind == "internal":
        (frontend,) = lb.inputs["frontendIPConfigurations"]
        assert ipaddress.ip_address(frontend["privateIPAddress"]) in \
            ipaddress.ip_network(stackfile.from_values(
                stack_values("dev"), stack="dev").network.vnet_cidr), lb.urn
    assert len(run.outputs["hosts"]) == spec.vm.count  # fab still reaches each host


def vm_metrics_violations(run: Run, spec: Spec) -> list[str]:
    """The VMs' metrics land where AKS's do: one workspace, a data collection rule writing to
    it, the VMs' own identity allowed to publish through that rule only, the agents' URL at the
    rule's stream, and the rendered alert rules running on the workspace."""
    out: list[str] = []
    workspaces = run.of_type(WORKSPACE)
    if len(workspaces) != 1:
        return [f"{run.stack}: {len(workspaces)} Azure Monitor workspaces, must be 1"]
    (workspace,) = workspaces
    wid = workspace.state["id"]
    rules = [r for r in run.of_type(DCR)
             if any(a.get("accountResourceId") == wid for a in
                    (r.inputs.get("destinations") or {}).get("monitoringAccounts") or [])]
    if len(rules) != 1:
        return [f"{workspace.urn}: {len(rules)} data collection rules write here, must be 1"]
    (rule,) = rules
    vm_identities = {key for vm in run.of_type(VM)
                     for key in (vm.inputs.get("identity") or {}).get("userAssignedIdentities")
                     or []}
    principals = {i.state["principalId"] for i in run.of_type(IDENTITY)
                  if i.state["id"] in vm_identities}
    publishers = [r for r in run.of_type(ROLE)
                  if str(r.inputs.get("roleDefinitionId")).endswith(PUBLISHER_ROLE)]
    if not any(p.inputs.get("principalId") in principals
               and p.inputs.get("scope") == rule.state["id"] for p in publishers):
        out.append(f"{rule.urn}: the VMs' identity may not publish metrics through it")
    url = run.outputs.get("metricsIngestionUrl", "")
    if f"/dataCollectionRules/{rule.state['immutableId']}/streams/" not in url:
        out.append(f"{run.stack}: metricsIngestionUrl {url!r} is not the rule's stream")
    out += _rule_group_violations(run, spec, workspace, wid)
    return out


@pytest.mark.parametrize("case", list(VM_CASES))
def test_vm_metrics_land_in_the_workspace_with_the_alert_rules(case: str) -> None:
    run, spec = vm_case(case)
    assert vm_metrics_violations(run, spec) == []


VM_METRICS_BREAKS = {
    "publisher-on-workspace": lambda r: [p.inputs.update(scope=r.of_type(WORKSPACE)[0].state["id"])
                                         for p in r.of_type(ROLE) if str(
                                             p.inputs["roleDefinitionId"]).endswith(PUBLISHER_ROLE)],
    "rules-missing": lambda r: r.of_type(RULE_GROUP)[0].inputs.update(rules=[]),
    "no-url": lambda r: r.outputs.update(metricsIngestionUrl=""),
}


def _rule_group_violations(run: Any, spec: Any, workspace: Any, wid: Any) -> list[str]:
    """The workspace's rule groups hold exactly the rendered alert rules."""
    from serving.render import monitoring

    groups = [g for g in run.of_type(RULE_GROUP) if wid in (g.inputs.get("scopes") or [])]
    wanted = [r["expr"] for g in monitoring.alert_rules(spec)["groups"] for r in g["rules"]]
    got = [r.get("expression") for g in groups for r in g.inputs.get("rules") or []]
    if got == wanted:
        return []
    return [f"{workspace.urn}: rule groups hold {len(got)} rules, not the "
            f"{len(wanted)} rendered ones"]


@pytest.mark.parametrize("name", list(VM_METRICS_BREAKS))
def test_vm_metrics_policy_catches(name: str) -> None:
    run, spec = vm_case("dev")
    bad = copy.deepcopy(run)
    VM_METRICS_BREAKS[name](bad)
    assert vm_metrics_violations(bad, spec)


def test_aks_and_local_stacks_have_no_vm_balancer() -> None:
    for stack in ("prod", "local"):
        run = run_program(stack, stack_values(stack), env=API_KEY_ENV)
        assert run.of_type(LB) == [], stack


def _mutated(case: str, edit) -> Run:
    run, _ = vm_case(case)
    bad = copy.deepcopy(run)
    edit(bad)
    return bad


def _lb(run: Run) -> dict[str, Any]:
    return run.of_type(LB)[0].inputs


def _nsg(run: Run) -> list[dict[str, Any]]:
    return run.of_type(NSG)[0].inputs["securityRules"]


BALANCER_BREAKS = {
    "basic-sku": lambda r: _lb(r)["sku"].update(name="Basic"),
    "tcp-probe": lambda r: _lb(r)["probes"][0].update(protocol="Tcp"),
    "probe-on-vllm-port": lambda r: _lb(r)["probes"][0].update(port=8001),
    "rule-to-vllm-port": lambda r: _lb(r)["loadBalancingRules"][0].update(backendPort=8001),
    "host-outside-pool": lambda r: r.of_type(NIC)[0].inputs["ipConfigurations"][0].update(
        loadBalancerBackendAddressPools=[]),
    "endpoint-is-a-host": lambda r: r.outputs.update(
        apiEndpoint=f"http://{r.outputs['hosts'][0]['address']}:8000/v1"),
}
NSG_BREAKS = {
    "probe-on-all-ports": lambda r: _nsg(r).append(
        {"name": "x", "access": "Allow", "sourceAddressPrefix": AZURE_PROBE_TAG,
         "destinationPortRange": "*"}),
    "api-from-the-internet": lambda r: _nsg(r).append(
        {"name": "x", "access": "Allow", "sourceAddressPrefix": "Internet",
         "destinationPortRange": "8000"}),
    "probe-not-admitted": lambda r: r.of_type(NSG)[0].inputs.update(securityRules=[
        x for x in _nsg(r) if AZURE_PROBE_TAG not in _sources(x)]),
}


@pytest.mark.parametrize("name", list(BALANCER_BREAKS))
def test_balancer_policy_catches(name: str) -> None:
    bad = _mutated("internal-two-hosts", BALANCER_BREAKS[name])
    found = balancer_violations(bad, vm_case("internal-two-hosts")[1])
    assert found and all("urn:pulumi:" in v for v in found), found


@pytest.mark.parametrize("name", list(NSG_BREAKS))
def test_probe_port_policy_catches(name: str) -> None:
    bad = _mutated("dev", NSG_BREAKS[name])
    assert probe_port_violations(bad, vm_case("dev")[1]), name


def test_public_frontend_on_an_internal_stack_is_caught() -> None:
    _, internal = vm_case("internal-two-hosts")
    run, _ = vm_case("public-three-hosts")
    assert any("internal" in v for v in balancer_violations(run, internal))


BAD_FLEET_INPUTS = {
    "probe-path-vllm-does-not-serve": ("dev", {"probePath": "/healthz"}, "probePath"),
    "internal-balancer-without-clients": ("dev", {"loadBalancer": "internal", "apiCidrs": []},
                                          "apiCidrs"),
    "unknown-balancer-kind": ("dev", {"loadBalancer": "gateway"}, "loadBalancer"),
    "autoscale-on-vms": ("dev", {"autoscale": True, "gpuNodesMax": 3}, "autoscale"),
    "node-min-above-max": ("prod", {"gpuNodesMax": 1}, "gpuNodesMax"),
    "pod-min-above-max": ("prod", {"replicasMax": 2}, "replicasMax"),
    "single-node-production-pool": ("prod", {"vmCount": 1, "gpuNodesMax": 1, "replicas": 1,
                                             "replicasMax": 2}, "gpuNodesMax"),
    "more-pods-than-gpus": ("prod", {"replicasMax": 9}, "replicasMax"),
    "kv-cache-target-above-one": ("prod", {"scaleKvCacheUsage": "1.5"}, "scaleKvCacheUsage"),
    # 22.04's prometheus (2.31) has no agent mode (2.32 and later).
    "vm-metrics-on-ubuntu-2204": ("dev", {"vmImage": "ubuntu-2204"}, "vmImage"),
    "grafana-without-a-workspace": ("dev", {"vmMetrics": False, "grafana": True}, "grafana"),
}


@pytest.mark.parametrize("case", list(BAD_FLEET_INPUTS))
def test_bad_fleet_input_stops_before_any_resource(case: str) -> None:
    stack, override, key = BAD_FLEET_INPUTS[case]
    values = {**stack_values(stack), **override}
    run, error = run_program_capture(stack, values, env=API_KEY_ENV)
    assert isinstance(error, SpecError), f"{case}: expected a SpecError, got {error!r}"
    assert any(p.where.endswith(f"exaone-serving:{key}") for p in error.problems), str(error)
    assert run.resources == [] and run.calls == [], case


def test_probe_paths_are_routes_the_proxy_serves() -> None:
    from serving.render.proxy import INFERENCE_ROUTES

    served = {r.path for r in INFERENCE_ROUTES if "GET" in r.methods}
    assert set(PROBE_PATHS) <= served


# ---------------------------------------------------------------- AKS: scaling and metrics

CLUSTER = "azure-native:containerservice:ManagedCluster"
POOL = "azure-native:containerservice:AgentPool"
WORKSPACE = "azure-native:monitor:AzureMonitorWorkspace"
DCR = "azure-native:monitor:DataCollectionRule"
DCRA = "azure-native:monitor:DataCollectionRuleAssociation"
RULE_GROUP = "azure-native:alertsmanagement:PrometheusRuleGroup"
FEDERATION = "azure-native:managedidentity:FederatedIdentityCredential"
IDENTITY = "azure-native:managedidentity:UserAssignedIdentity"
DEPLOYMENT = "kubernetes:apps/v1:Deployment"
SCALED_OBJECT = "kubernetes:keda.sh/v1alpha1:ScaledObject"
TRIGGER_AUTH = "kubernetes:keda.sh/v1alpha1:TriggerAuthentication"
POD_MONITOR = "kubernetes:azmonitoring.coreos.com/v1:PodMonitor"

AKS_CASES = {
    "prod": ("prod", {}),
    "prod-fixed": ("prod", {"autoscale": False}),
    "dev-cluster-to-zero": ("prod", {"production": False, "scaleToZero": True}),
    "prod-to-zero-asked": ("prod", {"scaleToZero": True}),
}


@functools.cache
def aks_case(case: str) -> tuple[Run, Spec]:
    stack, override = AKS_CASES[case]
    values = {**stack_values(stack), **override}
    return run_program(stack, values, env=API_KEY_ENV), stackfile.from_values(values, stack=stack)


def _gpu_pool(run: Run):
    return next(p for p in run.of_type(POOL) if p.inputs.get("mode") == "User")


def scale_violations(run: Run, spec: Spec) -> list[str]:
    """Bounds: min <= max on the pool and the pods, the pool's max is what preflight's quota
    check counts, the pods fit the nodes, no scale-to-zero in production unless asked."""
    from serving.cloud.preflight import quota_pools

    out: list[str] = []
    pool = _gpu_pool(run)
    i = pool.inputs
    if not spec.scale.enabled:
        if i.get("enableAutoScaling") or run.of_type(SCALED_OBJECT):
            out.append(f"{pool.urn}: the stack does not ask autoscaling")
        return out
    low, high = i.get("minCount"), i.get("maxCount")
    if not i.get("enableAutoScaling") or low is None or high is None or low > high:
        out.append(f"{pool.urn}: autoscaling {i.get('enableAutoScaling')} between {low} and "
                   f"{high}; must be on with min <= max")
    if high != quota_pools(spec)[0][1]:
        out.append(f"{pool.urn}: maxCount {high} is not the node count the quota check counts "
                   f"({quota_pools(spec)[0][1]})")
    if "count" not in pool.ignore_changes:
        out.append(f"{pool.urn}: Pulumi would fight the autoscaler over count")
    deployments = run.of_type(DEPLOYMENT)
    if any("spec.replicas" not in d.ignore_changes for d in deployments):
        out.append(f"{deployments[0].urn}: Pulumi would fight KEDA over replicas")
    objects = run.of_type(SCALED_OBJECT)
    if len(objects) != 1:
        return [*out, f"{run.stack}: {len(objects)} ScaledObjects, must be 1"]
    (scaled,) = objects
    s = scaled.inputs["spec"]
    pods_low, pods_high = s.get("minReplicaCount"), s.get("maxReplicaCount")
    if pods_low is None or pods_high is None or pods_low > pods_high:
        out.append(f"{scaled.urn}: replicas {pods_low}..{pods_high}; must be min <= max")
    elif pods_high * spec.vllm.tensor_parallel_size > (high or 0) * spec.vm.sku.gpus:
        out.append(f"{scaled.urn}: {pods_high} pods do not fit on {high} nodes' GPUs")
    if spec.production and not spec.scale.to_zero and (pods_low == 0 or low == 0):
        out.append(f"{scaled.urn}: production scales to zero (pods {pods_low}, nodes {low}) "
                   "and the stack does not ask scaleToZero")
    if s.get("scaleTargetRef", {}).get("name") != \
            run.of_type(DEPLOYMENT)[0].inputs["metadata"]["name"]:
        out.append(f"{scaled.urn}: does not scale the vLLM Deployment")
    return out


def signal_violations(run: Run, spec: Spec) -> list[str]:
    """KEDA reads vLLM's own load signal from the stack's workspace, with an identity that is
    federated to KEDA's operator; the cluster runs the KEDA and managed Prometheus add-ons."""
    from serving.render import monitoring

    out: list[str] = []
    (cluster,) = run.of_type(CLUSTER)
    c = cluster.inputs
    if not (c.get("azureMonitorProfile") or {}).get("metrics", {}).get("enabled"):
        out.append(f"{cluster.urn}: managed Prometheus is off: nothing scrapes vLLM")
    if spec.scale.enabled and not (c.get("workloadAutoScalerProfile") or {}).get(
            "keda", {}).get("enabled"):
        out.append(f"{cluster.urn}: the KEDA add-on is off")
    if not spec.scale.enabled:
        return out
    (workspace,) = run.of_type(WORKSPACE)
    endpoint = workspace.state["metrics"]["prometheusQueryEndpoint"]
    (scaled,) = run.of_type(SCALED_OBJECT)
    (auth,) = run.of_type(TRIGGER_AUTH)
    series = {monitoring.REQUESTS_WAITING, monitoring.KV_CACHE_USAGE}
    for trigger in scaled.inputs["spec"]["triggers"]:
        meta = trigger.get("metadata") or {}
        if trigger.get("type") != "prometheus" or meta.get("serverAddress") != endpoint:
            out.append(f"{scaled.urn}: trigger {trigger.get('name')} does not read the "
                       f"stack's workspace ({endpoint})")
        if not any(s in meta.get("query", "") for s in series):
            out.append(f"{scaled.urn}: trigger {trigger.get('name')} is not vLLM's load signal")
        if (trigger.get("authenticationRef") or {}).get("name") != \
                auth.inputs["metadata"]["name"]:
            out.append(f"{scaled.urn}: trigger {trigger.get('name')} has no authentication")
    keda_ids = [i for i in run.of_type(IDENTITY)
                if i.state["clientId"] == auth.inputs["spec"]["podIdentity"].get("identityId")]
    federated = [f for f in run.of_type(FEDERATION)
                 if f.inputs.get("subject") == "system:serviceaccount:kube-system:keda-operator"
                 and any(f.inputs.get("resourceName") == i.state["name"] for i in keda_ids)]
    if not federated:
        out.append(f"{auth.urn}: its identity is not federated to KEDA's operator")
    return out


def metrics_violations(run: Run, spec: Spec) -> list[str]:
    """The pods' metrics land in the workspace (scrape, rule, association to the cluster) and
    the project's alert rules run there, the same expressions as the rendered rule file."""
    from serving.render import monitoring

    out: list[str] = []
    workspaces = run.of_type(WORKSPACE)
    if len(workspaces) != 1:
        return [f"{run.stack}: {len(workspaces)} Azure Monitor workspaces, must be 1"]
    (workspace,) = workspaces
    (cluster,) = run.of_type(CLUSTER)
    wid, cid = workspace.state["id"], cluster.state["id"]
    rules = [r for r in run.of_type(DCR)
             if any(a.get("accountResourceId") == wid for a in
                    (r.inputs.get("destinations") or {}).get("monitoringAccounts") or [])]
    if not rules:
        out.append(f"{workspace.urn}: no data collection rule writes Prometheus metrics here")
    bound = {a.inputs.get("dataCollectionRuleId") for a in run.of_type(DCRA)
             if a.inputs.get("resourceUri") == cid}
    if not any(r.state["id"] in bound for r in rules):
        out.append(f"{cluster.urn}: the cluster's scraper is not bound to that rule")
    out += _rule_group_violations(run, spec, workspace, wid)
    monitors = run.of_type(POD_MONITOR)
    jobs = [e.get("replacement") for m in monitors
            for ep in m.inputs["spec"]["podMetricsEndpoints"] for e in ep.get("relabelings", [])
            if e.get("targetLabel") == "job"]
    if spec.aks.phase == "workload" and jobs != [monitoring.job_name(spec)]:
        out.append(f"{run.stack}: the scrape's job {jobs} is not the one the rules select")
    return out


def drain_violations(run: Run) -> list[str]:
    """Scale-down lets running requests finish: both containers wait in preStop, the grace
    period covers the wait, and the autoscaler waits that long for a node's pods."""
    from k8s import drain

    out: list[str] = []
    for dep in run.of_type(DEPLOYMENT):
        pod = dep.inputs["spec"]["template"]["spec"]
        for container in pod["containers"]:
            if not (container.get("lifecycle") or {}).get("preStop"):
                out.append(f"{dep.urn}: container {container['name']} stops without draining")
        if pod.get("terminationGracePeriodSeconds", 30) < drain.GRACE_SECONDS:
            out.append(f"{dep.urn}: grace {pod.get('terminationGracePeriodSeconds')} s is "
                       "shorter than the drain")
    for cluster in run.of_type(CLUSTER):
        profile = cluster.inputs.get("autoScalerProfile")
        if profile and int(profile.get("maxGracefulTerminationSec", 600)) < drain.GRACE_SECONDS:
            out.append(f"{cluster.urn}: the autoscaler cuts a node's drain short")
    return out


@pytest.mark.parametrize("case", list(AKS_CASES))
def test_aks_scales_on_vllms_signal_and_metrics_land_in_the_workspace(case: str) -> None:
    run, spec = aks_case(case)
    assert scale_violations(run, spec) == []
    assert signal_violations(run, spec) == []
    assert metrics_violations(run, spec) == []
    assert drain_violations(run) == []


def test_the_first_aks_run_already_collects_metrics() -> None:
    values = {**stack_values("prod"), "aksPhase": "cluster", "production": False}
    run = run_program("prod", values, env=API_KEY_ENV)
    spec = stackfile.from_values(values, stack="prod")
    assert metrics_violations(run, spec) == []
    assert run.of_type(SCALED_OBJECT) == [] and run.of_type(DEPLOYMENT) == []


def _scaled(run: Run) -> dict[str, Any]:
    return run.of_type(SCALED_OBJECT)[0].inputs["spec"]


AKS_BREAKS = {
    "min-above-max": (scale_violations, lambda r: _gpu_pool(r).inputs.update(minCount=9)),
    "max-beyond-quota-count": (scale_violations,
                               lambda r: _gpu_pool(r).inputs.update(maxCount=40)),
    "pulumi-owns-count": (scale_violations, lambda r: _gpu_pool(r).ignore_changes.clear()),
    "production-to-zero": (scale_violations, lambda r: _scaled(r).update(minReplicaCount=0)),
    "pods-beyond-gpus": (scale_violations, lambda r: _scaled(r).update(maxReplicaCount=64)),
    "keda-off": (signal_violations, lambda r: r.of_type(CLUSTER)[0].inputs.update(
        workloadAutoScalerProfile={})),
    "foreign-prometheus": (signal_violations, lambda r: _scaled(r)["triggers"][0][
        "metadata"].update(serverAddress="http://prometheus.example.invalid")),
    "cpu-signal": (signal_violations, lambda r: _scaled(r)["triggers"][0]["metadata"].update(
        query="avg(container_cpu_usage_seconds_total)")),
    "rules-missing": (metrics_violations, lambda r: r.of_type(RULE_GROUP)[0].inputs.update(
        rules=[])),
    "scrape-unbound": (metrics_violations, lambda r: [
        a.inputs.update(resourceUri="elsewhere") for a in r.of_type(DCRA)]),
    "no-pre-stop": (lambda r, s: drain_violations(r), lambda r: [
        c.pop("lifecycle", None) for c in
        r.of_type(DEPLOYMENT)[0].inputs["spec"]["template"]["spec"]["containers"]]),
}


@pytest.mark.parametrize("name", list(AKS_BREAKS))
def test_aks_policies_catch(name: str) -> None:
    policy, edit = AKS_BREAKS[name]
    run, spec = aks_case("prod")
    bad = copy.deepcopy(run)
    edit(bad)
    found = policy(bad, spec)
    assert found and all("urn:pulumi:" in v or v.startswith("prod:") for v in found), found


# ---------------------------------------------------------------- Managed Grafana

GRAFANA = "azure-native:dashboard:Grafana"
READER_ROLE = "b0d8363b-8ddd-447d-831f-62ca05bff136"  # Monitoring Data Reader
GRAFANA_CASES = {
    "vm": ("dev", {"grafana": True}),
    "aks": ("prod", {"grafana": True}),
}


def grafana_violations(run: Run) -> list[str]:
    """Grafana reads the stack's one workspace, with its own identity, and nothing more."""
    out = []
    (workspace,) = run.of_type(WORKSPACE)
    for g in run.of_type(GRAFANA):
        props = g.inputs.get("properties") or {}
        linked = [i.get("azureMonitorWorkspaceResourceId") for i in
                  (props.get("grafanaIntegrations") or {}).get(
                      "azureMonitorWorkspaceIntegrations") or []]
        if linked != [workspace.state["id"]]:
            out.append(f"{g.urn}: linked to {linked}, not the stack's workspace")
        if props.get("apiKey") != "Disabled":
            out.append(f"{g.urn}: API keys are on")
        if (g.inputs.get("sku") or {}).get("name") != "Standard":
            out.append(f"{g.urn}: not the Standard tier (workspace integrations)")
        if (g.inputs.get("identity") or {}).get("type") != "SystemAssigned":
            out.append(f"{g.urn}: no identity of its own")
        principal = g.state["identity"]["principalId"]
        grants = [r for r in run.of_type(ROLE) if r.inputs.get("principalId") == principal]
        if [(str(r.inputs.get("roleDefinitionId")).rsplit("/", 1)[-1], r.inputs.get("scope"))
                for r in grants] != [(READER_ROLE, workspace.state["id"])]:
            out.append(f"{g.urn}: its identity must only read the workspace, has {grants}")
    return out


@pytest.mark.parametrize("case", list(GRAFANA_CASES))
def test_grafana_where_the_stack_asks_reads_the_workspace_only(case: str) -> None:
    stack, override = GRAFANA_CASES[case]
    run = run_program(stack, {**stack_values(stack), **override}, env=API_KEY_ENV)
    assert len(run.of_type(GRAFANA)) == 1
    assert grafana_violations(run) == []
    assert run.outputs["grafanaEndpoint"].startswith("https://")


@pytest.mark.parametrize("stack", ["dev", "prod"])
def test_no_grafana_unless_the_stack_asks(stack: str) -> None:
    run = run_program(stack, stack_values(stack), env=API_KEY_ENV)
    assert run.of_type(GRAFANA) == [] and "grafanaEndpoint" not in run.outputs


GRAFANA_BREAKS = {
    "other-workspace": lambda g: g.inputs["properties"]["grafanaIntegrations"].update(
        azureMonitorWorkspaceIntegrations=[{"azureMonitorWorkspaceResourceId": "/x"}]),
    "api-keys-on": lambda g: g.inputs["properties"].update(apiKey="Enabled"),
}


@pytest.mark.parametrize("case", list(GRAFANA_BREAKS))
def test_grafana_policy_catches_a_broken_instance(case: str) -> None:
    stack, override = GRAFANA_CASES["vm"]
    run = copy.deepcopy(run_program(stack, {**stack_values(stack), **override},
                                    env=API_KEY_ENV))
    GRAFANA_BREAKS[case](run.of_type(GRAFANA)[0])
    assert grafana_violations(run)
