"""Where the third-party checkers live: the project's venvs first, then PATH."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


def find_tool(name: str, *dirs: Path) -> str:
    """The checker's path; a missing checker fails the test (CI must never skip them)."""
    for folder in dirs:
        if (folder / name).is_file():
            return str(folder / name)
    found = shutil.which(name)
    if not found:
        pytest.fail(f"{name} is not installed: `make tools` (or .ci/tools.sh) installs it")
    return found
