"""Tier 1: pulumi-kubernetes' await semantics applied to the object graph the program registers.

pulumi-kubernetes (4.x, its "await logic" as documented for each kind) does not report a create
done until the object is ready, and a resource that depends on it is not created before then:

- a Deployment or DaemonSet: until its rollout completes (updated pods Ready);
- a Service: until its endpoints list Ready pods that match its selector, and, for type
  LoadBalancer, until the load balancer has an ingress address; not for type ExternalName or a
  Service without a selector;
- anything annotated ``pulumi.com/skipAwait: "true"``: not at all.
Namespaces, ConfigMaps, Secrets, ServiceAccounts, NetworkPolicies and PDBs are done once created.

So nothing awaited may come before what it waits for (the Deployment whose pods a Service
selects; what the pods mount or run as), and nothing awaited may wait on data the same run cannot
provide: `pulumi up` writes no blobs, so a pod that fetches its weights from the stack's storage
account is only registered once the stack says they are uploaded (``aksPhase: workload``).
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import pytest
from pulumi_mocks import Registered, Run, run_program, stack_values

from serving.stack import stackfile

API_KEY_ENV = {"EXAONE_API_KEY": "test-api-key-not-real"}
SKIP_AWAIT = "pulumi.com/skipAwait"
WORKLOADS = ("kubernetes:apps/v1:Deployment", "kubernetes:apps/v1:DaemonSet",
             "kubernetes:apps/v1:StatefulSet")
SERVICE = "kubernetes:core/v1:Service"
ACCOUNT = "azure-native:storage:StorageAccount"
BLOB = "azure-native:storage:Blob"
POOL = "azure-native:containerservice:AgentPool"
GPU_RESOURCE = "nvidia.com/gpu"


def _meta(r: Registered) -> dict[str, Any]:
    return r.inputs.get("metadata") or {}


def _awaited(r: Registered) -> bool:
    if str((_meta(r).get("annotations") or {}).get(SKIP_AWAIT, "")).lower() == "true":
        return False
    if r.type == SERVICE:
        spec = r.inputs.get("spec") or {}
        return spec.get("type") != "ExternalName" and bool(spec.get("selector"))
    return r.type in WORKLOADS


def _ancestors(run: Run, r: Registered) -> set[str]:
    """Every URN ``r`` waits for, directly or through what it waits for."""
    seen: set[str] = set()
    todo = list(r.dependencies)
    while todo:
        urn = todo.pop()
        if urn in seen:
            continue
        seen.add(urn)
        todo += next((x.dependencies for x in run.resources if x.urn == urn), [])
    return seen


def _pod_spec(r: Registered) -> dict[str, Any]:
    return ((r.inputs.get("spec") or {}).get("template") or {}).get("spec") or {}


def _pod_labels(r: Registered) -> dict[str, str]:
    return (((r.inputs.get("spec") or {}).get("template") or {}).get("metadata") or {}).get(
        "labels") or {}


def _referenced(pod: dict[str, Any]) -> set[tuple[str, str]]:
    """(kind, name) of the objects a pod cannot start without."""
    refs: set[tuple[str, str]] = set()
    if pod.get("serviceAccountName"):
        refs.add(("ServiceAccount", pod["serviceAccountName"]))
    for volume in pod.get("volumes") or []:
        if volume.get("configMap"):
            refs.add(("ConfigMap", volume["configMap"]["name"]))
        if volume.get("secret"):
            refs.add(("Secret", volume["secret"]["secretName"]))
    for container in [*(pod.get("initContainers") or []), *(pod.get("containers") or [])]:
        for env in container.get("env") or []:
            source = env.get("valueFrom") or {}
            if source.get("secretKeyRef"):
                refs.add(("Secret", source["secretKeyRef"]["name"]))
            if source.get("configMapKeyRef"):
                refs.add(("ConfigMap", source["configMapKeyRef"]["name"]))
    return refs


def _requests_gpu(pod: dict[str, Any]) -> bool:
    return any(GPU_RESOURCE in ((c.get("resources") or {}).get("limits") or {})
               for c in pod.get("containers") or [])


def await_violations(run: Run, phase: str) -> list[str]:
    out: list[str] = []
    objects = {(r.type.split(":")[-1], _meta(r).get("name"), _meta(r).get("namespace")): r
               for r in run.resources if r.type.startswith("kubernetes:")}
    workloads = [r for r in run.resources if r.type in WORKLOADS]
    accounts = [a.state["name"] for a in run.of_type(ACCOUNT)]
    for r in filter(_awaited, run.resources):
        before = _ancestors(run, r)
        namespace = _meta(r).get("namespace")
        if r.type == SERVICE:
            selector = (r.inputs.get("spec") or {}).get("selector") or {}
            feeding = [w for w in workloads if _meta(w).get("namespace") == namespace
                       and selector.items() <= _pod_labels(w).items()]
            if not feeding:
                out.append(f"{r.urn}: awaits endpoints for {selector}, which no workload of "
                           "this run provides")
            out += [f"{r.urn}: awaited before {w.urn}, whose pods are its endpoints"
                    for w in feeding if w.urn not in before]
            continue
        pod = _pod_spec(r)
        for kind, name in sorted(_referenced(pod)):
            needed = objects.get((kind, name, namespace))
            if needed is not None and needed.urn not in before:
                out.append(f"{r.urn}: awaited before {needed.urn}, which its pods need")
        if _requests_gpu(pod):
            plugins = [w for w in workloads if w.type.endswith("DaemonSet")]
            out += [f"{r.urn}: requests {GPU_RESOURCE} before {p.urn} is ready"
                    for p in [*run.of_type(POOL), *plugins] if p.urn not in before]
        reads = [a for a in accounts if a in str(pod)]
        if reads and not run.of_type(BLOB) and phase != "workload":
            out.append(f"{r.urn}: awaits pods that fetch from storage account {reads[0]}, whose "
                       "blobs this run does not write (aksPhase is not workload)")
    return out


@functools.cache
def _run(stack: str, **override: Any) -> Run:
    return run_program(stack, {**stack_values(stack), **override}, env=API_KEY_ENV)


def _phase(run: Run) -> str:
    return stackfile.load(run.stack).aks.phase


@pytest.mark.parametrize("stack", stackfile.stack_names())
def test_nothing_is_awaited_before_what_it_waits_for(stack: str) -> None:
    run = _run(stack)
    assert await_violations(run, _phase(run)) == []


def test_the_workload_phase_awaits_the_service_after_the_deployment() -> None:
    run = _run("prod")
    (service,) = run.of_type(SERVICE)
    (deployment,) = run.of_type(WORKLOADS[0])
    assert deployment.urn in _ancestors(run, service)


def test_the_cluster_phase_registers_nothing_that_waits_for_blobs() -> None:
    """Finding 3: the first run creates the storage account empty and must not await a pod
    that fetches from it."""
    run = _run("prod", aksPhase="cluster")
    assert run.of_type(ACCOUNT) and run.of_type(POOL)
    assert [r.urn for r in run.resources if r.type.startswith("kubernetes:")] == []
    assert await_violations(run, "cluster") == []
    assert run.outputs["apiEndpoint"] == ""


def test_policy_catches_a_service_awaited_before_its_deployment() -> None:
    """Finding 2: the Service created first waits for endpoints that never come."""
    run = copy.deepcopy(_run("prod"))
    (service,) = run.of_type(SERVICE)
    (deployment,) = run.of_type(WORKLOADS[0])
    service.dependencies = [d for d in service.dependencies if d != deployment.urn]
    violations = await_violations(run, "workload")
    assert any(service.urn in v and "awaited before" in v for v in violations), violations


def test_policy_catches_a_service_with_no_pods_behind_it() -> None:
    run = copy.deepcopy(_run("prod"))
    run.resources = [r for r in run.resources if r.type != WORKLOADS[0]]
    assert any("no workload of this run" in v for v in await_violations(run, "workload"))


def test_policy_spares_a_service_marked_skip_await() -> None:
    run = copy.deepcopy(_run("prod"))
    (service,) = run.of_type(SERVICE)
    service.dependencies = []
    _meta(service).setdefault("annotations", {})[SKIP_AWAIT] = "true"
    assert not any(service.urn in v for v in await_violations(run, "workload"))


def test_policy_catches_a_deployment_awaiting_blobs_in_the_first_run() -> None:
    """Finding 3: the Deployment registered in the run that creates the empty account."""
    run = _run("prod")
    violations = await_violations(run, "cluster")
    (deployment,) = run.of_type(WORKLOADS[0])
    assert any(deployment.urn in v and "does not write" in v for v in violations), violations


def test_policy_catches_a_deployment_before_its_config_map() -> None:
    run = copy.deepcopy(_run("prod"))
    (deployment,) = run.of_type(WORKLOADS[0])
    deployment.dependencies = []
    violations = await_violations(run, "workload")
    assert any("ConfigMap" in v or "configmap" in v for v in violations), violations
    assert any(f"requests {GPU_RESOURCE}" in v for v in violations), violations
