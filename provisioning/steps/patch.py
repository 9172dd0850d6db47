"""Step `patch-exaone`: make the model's remote code import under the venv's transformers.

The patch itself runs on the host with the runtime venv (``serving.host.exaone_patch``): only the
venv that serves knows which imports fail. It keeps the original file beside the patched one
and verifies by loading the config with trust_remote_code.
"""

from __future__ import annotations

import json
from typing import Any

from provisioning.bundle import host_python
from provisioning.remote import RemoteError
from provisioning.steps.converge import Skip, StepError, Target
from serving.stack import layout as layouts

PATCH_TIMEOUT_SECONDS = 300
CHECK_ACTION_EXIT = 1  # serving.host.exaone_patch.EXIT_CHECK_ACTION (not imported: it is host-side)


class PatchStep:
    name = "patch-exaone"

    def _run(self, t: Target, *extra: str, **kwargs: Any) -> dict[str, Any]:
        model_dir = layouts.VM.model_path(t.spec)
        command = host_python("serving.host.exaone_patch", model_dir, "--json", *extra)
        code, out, err = t.host.run(command, sudo=True, check=False,
                                    timeout_s=PATCH_TIMEOUT_SECONDS, **kwargs)
        try:
            document = json.loads(out.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            document = None
        # --check exits CHECK_ACTION (1) when the patch is needed or stale: not a failure.
        if not isinstance(document, dict) or code not in (0, CHECK_ACTION_EXIT) \
                or document.get("error"):
            detail = (document or {}).get("error") if isinstance(document, dict) else None
            raise StepError(self.name, detail or str(RemoteError(command, code, out, err)))
        return document

    def probe(self, t: Target) -> dict[str, Any]:
        return self._run(t, "--check")

    def plan(self, t: Target, state: dict[str, Any]) -> list[str] | Skip:
        status = state.get("state")
        if status == "not needed":
            return Skip(f"the remote code imports under transformers "
                        f"{state.get('transformers', '?')} as it is")
        if status == "applied":
            return []
        fixes = [f"{old} -> {new}" for f in state.get("files", {}).values()
                 for old, new in f.get("fixed", [])]
        return [f"patch the remote code ({status}): " + ("; ".join(fixes) or "imports")]

    def apply(self, t: Target, actions: list[str], state: dict[str, Any]) -> None:
        self._run(t, lock=True)
        t.facts["patch_changed"] = True
