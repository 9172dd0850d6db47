"""The VM fleet's one endpoint: a Standard Load Balancer on the API port, probing vLLM's health
through the API proxy (``serving.stack.balancer`` holds the probe's facts).

Clients reach the address in ``apiEndpoint``; ``fab`` keeps using each host's own address.
Azure surprises:
- A load balancer's children (frontend, pool, probe) are referenced by resource ids that only
  exist inside the load balancer, so they are spelled out from its name, not read back.
- The NICs join the pool (NIC-based pool); the hosts' own addresses stay what they were.
- Neither SKU changes the NSG's job: inbound traffic keeps its client address (no SNAT), so the
  subnet's NSG still decides who gets in (``infra.network``).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import pulumi
from pulumi_azure_native import network

from infra.network import static_public_ip
from serving.stack.balancer import IDLE_TIMEOUT_MINUTES, PROBE_INTERVAL_SECONDS, PROBE_THRESHOLD

FRONTEND = "api"
POOL = "gpu-hosts"
PROBE = "vllm-health"
RULE = "vllm-api"


@dataclass(frozen=True)
class ApiBalancerArgs:
    resource_group_name: pulumi.Input[str]
    location: str
    subscription_id: pulumi.Input[str]
    lb_name: str
    kind: str  # internal or public (spec.balancer.kind)
    subnet_id: pulumi.Input[str]
    subnet_cidr: str
    api_port: int
    probe_path: str
    tags: dict[str, str]


def frontend_address(subnet_cidr: str) -> str:
    """The internal frontend's fixed address: the subnet's last usable one (Azure keeps the
    first four and the last), far from the hosts, which count up from the start."""
    return str(ipaddress.ip_network(subnet_cidr)[-2])


class ApiBalancer(pulumi.ComponentResource):
    def __init__(self, name: str, args: ApiBalancerArgs,
                 opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("exaone:infra:ApiBalancer", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        lb_id = pulumi.Output.all(args.subscription_id, args.resource_group_name).apply(
            lambda v: f"/subscriptions/{v[0]}/resourceGroups/{v[1]}/providers/"
                      f"Microsoft.Network/loadBalancers/{args.lb_name}")

        def sub(kind: str, item: str) -> pulumi.Output[str]:
            return lb_id.apply(lambda i: f"{i}/{kind}/{item}")

        self.public_ip: network.PublicIPAddress | None = None
        if args.kind == "public":
            self.public_ip = static_public_ip(f"{name}-ip", args.resource_group_name,
                                              args.location, args.tags, child)
            frontend = network.FrontendIPConfigurationArgs(
                name=FRONTEND,
                public_ip_address=network.PublicIPAddressArgs(id=self.public_ip.id))
        else:
            frontend = network.FrontendIPConfigurationArgs(
                name=FRONTEND,
                subnet=network.SubnetArgs(id=args.subnet_id),
                private_ip_allocation_method=network.IPAllocationMethod.STATIC,
                private_ip_address=frontend_address(args.subnet_cidr))
        self.lb = network.LoadBalancer(
            f"{name}-lb",
            load_balancer_name=args.lb_name,
            resource_group_name=args.resource_group_name,
            location=args.location,
            sku=network.LoadBalancerSkuArgs(name=network.LoadBalancerSkuName.STANDARD,
                                            tier=network.LoadBalancerSkuTier.REGIONAL),
            frontend_ip_configurations=[frontend],
            backend_address_pools=[network.BackendAddressPoolArgs(name=POOL)],
            probes=[network.ProbeArgs(
                name=PROBE,
                protocol=network.ProbeProtocol.HTTP,
                port=args.api_port,
                request_path=args.probe_path,
                interval_in_seconds=PROBE_INTERVAL_SECONDS,
                probe_threshold=PROBE_THRESHOLD,
            )],
            load_balancing_rules=[network.LoadBalancingRuleArgs(
                name=RULE,
                protocol=network.TransportProtocol.TCP,
                frontend_port=args.api_port,
                backend_port=args.api_port,
                frontend_ip_configuration=network.SubResourceArgs(
                    id=sub("frontendIPConfigurations", FRONTEND)),
                backend_address_pool=network.SubResourceArgs(
                    id=sub("backendAddressPools", POOL)),
                probe=network.SubResourceArgs(id=sub("probes", PROBE)),
                # Streams that wait for their first token are silent; a reset (not a silent
                # drop) tells the client at once when a flow does time out.
                idle_timeout_in_minutes=IDLE_TIMEOUT_MINUTES,
                enable_tcp_reset=True,
                enable_floating_ip=False,
                # Outbound goes through the NAT gateway or the hosts' own public IPs.
                disable_outbound_snat=True,
                load_distribution=network.LoadDistribution.DEFAULT,
            )],
            tags=args.tags,
            opts=child,
        )
        # From the load balancer itself, so that NICs joining the pool wait for it.
        self.pool_id: pulumi.Output[str] = self.lb.id.apply(
            lambda i: f"{i}/backendAddressPools/{POOL}")
        self.address: pulumi.Output[str] = (
            self.public_ip.ip_address.apply(lambda ip: ip or "")
            if self.public_ip else pulumi.Output.from_input(frontend_address(args.subnet_cidr)))
        self.register_outputs({"address": self.address, "pool_id": self.pool_id})
