"""Metrics that land somewhere: an Azure Monitor workspace that the cluster's managed
Prometheus (AKS) or each VM's Prometheus agent (``serving.render.metrics_unit``) writes to, the
project's alert rules (``serving.render.monitoring``) as Prometheus rule groups evaluated there,
and the identity KEDA reads the load signal with.

Azure surprises:
- Turning on ``azureMonitorProfile.metrics`` on the cluster only deploys the scraper
  (ama-metrics); where it writes is a data collection rule with a Prometheus forwarder, bound to
  the cluster by an association, and its endpoint by a second association that must be named
  ``configurationAccessEndpoint``.
- Rule groups take durations as ISO 8601 (``PT10M``), not PromQL's ``10m``.
- KEDA's operator, not the vLLM pod, queries the workspace: its own identity is federated to
  ``kube-system/keda-operator`` and may only read (Monitoring Data Reader on the workspace).
- A VM's agent remote-writes to the same rule's stream at the endpoint's metrics-ingestion
  host; its identity needs Monitoring Metrics Publisher on the data collection rule itself (on
  the workspace it is refused). A rule group bound to no cluster evaluates the workspace's
  series of every source: the job selector keeps it to the stack.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pulumi
from pulumi_azure_native import alertsmanagement, authorization, managedidentity, monitor

from infra.identity import role_definition_id
from k8s.autoscale import KEDA_SUBJECT
from serving.render import monitoring as rules
from serving.stack.catalog import AZURE_ROLES
from serving.stack.spec import Spec

MONITORING_DATA_READER = AZURE_ROLES["Monitoring Data Reader"]
MONITORING_METRICS_PUBLISHER = AZURE_ROLES["Monitoring Metrics Publisher"]
TOKEN_EXCHANGE_AUDIENCE = "api://AzureADTokenExchange"
# The name Azure requires for the association of a data collection endpoint.
ENDPOINT_ASSOCIATION = "configurationAccessEndpoint"
PROMETHEUS_STREAM = rules.PROMETHEUS_STREAM
RULE_INTERVAL = "PT1M"
_SEVERITY = {"critical": 1, "warning": 3}  # Azure's 0 (critical) .. 4 (verbose)


def iso_duration(promql: str) -> str:
    """PromQL ``10m``/``1h``/``30s`` -> ISO 8601 ``PT10M``/``PT1H``/``PT30S``."""
    match = re.fullmatch(r"(\d+)([smh])", promql)
    if not match:
        raise ValueError(f"{promql!r} is not a PromQL duration in s, m or h")
    return f"PT{match.group(1)}{match.group(2).upper()}"


def rule_args(spec: Spec) -> list[alertsmanagement.PrometheusRuleArgs]:
    """The rendered alert rules, unchanged, as Azure's rule-group entries."""
    out = []
    for group in rules.alert_rules(spec)["groups"]:
        for rule in group["rules"]:
            out.append(alertsmanagement.PrometheusRuleArgs(
                alert=rule["alert"],
                expression=rule["expr"],
                for_=iso_duration(rule["for"]),
                labels=rule["labels"],
                annotations=rule["annotations"],
                severity=_SEVERITY[rule["labels"]["severity"]],
                enabled=True,
            ))
    return out


@dataclass(frozen=True)
class MetricsArgs:
    spec: Spec
    resource_group_name: pulumi.Input[str]
    location: str
    subscription_id: pulumi.Input[str]
    tags: dict[str, str]
    # AKS: the cluster whose managed Prometheus writes here.
    cluster_id: pulumi.Input[str] | None = None
    cluster_name: pulumi.Input[str] | None = None
    oidc_issuer_url: pulumi.Input[str] | None = None
    # VMs: the principal of the identity their agents write with.
    publisher_principal_id: pulumi.Input[str] | None = None


