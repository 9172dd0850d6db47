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
    assert measured.lora_advice(lever_doc([BASELINE, candidate], LEVERS), "x") == [], why


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
