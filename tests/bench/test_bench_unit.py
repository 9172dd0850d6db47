"""Tier 1: the benchmark's logic: percentiles, arrival schedules, the adapter mix, SSE parsing
and timing of one stream (httpx.MockTransport stands in for the server here; the integration
tier runs the same code against a real vLLM)."""

from __future__ import annotations

import asyncio
import csv
import json
import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from serving.bench import engine as bench
from serving.bench.engine import BenchConfig, RequestResult

BASE, ADAPTERS = "exaone-tiny", ("tone-formal", "tone-casual")


# --- statistics and schedules --------------------------------------------------------------


@pytest.mark.parametrize("q", [0, 1, 25, 50, 90, 95, 99, 100])
def test_percentile_matches_numpy_linear(q: float) -> None:
    rng = random.Random(7)
    values = [rng.lognormvariate(0, 1) for _ in range(137)]
    assert bench.percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_edge_cases() -> None:
    assert bench.percentile([], 50) is None
    assert bench.percentile([3.0], 99) == 3.0
    assert bench.percentile([1.0, 2.0], 50) == 1.5
    with pytest.raises(ValueError):
        bench.percentile([1.0], 101)


def test_uniform_arrivals_are_evenly_spaced_from_zero() -> None:
    offsets = bench.arrival_offsets(4.0, count=5, duration_s=60, poisson=False,
                                    rng=random.Random(0))
    assert offsets == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])


def test_arrivals_stop_at_count_or_duration() -> None:
    rng = random.Random(0)
    assert len(bench.arrival_offsets(1.0, count=100, duration_s=3.5, poisson=False,
                                     rng=rng)) == 4
    assert len(bench.arrival_offsets(100.0, count=7, duration_s=60, poisson=True, rng=rng)) == 7
    assert bench.arrival_offsets(0.1, count=5, duration_s=1.0, poisson=False, rng=rng) == [0.0]


def test_poisson_arrivals_have_the_offered_rate_and_are_reproducible() -> None:
    def draw() -> list[float]:
        return bench.arrival_offsets(2.0, count=4000, duration_s=1e9, poisson=True,
                                     rng=random.Random(42))

    offsets = draw()
    assert offsets == draw()
    assert offsets == sorted(offsets)
    gaps = np.diff([0.0, *offsets])
    assert float(np.mean(gaps)) == pytest.approx(0.5, rel=0.05)
    assert float(np.std(gaps)) == pytest.approx(0.5, rel=0.08)  # exponential: sd = mean


def test_rate_must_be_positive() -> None:
    with pytest.raises(ValueError):
        bench.arrival_offsets(0, count=1, duration_s=1, poisson=False, rng=random.Random())


def test_mix_draws_follow_weights_and_skip_zero() -> None:
    mix = {BASE: 0.5, ADAPTERS[0]: 0.3, ADAPTERS[1]: 0.2, "off": 0.0}
    counts = Counter(bench.pick_models(mix, 20_000, random.Random(1)))
    assert "off" not in counts
    for name, weight in mix.items():
        assert counts[name] / 20_000 == pytest.approx(weight, abs=0.015)


@pytest.mark.parametrize(("text", "expected"), [
    ("a=1,b=3", {"a": 1.0, "b": 3.0}),
    (" a=0.5 , b=0.5 ,", {"a": 0.5, "b": 0.5}),
], ids=["plain", "spaces"])
def test_parse_mix(text: str, expected: dict[str, float]) -> None:
    assert bench.parse_mix(text) == expected


@pytest.mark.parametrize("text", ["", "a", "a=-1", "=1", "a=nan"],
                         ids=["empty", "no-weight", "negative", "no-name", "nan"])
def test_parse_mix_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        bench.parse_mix(text)


def test_summary_percentiles_are_ordered_and_errors_counted() -> None:
    rng = random.Random(3)
    results = [
        RequestResult(BASE, "x", None, i * 0.1, True, ttft_s=rng.random(), itl_s=rng.random(),
                      e2e_s=1 + rng.random(), completion_tokens=10)
        for i in range(50)
    ] + [RequestResult(BASE, "x", None, 5.0, False, error="boom", e2e_s=0.1)]
    s = bench.summarize(results, group="g", phase="x")
    assert (s.requests, s.errors, s.output_tokens) == (51, 1, 500)
    for metric in bench.METRICS:
        assert s.p(metric, 50) <= s.p(metric, 95) <= s.p(metric, 99)
    assert s.throughput_tok_s == pytest.approx(500 / s.wall_s)


@pytest.mark.parametrize(("p95", "errors", "breached"), [
    (0.9, 0, False), (1.1, 0, True), (0.5, 1, True),
], ids=["under", "over", "errors"])
def test_sweep_breach_rule(p95: float, errors: int, breached: bool) -> None:
    ok = [RequestResult(BASE, "sweep", 1.0, 0, True, e2e_s=p95) for _ in range(3)]
    bad = [RequestResult(BASE, "sweep", 1.0, 0, False, error="x") for _ in range(errors)]
    s = bench.summarize(ok + bad, group="rate=1", phase="sweep", rate=1.0)
    assert bench.sweep_breached(s, "e2e", 1.0) is breached


