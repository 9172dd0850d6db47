"""Every artifact of a stack, computed from the spec only, then written in one go.

``artifacts`` builds all file contents in memory first, so bad input (or a failing
builder) leaves the output folder untouched; ``write`` puts all of them in place or none.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import yaml

from k8s import autoscale
from k8s import objects as k8s_objects
from serving.render import dashboard, metrics_unit, monitoring, proxy_unit, systemd_unit, vllm_args
from serving.stack import layout
from serving.stack.errors import Problem, SpecError
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
        out[f"systemd/{metrics_unit.UNIT_NAME}"] = metrics_unit.render_unit(spec)
        out[f"systemd/{metrics_unit.TOKEN_UNIT_NAME}"] = metrics_unit.render_token_unit(spec)
        out[f"systemd/{metrics_unit.TOKEN_TIMER_NAME}"] = metrics_unit.render_token_timer(spec)
        for host in hosts:
            out[f"monitoring/{metrics_unit.NAME}-{host}.yml"] = metrics_unit.render_config(
                spec, instance=host)
    if spec.on.kubernetes:
        hosts = [f"{k8s_objects.SERVICE_NAME}.{spec.aks.namespace}.svc"]
        for obj in [*k8s_objects.device_plugin(spec), *k8s_objects.vllm_objects(spec),
                    *autoscale.autoscale_objects(spec, port_name=k8s_objects.PORT_NAME)]:
            name = f"{obj['kind'].lower()}-{obj['metadata']['name']}.yaml"
            out[f"k8s/{name}"] = _yaml_docs([obj])
    if spec.on.cloud:
        out["monitoring/grafana-dashboard.json"] = dashboard.render()
    targets = [f"{host}:{spec.vllm.port}" for host in hosts]
    out["monitoring/scrape-config.yaml"] = yaml.safe_dump(
        monitoring.scrape_config(spec, targets), sort_keys=False
    )
    return out


def _conflicts(files: dict[str, str], out_dir: Path) -> list[Problem]:
    """Paths where a file must go but a folder is (or the other way round)."""
    problems: list[Problem] = []
    if out_dir.exists() and not out_dir.is_dir():
        return [Problem("--out", f"{out_dir} is a file; allowed: a folder (new or existing)")]
    for rel in sorted(files):
        path = out_dir / rel
        for parent in list(reversed(path.relative_to(out_dir).parents))[1:]:
            if (out_dir / parent).exists() and not (out_dir / parent).is_dir():
                problems.append(Problem("--out", f"{out_dir / parent} is a file where the "
                                        f"folder for {rel} goes; allowed: a folder"))
                break
        if path.is_dir():
            problems.append(Problem("--out", f"{path} is a folder where {rel} goes"))
    return problems


def write(files: dict[str, str], out_dir: Path) -> list[Path]:
    """Write every file under ``out_dir``, or none: conflicts are refused first (SpecError,
    nothing written), then the files are staged in a folder beside their place and moved in.
    A new ``out_dir`` appears whole, in one rename."""
    out_dir = Path(out_dir)
    problems = _conflicts(files, out_dir)
    if problems:
        raise SpecError(problems)
    existing = out_dir if out_dir.is_dir() else next(p for p in out_dir.parents if p.is_dir())
    try:
        staging = Path(tempfile.mkdtemp(prefix=".render-", dir=existing))
    except OSError as exc:
        raise SpecError([Problem("--out", f"{existing}: {exc.strerror}")]) from None
    try:
        for rel, content in files.items():
            path = staging / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content)
        if not out_dir.exists():
            staging.chmod(0o755)  # mkdtemp makes it private
            out_dir.parent.mkdir(parents=True, exist_ok=True)
            staging.rename(out_dir)
        else:
            # Same file system: each rename is atomic and cannot run out of space.
            for rel in sorted(files):
                (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
                os.replace(staging / rel, out_dir / rel)
    except OSError as exc:
        raise SpecError([Problem("--out", f"{exc.filename or out_dir}: {exc.strerror}")]) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [out_dir / rel for rel in sorted(files)]
