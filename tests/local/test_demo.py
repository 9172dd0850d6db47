"""Tier 3: `make demo`'s job, for real: the local stack served on this CPU, start to stop."""

from __future__ import annotations

import pytest

from serving.cli import main


@pytest.mark.integration
def test_demo_runs_the_whole_flow(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["demo"])
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    for stack in ("dev", "prod", "local"):
        assert f"{stack}: valid" in out
    for step in ("add", "hotfix", "rollback", "remove", "stop"):
        assert step in out
