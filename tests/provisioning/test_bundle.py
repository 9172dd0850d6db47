"""Tier 1: the decisions of `fab deploy` without a host (bundle).

Steps are probed through a real ``provisioning.remote.Host`` around invoke's ``MockContext``
(``provisioning_helpers``): the tests see exactly what would go over SSH."""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

import pytest
from provisioning_helpers import (
    target,
)

from provisioning import bundle
from serving.stack import layout as layouts
from serving.stack import stackfile

# --- tools (the bundle) -------------------------------------------------------------------------


def _members(data: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        return tar.getmembers()


def test_bundle_is_deterministic_and_holds_only_what_runs_on_a_host() -> None:
    first, second = bundle.build.__wrapped__(stackfile.ROOT), bundle.build.__wrapped__(
        stackfile.ROOT)
    assert first.digest == second.digest
    # The tar inside the gzip is byte-identical (fixed mtimes, owners, order).
    assert gzip.decompress(first.data) == gzip.decompress(second.data)
    members = _members(first.data)
    names = [m.name for m in members]
    assert names == sorted(names)
    assert {"Pulumi.yaml", "serving/__init__.py", "serving/atomic.py", "serving/host/blobfetch.py",
            "serving/host/adapters.py", "serving/adapters/cli.py",
            "serving/stack/spec.py"} <= set(names)
    # The renderers, planner, benchmark and local target never run on a VM.
    assert not [n for n in names if n.startswith(("systemd/", "serving/render/", "serving/plan/",
                                                  "serving/bench/", "serving/local/"))]
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    assert all(m.mtime == 0 and m.mode == 0o644 and m.uid == 0 for m in members)
    assert first.remote_dir == f"{layouts.VM_TOOLS_DIR}/{first.digest[:16]}"


def test_bundle_digest_follows_content_not_mtimes_or_caches(tmp_path: Path) -> None:
    root = tmp_path / "checkout"
    (root / "serving" / "host" / "__pycache__").mkdir(parents=True)
    (root / "serving" / "render").mkdir()
    (root / "serving" / "host" / "a.py").write_text("A = 1\n")
    (root / "serving" / "host" / "__pycache__" / "stray.py").write_text("cached\n")
    (root / "serving" / "host" / "notes.txt").write_text("not shipped\n")
    (root / "serving" / "render" / "r.py").write_text("not shipped either\n")
    (root / "Pulumi.yaml").write_text("name: x\n")
    build = bundle.build.__wrapped__
    one = build(root)
    assert [m.name for m in _members(one.data)] == ["Pulumi.yaml", "serving/host/a.py"]
    (root / "serving" / "host" / "a.py").touch()
    (root / "serving" / "host" / "__pycache__" / "stray.py").write_text("changed cache\n")
    assert build(root).digest == one.digest
    (root / "serving" / "host" / "a.py").write_text("A = 2\n")
    assert build(root).digest != one.digest


@pytest.mark.parametrize(("state", "want_install"), [
    pytest.param("{dir}\ncomplete\n", False, id="current-and-complete"),
    pytest.param("{dir}\n", True, id="current-but-incomplete"),
    pytest.param("/opt/exaone/tools/0000000000000000\ncomplete\n", True, id="older-bundle"),
    pytest.param("", True, id="nothing-installed"),
])
def test_tools_plan(state: str, want_install: bool) -> None:
    t, _, _ = target()
    b = bundle.build()
    actions = bundle.ToolsStep().plan(t, state.format(dir=b.remote_dir))
    assert actions == ([f"install the host tools {b.digest[:16]} in {layouts.VM_TOOLS_DIR}"]
                       if want_install else [])


def test_host_python_runs_the_bundle_with_the_venv_interpreter() -> None:
    line = bundle.host_python("serving.host.files", "probe", "/etc/a b")
    assert line == (f"env PYTHONPATH={layouts.VM_TOOLS_CURRENT} PYTHONDONTWRITEBYTECODE=1 "
                    f"{layouts.VM.python} -m serving.host.files probe '/etc/a b'")
