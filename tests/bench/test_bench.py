"""Tier 3: the planner and the benchmark against a real vLLM CPU server started by this module.

The server runs the local stack's flags on a free port with its state in a temp folder; its
max-model-len is 448 (not a multiple of the CPU block size, 128) so the planner's rounding is
checked against vLLM's own start-up line. Request counts are small: the machine has 2 cores
and other tests may run a server at the same time.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from local_server import Served, serve_local_copy

from serving.bench import cli as bench_cli
from serving.bench import engine as bench
from serving.plan import capacity
from serving.plan import cli as plan_cli

pytestmark = pytest.mark.integration

MAX_MODEL_LEN = 448
MAX_TOKENS = 12
# vllm/v1/core/kv_cache_utils.py, update_kv_cache_capacity (the device is "CPU" here).
KV_LINE_RE = re.compile(
    r"(GPU|CPU) KV cache size: ([\d,]+) tokens, "
    r"Maximum concurrency for ([\d,]+) tokens per request: ([\d.]+)x"
)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    # A max-model-len that is not a multiple of the block size exercises vLLM's rounding.
    with serve_local_copy(tmp_path_factory.mktemp("bench-root"), "bench",
                          maxModelLen=MAX_MODEL_LEN) as served:
        yield served


def test_planned_kv_tokens_equal_what_vllm_reports(served: Served) -> None:
    match = KV_LINE_RE.search(served.server.log_file.read_text(errors="replace"))
    assert match, f"no KV cache size line in {served.server.log_file}"
    device, tokens, length, concurrency = match.groups()
    p = plan_cli.plan_input(served.spec, root=served.root)
    assert p is not None and p.hardware.device == "cpu"
    assert p.dims.vocab_size == 512  # read from the model folder vLLM serves
    planned = capacity.plan(p)
    assert device == "CPU" and int(length.replace(",", "")) == MAX_MODEL_LEN
    assert planned.kv.tokens == int(tokens.replace(",", ""))
    assert f"{planned.kv.max_concurrency:.2f}" == concurrency
    assert planned.fits and plan_cli.fit_problems(served.spec, root=served.root) == []


def test_benchmark_all_modes_on_the_cpu_server(served: Served, tmp_path: Path) -> None:
    cfg = bench.BenchConfig(
        endpoint=served.server.endpoint, api_key=served.key, max_tokens=MAX_TOKENS,
        requests_per_model=1, concurrency=3, rates=(0.5, 1.0), requests_per_rate=3,
        rate_duration_s=10, mix={"exaone-tiny": 2, "tone-formal": 1, "tone-casual": 1},
        mix_requests=4, mix_rate=1.0, p95_bound_s=60.0, max_total_s=240,
        request_timeout_s=60,
    )
    report = bench.run(cfg)
    assert report.models == ("exaone-tiny", "tone-formal", "tone-casual")
    phases = {r.phase for r in report.results}
    assert phases == set(bench.DEFAULT_MODES)
    assert not report.stopped_early and report.breach_rate is None

    # No errors at this load, and every count agrees: usage = the stream's own tokens =
    # max_tokens (ignore_eos makes every answer full length).
    assert [r.error for r in report.results if not r.ok] == []
    for r in report.results:
        assert r.completion_tokens == r.streamed_tokens == MAX_TOKENS, r
        assert 1 <= r.chunks <= r.completion_tokens
        assert r.prompt_tokens > 0
        assert 0 < r.ttft_s <= r.e2e_s
        assert r.itl_s is not None and 0 < r.itl_s < r.e2e_s
    for s in report.summaries:
        for metric in bench.METRICS:
            assert s.p(metric, 50) <= s.p(metric, 95) <= s.p(metric, 99), (s, metric)
    by_phase = {
        phase: sum(r.completion_tokens for r in report.results if r.phase == phase)
        for phase in bench.DEFAULT_MODES
    }
    totals = {s.phase: s.output_tokens for s in report.summaries
              if s.group == "all" or s.phase == "sweep"}
    assert totals["concurrent"] == by_phase["concurrent"]
    assert totals["mixed"] == by_phase["mixed"]
    assert sum(p.summary.output_tokens for p in report.sweep) == by_phase["sweep"]

    written = bench.write_outputs(report, tmp_path)
    assert {p.name for p in written} == {"bench.json", "requests.csv", "summary.csv",
                                         "sweep.png"}
    data = json.loads((tmp_path / "bench.json").read_text())
    assert len(data["requests"]) == len(report.results)
    assert served.key not in (tmp_path / "bench.json").read_text()
    with (tmp_path / "requests.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert sum(int(row["completion_tokens"]) for row in rows) == sum(by_phase.values())
    png = (tmp_path / "sweep.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_bench_command_against_the_server(served: Served, tmp_path: Path, capsys) -> None:
    parser = argparse.ArgumentParser()
    bench_cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args([
        "bench", "--endpoint", served.server.endpoint, "--api-key-file", str(served.key_file),
        "--mode", "sequential", "--models", "tone-casual", "--requests", "2",
        "--max-tokens", "4", "--out", str(tmp_path), "--fail-on-error",
    ])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "tone-casual" in printed and "bench.json" in printed
    data = json.loads((tmp_path / "bench.json").read_text())
    assert [r["completion_tokens"] for r in data["requests"]] == [4, 4]


def test_fabric_task_engine_benchmarks_a_host(served: Served, tmp_path: Path) -> None:
    from provisioning.tasks.bench import bench_host

    report, files = bench_host(
        "127.0.0.1", served.spec, served.key, out=tmp_path, modes=["sequential"],
        config={"requests_per_model": 1, "max_tokens": 4, "max_total_s": 60},
    )
    assert all(r.ok and r.completion_tokens == 4 for r in report.results)
    assert len(report.results) == 3  # base and both adapters
    assert files[0] == tmp_path / served.spec.stack / "127.0.0.1" / "bench.json"


def test_load_mode_engine_counters_match_what_the_clients_received(served: Served,
                                                                   tmp_path: Path) -> None:
    """Several client processes, vLLM's /metrics over the same interval: the engine's
    generated and prompt tokens and finished requests equal the clients' own counts."""
    requests = 8
    cfg = bench.BenchConfig(
        endpoint=served.server.endpoint, api_key=served.key, max_tokens=MAX_TOKENS,
        concurrency=4, processes=2, load_requests=requests, nostream_reference=True,
        request_timeout_s=60, max_total_s=240,
    )
    report = bench.run(cfg, ["load"])
    streamed, unstreamed = report.loads
    assert streamed.spec.stream and not unstreamed.spec.stream
    for load in report.loads:
        mine = [r for r in report.results if r.phase == load.spec.label]
        assert len(mine) == requests and [r.error for r in mine if not r.ok] == []
        assert {r.model for r in mine} == set(report.models)
        assert load.engine.generation_tokens == sum(r.completion_tokens for r in mine) \
            == requests * MAX_TOKENS
        assert load.engine.prompt_tokens == sum(r.prompt_tokens for r in mine)
        assert load.engine.requests_finished == requests
        assert load.engine.api_cpu_s is not None and load.engine.api_cpu_s > 0
        # A request's time in vLLM's scheduler is part of its time at the client.
        held = load.verdict.signals["engine_held_share"]
        assert held is not None and 0 < held <= 1.0
        assert len(load.client.cpu_shares) == 2
        assert load.verdict.limit in ("engine", "front-end", "client", "unknown")
        assert load.verdict.reasons
    assert all(r.ttft_s is None for r in report.results if r.phase == unstreamed.spec.label)

    written = bench.write_outputs(report, tmp_path)
    assert {p.name for p in written} >= {"bench.json", "load.csv", "load.png"}
    with (tmp_path / "load.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["label"] for r in rows] == [streamed.spec.label, unstreamed.spec.label]
    doc = json.loads((tmp_path / "bench.json").read_text())
    assert [d["limit"] for d in doc["load"]] == [streamed.verdict.limit,
                                                unstreamed.verdict.limit]
