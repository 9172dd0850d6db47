"""`fab teardown`: drain and stop vLLM and its API proxy, disable their units; ``--purge``
also removes what the deploy installed. Azure itself is left to ``pulumi destroy``
(production storage is protected there).

Draining is systemd's stop: SIGTERM to the API server, which finishes in-flight requests
within TimeoutStopSec before its engine shuts down.
"""

from __future__ import annotations

import shlex

from fabric import task
from invoke.exceptions import Exit

from provisioning.steps.converge import Target
from provisioning.tasks import options as cli_options
from provisioning.tasks.deploy import HostReport, summary
from serving.render import metrics_unit, proxy_unit, systemd_unit
from serving.stack import layout as layouts

# The proxy first: clients stop arriving while vLLM drains what is in flight; the metrics
# agent last, so vLLM's final samples still leave; then the timer that refreshes its token.
UNITS = (proxy_unit.UNIT_NAME, systemd_unit.UNIT_NAME, metrics_unit.UNIT_NAME,
         metrics_unit.TOKEN_TIMER_NAME)
# The agent's and the refresher's state folders: systemd keeps a DynamicUser= unit's under
# /var/lib/private and links /var/lib/<name> to it.
_METRICS_STATE = tuple(f"/var/lib/{where}{name}" for name in (
    metrics_unit.STATE_DIRECTORY, metrics_unit.TOKEN_DIRECTORY) for where in ("", "private/"))
PURGE_PATHS = (proxy_unit.UNIT_FILE, systemd_unit.UNIT_FILE, metrics_unit.UNIT_FILE,
               metrics_unit.TOKEN_UNIT_FILE, metrics_unit.TOKEN_TIMER_FILE,
               metrics_unit.TOKEN_SCRIPT, *_METRICS_STATE, layouts.VM.config_dir,
               "/opt/exaone", layouts.VM.state_dir, layouts.VM.cache_dir)
STOP_TIMEOUT_SECONDS = systemd_unit.STOP_TIMEOUT_SECONDS + 60


class StopStep:
    name = "stop"

    def probe(self, t: Target) -> dict[str, list[str]]:
        state = {}
        for unit in UNITS:
            _, out, _ = t.host.run(f"systemctl is-active {unit}; systemctl is-enabled {unit}",
                                   check=False)
            state[unit] = ([*out.split(), "", ""])[:2]
        return state

    def plan(self, t: Target, state: dict[str, list[str]]) -> list[str]:
        actions = []
        for unit in UNITS:
            active, enabled = state[unit]
            if active in ("active", "activating", "reloading"):
                actions.append(f"drain and stop {unit}")
            if enabled == "enabled":
                actions.append(f"disable {unit}")
        return actions

    def apply(self, t: Target, actions: list[str], state: dict[str, list[str]]) -> None:
        for unit in UNITS:
            if any(a.endswith(f" {unit}") for a in actions):
                t.host.sudo(f"systemctl disable --now {unit}", timeout_s=STOP_TIMEOUT_SECONDS)


class PurgeStep:
    name = "purge"

    def probe(self, t: Target) -> list[str]:
        paths = " ".join(shlex.quote(p) for p in PURGE_PATHS)
        _, out, _ = t.host.run(f"for p in {paths}; do test -e \"$p\" && echo \"$p\"; done; "
                               f"id -u {layouts.SERVICE_USER} >/dev/null 2>&1 && echo user",
                               check=False)
        return out.split()

    def plan(self, t: Target, state: list[str]) -> list[str]:
        actions = [f"remove {p}" for p in state if p != "user"]
        if "user" in state:
            actions.append(f"remove the user {layouts.SERVICE_USER}")
        return actions

    def apply(self, t: Target, actions: list[str], state: list[str]) -> None:
        paths = " ".join(shlex.quote(p) for p in state if p != "user")
        if paths:
            t.host.sudo(f"rm -rf {paths}", lock=True)
            t.host.sudo("systemctl daemon-reload")
        if "user" in state:
            t.host.sudo(f"userdel {layouts.SERVICE_USER}")


@task(help={**cli_options.HELP, "purge": "also remove the venv, model, adapters, config",
            "dry": "print the plan; change nothing"})
def teardown(c, stack="", config="", hosts="", purge=False, dry=False, blob_url="",
             blob_connection_string_env="", connect_timeout=0.0):
    """Drain and stop vLLM on each host and disable its unit (--purge removes everything)."""
    s = cli_options.load(c, stack=stack, config=config, hosts=hosts, blob_url=blob_url,
                         blob_connection_string_env=blob_connection_string_env,
                         connect_timeout=connect_timeout, gate=False, dry=bool(dry))
    steps = (StopStep(), *((PurgeStep(),) if purge else ()))
    runs = cli_options.each_host(s, steps=steps, dry=bool(dry))
    reports = [HostReport(r.host, r.results, r.error) for r in runs]
    cli_options.console.print(summary(reports, title="fab teardown"))
    failed = [r for r in reports if r.error]
    if failed:
        raise Exit(f"{failed[0].host}: {failed[0].error}", code=1)
