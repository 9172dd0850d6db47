"""The AKS cluster: a small system pool, and a tainted NC H100 v5 pool for vLLM."""

from __future__ import annotations

import base64
from dataclasses import dataclass

import pulumi
from pulumi_azure_native import authorization, containerservice

from infra.identity import role_definition_id
from k8s import GPU_NODE_LABELS, GPU_NODE_TAINT, GPU_POOL_NAME
from k8s.drain import GRACE_SECONDS
from serving.stack.catalog import AZURE_ROLES, aks_system_nodes

# Built-in role "Network Contributor": AKS's own identity needs it on a subnet it does not
# own to place internal load balancers there (the CLI grants it; ARM deployments must).
NETWORK_CONTRIBUTOR = AZURE_ROLES["Network Contributor"]
SYSTEM_POOL_NAME = "system"


@dataclass(frozen=True)
class AksClusterArgs:
    resource_group_name: pulumi.Input[str]
    location: str
    subscription_id: pulumi.Input[str]
    dns_prefix: str
    subnet_id: pulumi.Input[str]
    # The operators' networks: the only sources the API server answers.
    operator_cidrs: tuple[str, ...]
    system_vm_size: str
    gpu_vm_size: str
    gpu_count: int
    os_disk_gb: int
    encryption_at_host: bool
    production: bool
    pod_cidr: str
    service_cidr: str
    dns_service_ip: str
    tags: dict[str, str]
    # Cluster autoscaler on the GPU pool between these (spec.scale); 0 for a fixed pool.
    gpu_min: int = 0
    gpu_max: int = 0


def _decode_kubeconfig(value: str) -> str:
    return base64.b64decode(value).decode()


