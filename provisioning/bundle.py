"""The project's host-side tools, shipped to each VM as one content-addressed folder.

Host-side steps (fetching from Blob, adapter checks, the EXAONE patch, the health gate,
runtime adapter operations) run the project's own ``serving`` package with the runtime
venv's interpreter, so the host checks adapters with exactly the code the operator's machine
uses. The bundle holds ``serving/`` less what never runs on a host (``INCLUDE``) and
``Pulumi.yaml`` (the config schema the spec loader reads); its folder name is the hash of its
content, so a re-deploy with the same checkout uploads nothing.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import shlex
import tarfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from provisioning.remote import Host
from provisioning.steps.converge import Target
from serving.stack import layout as layouts
from serving.stack.stackfile import ROOT

# Only what runs on a VM: the contract, the adapter life cycle and the host tools (the
# renderers, the planner, the benchmark and the local target stay on the operator's machine).
INCLUDE = ("serving/__init__.py", "serving/atomic.py", "serving/stack", "serving/adapters",
           "serving/host", "Pulumi.yaml")
SUFFIXES = (".py", ".j2", ".sh", ".yaml", ".json")


@dataclass(frozen=True)
class Bundle:
    digest: str
    data: bytes

    @property
    def remote_dir(self) -> str:
        return f"{layouts.VM_TOOLS_DIR}/{self.digest[:16]}"


def _files(root: Path) -> list[Path]:
    out: list[Path] = []
    for name in INCLUDE:
        path = root / name
        if path.is_file():
            out.append(path)
            continue
        out += [p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES
                and "__pycache__" not in p.parts]
    return sorted(out)


@lru_cache(maxsize=2)
def build(root: Path = ROOT) -> Bundle:
    """A deterministic tar.gz (fixed mtimes and owners) and the sha256 of its members."""
    digest = hashlib.sha256()
    buf = io.BytesIO()
    # gzip's header carries a timestamp unless told otherwise: mtime=0 keeps the bytes stable.
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode="w") as tar:
        for path in _files(root):
            rel = path.relative_to(root).as_posix()
            data = path.read_bytes()
            digest.update(rel.encode() + b"\0" + hashlib.sha256(data).digest())
            info = tarfile.TarInfo(rel)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    return Bundle(digest.hexdigest(), buf.getvalue())


def host_python(module: str, *args: str) -> str:
    """The shell line that runs ``python -m <module> ARGS`` from the bundle on the host."""
    argv = " ".join(shlex.quote(a) for a in args)
    return (f"env PYTHONPATH={layouts.VM_TOOLS_CURRENT} PYTHONDONTWRITEBYTECODE=1 "
            f"{layouts.VM.python} -m {module} {argv}").rstrip()


class ToolsStep:
    """Ship the bundle: probe the `current` link, upload and unpack only when it differs."""

    name = "tools"

    def probe(self, t: Target) -> str:
        _, out, _ = t.host.run(f"readlink {layouts.VM_TOOLS_CURRENT}; "
                               f"test -f {layouts.VM_TOOLS_CURRENT}/.complete && echo complete",
                               check=False)
        return out

    def plan(self, t: Target, state: str) -> list[str]:
        bundle = build()
        lines = state.split()
        if lines[:1] == [bundle.remote_dir] and "complete" in lines:
            return []
        return [f"install the host tools {bundle.digest[:16]} in {layouts.VM_TOOLS_DIR}"]

    def apply(self, t: Target, actions: list[str], state: str) -> None:
        bundle = build()
        upload = f"/tmp/exaone-tools-{bundle.digest[:16]}.tar.gz"
        t.host.put_bytes(bundle.data, upload)
        install(t.host, bundle, upload)


def install(host: Host, bundle: Bundle, upload: str) -> None:
    target = bundle.remote_dir
    host.sudo(
        "sh -c " + shlex.quote(
            f"set -e; rm -rf {target}.tmp; mkdir -p {target}.tmp; "
            f"tar -xzf {upload} -C {target}.tmp --no-same-owner; "
            f"touch {target}.tmp/.complete; rm -rf {target}; mv {target}.tmp {target}; "
            f"chmod -R go-w {layouts.VM_TOOLS_DIR}; "
            f"ln -sfn {target} {layouts.VM_TOOLS_CURRENT}.tmp; "
            f"mv -T {layouts.VM_TOOLS_CURRENT}.tmp {layouts.VM_TOOLS_CURRENT}; rm -f {upload}; "
            # Earlier bundles: nothing references them once `current` moved.
            f"find {layouts.VM_TOOLS_DIR} -mindepth 1 -maxdepth 1 -type d "
            f"! -name {bundle.digest[:16]} -exec rm -rf {{}} +"),
        lock=True)
