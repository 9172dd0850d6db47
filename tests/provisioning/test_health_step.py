"""Tier 1: the decisions of `fab deploy` without a host (health step).

Steps are probed through a real ``provisioning.remote.Host`` around invoke's ``MockContext``
(``provisioning_helpers``): the tests see exactly what would go over SSH."""

from __future__ import annotations

import pytest
from provisioning_helpers import (
    as_json,
    commands,
    rx,
    target,
)

from provisioning.steps.converge import (
    PLANNED,
    StepError,
)
from provisioning.steps.health import HealthGate

# --- health -------------------------------------------------------------------------------------


def test_health_gate_is_not_run_under_dry() -> None:
    t, mc, _ = target(dry=True)
    assert HealthGate().run(t).status == PLANNED
    assert commands(mc) == []


def test_health_gate_passes_or_fails_with_the_tool_error() -> None:
    t, mc, said = target({rx("serving.host.health"): as_json(
        {"ready_s": 12.5, "answers": {"exaone": "hi", "support-ko": "annyeong"}})})
    result = HealthGate().run(t)
    assert result.status == "passed" and "2 models answer" in result.detail
    assert f"--timeout-s {t.settings.health_timeout_s}" in commands(mc)[0]
    assert "health: support-ko answers 'annyeong'" in said
    t, _, _ = target({rx("serving.host.health"): as_json({"error": "/health timed out"}, 2)})
    with pytest.raises(StepError, match=r"(?s)health: .*timed out"):
        HealthGate().run(t)
