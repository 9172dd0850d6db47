"""The Pulumi program: read the stack through the serving spec, compose components, export.

Nothing is registered before the spec (and the infra's own checks) have passed.
"""

import sys
from pathlib import Path

# Pulumi runs this file from infra/ (`main: infra/` in Pulumi.yaml), so Python puts infra/
# first on sys.path and the repository root not at all. The program imports the repo's own
# packages (serving, k8s, infra), so the root goes first, and infra/ itself is dropped so
# that its modules (config.py, storage.py...) cannot shadow top-level packages.
_INFRA = Path(__file__).resolve().parent
_ROOT = _INFRA.parent
sys.path[:] = [str(_ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != _INFRA]

import pulumi  # noqa: E402
from pulumi_azure_native import authorization  # noqa: E402

from infra import config  # noqa: E402
from infra.aks import AksCluster, AksClusterArgs  # noqa: E402
from infra.grafana import GrafanaArgs, ManagedGrafana  # noqa: E402
from infra.group import ResourceGroup, ResourceGroupArgs  # noqa: E402
from infra.identity import WorkloadIdentity, WorkloadIdentityArgs  # noqa: E402
from infra.loadbalancer import ApiBalancer, ApiBalancerArgs  # noqa: E402
from infra.monitoring import Metrics, MetricsArgs  # noqa: E402
from infra.network import Network, NetworkArgs  # noqa: E402
from infra.preflight import before_up  # noqa: E402
from infra.storage import CONTAINERS, Storage, StorageArgs  # noqa: E402
from infra.tags import tags  # noqa: E402
from infra.vm import GpuVms, GpuVmsArgs  # noqa: E402
from infra.workload import VllmOnAks, VllmOnAksArgs  # noqa: E402
from serving.stack import layout  # noqa: E402
from serving.stack.spec import Spec  # noqa: E402


def cloud(stack: config.StackConfig) -> None:
    spec = stack.spec
    base = layout.resource_group_name(spec.stack)
    client = authorization.get_client_config_output()
    net_cfg = spec.network

    group = ResourceGroup(base, ResourceGroupArgs(
        group_name=base, location=spec.location, production=spec.production,
        tags=tags(spec, "resource-group")))
    net = Network(f"{base}-net", NetworkArgs(
        resource_group_name=group.name, location=spec.location,
        vnet_cidr=net_cfg.vnet_cidr, subnet_cidr=stack.subnet_cidr,
        with_nsg=spec.on.ssh_hosts, ssh_cidrs=net_cfg.ssh_cidrs, api_cidrs=net_cfg.api_cidrs,
        api_port=spec.vllm.port,
        with_nat=spec.on.ssh_hosts and spec.vm.public_ip == "none",
        tags=tags(spec, "network")))
    store = Storage(f"{base}-store", StorageArgs(
        resource_group_name=group.name, location=spec.location, stack=spec.stack,
        subscription_id=client.subscription_id, subnet_id=net.subnet_id,
        operator_cidrs=net_cfg.ssh_cidrs, production=spec.production,
        tags=tags(spec, "storage")))
    identity = WorkloadIdentity(f"{base}-vllm", WorkloadIdentityArgs(
        resource_group_name=group.name, location=spec.location,
        subscription_id=client.subscription_id, storage_account_id=store.account_id,
        tags=tags(spec, "identity")))

    pulumi.export("resourceGroup", group.name)
    pulumi.export("storageAccount", store.account_name)
    pulumi.export("modelsContainer", store.containers[CONTAINERS[0]].name)
    pulumi.export("adaptersContainer", store.containers[CONTAINERS[1]].name)
    pulumi.export("identityClientId", identity.client_id)
    pulumi.export("tenantId", client.tenant_id)

    if spec.on.ssh_hosts:
        balancer = ApiBalancer(f"{base}-api", ApiBalancerArgs(
            resource_group_name=group.name, location=spec.location,
            subscription_id=client.subscription_id, lb_name=f"{base}-api",
            kind=spec.balancer.kind, subnet_id=net.subnet_id, subnet_cidr=stack.subnet_cidr,
            api_port=spec.vllm.port, probe_path=spec.balancer.probe_path,
            tags=tags(spec, "load-balancer")))
        vms = GpuVms(f"{base}-gpu", GpuVmsArgs(
            resource_group_name=group.name, location=spec.location,
            subnet_id=net.subnet_id, subnet_cidr=stack.subnet_cidr,
            vm_names=tuple(layout.vm_host_names(spec)), size=spec.vm.size,
            image=spec.vm.image, os_disk_gb=spec.vm.os_disk_gb, admin_user=spec.vm.admin_user,
            ssh_public_key=spec.vm.ssh_public_key, public_ip=spec.vm.public_ip,
            encryption_at_host=spec.vm.encryption_at_host, identity_id=identity.id,
            # Dev cost control only: production VMs never stop on a schedule.
            auto_shutdown_time="" if spec.production else spec.vm.auto_shutdown_time,
            tags=tags(spec, "gpu-vm"), backend_pool_id=balancer.pool_id))
        pulumi.export("hosts", [
            {"name": h.name, "address": h.address, "privateAddress": h.private_address,
             "adminUser": h.admin_user} for h in vms.hosts])
        # One endpoint for the fleet; `fab` reaches each host by its own address above.
        pulumi.export("apiEndpoint",
                      balancer.address.apply(lambda a: f"http://{a}:{spec.vllm.port}/v1"))
        if not spec.metrics.vm_agent:
            return
        # The hosts' Prometheus agents write to the workspace with the VMs' identity.
        metrics = Metrics(f"{base}-metrics", MetricsArgs(
            spec=spec, resource_group_name=group.name, location=spec.location,
            subscription_id=client.subscription_id, publisher_principal_id=identity.principal_id,
            tags=tags(spec, "monitoring")))
        pulumi.export("prometheusQueryEndpoint", metrics.query_endpoint)
        pulumi.export("metricsIngestionUrl", metrics.ingestion_url)
        grafana(spec, base, group.name, client.subscription_id, metrics)
        return

    aks = AksCluster(f"{base}-aks", AksClusterArgs(
        resource_group_name=group.name, location=spec.location,
        subscription_id=client.subscription_id, dns_prefix=base, subnet_id=net.subnet_id,
        operator_cidrs=net_cfg.ssh_cidrs, system_vm_size=spec.aks.system_vm_size,
        gpu_vm_size=spec.vm.size, gpu_count=spec.vm.count,
        os_disk_gb=spec.vm.os_disk_gb, encryption_at_host=spec.vm.encryption_at_host,
        production=spec.production, pod_cidr=config.AKS_POD_CIDR,
        service_cidr=config.AKS_SERVICE_CIDR, dns_service_ip=config.AKS_DNS_SERVICE_IP,
        gpu_min=0 if spec.scale.to_zero else spec.vm.count,
        gpu_max=spec.scale.gpu_nodes_max if spec.scale.enabled else 0,
        tags=tags(spec, "aks")))
    metrics = Metrics(f"{base}-metrics", MetricsArgs(
        spec=spec, resource_group_name=group.name, location=spec.location,
        subscription_id=client.subscription_id, cluster_id=aks.id, cluster_name=aks.name,
        oidc_issuer_url=aks.oidc_issuer_url, tags=tags(spec, "monitoring")))
    pulumi.export("aksCluster", aks.name)
    pulumi.export("prometheusQueryEndpoint", metrics.query_endpoint)
    grafana(spec, base, group.name, client.subscription_id, metrics)
    pulumi.export("kubeconfig", aks.kubeconfig)
    if spec.aks.phase != "workload":
        # First run: the storage account is created empty in this run, so nothing may be
        # awaited on its contents. `python -m serving upload`, then aksPhase: workload.
        pulumi.export("apiEndpoint", "")
        return
    workload = VllmOnAks(f"{base}-k8s", VllmOnAksArgs(
        spec=spec, kubeconfig=aks.kubeconfig, resource_group_name=group.name,
        storage_account_name=store.account_name, identity_name=identity.name,
        identity_client_id=identity.client_id, tenant_id=client.tenant_id,
        oidc_issuer_url=aks.oidc_issuer_url, api_key=stack.api_key,
        prometheus_query_endpoint=metrics.query_endpoint,
        keda_client_id=metrics.keda_client_id,
        depends_on=[aks.gpu_pool, aks.subnet_access, identity.reader, metrics]))
    pulumi.export("apiEndpoint", workload.api_endpoint(spec.vllm.port))


def grafana(spec: Spec, base: str, group_name: pulumi.Input[str],
            subscription_id: pulumi.Input[str], metrics: Metrics) -> None:
    """Managed Grafana on the workspace, where the stack asks for it (``grafana``)."""
    if not spec.metrics.grafana:
        return
    instance = ManagedGrafana(f"{base}-grafana", GrafanaArgs(
        stack=spec.stack, resource_group_name=group_name, location=spec.location,
        subscription_id=subscription_id, workspace_id=metrics.workspace.id,
        tags=tags(spec, "monitoring")))
    pulumi.export("grafanaEndpoint", instance.endpoint)


def main() -> None:
    stack = config.load()
    pulumi.export("target", stack.spec.target)
    if not stack.spec.on.cloud:
        # Target local runs on this machine: no Azure resources at all.
        pulumi.export("apiEndpoint", f"http://127.0.0.1:{stack.spec.vllm.port}/v1")
        return
    before_up(stack.spec)
    cloud(stack)


main()
