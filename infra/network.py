"""VNet, the workload subnet and, for VMs, the subnet's NSG and outbound NAT."""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
from pulumi_azure_native import network

from serving.stack.balancer import AZURE_PROBE_TAG

SSH_PORT = 22



def static_public_ip(name: str, resource_group_name: pulumi.Input[str],
                     location: pulumi.Input[str], tags: pulumi.Input[dict[str, str]],
                     opts: pulumi.ResourceOptions) -> network.PublicIPAddress:
    """A Standard, static public IP (what a NAT gateway and a Standard load balancer need)."""
    return network.PublicIPAddress(
        name,
        resource_group_name=resource_group_name,
        location=location,
        sku=network.PublicIPAddressSkuArgs(name=network.PublicIPAddressSkuName.STANDARD),
        public_ip_allocation_method=network.IPAllocationMethod.STATIC,
        tags=tags,
        opts=opts,
    )

@dataclass(frozen=True)
class NetworkArgs:
    resource_group_name: pulumi.Input[str]
    location: str
    vnet_cidr: str
    subnet_cidr: str
    # VMs get an NSG on their subnet; AKS manages the NSG of its own node resource group.
    with_nsg: bool
    ssh_cidrs: tuple[str, ...]
    api_cidrs: tuple[str, ...]
    api_port: int
    # Private-only VMs still need outbound (apt, pip, Hugging Face): a NAT gateway gives it
    # without opening anything inbound.
    with_nat: bool
    tags: dict[str, str]


def inbound_rules(ssh_cidrs: tuple[str, ...], api_cidrs: tuple[str, ...],
                  api_port: int) -> list[network.SecurityRuleArgs]:
    """SSH from the operators, the API from its clients and the load balancer's probe, every
    other inbound flow denied."""
    rules: list[network.SecurityRuleArgs] = []

    def allow(name: str, priority: int, port: int, sources: tuple[str, ...]) -> None:
        if sources:
            one = len(sources) == 1 and "/" not in sources[0]
            rules.append(network.SecurityRuleArgs(
                name=name,
                priority=priority,
                direction=network.SecurityRuleDirection.INBOUND,
                access=network.SecurityRuleAccess.ALLOW,
                protocol=network.SecurityRuleProtocol.TCP,
                # A service tag goes in the single-prefix field; CIDRs in the list.
                source_address_prefix=sources[0] if one else None,
                source_address_prefixes=None if one else list(sources),
                source_port_range="*",
                destination_address_prefix="VirtualNetwork",
                destination_port_range=str(port),
            ))

    allow("allow-ssh-operators", 100, SSH_PORT, ssh_cidrs)
    allow("allow-vllm-api-clients", 110, api_port, api_cidrs)
    # Azure's probes come from 168.63.129.16 (tag AzureLoadBalancer). The deny-all below also
    # denies Azure's default rule that would admit them, so they are allowed here, on the API
    # port only: the load balancer probes vLLM's health through the API proxy.
    allow("allow-load-balancer-probe", 120, api_port, (AZURE_PROBE_TAG,))
    # Azure's default rules (priority 65000+) admit all VNet and load-balancer traffic;
    # this rule sits above them so that nothing reaches the hosts unless allowed here.
    rules.append(network.SecurityRuleArgs(
        name="deny-all-inbound",
        priority=4096,
        direction=network.SecurityRuleDirection.INBOUND,
        access=network.SecurityRuleAccess.DENY,
        protocol=network.SecurityRuleProtocol.ASTERISK,
        source_address_prefix="*",
        source_port_range="*",
        destination_address_prefix="*",
        destination_port_range="*",
    ))
    return rules


class Network(pulumi.ComponentResource):
    def __init__(self, name: str, args: NetworkArgs,
                 opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("exaone:infra:Network", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        self.vnet = network.VirtualNetwork(
            f"{name}-vnet",
            resource_group_name=args.resource_group_name,
            location=args.location,
            address_space=network.AddressSpaceArgs(address_prefixes=[args.vnet_cidr]),
            tags=args.tags,
            # No inline subnets: the Subnet resource below owns the one subnet.
            opts=child,
        )
        self.nsg: network.NetworkSecurityGroup | None = None
        if args.with_nsg:
            self.nsg = network.NetworkSecurityGroup(
                f"{name}-nsg",
                resource_group_name=args.resource_group_name,
                location=args.location,
                security_rules=inbound_rules(args.ssh_cidrs, args.api_cidrs, args.api_port),
                tags=args.tags,
                opts=child,
            )
        self.nat: network.NatGateway | None = None
        if args.with_nat:
            nat_ip = static_public_ip(f"{name}-nat-ip", args.resource_group_name, args.location,
                                      args.tags, child)
            self.nat = network.NatGateway(
                f"{name}-nat",
                resource_group_name=args.resource_group_name,
                location=args.location,
                sku=network.NatGatewaySkuArgs(name=network.NatGatewaySkuName.STANDARD),
                public_ip_addresses=[network.SubResourceArgs(id=nat_ip.id)],
                tags=args.tags,
                opts=child,
            )
        self.subnet = network.Subnet(
            f"{name}-workload",
            resource_group_name=args.resource_group_name,
            virtual_network_name=self.vnet.name,
            address_prefix=args.subnet_cidr,
            network_security_group=(
                network.NetworkSecurityGroupArgs(id=self.nsg.id) if self.nsg else None
            ),
            nat_gateway=network.SubResourceArgs(id=self.nat.id) if self.nat else None,
            # The storage account admits this subnet through a service endpoint rule.
            service_endpoints=[network.ServiceEndpointPropertiesFormatArgs(
                service="Microsoft.Storage", locations=[args.location])],
            opts=child,
        )
        self.subnet_id: pulumi.Output[str] = self.subnet.id
        self.register_outputs({"vnet_id": self.vnet.id, "subnet_id": self.subnet_id})
