"""Where things live on a serving host (VM, pod or this machine): one place for every path.

The VM and the AKS pod use the same paths, so the vLLM arguments rendered for the systemd
unit and for the Deployment are identical; only the interpreter differs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from serving.stack.catalog import SERVICE_USER as SERVICE_USER  # re-exported
from serving.stack.spec import AdapterSpec, Spec

SERVICE_NAME = "exaone-vllm"
API_KEY_ENV = "VLLM_API_KEY"  # vLLM reads the key from here; never from argv (ps shows argv)


@dataclass(frozen=True)
class Layout:
    python: str  # interpreter that runs vLLM
    state_dir: str  # models, adapters, the adapter record
    cache_dir: str  # HF, vLLM compile and Triton caches
    config_dir: str  # environment files
    venv_dir: str
    host: str  # address vLLM binds
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
    host="0.0.0.0",
)

# The AKS pod: same paths as volume mounts; the vllm-openai image brings python3.
POD = Layout(
    python="python3",
    state_dir=VM.state_dir,
    cache_dir=VM.cache_dir,
    config_dir=VM.config_dir,
    venv_dir="",
    host="0.0.0.0",
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


# What fab deploy leaves on a VM besides the Layout above.
VM_TOOLS_DIR = "/opt/exaone/tools"  # the project's host-side tools, one folder per content hash
VM_TOOLS_CURRENT = f"{VM_TOOLS_DIR}/current"
VM_API_KEY_FILE = f"{VM.config_dir}/api-key"  # root-only copy for the host-side adapter tools
VM_MARKERS_DIR = f"{VM.state_dir}/.deploy"  # hashes of the inputs of expensive steps


def vm_stack_file(stack: str) -> str:
    """The stack's config as the host-side tools read it (no secrets; key in VM_API_KEY_FILE)."""
    return f"{VM.config_dir}/Pulumi.{stack}.yaml"
