"""Tier 1: the lever list a stack gets, and the table the levers bench prints."""

from __future__ import annotations

from typing import Any

import yaml

from serving.bench import levers as lv
from serving.stack import stackfile


def values(name: str) -> dict[str, Any]:
    document = yaml.safe_load(stackfile.stack_path(name).read_text())
    return {k.split(":", 1)[1]: v for k, v in document["config"].items()}


def test_dev_levers_change_one_thing_each_against_the_baseline() -> None:
    spec = stackfile.from_values({**values("dev"), "maxLoraRank": 64}, stack="x")
    levers = lv.lora_levers(spec, tuned_config_folder="/srv/tuned")
    names = [lever.name for lever in levers]
    assert names[0] == "baseline"
    # Two adapters (ranks 16 and 32) with maxLoras 4 and maxLoraRank 64.
    assert "max-loras 2" in names and "max-lora-rank 32" in names
    assert {"fully-sharded-loras", "specialize-active-lora", "tuned LoRA kernel configs",
            "max-num-batched-tokens 2048", "max-num-batched-tokens 8192"} <= set(names)
    for lever in levers[1:]:
        assert bool(lever.overrides) + bool(lever.extra_args) + bool(lever.env) == 1, lever
    # Every lever renders a stack the spec accepts.
    for lever in levers:
        merged = {**values("dev"), "maxLoraRank": 64, **lever.overrides}
        merged["vllmExtraArgs"] = list(lever.extra_args)
        stackfile.from_values(merged, stack="x")


def test_levers_already_in_place_are_left_out() -> None:
    spec = stackfile.from_values({**values("dev"), "maxLoras": 2}, stack="x")
    names = [lever.name for lever in lv.lora_levers(spec)]
    assert not any(n.startswith(("max-loras", "max-lora-rank")) for n in names)
    assert "tuned LoRA kernel configs" not in names


def test_front_end_levers_turn_runtime_loading_off_for_every_count() -> None:
    levers = lv.front_end_levers((1, 4))
    assert [lever.overrides for lever in levers] == [
        {"apiServerCount": 1, "runtimeLoraUpdating": False},
        {"apiServerCount": 4, "runtimeLoraUpdating": False}]
    for lever in levers:
        stackfile.from_values({**values("dev"), **lever.overrides}, stack="x")


def test_a_lever_that_did_not_start_is_a_row_with_its_error() -> None:
    report = lv.LeverReport("lora", (1,), [lv.Lever("baseline", ""), lv.Lever("x", "")],
                            errors={"x": "SpecError: unrecognized arguments"})
    header, rows = lv.table_rows(report)
    assert [r[0] for r in rows] == ["baseline", "x"]
    assert rows[1][-1].startswith("SpecError") and rows[1][1] == "-"
    assert header[1] == "adapter/base c=1"
