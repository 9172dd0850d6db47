"""`fab status`: one row per host: service and API proxy state, whether the load balancer
sends to it, the metrics agent, vLLM version, loaded adapters, GPU memory."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from fabric import task
from rich.table import Table

from provisioning import rotation
from provisioning.bundle import host_python
from provisioning.remote import Host, RemoteError
from provisioning.steps.converge import StepError, Target
from provisioning.steps.model import stack_file
from provisioning.tasks import options as cli_options
from serving.render import metrics_unit, proxy_unit, systemd_unit
from serving.stack import layout as layouts

GPU_QUERY = ("nvidia-smi --query-gpu=memory.used,memory.total --format=csv,noheader,nounits "
             "2>/dev/null || true")


def host_status(t: Target) -> dict[str, str]:
    row = {"host": t.host.name}
    try:
        _, out, _ = t.host.run(f"systemctl is-active {systemd_unit.UNIT_NAME}", check=False)
        row["service"] = out.strip() or "absent"
        _, out, _ = t.host.run(f"systemctl is-active {proxy_unit.UNIT_NAME}", check=False)
        row["proxy"] = out.strip() or "absent"
        try:
            row["rotation"] = rotation.Rotation().state(t)
        except StepError as exc:
            row["rotation"] = f"unknown: {exc}"
        if t.spec.metrics.vm_agent:
            _, out, _ = t.host.run(f"systemctl is-active {metrics_unit.UNIT_NAME}", check=False)
            row["metrics agent"] = out.strip() or "absent"
        else:
            row["metrics agent"] = "off (vmMetrics false)"
        _, pins, _ = t.host.run(f"cat {layouts.VM.venv_dir}/.pins", check=False)
        vllm = next((p for p in pins.split() if p.startswith(t.spec.vllm.package + "==")), "")
        row["vllm"] = vllm.partition("==")[2] or "-"
        try:
            st = t.host.json(host_python("serving.host.health", "--config", stack_file(t),
                                         "--status"), sudo=True)
            row["adapters"] = ", ".join(st.get("adapters", [])) or "-"
            row["health"] = "ok" if st.get("health") else "no answer"
        except RemoteError:
            row["adapters"], row["health"] = "-", "tools missing (run fab deploy)"
        _, gpu, _ = t.host.run(GPU_QUERY, check=False)
        cards = [line.split(",") for line in gpu.strip().splitlines() if "," in line]
        row["gpu memory"] = ", ".join(f"{int(u) / 1024:.1f}/{int(m) / 1024:.1f} GiB"
                                      for u, m in cards) or "no GPU"
    except RemoteError as exc:
        row["service"] = f"unreachable: {exc}"
    finally:
        t.host.close()
    return row


COLUMNS = ("host", "service", "proxy", "rotation", "metrics agent", "health", "vllm",
           "adapters", "gpu memory")


def table(rows: list[dict[str, str]], stack: str) -> Table:
    out = Table(title=f"stack {stack}")
    for col in COLUMNS:
        out.add_column(col)
    for row in rows:
        out.add_row(*(row.get(c, "") for c in COLUMNS))
    return out


@task(help=cli_options.HELP)
def status(c, stack="", config="", hosts="", blob_url="", blob_connection_string_env="",
           connect_timeout=0.0):
    """A table of the stack's hosts: service state, vLLM version, adapters, GPU memory."""
    s = cli_options.load(c, stack=stack, config=config, hosts=hosts, blob_url=blob_url,
                         blob_connection_string_env=blob_connection_string_env,
                         connect_timeout=connect_timeout, gate=False)
    connect = cli_options.connector(s)

    def one(name: str) -> dict[str, str]:
        host: Host = connect(name)
        return host_status(Target(host=host, spec=s.spec, settings=s))

    with ThreadPoolExecutor(max_workers=8) as pool:
        rows = list(pool.map(one, s.hosts))
    cli_options.console.print(table(rows, s.spec.stack))
