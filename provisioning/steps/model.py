"""Step `model`: the base model at its pinned revision, on the local NVMe when asked.

The download itself runs on the host (``serving.host.model``): from Blob through the VM's
managed identity, or from Hugging Face with the token from the stack's ``hfTokenRef``; secrets
travel over stdin. A complete model carries a marker; without it (or with another
source/revision) the step fetches, resuming a cut download.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from provisioning.bundle import host_python
from provisioning.steps.converge import Target
from serving.stack import layout as layouts

NVME_SCRIPT = Path(__file__).resolve().parent / "scripts" / "nvme.sh"
FETCH_TIMEOUT_SECONDS = 3 * 3600  # 32B is ~64 GB


def stack_file(t: Target) -> str:
    return layouts.vm_stack_file(t.spec.stack)


def blob_args(t: Target) -> tuple[list[str], str | None]:
    """Arguments and stdin for a host-side tool that reads Blob (and the HF token)."""
    blob = t.settings.blob
    args = []
    if blob.account_url:
        args += ["--account-url", blob.account_url]
    if blob.client_id:
        args += ["--client-id", blob.client_id]
    secret = {}
    if blob.connection_string:
        secret["connection_string"] = blob.connection_string
    if t.settings.hf_token:
        secret["hf_token"] = t.settings.hf_token
    if secret:
        args.append("--secrets-stdin")
        return args, json.dumps(secret)
    return args, None


class ModelStep:
    name = "model"

    def probe(self, t: Target) -> dict[str, Any]:
        state: dict[str, Any] = {}
        if t.spec.vm.use_local_nvme:
            _, out, _ = t.host.script(NVME_SCRIPT, "probe", layouts.VM.models_dir)
            state["nvme"] = dict(x.split("=", 1) for x in out.split() if "=" in x)
        state["model"] = self._model_state(t)
        return state

    def _model_state(self, t: Target) -> dict[str, Any]:
        return t.host.json(
            host_python("serving.host.model", "probe", "--config", stack_file(t)), sudo=True)

    def plan(self, t: Target, state: dict[str, Any]) -> list[str]:
        actions = []
        nvme = state.get("nvme")
        if nvme is not None and nvme.get("mounted") != "yes":
            actions.append(f"mount the local NVMe disk ({nvme.get('disk')}) at "
                           f"{layouts.VM.models_dir}")
        model = state["model"]
        if model["state"] != "present":
            resume = " (resuming)" if model.get("partial") else ""
            actions.append(f"fetch {t.spec.model.id}@{t.spec.model.revision[:12] or 'local'} "
                           f"from {t.spec.model.source}{resume} into {model['path']}")
        return actions

    def apply(self, t: Target, actions: list[str], state: dict[str, Any]) -> None:
        model = state["model"]
        if any(a.startswith("mount") for a in actions):
            t.host.script(NVME_SCRIPT, "apply", layouts.VM.models_dir, lock=True)
            # The mount hides whatever was in the folder before: look again.
            model = self._model_state(t)
        if model["state"] != "present":
            args, stdin = blob_args(t)
            done = t.host.json(
                host_python("serving.host.model", "fetch", "--config", stack_file(t), *args),
                sudo=True, stdin=stdin, lock=True, timeout_s=FETCH_TIMEOUT_SECONDS)
            t.say(f"model: {done.get('files', '?')} files, {done.get('bytes', 0) / 1e6:.1f} MB "
                  f"in {done.get('seconds', '?')} s")
        t.facts["model_changed"] = True
