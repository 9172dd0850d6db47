"""The API proxy's systemd unit on a VM: the distribution's nginx with the configuration from
``serving.render.proxy``, in its own sandbox (no root, no capabilities: the API port is above
1024). Clients reach the API port here; vLLM's unit admits loopback only.
"""

from __future__ import annotations

from serving.render import proxy
from serving.render.systemd_unit import exec_line, template
from serving.stack import layout as layouts
from serving.stack.spec import Spec

NAME = layouts.PROXY_SERVICE_NAME
UNIT_NAME = f"{NAME}.service"
UNIT_FILE = f"/etc/systemd/system/{UNIT_NAME}"
TEMPLATE = f"{NAME}.service.j2"
# Where Debian and Ubuntu's nginx package puts the binary and its compiled-in error log.
NGINX = "/usr/sbin/nginx"
NGINX_LOG_DIR = "/var/log/nginx"
# The distribution's own nginx unit, started by the package on port 80 with its default
# site: the proxy step stops and disables it.
DISTRIBUTION_UNIT = "nginx.service"
CONFIG_FILE = f"{layouts.VM.config_dir}/{NAME}.nginx.conf"

RESTART_DELAY_SECONDS = 2
START_LIMIT_INTERVAL_SECONDS = 300
START_LIMIT_BURST = 10
STOP_TIMEOUT_SECONDS = proxy.SHUTDOWN_TIMEOUT_SECONDS + 10
NOFILE_LIMIT = 16384


def nginx_argv(config_file: str = CONFIG_FILE, *, check: bool = False) -> list[str]:
    """nginx on the rendered configuration; ``check``: ``nginx -t`` on it (quiet)."""
    return [NGINX, *(("-t", "-q") if check else ()), "-c", config_file]


def render_config(spec: Spec) -> str:
    """The VM's nginx.conf for ``CONFIG_FILE``."""
    return proxy.render_config(spec, proxy.VM)


def ip_address_allow(spec: Spec) -> list[str]:
    return ["localhost", *proxy.client_networks(spec)]


def render_unit(spec: Spec) -> str:
    """The unit file's text for ``UNIT_FILE``."""
    run_dir = proxy.VM.run_dir
    if not run_dir.startswith("/run/"):
        raise ValueError(f"the VM's proxy run folder must be under /run/, got {run_dir}")
    return template(TEMPLATE).render(
        stack=spec.stack,
        description=(f"API proxy for vLLM (stack {spec.stack}): inference routes on port "
                     f"{spec.vllm.port}").replace("%", "%%"),
        start_limit_interval_s=START_LIMIT_INTERVAL_SECONDS,
        start_limit_burst=START_LIMIT_BURST,
        exec_check=exec_line(nginx_argv(check=True)),
        exec_start=exec_line(nginx_argv()),
        stop_timeout_s=STOP_TIMEOUT_SECONDS,
        restart_s=RESTART_DELAY_SECONDS,
        nofile=NOFILE_LIMIT,
        runtime_directory=run_dir.removeprefix("/run/"),
        log_dir=NGINX_LOG_DIR,
        ip_address_allow=ip_address_allow(spec),
    )

