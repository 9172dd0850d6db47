"""Tier 1: the rules the folder layout stands for, read from the code itself (imports by ast),
so a later change cannot quietly break them."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from serving.stack import stackfile
from serving.stack.targets import TARGETS

ROOT = stackfile.ROOT
CODE = ("serving", "provisioning", "infra", "k8s")


def _modules(folder: str) -> list[Path]:
    return sorted(p for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts)


def _imports(path: Path) -> set[str]:
    """Every project module ``path`` imports, anywhere in the file (also inside functions)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
    return {m for m in out if m.split(".")[0] in CODE}


def _offenders(folder: str, forbidden: tuple[str, ...]) -> list[str]:
    return [f"{p.relative_to(ROOT)} imports {m}" for p in _modules(folder)
            for m in sorted(_imports(p)) if m.startswith(forbidden)]


def test_the_contract_imports_nothing_else_of_the_project() -> None:
    forbidden = ("provisioning", "infra", "k8s", "serving.render", "serving.adapters",
                 "serving.host", "serving.plan", "serving.bench", "serving.local", "serving.cli",
                 "serving.cloud")
    assert _offenders("serving/stack", forbidden) == []


@pytest.mark.parametrize("folder, forbidden", [
    ("serving/host", ("serving.render", "serving.plan", "serving.bench", "serving.local",
                      "serving.cli", "provisioning", "infra", "k8s")),
    ("serving/adapters", ("serving.render", "serving.plan", "serving.bench", "serving.local",
                          "serving.host", "provisioning", "infra", "k8s")),
    ("serving/render", ("serving.adapters", "serving.host", "serving.plan", "serving.bench",
                        "serving.local", "provisioning", "infra")),
    # The operator's Azure side: the spec and Azure's SDKs, no rendering, hosts or Pulumi.
    ("serving/cloud", ("serving.render", "serving.plan", "serving.bench", "serving.local",
                       "serving.host", "serving.adapters", "provisioning", "infra", "k8s")),
], ids=["host", "adapters", "render", "cloud"])
def test_what_travels_to_a_vm_and_what_renders_stay_in_their_lanes(
        folder: str, forbidden: tuple[str, ...]) -> None:
    assert _offenders(folder, forbidden) == []


def test_only_the_cli_the_demo_and_tests_import_the_local_target() -> None:
    allowed = {ROOT / "serving" / "cli.py"}
    users = [f"{p.relative_to(ROOT)}" for folder in CODE for p in _modules(folder)
             if p not in allowed and "local" not in p.relative_to(ROOT).parts[:2]
             and any(m.startswith("serving.local") for m in _imports(p))]
    assert users == []


def test_no_module_asks_a_target_by_its_name() -> None:
    """Behaviour that differs per target reads ``spec.on`` (serving.stack.targets)."""
    pattern = re.compile(r"\.target\s*(==|!=|\bin\b|\bnot in\b)")
    found = [f"{p.relative_to(ROOT)}:{i}" for folder in CODE for p in _modules(folder)
             for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert found == []


def test_every_target_is_described_once_and_accepted_by_the_spec() -> None:
    for name, target in TARGETS.items():
        assert target.name == name and target.vllm_packages and target.summary
        assert target.cloud == (target.ssh_hosts or target.kubernetes)
        assert target.local_files == (not target.cloud)