class AksCluster(pulumi.ComponentResource):
    def __init__(self, name: str, args: AksClusterArgs,
                 opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("exaone:infra:AksCluster", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        cs = containerservice
        self.cluster = cs.ManagedCluster(
            f"{name}-cluster",
            resource_group_name=args.resource_group_name,
            location=args.location,
            dns_prefix=args.dns_prefix,
            identity=cs.ManagedClusterIdentityArgs(type=cs.ResourceIdentityType.SYSTEM_ASSIGNED),
            sku=cs.ManagedClusterSKUArgs(
                name=cs.ManagedClusterSKUName.BASE,
                tier=cs.ManagedClusterSKUTier.STANDARD if args.production
                else cs.ManagedClusterSKUTier.FREE),
            enable_rbac=True,
            oidc_issuer_profile=cs.ManagedClusterOIDCIssuerProfileArgs(enabled=True),
            security_profile=cs.ManagedClusterSecurityProfileArgs(
                workload_identity=cs.ManagedClusterSecurityProfileWorkloadIdentityArgs(
                    enabled=True)),
            api_server_access_profile=cs.ManagedClusterAPIServerAccessProfileArgs(
                authorized_ip_ranges=list(args.operator_cidrs)),
            # Azure CNI overlay with the Cilium dataplane enforces NetworkPolicy; pods take
            # addresses outside the VNet, nodes take theirs from the workload subnet.
            network_profile=cs.ContainerServiceNetworkProfileArgs(
                network_plugin=cs.NetworkPlugin.AZURE,
                network_plugin_mode=cs.NetworkPluginMode.OVERLAY,
                network_dataplane=cs.NetworkDataplane.CILIUM,
                network_policy=cs.NetworkPolicy.CILIUM,
                pod_cidr=args.pod_cidr,
                service_cidr=args.service_cidr,
                dns_service_ip=args.dns_service_ip,
            ),
            # KEDA (the add-on) scales the vLLM pods; managed Prometheus (ama-metrics) scrapes
            # them for it and for the alert rules (infra.monitoring says where it writes).
            workload_auto_scaler_profile=cs.ManagedClusterWorkloadAutoScalerProfileArgs(
                keda=cs.ManagedClusterWorkloadAutoScalerProfileKedaArgs(enabled=True)),
            azure_monitor_profile=cs.ManagedClusterAzureMonitorProfileArgs(
                metrics=cs.ManagedClusterAzureMonitorProfileMetricsArgs(enabled=True)),
            # A GPU node is removed only after its pods drained (k8s.drain), and not soon after
            # one was added: a new vLLM pod needs minutes before it takes load.
            auto_scaler_profile=cs.ManagedClusterPropertiesAutoScalerProfileArgs(
                max_graceful_termination_sec=str(GRACE_SECONDS),
                scale_down_delay_after_add="15m",
                scale_down_unneeded_time="10m",
                max_node_provision_time="30m",
            ) if args.gpu_max else None,
            agent_pool_profiles=[cs.ManagedClusterAgentPoolProfileArgs(
                name=SYSTEM_POOL_NAME,
                mode=cs.AgentPoolMode.SYSTEM,
                count=aks_system_nodes(args.production),
                vm_size=args.system_vm_size,
                os_type=cs.OSType.LINUX,
                os_sku=cs.OSSKU.UBUNTU,
                vnet_subnet_id=args.subnet_id,
                enable_encryption_at_host=args.encryption_at_host,
                # Only system pods here; vLLM goes to the GPU pool.
                node_taints=["CriticalAddonsOnly=true:NoSchedule"],
                security_profile=cs.AgentPoolSecurityProfileArgs(
                    ssh_access=cs.AgentPoolSSHAccess.DISABLED),
                tags=args.tags,
            )],
            tags=args.tags,
            opts=child,
        )
        self.subnet_access = authorization.RoleAssignment(
            f"{name}-subnet-access",
            principal_id=self.cluster.identity.apply(lambda i: i.principal_id if i else ""),
            principal_type=authorization.PrincipalType.SERVICE_PRINCIPAL,
            role_definition_id=pulumi.Output.from_input(args.subscription_id).apply(
                lambda sub: role_definition_id(sub, NETWORK_CONTRIBUTOR)),
            scope=args.subnet_id,
            opts=child,
        )
        # Size and taints of a pool are fixed at creation: changing them replaces the pool.
        self.gpu_pool = cs.AgentPool(
            f"{name}-gpu",
            agent_pool_name=GPU_POOL_NAME,
            resource_group_name=args.resource_group_name,
            resource_name_=self.cluster.name,
            mode=cs.AgentPoolMode.USER,
            count=args.gpu_count,
            enable_auto_scaling=bool(args.gpu_max) or None,
            min_count=args.gpu_min if args.gpu_max else None,
            max_count=args.gpu_max or None,
            vm_size=args.gpu_vm_size,
            os_type=cs.OSType.LINUX,
            # H100 pools need Ubuntu: Azure Linux has no H100 support.
            os_sku=cs.OSSKU.UBUNTU,
            os_disk_size_gb=args.os_disk_gb,
            node_taints=[GPU_NODE_TAINT],
            node_labels=dict(GPU_NODE_LABELS),
            # AKS installs the driver; the workload adds the device plugin (spec.AKS_GPU_DRIVERS).
            gpu_profile=cs.GPUProfileArgs(driver=cs.GPUDriver.INSTALL),
            vnet_subnet_id=args.subnet_id,
            enable_encryption_at_host=args.encryption_at_host,
            security_profile=cs.AgentPoolSecurityProfileArgs(
                ssh_access=cs.AgentPoolSSHAccess.DISABLED),
            tags=args.tags,
            # The cluster autoscaler owns the node count between min and max.
            opts=pulumi.ResourceOptions.merge(child, pulumi.ResourceOptions(
                ignore_changes=["count"] if args.gpu_max else None)),
        )
        credentials = cs.list_managed_cluster_user_credentials_output(
            resource_group_name=args.resource_group_name,
            resource_name=self.cluster.name,
        )
        self.kubeconfig: pulumi.Output[str] = pulumi.Output.secret(
            credentials.kubeconfigs.apply(lambda kcs: _decode_kubeconfig(kcs[0].value)))
        self.oidc_issuer_url: pulumi.Output[str] = self.cluster.oidc_issuer_profile.apply(
            lambda p: p.issuer_url if p else "")
        self.name: pulumi.Output[str] = self.cluster.name
        self.id: pulumi.Output[str] = self.cluster.id
        self.register_outputs({"name": self.name, "oidc_issuer_url": self.oidc_issuer_url})
