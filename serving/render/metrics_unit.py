"""Prometheus in agent mode on a VM (``monitoring.agent_config``): its configuration and its
systemd unit. The agent scrapes vLLM on loopback and remote-writes to the stack's Azure Monitor
workspace with the VM's managed identity, so VM fleets land where AKS's managed Prometheus
writes and the same rule groups judge them.

Prometheus surprises:
- ``remote_write.azuread.managed_identity`` needs Prometheus 2.45 or newer. Ubuntu 24.04's own
  package is 2.45 (signed by the archive, nothing to download and checksum); Ubuntu 22.04's is
  2.31 and Debian bookworm's 2.42, which refuse the ``azuread`` block as an unknown field. So the
  VMs run the distribution's package on ubuntu-2404 only (the spec refuses vmMetrics on
  ubuntu-2204), and ``fab deploy`` checks the configuration with the package's own promtool
  before it starts the agent.
- Prometheus 2.x runs as an agent with ``--enable-feature=agent``; ``--agent`` is Prometheus
  3's spelling and 2.45 refuses it as an unknown flag. An agent keeps only a write-ahead log
  and has no rules, alerts or query API.
- The package starts its own ``prometheus.service`` (a full server on :9090 with the package's
  example configuration): ``fab deploy`` masks it and runs this unit instead.
- The token comes from the instance metadata service (169.254.169.254) and the samples go to a
  public Azure endpoint whose addresses are not fixed: the unit cannot allow-list addresses.
"""

from __future__ import annotations

import yaml

from serving.render import monitoring, proxy
from serving.render.systemd_unit import exec_line, template
from serving.stack import layout as layouts
from serving.stack.spec import Spec

NAME = f"{layouts.SERVICE_NAME}-metrics"
UNIT_NAME = f"{NAME}.service"
UNIT_FILE = f"/etc/systemd/system/{UNIT_NAME}"
TEMPLATE = f"{NAME}.service.j2"
PACKAGE = "prometheus"  # the distribution's package (ubuntu-2404: 2.45)
MIN_VERSION = (2, 45)  # remote_write.azuread with a managed identity
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


def prometheus_argv(config_file: str = CONFIG_FILE) -> list[str]:
    return [PROMETHEUS, "--enable-feature=agent", f"--config.file={config_file}",
            f"--storage.agent.path=/var/lib/{STATE_DIRECTORY}",
            f"--web.listen-address={LISTEN}"]


def render_config(spec: Spec, *, instance: str,
                  remote_write_url: str = monitoring.PLACEHOLDER_INGESTION_URL,
                  client_id: str = monitoring.PLACEHOLDER_CLIENT_ID) -> str:
    config = monitoring.agent_config(
        spec, instance=instance, vllm_address=f"127.0.0.1:{proxy.vllm_port(spec)}",
        remote_write_url=remote_write_url, client_id=client_id)
    return yaml.safe_dump(config, sort_keys=False)


def render_unit(spec: Spec) -> str:
    return template(TEMPLATE).render(
        stack=spec.stack,
        description=f"Prometheus agent: vLLM metrics of stack {spec.stack} to Azure Monitor"
        .replace("%", "%%"),
        exec_start=exec_line(prometheus_argv()),
        state_directory=STATE_DIRECTORY,
        stop_timeout_s=STOP_TIMEOUT_SECONDS,
        restart_s=RESTART_DELAY_SECONDS,
        vllm_unit=f"{layouts.SERVICE_NAME}.service",
    )
