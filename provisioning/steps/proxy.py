"""Step `proxy`: the API proxy in front of vLLM (``serving.render.proxy``).

The distribution's nginx package, its own unit masked; the project's unit
(``serving.render.proxy_unit``) runs nginx on the rendered configuration. What the proxy runs on
is hashed into a marker written after each (re)load, so a run cut between writing a file and
reloading still reloads on the next run. A changed configuration is reloaded (nginx checks it
first and keeps the old one if it is bad: open streams are not cut); a changed unit restarts.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from provisioning.steps.config import digests, put, sha
from provisioning.steps.converge import StepError, Target
from serving.render import proxy_unit
from serving.stack import layout as layouts

SCRIPT = Path(__file__).resolve().parent / "scripts" / "proxy.sh"
PACKAGE = "nginx"  # Debian and Ubuntu (22.04: 1.18, 24.04: 1.24, bookworm: 1.22)
MARKER = f"{layouts.VM_MARKERS_DIR}/proxy-inputs"
INSTALL_TIMEOUT_SECONDS = 600
RESTART_TIMEOUT_SECONDS = proxy_unit.STOP_TIMEOUT_SECONDS + 60


def files(t: Target) -> dict[str, tuple[str, str]]:
    """path -> (content, octal mode)."""
    return {
        proxy_unit.CONFIG_FILE: (proxy_unit.render_config(t.spec), "644"),
        proxy_unit.UNIT_FILE: (proxy_unit.render_unit(t.spec), "644"),
    }


def inputs_hash(t: Target) -> str:
    doc = {path: sha(content) for path, (content, _) in files(t).items()}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


class ProxyStep:
    name = "proxy"

    def probe(self, t: Target) -> dict[str, Any]:
        _, out, _ = t.host.script(SCRIPT, "probe", PACKAGE, proxy_unit.NGINX,
                                  proxy_unit.DISTRIBUTION_UNIT, proxy_unit.UNIT_NAME)
        state: dict[str, Any] = dict(line.split("=", 1) for line in out.splitlines()
                                     if "=" in line)
        state["digests"] = digests(t, [*files(t), MARKER])
        _, marker, _ = t.host.run(f"cat {MARKER}", sudo=True, check=False)
        state["marker"] = marker.strip()
        return state

    def plan(self, t: Target, state: dict[str, Any]) -> list[str]:
        actions = []
        if state.get("package") != "yes":
            actions.append(f"install the {PACKAGE} package")
        if state.get("distro") not in ("masked", "masked-runtime", "not-found"):
            actions.append(f"stop and mask {proxy_unit.DISTRIBUTION_UNIT}")
        actions += [f"write {path}" for path, (content, _) in files(t).items()
                    if state["digests"].get(path) != sha(content)]
        unit_written = f"write {proxy_unit.UNIT_FILE}" in actions
        if unit_written:
            actions.append("systemctl daemon-reload")
        if state.get("enabled") != "enabled":
            actions.append(f"systemctl enable {proxy_unit.UNIT_NAME}")
        active = state.get("active") == "active"
        if not active:
            now = state.get("active") or "absent"
            actions.append(f"start {proxy_unit.UNIT_NAME} (it is {now})")
        elif unit_written:
            actions.append(f"restart {proxy_unit.UNIT_NAME} (its unit changed)")
        elif state["marker"] != inputs_hash(t) or any(a.startswith("write") for a in actions):
            actions.append(f"reload {proxy_unit.UNIT_NAME} (its configuration changed)")
        return actions

    def apply(self, t: Target, actions: list[str], state: dict[str, Any]) -> None:
        if any(a.startswith(("install", "stop and mask")) for a in actions):
            t.host.script(SCRIPT, "install", PACKAGE, proxy_unit.DISTRIBUTION_UNIT, lock=True,
                          timeout_s=INSTALL_TIMEOUT_SECONDS)
        for path, (content, mode) in files(t).items():
            if f"write {path}" in actions:
                put(t, path, content, mode)
        unit = proxy_unit.UNIT_NAME
        if "systemctl daemon-reload" in actions:
            t.host.sudo("systemctl daemon-reload")
        if any(a.startswith("systemctl enable") for a in actions):
            t.host.sudo(f"systemctl enable --quiet {unit}")
        verb = next((a.split()[0] for a in actions if a.startswith(("start", "restart",
                                                                     "reload"))), "")
        if not verb:
            return
        if verb != "reload":
            t.host.sudo(f"systemctl reset-failed {unit}", check=False)
        # The unit's ExecReload and ExecStartPre run `nginx -t` first: a bad configuration
        # fails here and a reload keeps the workers on the previous one.
        code, _, err = t.host.sudo(f"systemctl {verb} {unit}", check=False,
                                   timeout_s=RESTART_TIMEOUT_SECONDS)
        if code:
            _, journal, _ = t.host.sudo(f"journalctl -u {unit} -n 30 --no-pager", check=False)
            raise StepError(self.name, f"systemctl {verb} failed: {err.strip()}\n{journal}")
        t.host.sudo(f"mkdir -p {layouts.VM_MARKERS_DIR}")
        put(t, MARKER, inputs_hash(t) + "\n", "644")