# --- SSE and one stream --------------------------------------------------------------------


def test_parse_sse_line() -> None:
    assert bench.parse_sse_line('data: {"a": 1}') == {"a": 1}
    assert bench.parse_sse_line("data: [DONE]") == "[DONE]"
    assert bench.parse_sse_line(": keep-alive") is None
    assert bench.parse_sse_line("") is None
    with pytest.raises(ValueError):
        bench.parse_sse_line("data: {not json")


def sse(*events: Any, done: bool = True) -> bytes:
    lines = [f"data: {json.dumps(e)}\n\n" for e in events]
    if done:
        lines.append("data: [DONE]\n\n")
    return "".join(lines).encode()


def chunk(text: str, tokens: list[str] | None = None) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "text": text}
    if tokens is not None:
        choice["logprobs"] = {"tokens": tokens, "token_logprobs": [-0.1] * len(tokens)}
    return {"choices": [choice]}


def usage(completion: int, prompt: int = 9) -> dict[str, Any]:
    return {"choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                                     "total_tokens": prompt + completion}}


def fake_clock(*values: float):
    it: Iterator[float] = iter(values)
    return lambda: next(it)


def one(body: bytes, *, status: int = 200, cfg: BenchConfig | None = None, clock=None,
        seen: list[httpx.Request] | None = None) -> RequestResult:
    def handler(request: httpx.Request) -> httpx.Response:
        if seen is not None:
            seen.append(request)
        return httpx.Response(status, content=body,
                              headers={"content-type": "text/event-stream"})

    cfg = cfg or BenchConfig(endpoint="http://server", api_key="k")

    async def go() -> RequestResult:
        async with httpx.AsyncClient(base_url="http://server",
                                     transport=httpx.MockTransport(handler)) as client:
            kwargs = {"clock": clock} if clock else {}
            return await bench.stream_one(client, cfg, BASE, phase="t", rate=None,
                                          run_start=0.0, **kwargs)

    return asyncio.run(go())


def test_stream_tokens_come_from_usage_not_chunks() -> None:
    """3 chunks, the second carrying 2 tokens: usage says 4, the stream's logprobs agree."""
    body = sse(chunk("He", ["He"]), chunk("llo!", ["llo", "!"]), chunk(" Bye", [" Bye"]),
               usage(4))
    # clock: start, 3 chunks, the usage event, end
    result = one(body, clock=fake_clock(0.0, 0.1, 0.3, 0.5, 0.55, 0.6))
    assert result.ok, result.error
    assert (result.chunks, result.completion_tokens, result.streamed_tokens) == (3, 4, 4)
    assert result.prompt_tokens == 9
    assert result.ttft_s == pytest.approx(0.1)
    assert result.itl_s == pytest.approx((0.5 - 0.1) / 3)
    assert result.e2e_s == pytest.approx(0.6)
    assert result.tokens_per_s == pytest.approx(4 / 0.6)


def test_request_asks_for_usage_fixed_length_and_token_counts() -> None:
    seen: list[httpx.Request] = []
    one(sse(chunk("a", ["a"]), usage(1)), seen=seen)
    body = json.loads(seen[0].content)
    assert seen[0].url.path == "/v1/completions"
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["ignore_eos"] is True and body["logprobs"] == 0 and body["model"] == BASE
    path, chat = bench.request_body(BenchConfig(endpoint="x", api="chat"), BASE)
    assert path == "/v1/chat/completions" and chat["logprobs"] is True
    assert chat["messages"][0]["role"] == "user"


def test_chat_stream_is_parsed() -> None:
    cfg = BenchConfig(endpoint="http://server", api="chat")
    events = [
        {"choices": [{"delta": {"role": "assistant"}}]},  # no content: not a token
        {"choices": [{"delta": {"content": "Hi"}, "logprobs": {"content": [{"token": "Hi"}]}}]},
        {"choices": [{"delta": {"content": "!"}, "logprobs": {"content": [{"token": "!"}]}}]},
        usage(2),
    ]
    result = one(sse(*events), cfg=cfg)
    assert result.ok and (result.chunks, result.completion_tokens, result.streamed_tokens) == (
        2, 2, 2)


@pytest.mark.parametrize(("body", "status", "error"), [
    (b'{"error": {"message": "The model `x` does not exist."}}', 404, "HTTP 404"),
    (sse({"error": {"message": "engine dead"}}), 200, "in stream: engine dead"),
    (sse(chunk("a", ["a"])), 200, "no usage"),
    (sse(chunk("a", ["a"]), usage(1), done=False), 200, "without [DONE]"),
    (b"data: {broken\n\n", 200, "JSONDecodeError"),
], ids=["http-404", "stream-error", "no-usage", "no-done", "bad-json"])
def test_failures_become_error_results(body: bytes, status: int, error: str) -> None:
    result = one(body, status=status)
    assert not result.ok and error in result.error
    assert result.tokens_per_s is None


def test_unreachable_server_is_an_error_result() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    async def go() -> RequestResult:
        async with httpx.AsyncClient(base_url="http://server",
                                     transport=httpx.MockTransport(handler)) as client:
            return await bench.stream_one(client, BenchConfig(endpoint="http://server"), BASE,
                                          phase="t", rate=None, run_start=0.0)

    result = asyncio.run(go())
    assert not result.ok and "ConnectError" in result.error


# --- whole runs against a mock server --------------------------------------------------------


def mock_server(delay_s: float = 0.0, tokens: int = 3) -> httpx.MockTransport:
    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            data = [{"id": BASE, "parent": None}] + [
                {"id": a, "parent": BASE} for a in ADAPTERS]
            return httpx.Response(200, json={"object": "list", "data": data})
        if request.headers.get("authorization") != "Bearer k":
            return httpx.Response(401, json={"error": "Unauthorized"})
        await asyncio.sleep(delay_s)
        return httpx.Response(200, content=sse(*(chunk("t", ["t"]) for _ in range(tokens)),
                                               usage(tokens)))

    return httpx.MockTransport(handler)


def small(**kw: Any) -> BenchConfig:
    base: dict[str, Any] = {
        "endpoint": "http://server", "api_key": "k", "requests_per_model": 2,
        "concurrency": 3, "rates": (20.0, 40.0), "requests_per_rate": 4, "mix_requests": 6,
        "mix_rate": 50.0, "p95_bound_s": 5.0, "max_total_s": 30,
    }
    return BenchConfig(**{**base, **kw})


def test_all_modes_discover_models_and_summarize(tmp_path: Path) -> None:
    report = bench.run(small(mix={BASE: 1, ADAPTERS[0]: 1}), transport=mock_server())
    assert report.models == (BASE, *ADAPTERS)
    phases = Counter(r.phase for r in report.results)
    assert phases == {"sequential": 6, "concurrent": 6, "sweep": 8, "mixed": 6}
    assert all(r.ok and r.completion_tokens == r.streamed_tokens == 3 for r in report.results)
    assert {r.model for r in report.results if r.phase == "mixed"} <= {BASE, ADAPTERS[0]}
    assert [p.rate for p in report.sweep] == [20.0, 40.0]
    assert report.breach_rate is None and not report.stopped_early
    groups = {(s.phase, s.group) for s in report.summaries}
    assert ("sequential", ADAPTERS[1]) in groups and ("concurrent", "all") in groups

    written = bench.write_outputs(report, tmp_path)
    assert [p.name for p in written] == ["bench.json", "requests.csv", "summary.csv",
                                         "sweep.png"]
    data = json.loads((tmp_path / "bench.json").read_text())
    assert "api_key" not in data["config"] and "k" not in json.dumps(data["config"]).split('"')
    with (tmp_path / "requests.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == len(report.results)
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_stops_at_the_first_rate_over_the_bound() -> None:
    report = bench.run(small(rates=(1.0, 2.0, 4.0), requests_per_rate=2, p95_bound_s=0.01),
                       ["sweep"], transport=mock_server(delay_s=0.05))
    assert [p.rate for p in report.sweep] == [1.0]
    assert report.breach_rate == 1.0 and not report.stopped_early


def test_deadline_bounds_the_run() -> None:
    report = bench.run(small(rates=(2.0,), requests_per_rate=50, rate_duration_s=60,
                             max_total_s=1.0, poisson=False), ["sweep"],
                       transport=mock_server())
    assert len(report.results) <= 3
    assert "deadline" in report.stopped_early


def test_wrong_key_and_unknown_mix_model_are_reported() -> None:
    report = bench.run(small(api_key="wrong"), ["sequential"], transport=mock_server())
    assert all(not r.ok and "HTTP 401" in r.error for r in report.results)
    with pytest.raises(bench.BenchError, match="not served"):
        bench.run(small(mix={"ghost": 1.0}), ["mixed"], transport=mock_server())


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(bench.BenchError, match="unknown mode"):
        bench.run(small(), ["turbo"], transport=mock_server())


def test_fabric_task_needs_hosts() -> None:
    from invoke import Context
    from invoke.exceptions import Exit

    from provisioning.tasks.bench import bench as bench_task

    with pytest.raises(Exit, match="--hosts"):
        bench_task(Context())


def test_sweep_plot_redraws_from_bench_json(tmp_path) -> None:
    """The checked-in run's bench.json reads back as a report and draws its sweep figure."""
    import json
    from pathlib import Path

    from serving.bench import engine
    from serving.stack import stackfile

    doc = json.loads(Path(stackfile.ROOT, "docs/bench-local/bench.json").read_text())
    report = engine.report_from_json(doc)
    assert [p.rate for p in report.sweep] == [s["rate"] for s in doc["sweep"]]
    assert report.to_json()["sweep"] == doc["sweep"]
    out = engine.plot_sweep(report, tmp_path / "sweep.png")
    assert out.stat().st_size > 10_000
