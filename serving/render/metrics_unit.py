"""Prometheus in agent mode on a VM (``monitoring.agent_config``): its configuration, its
systemd unit, and the token refresher that lets it remote-write to the stack's Azure Monitor
workspace with the VM's managed identity, so VM fleets land where AKS's managed Prometheus
writes and the same rule groups judge them.

How the remote write authenticates:
- Not with ``remote_write.azuread``: Debian's packaging (which Ubuntu syncs) builds Prometheus
  without it. Debian bookworm's 2.42.0+ds and trixie's 2.53.3+ds1-2 both refuse a
  ``remote_write[].azuread`` block as ``field azuread not found in type config.plain``, so
  Ubuntu 24.04's 2.45.3+ds, from the same packaging, is not expected to know it either.
- Instead with what every build has (2.26 and newer): ``authorization`` with ``type: Bearer``
  and a ``credentials_file``. Prometheus reads that file on every request (the integration
  tier proves it with the real binary: a rotated token is used without restart or reload).
- ``exaone-vllm-metrics-token.service`` (oneshot, ``TOKEN_SCRIPT``) asks the instance metadata
  service for the identity's token and renames it into ``TOKEN_FILE``; a timer runs it every
  ``TOKEN_REFRESH`` and the agent unit wants it and starts after it. Managed-identity tokens
  live for hours (about 24) and every run asks again, so a failed refresh keeps a previous
  token that is still good for a while: it exits non-zero and says why (and until when the
  kept token holds) in the journal; it never touches vLLM.
- Who may read the token: both units run as the same dynamic user (``User=`` names it,
  ``DynamicUser=yes``). systemd shares one dynamic UID among all units that name the same user
  while any of them runs, and re-owns their state directories when the UID changes, so the
  token's directory (a state directory of the refresher, ``0700``, the file ``0600``) is the
  agent's and nobody else's but root's. The agent lists that directory among its own state
  directories too, which is what makes it visible in its sandbox (a dynamic user's state lives
  under ``/var/lib/private``, which systemd hides from everything but the units listing it).
- The token never reaches a log, the rendered files or ``fab``'s output: the refresher prints
  only the expiry, and the configuration names the file, not its content.

Prometheus and Azure surprises:
- Agent mode came in 2.32 (``--enable-feature=agent``): Ubuntu 22.04's package (2.31) has no
  agent mode, so the spec refuses vmMetrics on ubuntu-2204 (``spec.IMAGE_PROMETHEUS``, the one
  place for those versions); ``--agent`` is Prometheus 3's spelling and 2.x refuses it. An
  agent keeps only a write-ahead log and has no rules, alerts or query API.
- The token's audience is Azure Monitor's ingestion, ``https://monitor.azure.com/``: the
  resource Microsoft's Logs Ingestion documentation asks tokens for
  (``resource=https://monitor.azure.com``), and the one Prometheus's own ``azuread`` requests
  for the public cloud (scope ``https://monitor.azure.com//.default``, that resource plus
  ``/.default``). The identity must hold Monitoring Metrics Publisher on the data collection
  rule whose remote-write URL the agent writes to.
- The package starts its own ``prometheus.service`` (a full server on :9090 with the package's
  example configuration): ``fab deploy`` masks it and runs this unit instead.
- The samples go to a public Azure endpoint whose addresses are not fixed: the agent's unit
  cannot allow-list addresses; the refresher's allows the metadata service only.
"""

from __future__ import annotations

import yaml

from serving.render import monitoring, proxy
from serving.render.systemd_unit import exec_line, template
from serving.stack import layout as layouts
from serving.stack.spec import PROMETHEUS_AGENT_MIN_VERSION, Spec

NAME = f"{layouts.SERVICE_NAME}-metrics"
UNIT_NAME = f"{NAME}.service"
UNIT_FILE = f"/etc/systemd/system/{UNIT_NAME}"
TEMPLATE = f"{NAME}.service.j2"
# Both units run as this dynamic user (see above): the agent's default name, spelled out.
USER = NAME
PACKAGE = "prometheus"  # the distribution's package (ubuntu-2404: 2.45)
MIN_VERSION = PROMETHEUS_AGENT_MIN_VERSION  # agent mode
PROMETHEUS = "/usr/bin/prometheus"
PROMTOOL = "/usr/bin/promtool"
# What the package starts on its own: stopped and masked on the VMs.
DISTRIBUTION_UNITS = ("prometheus.service", "prometheus-node-exporter.service")
CONFIG_FILE = f"{layouts.VM.config_dir}/{NAME}.yml"
STATE_DIRECTORY = NAME
# The agent's own web endpoint (health, its metrics), on loopback only.
LISTEN = "127.0.0.1:9095"
READY_URL = f"http://{LISTEN}/-/ready"
RESTART_DELAY_SECONDS = 5
STOP_TIMEOUT_SECONDS = 60

