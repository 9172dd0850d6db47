"""Blob storage for model weights and adapters: private, keyless, recoverable."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import pulumi
from pulumi_azure_native import storage

from serving.stack import layout

CONTAINERS = ("models", "adapters")
SOFT_DELETE_DAYS = 7
PRODUCTION_SOFT_DELETE_DAYS = 30


@dataclass(frozen=True)
class StorageArgs:
    resource_group_name: pulumi.Input[str]
    location: str
    stack: str
    subscription_id: pulumi.Input[str]
    subnet_id: pulumi.Input[str]
    # The operators' networks: they upload weights and adapters from there.
    operator_cidrs: tuple[str, ...]
    production: bool
    tags: dict[str, str]


def account_name(stack: str, subscription_id: str) -> str:
    return layout.storage_account_name(stack, subscription_id)


# Storage IP rules refuse these (RFC 1918 and carrier-grade NAT); such networks reach the
# account through the VNet rule instead.
_NOT_ALLOWED_IN_IP_RULES = tuple(ipaddress.ip_network(n) for n in (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10"))


def ip_rules(cidrs: tuple[str, ...]) -> list[storage.IPRuleArgs]:
    """Storage IP rules take public IPv4 only, and /31 and /32 as plain addresses."""
    rules = []
    for cidr in cidrs:
        net = ipaddress.ip_network(cidr)
        if net.version != 4 or any(net.overlaps(p) for p in _NOT_ALLOWED_IN_IP_RULES):
            continue
        if net.prefixlen >= 31:
            hosts = list(net.hosts()) if net.prefixlen == 31 else [net.network_address]
            rules.extend(storage.IPRuleArgs(i_p_address_or_range=str(host),
                                            action=storage.Action.ALLOW) for host in hosts)
        else:
            rules.append(storage.IPRuleArgs(i_p_address_or_range=str(net),
                                            action=storage.Action.ALLOW))
    return rules


class Storage(pulumi.ComponentResource):
    """Account, blob service properties (soft delete, versioning) and the two containers."""

    def __init__(self, name: str, args: StorageArgs,
                 opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("exaone:infra:Storage", name, None, opts)
        # Production data survives `pulumi destroy`: protect makes the engine refuse to
        # delete these until `pulumi state unprotect` is run on purpose.
        kept = pulumi.ResourceOptions(parent=self, protect=args.production)
        days = PRODUCTION_SOFT_DELETE_DAYS if args.production else SOFT_DELETE_DAYS
        self.account = storage.StorageAccount(
            f"{name}-account",
            account_name=pulumi.Output.from_input(args.subscription_id).apply(
                lambda sub: account_name(args.stack, sub)),
            resource_group_name=args.resource_group_name,
            location=args.location,
            kind=storage.Kind.STORAGE_V2,
            # Zone-redundant in production, locally redundant elsewhere.
            sku=storage.SkuArgs(name=storage.SkuName.STANDARD_ZRS if args.production
                                else storage.SkuName.STANDARD_LRS),
            access_tier=storage.AccessTier.HOT,
            allow_blob_public_access=False,
            enable_https_traffic_only=True,
            minimum_tls_version=storage.MinimumTlsVersion.TLS1_2,
            # No account keys and no SAS signed with them: readers use Entra ID roles.
            allow_shared_key_access=False,
            default_to_o_auth_authentication=True,
            allow_cross_tenant_replication=False,
            public_network_access=storage.PublicNetworkAccess.ENABLED,
            network_rule_set=storage.NetworkRuleSetArgs(
                default_action=storage.DefaultAction.DENY,
                # Not even "trusted Microsoft services": only the VNet and the operators.
                bypass=storage.Bypass.NONE,
                virtual_network_rules=[storage.VirtualNetworkRuleArgs(
                    virtual_network_resource_id=args.subnet_id, action=storage.Action.ALLOW)],
                ip_rules=ip_rules(args.operator_cidrs),
            ),
            tags=args.tags,
            opts=kept,
        )
        self.blob_service = storage.BlobServiceProperties(
            f"{name}-blob-service",
            account_name=self.account.name,
            resource_group_name=args.resource_group_name,
            blob_services_name="default",
            delete_retention_policy=storage.DeleteRetentionPolicyArgs(enabled=True, days=days),
            container_delete_retention_policy=storage.DeleteRetentionPolicyArgs(
                enabled=True, days=days),
            is_versioning_enabled=True,
            opts=kept,
        )
        self.containers: dict[str, storage.BlobContainer] = {
            container: storage.BlobContainer(
                f"{name}-{container}",
                account_name=self.account.name,
                resource_group_name=args.resource_group_name,
                container_name=container,
                public_access=storage.PublicAccess.NONE,
                opts=pulumi.ResourceOptions.merge(
                    kept, pulumi.ResourceOptions(depends_on=[self.blob_service])),
            )
            for container in CONTAINERS
        }
        self.account_name: pulumi.Output[str] = self.account.name
        self.account_id: pulumi.Output[str] = self.account.id
        self.register_outputs({"account_name": self.account_name,
                               "containers": list(self.containers)})
