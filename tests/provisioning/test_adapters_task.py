"""Tier 1: the decisions of `fab deploy` without a host (adapters task).

Steps are probed through a real ``provisioning.remote.Host`` around invoke's ``MockContext``
(``provisioning_helpers``): the tests see exactly what would go over SSH."""

from __future__ import annotations

import pytest

# --- fab adapters.add / hotfix arguments ----------------------------------------------------------

@pytest.mark.parametrize(("args", "names"), [
    pytest.param(("tone", "1", "", ""), "", id="ok-without-source"),
    pytest.param(("tone", "1", "blob://adapters/tone/1", "ab" * 32), "", id="ok-with-source"),
    pytest.param(("Tone!", "1", "", ""), "NAME", id="bad-name"),
    pytest.param(("tone", "1 2", "", ""), "VERSION", id="bad-version"),
    pytest.param(("tone", "1", "blob://adapters/tone/1", ""), "--sha256", id="source-alone"),
    pytest.param(("tone", "1", "/tmp/tone", "ab" * 32), "--source", id="not-blob"),
    pytest.param(("tone", "1", "blob://adapters/tone/1", "XYZ"), "--sha256", id="bad-digest"),
])
def test_adapter_task_arguments_are_checked_before_any_host(args: tuple[str, ...],
                                                             names: str) -> None:
    from provisioning.tasks.adapters import check_version_args

    problem = check_version_args(*args)
    assert bool(problem) == bool(names) and names in problem