# The token refresher: its oneshot unit, its timer, its script and where the token goes.
TOKEN_NAME = f"{NAME}-token"
TOKEN_UNIT_NAME = f"{TOKEN_NAME}.service"
TOKEN_UNIT_FILE = f"/etc/systemd/system/{TOKEN_UNIT_NAME}"
TOKEN_UNIT_TEMPLATE = f"{TOKEN_NAME}.service.j2"
TOKEN_TIMER_NAME = f"{TOKEN_NAME}.timer"
TOKEN_TIMER_FILE = f"/etc/systemd/system/{TOKEN_TIMER_NAME}"
TOKEN_TIMER_TEMPLATE = f"{TOKEN_NAME}.timer.j2"
TOKEN_SCRIPT = f"/usr/local/libexec/{TOKEN_NAME}"
TOKEN_DIRECTORY = TOKEN_NAME  # a state directory: /var/lib/<it>, owned by USER
TOKEN_FILE = f"/var/lib/{TOKEN_DIRECTORY}/token"
TOKEN_REFRESH = "15min"
TOKEN_TIMEOUT_SECONDS = 90  # the refresher's curl retries stay well inside it
# The instance metadata service: only a VM's own processes reach it, never through a proxy.
IMDS_ADDRESS = "169.254.169.254"
IMDS_TOKEN_URL = (f"http://{IMDS_ADDRESS}/metadata/identity/oauth2/token"
                  "?api-version=2018-02-01")
# Azure Monitor's ingestion (the data collection endpoint's remote write); see above.
AUDIENCE = "https://monitor.azure.com/"


def prometheus_argv(config_file: str = CONFIG_FILE, *, listen: str = LISTEN,
                    storage: str = f"/var/lib/{STATE_DIRECTORY}") -> list[str]:
    return [PROMETHEUS, "--enable-feature=agent", f"--config.file={config_file}",
            f"--storage.agent.path={storage}", f"--web.listen-address={listen}"]


def token_argv(client_id: str = monitoring.PLACEHOLDER_CLIENT_ID, *,
               script: str = TOKEN_SCRIPT, imds_url: str = IMDS_TOKEN_URL,
               token_file: str = TOKEN_FILE) -> list[str]:
    """The refresher's command line (``metrics-token.sh``'s arguments)."""
    return [script, imds_url, AUDIENCE, client_id, token_file]


def render_config(spec: Spec, *, instance: str,
                  remote_write_url: str = monitoring.PLACEHOLDER_INGESTION_URL,
                  token_file: str = TOKEN_FILE) -> str:
    config = monitoring.agent_config(
        spec, instance=instance, vllm_address=f"127.0.0.1:{proxy.vllm_port(spec)}",
        remote_write_url=remote_write_url, token_file=token_file)
    return yaml.safe_dump(config, sort_keys=False)


def render_unit(spec: Spec) -> str:
    return template(TEMPLATE).render(
        stack=spec.stack,
        description=f"Prometheus agent: vLLM metrics of stack {spec.stack} to Azure Monitor"
        .replace("%", "%%"),
        exec_start=exec_line(prometheus_argv()),
        user=USER,
        state_directory=STATE_DIRECTORY,
        token_directory=TOKEN_DIRECTORY,
        token_unit=TOKEN_UNIT_NAME,
        stop_timeout_s=STOP_TIMEOUT_SECONDS,
        restart_s=RESTART_DELAY_SECONDS,
        vllm_unit=f"{layouts.SERVICE_NAME}.service",
    )


def render_token_unit(spec: Spec, client_id: str = monitoring.PLACEHOLDER_CLIENT_ID) -> str:
    """The refresher's oneshot unit, for the identity ``client_id`` (not a secret: it names
    the identity; only the VM itself can get a token for it)."""
    return template(TOKEN_UNIT_TEMPLATE).render(
        stack=spec.stack,
        description=f"Managed-identity token for the metrics agent of stack {spec.stack}"
        .replace("%", "%%"),
        exec_start=exec_line(token_argv(client_id)),
        user=USER,
        token_directory=TOKEN_DIRECTORY,
        imds_address=IMDS_ADDRESS,
        timeout_s=TOKEN_TIMEOUT_SECONDS,
        agent_unit=UNIT_NAME,
    )


def render_token_timer(spec: Spec) -> str:
    return template(TOKEN_TIMER_TEMPLATE).render(
        stack=spec.stack, refresh=TOKEN_REFRESH, token_unit=TOKEN_UNIT_NAME)
