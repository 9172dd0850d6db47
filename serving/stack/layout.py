"""Where things live on a serving host (VM, pod or this machine): one place for every path.

The VM and the AKS pod use the same paths, so the vLLM arguments rendered for the systemd
unit and for the Deployment are identical; only the interpreter differs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from serving.stack.catalog import SERVICE_USER as SERVICE_USER  # re-exported
from serving.stack.spec import AdapterSpec, Spec

SERVICE_NAME = "exaone-vllm"
PROXY_SERVICE_NAME = "exaone-proxy"  # the API proxy in front of vLLM (serving.render.proxy)
API_KEY_ENV = "VLLM_API_KEY"  # vLLM reads the key from here; never from argv (ps shows argv)


@dataclass(frozen=True)
class Layout:
    python: str  # interpreter that runs vLLM
    state_dir: str  # models, adapters, the adapter record
    cache_dir: str  # HF, vLLM compile and Triton caches
    config_dir: str  # environment files
    venv_dir: str
    host: str  # address vLLM binds: loopback everywhere (clients come through the API proxy)
    root: str = ""  # target local: the checkout that local model/adapter paths are relative to

    @property
    def models_dir(self) -> str:
        return f"{self.state_dir}/models"

    @property
    def adapters_dir(self) -> str:
        return f"{self.state_dir}/adapters"

    @property
    def resolver_dir(self) -> str:
        """vLLM's filesystem LoRA resolver folder (``serving.adapters.resolver``); beside the
        adapters, not in them: every folder in ``adapters_dir`` is an adapter name."""
        return f"{self.state_dir}/lora-resolver"

    def model_path(self, spec: Spec) -> str:
        """Folder of the base model at its pinned revision."""
        if self.root and spec.model.source_kind == "path":
            return str(Path(self.root, spec.model.source).resolve())
        if spec.on.kubernetes and spec.model.source_kind == "hf":
            return spec.model.id  # vLLM fetches it at --revision into HF_HOME
        rev = spec.model.revision or "local"
        return f"{self.models_dir}/{spec.model.id.replace('/', '--')}/{rev}"

    def adapter_path(self, spec: Spec, adapter: AdapterSpec) -> str:
        if self.root and adapter.source_kind == "path":
            return str(Path(self.root, adapter.source).resolve())
        return str(PurePosixPath(self.adapters_dir, adapter.name, adapter.version))


def vllm_port(spec: Spec) -> int:
    """The port vLLM itself listens on (bound to loopback), where the project's own tools
    (adapters, the health gate, the local bench) reach it.

    ``vllmPort`` is the API port clients use. Where the target puts the API proxy in front
    (``spec.on.api_proxy``: VM, pod) the proxy listens there and vLLM one port above it (below
    it for 65535); vLLM has one key for everything, so its LoRA admin routes must not be on
    the port clients reach. Target local has no proxy: vLLM is on the API port, loopback only.
    """
    port = spec.vllm.port
    if not spec.on.api_proxy:
        return port
    return port + 1 if port < 65535 else port - 1


def resolver_dir(spec: Spec, layout: Layout) -> str | None:
    """vLLM's filesystem LoRA resolver folder, where the adapter tools run beside vLLM (VM,
    local): a name that is briefly not loaded is found there instead of answering 404
    (``serving.adapters.resolver``). The pod changes adapters by rollout, not at runtime."""
    if spec.vllm.runtime_lora_updating and spec.on.runtime_adapter_tools:
        return layout.resolver_dir
    return None


# The VM: a dedicated system user, state under /var/lib (NVMe mounted at models/ when asked).
VM = Layout(
    python="/opt/exaone/venv/bin/python",
    state_dir="/var/lib/exaone",
    cache_dir="/var/cache/exaone",
    config_dir="/etc/exaone",
    venv_dir="/opt/exaone/venv",
    host="127.0.0.1",
)

# The AKS pod: same paths as volume mounts; the vllm-openai image brings python3.
POD = Layout(
    python="python3",
    state_dir=VM.state_dir,
    cache_dir=VM.cache_dir,
    config_dir=VM.config_dir,
    venv_dir="",
    host="127.0.0.1",
)


def local(root: Path) -> Layout:
    """This machine: everything under the checkout's .local/, loopback only."""
    base = root / ".local"
    return Layout(
        python=str(root / ".venv-vllm" / "bin" / "python"),
        state_dir=str(base),
        cache_dir=str(base / "cache"),
        config_dir=str(base / "etc"),
        venv_dir=str(root / ".venv-vllm"),
        host="127.0.0.1",
        root=str(root),
    )


def for_target(spec: Spec, root: Path) -> Layout:
    return {"vm": VM, "aks": POD}.get(spec.target) or local(root)


def vm_host_names(spec: Spec) -> list[str]:
    """Computer names of the stack's GPU VMs (Azure VM names and hostnames agree)."""
    return [f"exaone-{spec.stack}-{i}" for i in range(spec.vm.count)]


def resource_group_name(stack: str) -> str:
    """The stack's resource group (and the prefix of its resources' names)."""
    return f"exaone-{stack}"


def storage_account_name(stack: str, subscription_id: str) -> str:
    """The stack's storage account. Its name is global across Azure: 3-24 lowercase letters
    and digits; the hash of subscription and stack keeps it stable per stack and apart from
    others'. `pulumi up` creates it; upload and preflight find it by the same name."""
    digest = hashlib.sha256(f"{subscription_id}/{stack}".encode()).hexdigest()[:8]
    slug = "".join(c for c in stack.lower() if c.isalnum())[:10]
    return f"exaone{slug}{digest}"


def blob_account_url(account: str) -> str:
    return f"https://{account}.blob.core.windows.net"


# What fab deploy leaves on a VM besides the Layout above.
VM_TOOLS_DIR = "/opt/exaone/tools"  # the project's host-side tools, one folder per content hash
VM_TOOLS_CURRENT = f"{VM_TOOLS_DIR}/current"
VM_API_KEY_FILE = f"{VM.config_dir}/api-key"  # root-only copy for the host-side adapter tools
VM_MARKERS_DIR = f"{VM.state_dir}/.deploy"  # hashes of the inputs of expensive steps


def vm_stack_file(stack: str) -> str:
    """The stack's config as the host-side tools read it (no secrets; key in VM_API_KEY_FILE)."""
    return f"{VM.config_dir}/Pulumi.{stack}.yaml"
