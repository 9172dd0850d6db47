"""vLLM on AKS: the Kubernetes provider, the NVIDIA device plugin and the vLLM objects.

The objects come from the ``k8s`` builders (the same data ``render`` writes as YAML); each
becomes a typed pulumi-kubernetes resource, so previews and tests see every one of them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pulumi
import pulumi_kubernetes as k8s
from pulumi_azure_native import managedidentity

from k8s import api_key_secret, device_plugin, vllm_objects
from k8s.autoscale import autoscale_objects
from k8s.objects import PORT_NAME
from serving.stack.spec import Spec

# Kubernetes' audience for Entra ID workload identity federation.
TOKEN_EXCHANGE_AUDIENCE = "api://AzureADTokenExchange"
# A Deployment is "ready" only after the model is fetched, loaded and compiled; the weights
# are in Blob before this runs (aksPhase: workload, checked by preflight).
ROLLOUT_TIMEOUT = "60m"

_KINDS: dict[tuple[str, str], type[pulumi.CustomResource]] = {
    ("v1", "Namespace"): k8s.core.v1.Namespace,
    ("v1", "ServiceAccount"): k8s.core.v1.ServiceAccount,
    ("v1", "ConfigMap"): k8s.core.v1.ConfigMap,
    ("v1", "Secret"): k8s.core.v1.Secret,
    ("v1", "Service"): k8s.core.v1.Service,
    ("apps/v1", "Deployment"): k8s.apps.v1.Deployment,
    ("apps/v1", "DaemonSet"): k8s.apps.v1.DaemonSet,
    ("policy/v1", "PodDisruptionBudget"): k8s.policy.v1.PodDisruptionBudget,
    ("networking.k8s.io/v1", "NetworkPolicy"): k8s.networking.v1.NetworkPolicy,
}


def _snake(key: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", key).lower()


@dataclass(frozen=True)
class VllmOnAksArgs:
    spec: Spec
    kubeconfig: pulumi.Input[str]
    resource_group_name: pulumi.Input[str]
    storage_account_name: pulumi.Input[str]
    identity_name: pulumi.Input[str]
    identity_client_id: pulumi.Input[str]
    tenant_id: pulumi.Input[str]
    oidc_issuer_url: pulumi.Input[str]
    api_key: pulumi.Output[str] | None
    # The GPU pool and anything else the workload must come after.
    depends_on: Sequence[pulumi.Resource]
    # Where KEDA reads the load signal (infra.monitoring) and the identity it reads with.
    prometheus_query_endpoint: pulumi.Input[str] = ""
    keda_client_id: pulumi.Input[str] = ""


class VllmOnAks(pulumi.ComponentResource):
    def __init__(self, name: str, args: VllmOnAksArgs,
                 opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("exaone:infra:VllmOnAks", name, None, opts)
        spec = args.spec
        self._spec = spec
        self.provider = k8s.Provider(
            f"{name}-provider",
            kubeconfig=args.kubeconfig,
            opts=pulumi.ResourceOptions(parent=self),
        )
        self.resources: dict[str, pulumi.CustomResource] = {}
        self._service_meta: dict[str, Any] = {}
        after = list(args.depends_on)

        plugin = self._create(name, device_plugin(spec), after)

        # The builders place the cloud values as given, so the Outputs go in as they are:
        # one build, and Pulumi resolves them inside each object's fields.
        objs = vllm_objects(spec, storage_account=args.storage_account_name,
                            client_id=args.identity_client_id, tenant_id=args.tenant_id)
        account = next(o for o in objs if o["kind"] == "ServiceAccount")["metadata"]
        # The vLLM pod's service account may exchange its token for the identity's; the
        # adapter init container then reads Blob with no key anywhere.
        self.federation = managedidentity.FederatedIdentityCredential(
            f"{name}-federation",
            resource_group_name=args.resource_group_name,
            resource_name_=args.identity_name,
            issuer=args.oidc_issuer_url,
            subject=f"system:serviceaccount:{account['namespace']}:{account['name']}",
            audiences=[TOKEN_EXCHANGE_AUDIENCE],
            opts=pulumi.ResourceOptions(parent=self),
        )

        def pick(kinds: Callable[[str], bool]) -> list[dict[str, Any]]:
            return [o for o in objs if kinds(o["kind"])]

        namespaces = self._create(name, pick(lambda k: k == "Namespace"), after)
        # What the pods need exists first (NetworkPolicy included), then the Deployment, then the
        # Service: pulumi-kubernetes awaits a Service until its endpoints are ready pods (and a
        # LoadBalancer has an address), so a Service created before its pods fails on its
        # timeout and the Deployment after it is never created.
        around = self._create(
            name, pick(lambda k: k not in ("Namespace", "Deployment", "Service")),
            [*after, *namespaces])
        if args.api_key is not None:
            # Only the key is secret: name and labels stay readable in previews and state.
            around += self._create(
                name, [api_key_secret(spec, pulumi.Output.secret(args.api_key))],
                [*after, *namespaces])
        deployments = self._create(name, pick(lambda k: k == "Deployment"),
                                   [*after, *namespaces, *plugin, *around, self.federation])
        self._create(name, pick(lambda k: k == "Service"), [*namespaces, *deployments])
        # The scrape (CRD of the managed Prometheus add-on) and KEDA's objects (CRDs of its
        # add-on): both add-ons are on the cluster before any of this runs.
        self._create(name, autoscale_objects(
            spec, server_address=args.prometheus_query_endpoint,
            client_id=args.keda_client_id, port_name=PORT_NAME), [*namespaces, *deployments])
        self.register_outputs({"objects": list(self.resources)})

    def _create(self, name: str, objs: list[dict[str, Any]],
                depends_on: Sequence[pulumi.Resource]) -> list[pulumi.CustomResource]:
        """One typed resource per object, its fields the object's (values may be Outputs)."""
        created: list[pulumi.CustomResource] = []
        for obj in objs:
            logical = f"{name}-{obj['kind'].lower()}-{obj['metadata']['name']}"
            opts = pulumi.ResourceOptions(parent=self, provider=self.provider,
                                          depends_on=list(depends_on))
            if obj["kind"] == "Deployment":
                opts.custom_timeouts = pulumi.CustomTimeouts(
                    create=ROLLOUT_TIMEOUT, update=ROLLOUT_TIMEOUT)
                if self._spec.scale.enabled:
                    # KEDA's HPA owns the replica count once the Deployment exists.
                    opts.ignore_changes = ["spec.replicas"]
            cls = _KINDS.get((obj["apiVersion"], obj["kind"]))
            resource: pulumi.CustomResource
            if cls is None:  # an add-on's CRD (KEDA, managed Prometheus)
                resource = k8s.apiextensions.CustomResource(
                    logical, api_version=obj["apiVersion"], kind=obj["kind"],
                    metadata=obj["metadata"], spec=obj["spec"], opts=opts)
            else:
                fields = {_snake(key): value for key, value in obj.items()
                          if key not in ("apiVersion", "kind")}
                resource = cls(logical, opts=opts, **fields)
            if obj["kind"] == "Service":
                self._service_meta = obj["metadata"]
            self.resources[logical] = resource
            created.append(resource)
        return created

    @property
    def service(self) -> k8s.core.v1.Service | None:
        return next((r for r in self.resources.values()
                     if isinstance(r, k8s.core.v1.Service)), None)

    def api_endpoint(self, port: int) -> pulumi.Output[str]:
        """The Service's load-balancer address once Azure assigns it, else its cluster name
        (a ClusterIP Service, when no client network is named)."""
        service = self.service
        if service is None:
            return pulumi.Output.from_input("")
        cluster_name = f"{self._service_meta['name']}.{self._service_meta['namespace']}" \
            ".svc.cluster.local"

        def pick(status: Any) -> str:
            ingress = _field(_field(status, "load_balancer", "loadBalancer"), "ingress") or []
            first = ingress[0] if ingress else None
            host = _field(first, "ip") or _field(first, "hostname") or cluster_name
            return f"http://{host}:{port}/v1"

        return service.status.apply(pick)


def _field(obj: Any, name: str, wire: str | None = None) -> Any:
    """A field of an SDK output object, or of the plain dict the engine may hand back."""
    if obj is None:
        return None
    if isinstance(obj, dict):
        return obj.get(wire or name)
    return getattr(obj, name, None)
