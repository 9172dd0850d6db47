"""Tier 1: the decisions of `fab deploy` without a host (adapters step).

Steps are probed through a real ``provisioning.remote.Host`` around invoke's ``MockContext``
(``provisioning_helpers``): the tests see exactly what would go over SSH."""

from __future__ import annotations

from typing import Any

import pytest
from provisioning_helpers import (
    as_json,
    commands,
    rx,
    spec_with,
    target,
)

from provisioning.steps.adapters import AdaptersStep, RecordStep
from provisioning.steps.converge import (
    Skip,
    StepError,
)

# --- adapters and record ------------------------------------------------------------------------


def test_adapters_plan_skips_a_stack_without_adapters() -> None:
    t, _, _ = target(spec=spec_with(adapters=[]))
    assert AdaptersStep().plan(t, {}) == Skip("the stack has no adapters")


@pytest.mark.parametrize(("state", "want"), [
    pytest.param({"support-ko/3": "present", "legal-summary/1": "present"}, [], id="all-present"),
    pytest.param({"support-ko/3": "missing", "legal-summary/1": "present"},
                 ["fetch support-ko/3 from blob://adapters/support-ko/3 (missing), "
                  "check sha256 and PEFT"], id="one-missing"),
    pytest.param({"support-ko/3": "changed", "legal-summary/1": "missing"},
                 ["fetch legal-summary/1 from blob://adapters/legal-summary/1 (missing), "
                  "check sha256 and PEFT",
                  "fetch support-ko/3 from blob://adapters/support-ko/3 (changed), "
                  "check sha256 and PEFT"], id="changed-and-missing-sorted"),
])
def test_adapters_plan(state: dict[str, str], want: list[str]) -> None:
    t, _, _ = target()
    assert AdaptersStep().plan(t, state) == want


def test_adapters_probe_and_apply() -> None:
    t, mc, said = target({
        rx("host.adapters probe"): as_json({"adapters": {"support-ko/3": "missing"}}),
        rx("host.adapters sync"): as_json({"installed": ["support-ko/3"]}),
    })
    step = AdaptersStep()
    state = step.probe(t)
    assert state == {"support-ko/3": "missing"}
    step.apply(t, step.plan(t, state), state)
    assert "adapters: installed support-ko/3" in said
    assert t.facts["adapters_changed"] is True
    assert "flock" in commands(mc)[1] and "flock" not in commands(mc)[0]


def test_adapters_sync_failure_is_a_step_error() -> None:
    t, _, _ = target({rx("host.adapters sync"): as_json(
        {"error": "adapter support-ko/3: sha256 is abc"}, 2)})
    with pytest.raises(StepError, match=r"(?s)adapters: .*sha256 is abc"):
        AdaptersStep().apply(t, ["fetch"], {})
    assert "adapters_changed" not in t.facts


@pytest.mark.parametrize(("state", "want"), [
    pytest.param({"changes": [], "remove": [], "applied": False}, [], id="settled"),
    pytest.param({"changes": ["record support-ko/3 as serving", "record old as removed"],
                  "remove": ["/var/lib/exaone/adapters/old"]},
                 ["record support-ko/3 as serving", "record old as removed",
                  "remove /var/lib/exaone/adapters/old"], id="changes-and-removals"),
])
def test_record_plan(state: dict[str, Any], want: list[str]) -> None:
    t, _, _ = target()
    assert RecordStep().plan(t, state) == want


def test_record_probes_dry_and_applies_under_the_lock() -> None:
    t, mc, _ = target({rx("host.adapters record"): as_json({"changes": [], "remove": []})})
    RecordStep().probe(t)
    RecordStep().apply(t, ["x"], {})
    probe, apply = commands(mc)
    assert probe.endswith("--dry") and "flock" not in probe
    assert not apply.endswith("--dry") and "flock" in apply
