"""Tier 1: the decisions of `fab deploy` without a host (teardown task).

Steps are probed through a real ``provisioning.remote.Host`` around invoke's ``MockContext``
(``provisioning_helpers``): the tests see exactly what would go over SSH."""

from __future__ import annotations

from pathlib import Path

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
TIMER = metrics_unit.TOKEN_TIMER_NAME


@pytest.mark.parametrize(("state", "want"), [
    pytest.param({PROXY: ["active", "enabled"], UNIT: ["active", "enabled"],
                  AGENT: ["active", "enabled"], TIMER: ["active", "enabled"]},
                 [f"drain and stop {PROXY}", f"disable {PROXY}", f"drain and stop {UNIT}",
                  f"disable {UNIT}", f"drain and stop {AGENT}", f"disable {AGENT}",
                  f"drain and stop {TIMER}", f"disable {TIMER}"],
                 id="running"),
    pytest.param({PROXY: ["inactive", "disabled"], UNIT: ["inactive", "enabled"],
                  AGENT: ["inactive", "disabled"], TIMER: ["inactive", "disabled"]},
                 [f"disable {UNIT}"], id="stopped"),
    pytest.param({PROXY: ["inactive", "disabled"], UNIT: ["inactive", "disabled"],
                  AGENT: ["", ""], TIMER: ["", ""]}, [], id="already-down"),
])
def test_stop_plan(state: dict[str, list[str]], want: list[str]) -> None:
    # The proxy goes first: no new client arrives while vLLM drains.
    assert StopStep().plan(target()[0], state) == want


def test_purge_plan_removes_found_paths_and_the_user() -> None:
    actions = PurgeStep().plan(target()[0], ["/etc/exaone", "user"])
    assert actions == ["remove /etc/exaone", f"remove the user {layouts.SERVICE_USER}"]


def test_purge_removes_the_metrics_token_and_its_refresher() -> None:
    """The token refresher's unit, timer, script and token folder (a DynamicUser= state
    folder: the link and systemd's private copy) go with --purge."""
    from provisioning.tasks.teardown import PURGE_PATHS

    for path in (metrics_unit.TOKEN_UNIT_FILE, metrics_unit.TOKEN_TIMER_FILE,
                 metrics_unit.TOKEN_SCRIPT, str(Path(metrics_unit.TOKEN_FILE).parent),
                 f"/var/lib/private/{metrics_unit.TOKEN_DIRECTORY}"):
        assert path in PURGE_PATHS, path
