"""Tier 1: the decisions of `fab deploy` without a host (converge).

Steps are probed through a real ``provisioning.remote.Host`` around invoke's ``MockContext``
(``provisioning_helpers``): the tests see exactly what would go over SSH."""

from __future__ import annotations

import time
from typing import Any

import pytest
from provisioning_helpers import (
    target,
)

from provisioning.steps import converge as converge_module
from provisioning.steps.converge import (
    CHANGED,
    PLANNED,
    SKIPPED,
    UNCHANGED,
    Skip,
    StepError,
    Target,
    converge,
)

# --- converge -----------------------------------------------------------------------------------


class FakeStep:
    """A step whose plans come from a list (one per plan call); records probe/apply calls."""

    name = "fake"

    def __init__(self, *plans: list[str] | Skip):
        self.plans = list(plans)
        self.probes = 0
        self.applied: list[tuple[list[str], Any]] = []

    def probe(self, t: Target) -> Any:
        self.probes += 1
        return {"probe": self.probes}

    def plan(self, t: Target, state: Any) -> list[str] | Skip:
        return self.plans.pop(0)

    def apply(self, t: Target, actions: list[str], state: Any) -> None:
        self.applied.append((actions, state))


class SlowStep(FakeStep):
    def apply(self, t: Target, actions: list[str], state: Any) -> None:
        time.sleep(0.35)
        super().apply(t, actions, state)


def test_a_long_change_says_it_is_still_at_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """A change that prints nothing for a while (pip on the host, vLLM's start) is not silent:
    every HEARTBEAT_SECONDS a line with the step and its time; none once it is done."""
    monkeypatch.setattr(converge_module, "HEARTBEAT_SECONDS", 0.1)
    t, _, said = target()
    assert converge(SlowStep(["install"], []), t).status == CHANGED
    beats = [line for line in said if line.startswith("fake: still at work (")]
    assert 1 <= len(beats) <= 4, said
    count = len(said)
    time.sleep(0.3)
    assert len(said) == count


@pytest.mark.parametrize(("plans", "dry", "status", "detail", "applied"), [
    pytest.param([[]], False, UNCHANGED, "", False, id="unchanged"),
    pytest.param([Skip("not here")], False, SKIPPED, "not here", False, id="skipped"),
    pytest.param([["a", "b"]], True, PLANNED, "a; b", False, id="planned-under-dry"),
    pytest.param([["a", "b"], []], False, CHANGED, "a; b", True, id="changed"),
])
def test_converge_outcomes(plans: list[Any], dry: bool, status: str, detail: str,
                           applied: bool) -> None:
    step = FakeStep(*plans)
    t, _, said = target(dry=dry)
    result = converge(step, t)
    assert (result.step, result.status, result.detail) == ("fake", status, detail)
    assert bool(step.applied) is applied
    assert not step.plans, "plan was not called as often as expected"
    if applied:
        assert step.applied == [(["a", "b"], {"probe": 1})]
        assert step.probes == 2  # probed again after the change
    if dry:
        assert said == ["fake: would a", "fake: would b"]


@pytest.mark.parametrize("after", [
    pytest.param(["a"], id="same-action-left"),
    pytest.param(Skip("vanished"), id="skip-after-apply"),
])
def test_converge_fails_loudly_when_apply_does_not_converge(after: list[str] | Skip) -> None:
    step = FakeStep(["a"], after)
    t, _, _ = target()
    with pytest.raises(StepError, match="still not converged") as err:
        converge(step, t)
    assert err.value.step == "fake"
    assert ("vanished" if isinstance(after, Skip) else "a") in err.value.message
