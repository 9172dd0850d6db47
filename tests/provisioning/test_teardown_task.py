"""Tier 1: the decisions of `fab deploy` without a host (teardown task).

Steps are probed through a real ``provisioning.remote.Host`` around invoke's ``MockContext``
(``provisioning_helpers``): the tests see exactly what would go over SSH."""

from __future__ import annotations

import pytest
from provisioning_helpers import (
    UNIT,
    target,
)

from provisioning.tasks.teardown import PurgeStep, StopStep
from serving.render import metrics_unit, proxy_unit
from serving.stack import layout as layouts

# --- teardown -----------------------------------------------------------------------------------


PROXY = proxy_unit.UNIT_NAME
AGENT = metrics_unit.UNIT_NAME


@pytest.mark.parametrize(("state", "want"), [
    pytest.param({PROXY: ["active", "enabled"], UNIT: ["active", "enabled"],
                  AGENT: ["active", "enabled"]},
                 [f"drain and stop {PROXY}", f"disable {PROXY}", f"drain and stop {UNIT}",
                  f"disable {UNIT}", f"drain and stop {AGENT}", f"disable {AGENT}"],
                 id="running"),
    pytest.param({PROXY: ["inactive", "disabled"], UNIT: ["inactive", "enabled"],
                  AGENT: ["inactive", "disabled"]},
                 [f"disable {UNIT}"], id="stopped"),
    pytest.param({PROXY: ["inactive", "disabled"], UNIT: ["inactive", "disabled"],
                  AGENT: ["", ""]}, [], id="already-down"),
])
def test_stop_plan(state: dict[str, list[str]], want: list[str]) -> None:
    # The proxy goes first: no new client arrives while vLLM drains.
    assert StopStep().plan(target()[0], state) == want


def test_purge_plan_removes_found_paths_and_the_user() -> None:
    actions = PurgeStep().plan(target()[0], ["/etc/exaone", "user"])
    assert actions == ["remove /etc/exaone", f"remove the user {layouts.SERVICE_USER}"]