class Metrics(pulumi.ComponentResource):
    def __init__(self, name: str, args: MetricsArgs,
                 opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("exaone:infra:Metrics", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        rg, location = args.resource_group_name, args.location
        self.workspace = monitor.AzureMonitorWorkspace(
            f"{name}-workspace", resource_group_name=rg, location=location,
            tags=args.tags, opts=child)
        self.endpoint = monitor.DataCollectionEndpoint(
            f"{name}-dce", resource_group_name=rg, location=location, kind="Linux",
            tags=args.tags, opts=child)
        self.rule = monitor.DataCollectionRule(
            f"{name}-dcr", resource_group_name=rg, location=location, kind="Linux",
            data_collection_endpoint_id=self.endpoint.id,
            data_sources=monitor.DataCollectionRuleDataSourcesArgs(
                prometheus_forwarder=[monitor.PrometheusForwarderDataSourceArgs(
                    name="prometheus", streams=[PROMETHEUS_STREAM])]),
            destinations=monitor.DataCollectionRuleDestinationsArgs(
                monitoring_accounts=[monitor.MonitoringAccountDestinationArgs(
                    name="workspace", account_resource_id=self.workspace.id)]),
            data_flows=[monitor.DataFlowArgs(streams=[PROMETHEUS_STREAM],
                                             destinations=["workspace"])],
            tags=args.tags, opts=child)
        scopes: list[pulumi.Input[str]] = [self.workspace.id]
        if args.cluster_id is not None:
            monitor.DataCollectionRuleAssociation(
                f"{name}-dcra", association_name=f"{name}-dcra", resource_uri=args.cluster_id,
                data_collection_rule_id=self.rule.id, opts=child)
            monitor.DataCollectionRuleAssociation(
                f"{name}-dcea", association_name=ENDPOINT_ASSOCIATION,
                resource_uri=args.cluster_id, data_collection_endpoint_id=self.endpoint.id,
                opts=child)
            scopes.append(args.cluster_id)
        self.ingestion_url: pulumi.Output[str] = pulumi.Output.from_input("")
        if args.publisher_principal_id is not None:
            self._publisher(name, args, child)
        self.rule_group = alertsmanagement.PrometheusRuleGroup(
            f"{name}-alerts", resource_group_name=rg, location=location,
            rule_group_name=rules.job_name(args.spec),
            cluster_name=args.cluster_name,
            scopes=scopes,
            interval=RULE_INTERVAL, enabled=True, rules=rule_args(args.spec),
            description="vLLM alert rules rendered by serving.render.monitoring",
            tags=args.tags, opts=child)
        self.query_endpoint: pulumi.Output[str] = self.workspace.metrics.apply(
            lambda m: (m.prometheus_query_endpoint if m else "") or "")

        self.keda_client_id: pulumi.Output[str] = pulumi.Output.from_input("")
        if args.spec.scale.enabled:
            self._keda(name, args, child)
        self.register_outputs({"workspace_id": self.workspace.id,
                               "query_endpoint": self.query_endpoint,
                               "ingestion_url": self.ingestion_url})

    def _publisher(self, name: str, args: MetricsArgs, child: pulumi.ResourceOptions) -> None:
        """The VMs' identity may write through this rule only (Monitoring Metrics Publisher on
        the rule); the agents' remote-write URL is the rule's stream at the endpoint."""
        self.publisher = authorization.RoleAssignment(
            f"{name}-publisher",
            principal_id=args.publisher_principal_id,
            principal_type=authorization.PrincipalType.SERVICE_PRINCIPAL,
            role_definition_id=pulumi.Output.from_input(args.subscription_id).apply(
                lambda sub: role_definition_id(sub, MONITORING_METRICS_PUBLISHER)),
            scope=self.rule.id,
            opts=child)
        ingest = self.endpoint.metrics_ingestion.apply(
            lambda m: (m.endpoint if m else "") or "")
        self.ingestion_url = pulumi.Output.all(ingest, self.rule.immutable_id).apply(
            lambda v: rules.ingestion_url(v[0], v[1]) if v[0] and v[1] else "")

    def _keda(self, name: str, args: MetricsArgs, child: pulumi.ResourceOptions) -> None:
        """KEDA reads the workspace with an identity of its own, that may only read it."""
        rg, location = args.resource_group_name, args.location
        self.keda_identity = managedidentity.UserAssignedIdentity(
            f"{name}-keda-id", resource_group_name=rg, location=location,
            tags=args.tags, opts=child)
        self.keda_reader = authorization.RoleAssignment(
            f"{name}-keda-reader",
            principal_id=self.keda_identity.principal_id,
            principal_type=authorization.PrincipalType.SERVICE_PRINCIPAL,
            role_definition_id=pulumi.Output.from_input(args.subscription_id).apply(
                lambda sub: role_definition_id(sub, MONITORING_DATA_READER)),
            scope=self.workspace.id,
            opts=child)
        self.keda_federation = managedidentity.FederatedIdentityCredential(
            f"{name}-keda-federation",
            resource_group_name=rg,
            resource_name_=self.keda_identity.name,
            issuer=args.oidc_issuer_url,
            subject=KEDA_SUBJECT,
            audiences=[TOKEN_EXCHANGE_AUDIENCE],
            opts=child)
        self.keda_client_id = self.keda_identity.client_id
