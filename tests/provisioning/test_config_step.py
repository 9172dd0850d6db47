"""Tier 1: the decisions of `fab deploy` without a host (config step).

Steps are probed through a real ``provisioning.remote.Host`` around invoke's ``MockContext``
(``provisioning_helpers``): the tests see exactly what would go over SSH."""

from __future__ import annotations

import pytest
from provisioning_helpers import (
    API_KEY,
    STACK_FILE,
    as_json,
    commands,
    config_digests,
    rx,
    sent,
    target,
)

from provisioning.steps.config import ConfigStep
from provisioning.steps.converge import (
    CHANGED,
    converge,
)
from serving.stack import layout as layouts

# --- config -------------------------------------------------------------------------------------






@pytest.mark.parametrize(("override", "want"), [
    pytest.param({}, [], id="both-current"),
    pytest.param({STACK_FILE: "0" * 64}, [f"write {STACK_FILE}"], id="stack-file-differs"),
    pytest.param({layouts.VM_API_KEY_FILE: None}, [f"write {layouts.VM_API_KEY_FILE}"],
                 id="key-file-missing"),
    pytest.param({STACK_FILE: None, layouts.VM_API_KEY_FILE: "x"},
                 [f"write {STACK_FILE}", f"write {layouts.VM_API_KEY_FILE}"], id="both"),
])
def test_config_plan(override: dict[str, str | None], want: list[str]) -> None:
    t, _, _ = target()
    assert ConfigStep().plan(t, config_digests(t, **override)) == want


def test_config_converges_writing_over_stdin_with_modes() -> None:
    t, _, _ = target()
    before = config_digests(t, **{STACK_FILE: None, layouts.VM_API_KEY_FILE: None})
    after = config_digests(t)
    t, mc, _ = target({rx("serving.host.files probe"): [as_json(before), as_json(after)],
                       rx("serving.host.files put"): as_json({"changed": True})})
    result = converge(ConfigStep(), t)
    assert result.status == CHANGED
    puts = [(line, stdin) for line, stdin in sent(mc) if "host.files put" in line]
    assert [(line.split(" put ")[1], stdin) for line, stdin in puts] == [
        (f"{STACK_FILE} --mode 644", t.settings.host_stack_document()),
        (f"{layouts.VM_API_KEY_FILE} --mode 600", API_KEY + "\n"),
    ]
    assert all(line.startswith("sudo -n ") for line, _ in sent(mc))
    probe = commands(mc)[0]
    assert probe.endswith(f"serving.host.files probe {STACK_FILE} {layouts.VM_API_KEY_FILE}")
