"""Tier 1: the planner's recommendations from bench results files (levers, front end, load)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from serving.plan import measured


def lever_doc(rows: list[dict[str, Any]], levers: list[dict[str, Any]]) -> dict[str, Any]:
    return {"kind": "lora", "concurrencies": [1, 5, 256], "rows": rows, "levers": levers}


BASELINE = {"lever": "baseline", "error": "", "adapters_tok_s_c256": 6900.0,
            "base_tok_s_c256": 9000.0, "ratio_c256": 0.77}
LEVERS = [
    {"name": "baseline", "overrides": {}, "extra_args": [], "env": {}},
    {"name": "max-loras 4", "overrides": {"maxLoras": 4, "maxCpuLoras": 8}, "extra_args": [],
     "env": {}},
    {"name": "fully-sharded-loras", "overrides": {}, "extra_args": ["--fully-sharded-loras"],
     "env": {}},
    {"name": "tuned", "overrides": {}, "extra_args": [],
     "env": {"VLLM_TUNED_CONFIG_FOLDER": "/srv/tuned"}},
]


def row(name: str, adapters: float, base: float = 9000.0, error: str = "") -> dict[str, Any]:
    return {"lever": name, "error": error, "adapters_tok_s_c256": adapters,
            "base_tok_s_c256": base, "ratio_c256": adapters / base}


def test_winning_levers_come_best_first_with_their_figures() -> None:
    doc = lever_doc([BASELINE, row("max-loras 4", 7400), row("fully-sharded-loras", 8100),
                     row("tuned", 7000)], LEVERS)
    found = measured.lora_advice(doc, "levers.json")
    assert [(a.setting, a.value) for a in found] == [
        ("vllmExtraArgs", "--fully-sharded-loras"), ("maxLoras, maxCpuLoras", "4, 8")]
    assert "6900 -> 8100 tok/s (+17%) at 256 concurrent" in found[0].reason
    assert "adapter/base 0.77 -> 0.90" in found[0].reason


@pytest.mark.parametrize(("candidate", "why"), [
    (row("fully-sharded-loras", 7100), "gain below the margin"),
    (row("fully-sharded-loras", 8100, base=8000), "the base model lost more than the margin"),
    (row("fully-sharded-loras", 8100, error="HTTP 400"), "the lever failed"),
], ids=["small-gain", "base-loses", "error"])
def test_no_win_without_a_clear_gain(candidate: dict[str, Any], why: str) -> None:
    found = measured.lora_advice(lever_doc([BASELINE, candidate], LEVERS), "x")
    assert all(a.setting == "LoRA levers" and a.value == "keep the baseline" for a in found), why
    if not candidate["error"]:
        [keep] = found
        assert "fully-sharded-loras" in keep.reason and "at 256" in keep.reason


def limited(adapters_by_c: dict[int, tuple[float, str]], name: str) -> dict[str, Any]:
    """A row with a figure and a verdict per concurrency, the base model at 1000 x c."""
    out: dict[str, Any] = {"lever": name, "error": ""}
    for c, (adapters, limit) in adapters_by_c.items():
        out.update({f"adapters_tok_s_c{c}": adapters, f"base_tok_s_c{c}": 1000.0 * c,
                    f"adapters_limit_c{c}": limit, f"base_limit_c{c}": limit})
    return out


def test_a_lever_is_judged_where_the_engine_not_the_front_end_limited_the_figures() -> None:
    """As on the H200: every 256-stream run was front-end-limited and moved by 25% for
    levers that cannot change it; the engine-bound figures at 5 are the ones that count."""
    base = limited({1: (230, "engine"), 5: (1141, "engine"), 256: (6600, "front-end")},
                   "baseline")
    noise = limited({1: (236, "engine"), 5: (1169, "engine"), 256: (8237, "front-end")},
                    "fully-sharded-loras")
    [keep] = measured.lora_advice(lever_doc([base, noise], LEVERS), "x")
    assert (keep.setting, keep.value) == ("LoRA levers", "keep the baseline")
    assert "+2% at 5" in keep.reason and "at 256 the front end limited" in keep.reason
    real = limited({1: (236, "engine"), 5: (1300, "engine"), 256: (8237, "front-end")},
                   "fully-sharded-loras")
    [win] = measured.lora_advice(lever_doc([base, real], LEVERS), "x")
    assert win.value == "--fully-sharded-loras"
    assert "at 5 concurrent" in win.reason and "at 256 the front end" in win.reason
    # The baseline's own front-end verdict also rules a concurrency out: judged at 1.
    base["adapters_limit_c5"] = "front-end"
    [keep] = measured.lora_advice(lever_doc([base, real], LEVERS), "x")
    assert keep.value == "keep the baseline" and "+3% at 1" in keep.reason


def test_where_the_front_end_limited_the_baseline_more_api_servers_say_what_adapters_cost(
        ) -> None:
    """As on the H200: with 4 API servers the engine limited 256, so adapter/base there is
    read from that server (both groups measured on it), not asked for again."""
    base = limited({1: (230, "engine"), 256: (6600, "front-end")}, "baseline")
    servers = limited({1: (234, "engine"), 256: (205_000, "engine")}, "api-server-count 4")
    servers["ratio_c256"] = 205_000 / 256_000
    levers = [*LEVERS, {"name": "api-server-count 4", "extra_args": [], "env": {},
                        "overrides": {"apiServerCount": 4, "runtimeLoraUpdating": False}}]
    doc = {**lever_doc([base, servers], levers), "concurrencies": [1, 256]}
    [keep] = measured.lora_advice(doc, "x")
    assert keep.value == "keep the baseline" and "+2% at 1" in keep.reason
    assert ("with api-server-count 4 the engine limited 256 and adapters ran at 0.80x base "
            "(205000 against 256000 tok/s)") in keep.reason
    assert "measure again" not in keep.reason
    # Front-end-limited there too: nothing is read from it.
    servers["adapters_limit_c256"] = "front-end"
    [keep] = measured.lora_advice(doc, "x")
    assert "raise apiServerCount first and measure again" in keep.reason


def test_front_end_recommends_the_smallest_count_that_pays() -> None:
    doc = {"kind": "front-end", "concurrencies": [256],
           "levers": [{"name": f"api-server-count {c}",
                       "overrides": {"apiServerCount": c, "runtimeLoraUpdating": False}}
                      for c in (1, 2, 4, 8)],
           # Merged from two runs: counts out of order.
           "rows": [{"lever": "api-server-count 1", "all_tok_s_c256": 6000.0},
                    {"lever": "api-server-count 8", "all_tok_s_c256": 12500.0},
                    {"lever": "api-server-count 2", "all_tok_s_c256": 6100.0},
                    {"lever": "api-server-count 4", "all_tok_s_c256": 12000.0,
                     "all_tok_s_c256_unstreamed": 15000.0}]}
    [advice] = measured.front_end_advice(doc, "front-end.json")
    assert (advice.setting, advice.value) == ("apiServerCount", "4")
    assert "2.00x" in advice.reason and "runtimeLoraUpdating false" in advice.reason


def test_a_front_end_verdict_in_a_bench_run_recommends_more_api_servers(tmp_path: Path) -> None:
    doc = {"load": [{"label": "load c=256", "stream": True, "limit": "front-end",
                     "reasons": ["vLLM's API server used 0.98 cores"]}]}
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(doc))
    [advice] = measured.advice([path])
    assert advice.setting == "apiServerCount" and "0.98 cores" in advice.reason
    doc["load"][0]["limit"] = "engine"
    path.write_text(json.dumps(doc))
    assert measured.advice([path]) == []


def test_an_unknown_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_text("{}")
    with pytest.raises(ValueError, match="not a bench results file"):
        measured.advice([path])


def engine_row(name: str, figures: dict[int, tuple[float, float]]) -> dict[str, Any]:
    """A row where the engine limited every figure: c -> (base, adapters) tok/s."""
    out: dict[str, Any] = {"lever": name, "error": ""}
    for c, (base, adapters) in figures.items():
        out.update({f"base_tok_s_c{c}": base, f"adapters_tok_s_c{c}": adapters,
                    f"base_limit_c{c}": "engine", f"adapters_limit_c{c}": "engine",
                    f"ratio_c{c}": adapters / base})
    return out


SMALL = {"name": "small", "overrides": {}, "extra_args": [],
         "env": {"VLLM_TUNED_CONFIG_FOLDER": "/srv/small"}}


def two_c(rows: list[dict[str, Any]], common: dict[str, Any] | None = None
          ) -> dict[str, Any]:
    return {"kind": "lora", "concurrencies": [1, 256], "common": common, "rows": rows,
            "levers": [*LEVERS, SMALL,
                       {"name": "baseline (again)", "overrides": {}, "extra_args": [],
                        "env": {}}]}


def test_a_single_stream_win_that_costs_nothing_at_256_is_recommended() -> None:
    base = engine_row("baseline", {1: (360, 230), 256: (22000, 19500)})
    small = engine_row("small", {1: (350, 262), 256: (21800, 19900)})
    [win] = measured.lora_advice(two_c([base, small]), "x")
    assert (win.setting, win.value) == ("VLLM_TUNED_CONFIG_FOLDER", "/srv/small")
    assert "+14%) at 1 concurrent" in win.reason and "at 256 adapters +2%" in win.reason
    # The same single-stream gain, but 256 streams lose more than the margin: kept out.
    costly = engine_row("small", {1: (350, 262), 256: (21800, 17000)})
    [keep] = measured.lora_advice(two_c([base, costly]), "x")
    assert keep.value == "keep the baseline" and "small -13% at 256, +14% at 1" in keep.reason


def test_the_spread_between_baseline_servers_is_the_margin_to_beat() -> None:
    """As on the H200: servers of the same settings differed by 20% at 256, so a lever
    10% above one baseline is no win; the same lever against baselines that agree is."""
    small = engine_row("small", {1: (340, 235), 256: (22000, 21500)})
    agree = [engine_row("baseline", {1: (360, 234), 256: (22000, 19400)}),
             engine_row("baseline (again)", {1: (362, 236), 256: (23000, 19600)})]
    [win] = measured.lora_advice(two_c([*agree, small]), "x")
    assert win.value == "/srv/small" and "19500 -> 21500 tok/s (+10%) at 256" in win.reason
    assert "servers differed by 1% (adapters)" in win.reason
    spread = [agree[0], engine_row("baseline (again)", {1: (362, 236), 256: (26000, 23500)})]
    [keep] = measured.lora_advice(two_c([*spread, small]), "x")
    assert keep.value == "keep the baseline" and "spread 1% at 1, 19% at 256" in keep.reason


def test_baselines_of_every_file_with_the_same_settings_are_pooled(tmp_path: Path) -> None:
    four = {"name": "api-server-count 4", "overrides": {"apiServerCount": 4}}
    small = engine_row("small", {1: (340, 235), 256: (22000, 21500)})
    paths = []
    for i, doc in enumerate((
            two_c([engine_row("baseline", {1: (360, 234), 256: (22000, 19400)}), small],
                  four),
            two_c([engine_row("baseline", {1: (360, 234), 256: (25000, 23600)})], four),
            # Other shared settings: not a sample of the same servers.
            two_c([engine_row("baseline", {1: (360, 234), 256: (22000, 12000)})]))):
        paths.append(tmp_path / f"{i}.json")
        paths[-1].write_text(json.dumps(doc))
    [keep, *_] = measured.advice(paths)
    assert keep.value == "keep the baseline" and "20% at 256" in keep.reason
    [win] = measured.advice(paths[:1])
    assert win.value == "/srv/small"
