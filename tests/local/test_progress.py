"""Tier 1: a long local step's live line, as a log (CI, a pipe) shows it."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from serving.local import progress
from serving.local.progress import Phases


def test_in_a_log_each_phase_is_one_line_with_its_seconds_and_a_heartbeat(
        monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=200)
    with Phases(console, "vLLM start") as phases:
        phases.update("loading weights")
        phases.update("loading weights")  # the same phase: no new line yet
        monkeypatch.setattr(progress, "HEARTBEAT_SECONDS", 0.0)
        phases.update("")  # nothing new, but the heartbeat is due: say it is still waiting
        phases.update("compiling")
    lines = out.getvalue().splitlines()
    assert lines[0] == "vLLM start ..."
    assert [line.split(" (")[0] for line in lines[1:]] == [
        "vLLM start: loading weights", "vLLM start: loading weights", "vLLM start: compiling"]
    assert all(line.endswith(" s)") for line in lines[1:])
