"""Tier 3: the levers bench against real vLLM CPU servers, each lever a server of its own.

- two API servers (``apiServerCount: 2``, rendered through vLLM's ``serve`` launcher) start
  and serve base and adapters; vLLM's counters, aggregated over both API servers, equal what
  the clients received;
- a lever vLLM refuses becomes a row with its error and the run goes on; the table, JSON,
  CSV, markdown and PNG are written, and the planner reads the results file.

Tiny load (2 concurrent, 12 tokens): the figures prove the machinery, not a speed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from local_server import local_copy

from serving.bench import levers as lv
from serving.bench.engine import BenchConfig
from serving.local import lever_server
from serving.plan import measured

pytestmark = pytest.mark.integration

MAX_TOKENS = 12


def test_two_api_servers_start_serve_and_count_together(tmp_path: Path) -> None:
    values, _, layout, key, _ = local_copy(tmp_path, "fe")
    serve = lever_server.spec_server(values, layout, key, stack="fe")
    cfg = BenchConfig(endpoint="", max_tokens=MAX_TOKENS, request_timeout_s=120,
                      max_total_s=600)
    report = lv.run_levers(lv.front_end_levers((2,)), serve, cfg, kind="front-end",
                           concurrencies=(2,), processes=2, per_lane=2,
                           unstreamed_reference=True, say=print)
    assert report.errors == {}
    log = (Path(layout.state_dir) / "vllm.log").read_text(errors="replace")
    assert "Started 2 API server processes" in log
    assert "Traceback" not in log
    streamed, unstreamed = (report.get("api-server-count 2", 2, "all", s) for s in (True, False))
    assert streamed and unstreamed and not streamed.error and not unstreamed.error
    for m in (streamed, unstreamed):
        assert m.result is not None
        assert m.result.engine.generation_tokens == m.result.client.tokens == 8 * MAX_TOKENS
        # Several API servers: vLLM drops the process collector (multiprocess mode).
        assert m.result.engine.api_cpu_s is None
    header, rows = lv.table_rows(report)
    assert rows[0][0] == "api-server-count 2" and "streamed/unstreamed c=2" in header


def test_levers_restart_the_server_and_a_refused_lever_is_a_row(tmp_path: Path) -> None:
    values, _, layout, key, _ = local_copy(tmp_path, "lv")
    serve = lever_server.spec_server(values, layout, key, stack="lv", deadline_s=300)
    cfg = BenchConfig(endpoint="", max_tokens=MAX_TOKENS, request_timeout_s=120,
                      max_total_s=600)
    levers = [lv.Lever("baseline", "as configured"),
              lv.Lever("bogus", "a flag vLLM does not know", extra_args=("--no-such-flag",))]
    report = lv.run_levers(levers, serve, cfg, concurrencies=(1,), processes=1, per_lane=2,
                           say=print)
    assert "bogus" in report.errors and "baseline" not in report.errors
    base = report.get("baseline", 1, "base")
    adapters = report.get("baseline", 1, "adapters")
    assert base and adapters and base.result and adapters.result
    assert base.result.summary.requests == adapters.result.summary.requests == 8
    assert report.ratio("baseline", 1) is not None
    paths = lv.write_outputs(report, tmp_path / "out", "levers")
    assert [p.suffix for p in paths] == [".json", ".csv", ".md", ".png"]
    doc = json.loads(paths[0].read_text())
    assert [r["lever"] for r in doc["rows"]] == ["baseline", "bogus"]
    assert doc["rows"][1]["error"]
    # The planner reads the file: no lever beat the baseline here (one failed to start).
    assert measured.advice([paths[0]]) == []
