"""Tier 1: the lever list a stack gets, and the table the levers bench prints."""

from __future__ import annotations

import contextlib
import functools
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
import yaml

from serving.bench import levers as lv
from serving.bench.engine import BenchConfig
from serving.bench.load import LoadResult
from serving.local import lever_server, run
from serving.stack import layout as layouts
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


def test_several_tuned_folders_are_a_lever_each() -> None:
    spec = stackfile.from_values(values("dev"), stack="x")
    levers = lv.lora_levers(spec, tuned_config_folder="/srv/full",
                            tuned_config_folders={"up to 64": "/srv/small"})
    tuned = {lever.name: lever.env for lever in levers if lever.env}
    assert tuned == {
        "tuned LoRA kernel configs": {"VLLM_TUNED_CONFIG_FOLDER": "/srv/full"},
        "tuned LoRA kernel configs (up to 64)": {"VLLM_TUNED_CONFIG_FOLDER": "/srv/small"}}


def test_a_concurrency_measured_twice_reports_the_last_pass(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """256 listed twice (the second pass after kernels compiled at first use): one column,
    the second figure in it, both passes in the JSON."""
    calls: list[int] = []

    @contextlib.contextmanager
    def serve(lever: lv.Lever) -> Iterator[lv.Target]:
        yield lv.Target("http://x", "k", "base", ("a",), 1.0)

    def measure(cfg: BenchConfig, lever: str, group: str, models: tuple[str, ...], c: int,
                *rest: object) -> lv.Measurement:
        calls.append(c)
        result = SimpleNamespace(client=SimpleNamespace(tok_s=100.0 * len(calls)))
        return lv.Measurement(lever, c, group, True, cast(LoadResult, result))

    monkeypatch.setattr(lv, "_measure", measure)
    monkeypatch.setattr(lv, "warm_up", lambda *a, **k: None)
    report = lv.run_levers([lv.Lever("baseline", "")], serve, BenchConfig(endpoint=""),
                           concurrencies=(1, 256, 256), say=lambda _: None)
    assert calls == [1, 256, 256, 1, 256, 256]
    assert report.concurrencies == (1, 256)
    base, adapters = report.get("baseline", 256, "base"), report.get("baseline", 256, "adapters")
    assert base is not None and adapters is not None
    assert (base.tok_s, adapters.tok_s) == (300.0, 600.0)
    assert len(report.measurements) == 6


def _doc(levers: list[str], common: dict | None = None) -> dict:
    return {"kind": "lora", "concurrencies": [1], "common": common,
            "levers": [{"name": n, "overrides": {}, "env": {}, "extra_args": []}
                       for n in levers],
            "rows": [{"lever": n, "error": "", "adapters_tok_s_c1": 1.0} for n in levers],
            "measurements": [{"lever": n, "concurrency": 1} for n in levers]}


def test_merged_runs_keep_each_server_apart() -> None:
    """Each run's own baseline stays a row of its own: the planner reads the repeats as the
    noise between servers."""
    merged = lv.merge_docs([_doc(["x", "baseline"]), _doc(["baseline"]), _doc(["baseline"])])
    names = ["x", "baseline", "baseline (again)", "baseline (again 3)"]
    assert [lever["name"] for lever in merged["levers"]] == names
    assert [row["lever"] for row in merged["rows"]] == names
    assert [m["lever"] for m in merged["measurements"]] == names


def test_runs_on_different_shared_settings_are_not_merged() -> None:
    with pytest.raises(ValueError, match="shared different settings"):
        lv.merge_docs([_doc(["baseline"]), _doc(["baseline"], {"name": "api-server-count 4"})])


def _running(pid: int) -> bool:
    """Alive and not a zombie (``stop`` may have reaped it already: Popen.poll then cannot
    tell)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_server_left_running_is_stopped_before_a_lever_starts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An interrupted run's server, still answering on the port, must not be measured as the
    next lever: it was started with other settings."""
    layout = layouts.local(tmp_path)
    Path(layout.state_dir).mkdir(parents=True)
    leftover = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", run.ENTRYPOINT_MARKS[0]],
        start_new_session=True)
    try:
        (Path(layout.state_dir) / "vllm.pid").write_text(f"{leftover.pid}\n")
        seen: list[bool] = []
        monkeypatch.setattr(run, "start", lambda *a, **k: seen.append(_running(leftover.pid))
                            or 1)
        monkeypatch.setattr(run, "stop", functools.partial(run.stop, deadline_s=5))
        serve = lever_server.spec_server(values("local"), layout, "key", stack="local")
        with serve(lv.Lever("baseline", "")):
            pass
        assert seen == [False], "the leftover server still ran at the start"
    finally:
        leftover.kill()
        leftover.wait()
