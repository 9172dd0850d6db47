"""Tier 1: the real `fab` entry refuses hostile stack input like `python -m serving validate`:
exit 2, one line per problem naming the key or file, no traceback, no secret, before any host
is touched (none is reachable here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from serving.stack import stackfile
from tests.stack.test_spec import GOOD_VM

FAB = Path(sys.executable).with_name("fab")
SECRET = "sk-live-0123456789abcdef"


def stack_file(tmp_path: Path, **changes: Any) -> Path:
    values = {**GOOD_VM, **changes}
    path = tmp_path / "Pulumi.t.yaml"
    path.write_text(yaml.safe_dump(
        {"config": {f"exaone-serving:{k}": v for k, v in values.items()}}))
    return path


CASES: dict[str, tuple[dict[str, Any], str]] = {
    "ipv4-halves": ({"sshCidrs": ["0.0.0.0/1", "128.0.0.0/1"]}, "exaone-serving:sshCidrs"),
    "api-key-in-argv": ({"vllmExtraArgs": [f"--api_key={SECRET}"]}, "vllmExtraArgs[0]"),
    "key-in-apiKeyRef": ({"apiKeyRef": SECRET}, "exaone-serving:apiKeyRef"),
    "vmCount-text": ({"vmCount": "1"}, "exaone-serving:vmCount"),
    "admin-root": ({"adminUser": "root"}, "exaone-serving:adminUser"),
}


@pytest.mark.parametrize("task", ["validate", "deploy"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_fab_refuses_hostile_stacks(tmp_path: Path, task: str, case: str) -> None:
    changes, named = CASES[case]
    path = stack_file(tmp_path, **changes)
    done = subprocess.run([str(FAB), task, "--config", str(path)], cwd=stackfile.ROOT,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and SECRET not in done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines and all(line.startswith(str(path)) for line in lines), lines
    assert any(named in line for line in lines), lines


def test_fab_validate_refuses_a_duplicate_key(tmp_path: Path) -> None:
    path = stack_file(tmp_path)
    second = len(path.read_text().splitlines()) + 2
    path.write_text(path.read_text() + "  exaone-serving:production: true\n"
                    "  exaone-serving:production: false\n")
    done = subprocess.run([str(FAB), "validate", "--config", str(path)], cwd=stackfile.ROOT,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"{path}: key 'exaone-serving:production' appears twice in one mapping "
        f"(line {second}); YAML keeps only the last: allowed: each key once"]
