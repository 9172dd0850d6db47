"""Tier 1: the decisions of `fab deploy` without a host (patch step).

Steps are probed through a real ``provisioning.remote.Host`` around invoke's ``MockContext``
(``provisioning_helpers``): the tests see exactly what would go over SSH."""

from __future__ import annotations

from typing import Any

import pytest
from provisioning_helpers import (
    MODEL_PATH,
    as_json,
    commands,
    rx,
    target,
)

from provisioning.steps.converge import (
    Skip,
    StepError,
)
from provisioning.steps.patch import PatchStep

# --- patch --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("state", "want"), [
    pytest.param({"state": "not needed", "transformers": "5.19.0"},
                 Skip("the remote code imports under transformers 5.19.0 as it is"),
                 id="not-needed"),
    pytest.param({"state": "applied"}, [], id="applied"),
    pytest.param({"state": "needed", "files": {
        "modeling_exaone.py": {"fixed": [["transformers.a.X", "transformers.b.X"],
                                         ["old_fn", "new_fn"]]},
        "configuration_exaone.py": {"fixed": []}}},
        ["patch the remote code (needed): transformers.a.X -> transformers.b.X; "
         "old_fn -> new_fn"], id="needed-with-fixes"),
    pytest.param({"state": "outdated", "files": {}},
                 ["patch the remote code (outdated): imports"], id="needed-no-fix-list"),
])
def test_patch_plan(state: dict[str, Any], want: Any) -> None:
    t, _, _ = target()
    assert PatchStep().plan(t, state) == want


def test_patch_probe_checks_the_model_dir_and_maps_tool_errors() -> None:
    t, mc, _ = target({rx("serving.host.exaone_patch"): as_json({"state": "applied"})})
    assert PatchStep().probe(t) == {"state": "applied"}
    assert commands(mc)[0].endswith(f"-m serving.host.exaone_patch {MODEL_PATH} --json --check")
    t, _, _ = target({rx("serving.host.exaone_patch"): as_json({"error": "no config.json"}, 2)})
    with pytest.raises(StepError, match=r"(?s)patch-exaone: .*no config.json"):
        PatchStep().probe(t)
