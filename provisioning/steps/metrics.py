"""Step `metrics`: each VM's Prometheus agent and its token refresher
(``serving.render.metrics_unit``).

The distribution's prometheus package (agent mode: 2.32 or newer; ubuntu-2404 has 2.45), its
own units masked; the project's hardened unit runs it in agent mode on the rendered
configuration, filled here with the stack's ingestion URL (a stack output,
``provisioning.settings.MetricsAccess``) and the VM's host name as ``instance``. The remote
write carries the VMs' identity's bearer token from a file: Debian's and Ubuntu's builds lack
``remote_write.azuread`` (bookworm's 2.42 and trixie's 2.53 refuse it as an unknown field), so
a oneshot unit (``metrics-token.sh``, the identity's client id on its command line) gets the
token from the instance metadata service, and a timer repeats that; Prometheus reads the file
on every request. The step runs the refresher once before the agent (re)starts: a VM that
cannot get a token fails here, naming the refresher's journal, not silently at the first
remote write. The package's promtool checks the configuration before the agent (re)loads it.
What the agent runs on is hashed into a marker written after each (re)load, so a run cut
between writing a file and reloading still reloads on the next run. The token is never read
by this step (the probe asks only whether the file is there) and never printed. A failure
here never touches vLLM.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from provisioning.steps.config import digests, put, sha
from provisioning.steps.converge import Skip, StepError, Target
from serving.render import metrics_unit
from serving.stack import layout as layouts

SCRIPT = Path(__file__).resolve().parent / "scripts" / "metrics.sh"
TOKEN_SCRIPT = SCRIPT.with_name("metrics-token.sh")
MARKER = f"{layouts.VM_MARKERS_DIR}/metrics-inputs"
INSTALL_TIMEOUT_SECONDS = 600
RESTART_TIMEOUT_SECONDS = metrics_unit.STOP_TIMEOUT_SECONDS + 60
# An agent replays its write-ahead log before it reports ready: seconds, not minutes.
READY_TIMEOUT_SECONDS = 120
UNIT = metrics_unit.UNIT_NAME
TOKEN_UNIT = metrics_unit.TOKEN_UNIT_NAME
TIMER = metrics_unit.TOKEN_TIMER_NAME
# The refresher retries IMDS within its own TimeoutStartSec.
TOKEN_TIMEOUT_SECONDS = metrics_unit.TOKEN_TIMEOUT_SECONDS + 30
UNIT_FILES = (metrics_unit.UNIT_FILE, metrics_unit.TOKEN_UNIT_FILE,
              metrics_unit.TOKEN_TIMER_FILE)


def version_of(package_version: str) -> tuple[int, int] | None:
    """``2.45.3+ds-2ubuntu0.1`` -> (2, 45); None when none is installed."""
    found = re.match(r"^(?:\d+:)?(\d+)\.(\d+)", package_version)
    return (int(found.group(1)), int(found.group(2))) if found else None


def too_old(package_version: str) -> bool:
    found = version_of(package_version)
    return found is None or found < metrics_unit.MIN_VERSION


def files(t: Target, instance: str) -> dict[str, tuple[str, str]]:
    """path -> (content, octal mode). Nothing secret: a client id names an identity, and the
    token is fetched on the VM by the refresher into a file only the agent reads."""
    access = t.settings.metrics
    config = metrics_unit.render_config(t.spec, instance=instance,
                                        remote_write_url=access.ingestion_url)
    return {
        metrics_unit.CONFIG_FILE: (config, "644"),
        metrics_unit.TOKEN_SCRIPT: (TOKEN_SCRIPT.read_text(), "755"),
        metrics_unit.TOKEN_UNIT_FILE: (
            metrics_unit.render_token_unit(t.spec, access.client_id), "644"),
        metrics_unit.TOKEN_TIMER_FILE: (metrics_unit.render_token_timer(t.spec), "644"),
        metrics_unit.UNIT_FILE: (metrics_unit.render_unit(t.spec), "644"),
    }


def inputs_hash(t: Target, instance: str) -> str:
    doc = {path: sha(content) for path, (content, _) in files(t, instance).items()}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def _minimum() -> str:
    return ".".join(map(str, metrics_unit.MIN_VERSION))


def _skip(t: Target) -> Skip | None:
    if not t.spec.metrics.vm_agent:
        return Skip("vmMetrics is false")
    if not t.settings.metrics.configured:
        # Hosts given by hand (test hosts) have no workspace to write to.
        return Skip("the stack exports no metricsIngestionUrl")
    return None


class MetricsStep:
    name = "metrics"

    def probe(self, t: Target) -> dict[str, Any]:
        if _skip(t):
            return {}  # nothing to read on a host the step leaves alone
        _, out, _ = t.host.script(SCRIPT, "probe", metrics_unit.PACKAGE, metrics_unit.PROMETHEUS,
                                  UNIT, metrics_unit.READY_URL, TIMER, metrics_unit.TOKEN_FILE,
                                  *metrics_unit.DISTRIBUTION_UNITS)
        state: dict[str, Any] = dict(line.split("=", 1) for line in out.splitlines()
                                     if "=" in line)
        instance = state.get("hostname", "").strip() or t.host.name
        state["hostname"] = instance
        state["digests"] = digests(t, [*files(t, instance), MARKER])
        _, marker, _ = t.host.run(f"cat {MARKER}", sudo=True, check=False)
        state["marker"] = marker.strip()
        return state

    def plan(self, t: Target, state: dict[str, Any]) -> list[str] | Skip:
        skip = _skip(t)
        if skip:
            return skip
        instance = state["hostname"]
        actions = []
        version = state.get("version", "")
        if not version:
            actions.append(f"install the {metrics_unit.PACKAGE} package")
        elif too_old(version):
            actions.append(f"upgrade the {metrics_unit.PACKAGE} package ({version} predates "
                           f"{_minimum()})")
        for unit in metrics_unit.DISTRIBUTION_UNITS:
            if state.get(f"distro:{unit}") not in ("masked", "masked-runtime"):
                actions.append(f"stop and mask {unit}")
        actions += [f"write {path}" for path, (content, _) in files(t, instance).items()
                    if state["digests"].get(path) != sha(content)]
        if any(f"write {path}" in actions for path in UNIT_FILES):
            actions.append("systemctl daemon-reload")
        if state.get("enabled") != "enabled":
            actions.append(f"systemctl enable {UNIT}")
        if state.get("timer-enabled") != "enabled" or state.get("timer-active") != "active":
            actions.append(f"enable and start {TIMER}")
        if (state.get("token") != "yes" or f"write {metrics_unit.TOKEN_UNIT_FILE}" in actions
                or f"write {metrics_unit.TOKEN_SCRIPT}" in actions):
            actions.append(f"refresh the token ({TOKEN_UNIT})")
        if state.get("active") != "active":
            actions.append(f"start {UNIT} (it is {state.get('active') or 'absent'})")
        elif (f"write {metrics_unit.UNIT_FILE}" in actions
              or any(a.startswith(("install", "upgrade")) for a in actions)):
            actions.append(f"restart {UNIT} (its unit or binary changed)")
        elif (state["marker"] != inputs_hash(t, instance)
              or any(a.startswith("write") for a in actions)):
            actions.append(f"reload {UNIT} (its configuration changed)")
        elif state.get("ready") != "yes":
            actions.append(f"wait until {UNIT} is ready")
        return actions

    def apply(self, t: Target, actions: list[str], state: dict[str, Any]) -> None:
        instance = state["hostname"]
        if any(a.startswith(("install", "upgrade", "stop and mask")) for a in actions):
            _, out, _ = t.host.script(SCRIPT, "install", metrics_unit.PACKAGE,
                                      *metrics_unit.DISTRIBUTION_UNITS, lock=True,
                                      timeout_s=INSTALL_TIMEOUT_SECONDS)
            version = next((line.split("=", 1)[1] for line in out.splitlines()
                            if line.startswith("version=")), "")
            if too_old(version):
                raise StepError(self.name, (
                    f"the archive's {metrics_unit.PACKAGE} is {version or 'not installable'}; "
                    f"the agent needs {_minimum()} or newer (agent mode): vmImage "
                    f"{t.spec.vm.image} cannot run it; allowed: vmImage ubuntu-2404, or "
                    "vmMetrics false"))
        for path, (content, mode) in files(t, instance).items():
            if f"write {path}" in actions:
                put(t, path, content, mode)
        if "systemctl daemon-reload" in actions:
            t.host.sudo("systemctl daemon-reload")
        if any(a.startswith("systemctl enable") for a in actions):
            t.host.sudo(f"systemctl enable --quiet {UNIT}")
        if f"enable and start {TIMER}" in actions:
            t.host.sudo(f"systemctl enable --now --quiet {TIMER}")
        if f"refresh the token ({TOKEN_UNIT})" in actions:
            # A oneshot: `start` returns when the refresher has exited. Its output (the expiry,
            # or why it failed) is in its journal; the token is in neither.
            code, _, err = t.host.sudo(f"systemctl start {TOKEN_UNIT}", check=False,
                                       timeout_s=TOKEN_TIMEOUT_SECONDS)
            if code:
                self._fail(t, f"{TOKEN_UNIT} could not get the managed identity's token "
                           f"({err.strip()}); does the VM have the stack's identity, and IMDS "
                           "(169.254.169.254) answer? vLLM is untouched", TOKEN_UNIT)
        verb = next((a.split()[0] for a in actions if a.startswith(("start", "restart",
                                                                     "reload"))), "")
        if verb:
            # The package's own promtool judges the file first: a bad file never reaches the
            # running agent (a reload with one would leave it on the old file, a restart dead).
            code, out, err = t.host.script(SCRIPT, "check", metrics_unit.PROMTOOL,
                                           metrics_unit.CONFIG_FILE, check=False)
            if code:
                raise StepError(self.name, "promtool refuses the agent's configuration; "
                                "vLLM is untouched; to deploy without VM metrics set "
                                "exaone-serving:vmMetrics false:\n"
                                f"{(out + err).strip()}")
            if verb != "reload":
                t.host.sudo(f"systemctl reset-failed {UNIT}", check=False)
            code, _, err = t.host.sudo(f"systemctl {verb} {UNIT}", check=False,
                                       timeout_s=RESTART_TIMEOUT_SECONDS)
            if code:
                self._fail(t, f"systemctl {verb} failed: {err.strip()}")
        code, _, err = t.host.script(SCRIPT, "wait-ready", metrics_unit.READY_URL,
                                     str(READY_TIMEOUT_SECONDS), check=False,
                                     timeout_s=READY_TIMEOUT_SECONDS + 30)
        if code:
            self._fail(t, f"the agent is not ready: {err.strip()}")
        if verb:
            t.host.sudo(f"mkdir -p {layouts.VM_MARKERS_DIR}")
            put(t, MARKER, inputs_hash(t, instance) + "\n", "644")

    def _fail(self, t: Target, why: str, unit: str = UNIT) -> None:
        _, journal, _ = t.host.sudo(f"journalctl -u {unit} -n 30 --no-pager", check=False)
        raise StepError(self.name, f"{why}\n{journal}")
