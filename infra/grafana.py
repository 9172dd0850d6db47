"""Azure Managed Grafana on the stack's Azure Monitor workspace, where the stack asks for it
(``grafana: true``): the workspace linked as its Prometheus data source, and the instance's own
identity allowed to read that workspace only (Monitoring Data Reader on it). The dashboard the
project generates (``docs/grafana/exaone-vllm.json``) is imported by hand (README).

Azure surprises:
- Linking a workspace (``grafanaIntegrations.azureMonitorWorkspaceIntegrations``) adds the data
  source but grants nothing: without Monitoring Data Reader for the instance's identity every
  panel answers 403.
- The Standard tier is the one that takes workspace integrations; an instance name is 2 to 23
  letters, digits and hyphens, and its URL gets a hash of Azure's own (``grafanaEndpoint``).
- Signing in takes a Grafana role on the instance (Grafana Admin, Editor or Viewer), given to
  people, not by this stack; API keys and service accounts stay off.
"""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
from pulumi_azure_native import authorization, dashboard

from infra.identity import role_definition_id
from serving.stack.catalog import AZURE_ROLES

MONITORING_DATA_READER = AZURE_ROLES["Monitoring Data Reader"]
SKU = "Standard"
NAME_MAX = 23


def instance_name(stack: str) -> str:
    """``exaone-<stack>``, cut to Azure's 23 characters, never ending in a hyphen."""
    return f"exaone-{stack}"[:NAME_MAX].rstrip("-")


@dataclass(frozen=True)
class GrafanaArgs:
    stack: str
    resource_group_name: pulumi.Input[str]
    location: str
    subscription_id: pulumi.Input[str]
    workspace_id: pulumi.Input[str]
    tags: dict[str, str]


class ManagedGrafana(pulumi.ComponentResource):
    def __init__(self, name: str, args: GrafanaArgs,
                 opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("exaone:infra:ManagedGrafana", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        self.instance = dashboard.Grafana(
            f"{name}-instance",
            workspace_name=instance_name(args.stack),
            resource_group_name=args.resource_group_name,
            location=args.location,
            sku=dashboard.ResourceSkuArgs(name=SKU),
            identity=dashboard.ManagedServiceIdentityArgs(
                type=dashboard.ManagedServiceIdentityType.SYSTEM_ASSIGNED),
            properties=dashboard.ManagedGrafanaPropertiesArgs(
                api_key=dashboard.ApiKey.DISABLED,
                deterministic_outbound_ip=dashboard.DeterministicOutboundIP.DISABLED,
                grafana_integrations=dashboard.GrafanaIntegrationsArgs(
                    azure_monitor_workspace_integrations=[
                        dashboard.AzureMonitorWorkspaceIntegrationArgs(
                            azure_monitor_workspace_resource_id=args.workspace_id)]),
            ),
            tags=args.tags,
            opts=child)
        principal = self.instance.identity.apply(lambda i: (i.principal_id if i else "") or "")
        self.reader = authorization.RoleAssignment(
            f"{name}-reader",
            principal_id=principal,
            principal_type=authorization.PrincipalType.SERVICE_PRINCIPAL,
            role_definition_id=pulumi.Output.from_input(args.subscription_id).apply(
                lambda sub: role_definition_id(sub, MONITORING_DATA_READER)),
            scope=args.workspace_id,
            opts=child)
        self.endpoint = self.instance.properties.apply(
            lambda p: (p.endpoint if p else "") or "")
        self.register_outputs({"endpoint": self.endpoint})
