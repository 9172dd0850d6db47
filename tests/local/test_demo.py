"""Tier 3: `make demo`'s job, for real: the local stack served on this CPU, start to stop."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from serving.cli import main
from serving.local import demo
from serving.local import run as localrun
from serving.stack import layout as layouts
from serving.stack import stackfile


def test_demo_validates_and_renders_every_example_stack(
        capsys: pytest.CaptureFixture[str]) -> None:
    """The part of `make demo` before vLLM starts, through the CLI; the served flow itself is
    the next test's (one vLLM start for both)."""
    code = main(["demo", "--render-only"])
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    for stack in ("dev", "prod", "local"):
        assert f"{stack}: valid" in out


@pytest.mark.integration
def test_demo_runs_the_whole_flow_twice_beside_what_was_done_by_hand(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`make demo`'s served flow, twice in a row, in a checkout whose own record already
    serves the demo's adapter name (added by hand, other files) and whose pid file names a
    server the demo did not start: both runs pass and leave all of that as it was."""
    (tmp_path / ".venv-vllm").symlink_to(stackfile.ROOT / ".venv-vllm")
    layout = layouts.local(tmp_path)
    state = Path(layout.state_dir)
    by_hand = Path(layout.adapters_dir, demo.DEMO_ADAPTER, "1")
    by_hand.mkdir(parents=True)
    (by_hand / "adapter_config.json").write_text('{"made": "by hand"}')
    record = {"schema": 1, "serial": 1, "log": [], "adapters": {demo.DEMO_ADAPTER: {
        "current": {"version": "1", "path": str(by_hand), "at": 0.0}, "history": []}}}
    (state / "adapters.json").write_text(json.dumps(record))
    theirs = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)",
                               localrun.ENTRYPOINT_MARKS[0]])
    (state / "vllm.pid").write_text(f"{theirs.pid}\n")
    try:
        for run in (1, 2):
            code = demo.run(tmp_path)
            out = capsys.readouterr().out
            assert code == 0, f"run {run}:\n{out[-3000:]}"
            assert theirs.poll() is None, f"run {run} stopped a server it did not start"
            # The whole flow, each time: every step shown and verified.
            for step in ("add", "hotfix", "rollback", "remove", "stop"):
                assert step in out, f"run {run}: no {step} step"
            assert "random weights" in out
    finally:
        theirs.kill()
        theirs.wait()
    assert json.loads((state / "adapters.json").read_text()) == record
    assert (state / "vllm.pid").read_text() == f"{theirs.pid}\n"
    assert (by_hand / "adapter_config.json").read_text() == '{"made": "by hand"}'
    assert not Path(tmp_path, demo.DEMO_DIR, "vllm.pid").exists()
