"""Every artifact of a stack, computed from the spec only, then written in one go.

``artifacts`` builds all file contents in memory first, so bad input (or a failing
builder) leaves the output folder untouched.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from k8s import objects as k8s_objects
from serving.render import monitoring, proxy_unit, systemd_unit, vllm_args
from serving.stack import layout
from serving.stack.spec import Spec


def _yaml_docs(docs: list[dict]) -> str:
    return yaml.safe_dump_all(docs, sort_keys=False, default_flow_style=False)


def artifacts(spec: Spec, root: Path) -> dict[str, str]:
    """Relative path -> content for every artifact the stack's target uses."""
    place = layout.for_target(spec, root)
    out: dict[str, str] = {
        "vllm/command.json": json.dumps(vllm_args.command(spec, place), indent=2) + "\n",
        "vllm/environment.json": json.dumps(vllm_args.environment(spec, place), indent=2) + "\n",
        "monitoring/alert-rules.yaml": yaml.safe_dump(
            monitoring.alert_rules(spec), sort_keys=False
        ),
    }
    hosts = ["127.0.0.1"]
    if spec.on.ssh_hosts:
        out[f"systemd/{systemd_unit.UNIT_NAME}"] = systemd_unit.render_unit(spec, place)
        out[f"systemd/{systemd_unit.ENV_NAME}"] = systemd_unit.render_env(spec, place)
        out[f"systemd/{proxy_unit.UNIT_NAME}"] = proxy_unit.render_unit(spec)
        out[f"proxy/{proxy_unit.NAME}.nginx.conf"] = proxy_unit.render_config(spec)
        hosts = layout.vm_host_names(spec)
    if spec.on.kubernetes:
        hosts = [f"{k8s_objects.SERVICE_NAME}.{spec.aks.namespace}.svc"]
        for obj in [*k8s_objects.device_plugin(spec), *k8s_objects.vllm_objects(spec)]:
            name = f"{obj['kind'].lower()}-{obj['metadata']['name']}.yaml"
            out[f"k8s/{name}"] = _yaml_docs([obj])
    targets = [f"{host}:{spec.vllm.port}" for host in hosts]
    out["monitoring/scrape-config.yaml"] = yaml.safe_dump(
        monitoring.scrape_config(spec, targets), sort_keys=False
    )
    return out


def write(files: dict[str, str], out_dir: Path) -> list[Path]:
    written = []
    for rel, content in sorted(files.items()):
        path = out_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
        written.append(path)
    return written
