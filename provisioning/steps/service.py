"""Step `service`: the rendered unit and environment files, enabled, restarted only when
something it depends on changed.

What the service depends on is hashed into a marker written after each restart: the unit,
both environment files, the runtime pins, the model's source and revision, and the adapter
set. A run cut between a change and the restart still restarts on the next run.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from provisioning.steps import runtime
from provisioning.steps.config import digests, put, sha
from provisioning.steps.converge import StepError, Target
from serving.render import systemd_unit
from serving.stack import layout as layouts

MARKER = f"{layouts.VM_MARKERS_DIR}/service-inputs"
STOP_START_TIMEOUT_SECONDS = systemd_unit.STOP_TIMEOUT_SECONDS + 120


def files(t: Target) -> dict[str, tuple[str, str]]:
    spec = t.spec
    return {
        systemd_unit.UNIT_FILE: (systemd_unit.render_unit(spec), "644"),
        systemd_unit.ENV_FILE: (systemd_unit.render_env(spec), "644"),
        # A dry run that could not read the key plans the file as a write (never compared).
        systemd_unit.SECRET_ENV_FILE: (systemd_unit.render_secret_env(t.settings.api_key)
                                       if t.settings.api_key else "", "600"),
    }


def inputs_hash(t: Target) -> str:
    spec = t.spec
    doc = {
        "files": {path: sha(content) for path, (content, _) in files(t).items()},
        "runtime": runtime.pins(t),
        "model": [spec.model.source, spec.model.revision],
        "adapters": sorted((a.key, a.sha256) for a in spec.adapters),
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


class ServiceStep:
    name = "service"

    def probe(self, t: Target) -> dict[str, Any]:
        state: dict[str, Any] = {"digests": digests(t, [*files(t), MARKER])}
        unit = systemd_unit.UNIT_NAME
        _, out, _ = t.host.run(f"systemctl is-enabled {unit}; systemctl is-active {unit}",
                               check=False)
        lines = out.split()
        state["enabled"], state["active"] = ([*lines, "", ""])[:2]
        _, marker, _ = t.host.run(f"cat {MARKER}", sudo=True, check=False)
        state["marker"] = marker.strip()
        return state

    def plan(self, t: Target, state: dict[str, Any]) -> list[str]:
        actions = [f"write {path}" for path, (content, _) in files(t).items()
                   if state["digests"].get(path) != sha(content)]
        if f"write {systemd_unit.UNIT_FILE}" in actions:
            actions.append("systemctl daemon-reload")
        if state["enabled"] != "enabled":
            actions.append(f"systemctl enable {systemd_unit.UNIT_NAME}")
        changed = [k for k in ("runtime_changed", "model_changed", "patch_changed",
                               "adapters_changed") if t.facts.get(k)]
        why = []
        if state["active"] != "active":
            why.append(f"it is {state['active'] or 'absent'}")
        if state["marker"] != inputs_hash(t):
            why.append("its inputs changed")
        elif any(a.startswith("write") for a in actions):
            # The marker is current, so someone changed a file by hand since the last
            # restart; what runs may be that edit: restart on the rendered files.
            why.append("its files differed from the rendering")
        if changed and not t.facts.get("restarted"):
            why.append("this run changed " + ", ".join(c.removesuffix("_changed")
                                                       for c in changed))
        if why and not t.facts.get("restarted"):
            actions.append(f"restart {systemd_unit.UNIT_NAME} ({'; '.join(why)})")
        elif state["active"] != "active":
            actions.append(f"start {systemd_unit.UNIT_NAME} (it is {state['active']})")
        return actions

    def apply(self, t: Target, actions: list[str], state: dict[str, Any]) -> None:
        for path, (content, mode) in files(t).items():
            if f"write {path}" in actions:
                put(t, path, content, mode)
        unit = systemd_unit.UNIT_NAME
        if "systemctl daemon-reload" in actions:
            t.host.sudo("systemctl daemon-reload")
        if any(a.startswith("systemctl enable") for a in actions):
            t.host.sudo(f"systemctl enable --quiet {unit}")
        if any(a.startswith(("restart", "start")) for a in actions):
            # A unit that hit its start limit refuses to start until reset.
            t.host.sudo(f"systemctl reset-failed {unit}", check=False)
            code, _out, err = t.host.sudo(f"systemctl restart {unit}", check=False,
                                         timeout_s=STOP_START_TIMEOUT_SECONDS)
            if code:
                _, journal, _ = t.host.sudo(f"journalctl -u {unit} -n 30 --no-pager",
                                            check=False)
                raise StepError(self.name, f"systemctl restart failed: {err.strip()}\n{journal}")
            t.host.sudo(f"mkdir -p {layouts.VM_MARKERS_DIR}")
            put(t, MARKER, inputs_hash(t) + "\n", "644")
            t.facts["restarted"] = True
