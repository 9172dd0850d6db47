"""Serving benchmark: what a deployment really delivers, per model and under load.

Streams requests to any OpenAI-compatible endpoint (vLLM here) and measures, per request:
time to first token (TTFT), inter-token latency (ITL), end-to-end latency and output tokens
per second. Token counts come from the server's ``usage`` (``stream_options.include_usage``),
never from the number of chunks: a chunk may carry several tokens, or none. When asked, the
stream's own tokens are counted too (``logprobs``), so the two can be checked against each
other.

Modes:
- ``sequential``: one request at a time, per model (base and each adapter);
- ``concurrent``: every model at once, ``concurrency`` requests in flight;
- ``sweep``: open-loop arrivals at increasing request rates; p50/p95/p99 and errors per rate,
  and the first rate whose p95 exceeds the stated bound (the sweep stops there);
- ``mixed``: each request picks a model from a weighted distribution (adapter mix);
- ``load``: closed-loop load at ``concurrency`` from ``processes`` processes, every model in
  turn, with vLLM's own /metrics over the same interval and a verdict on what limited the
  figure (``serving.bench.load``, ``serving.bench.metrics``); optionally the same requests
  unstreamed as the reference. Not in the default set: it is meant for high concurrency.

Everything is bounded: request counts per phase, a per-request timeout, and a deadline for
the whole run after which nothing new starts.
"""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import json
import math
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

MODES = ("sequential", "concurrent", "sweep", "mixed", "load")
DEFAULT_MODES = MODES[:4]
METRICS = ("ttft", "itl", "e2e")
CONNECT_TIMEOUT_SECONDS = 5.0
DEFAULT_REQUEST_TIMEOUT_SECONDS = 120.0
DEFAULT_MAX_TOTAL_SECONDS = 600.0
# Open-loop arrivals never pile up beyond this many requests in flight: a server that has
# stopped answering must not make the benchmark open thousands of connections.
MAX_IN_FLIGHT = 256
DEFAULT_PROMPT = (
    "Summarise in two sentences why a language model server keeps several LoRA adapters "
    "resident at once."
)


class BenchError(Exception):
    """The benchmark cannot run (no models, bad endpoint or key); the message says why."""


# --- statistics ----------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100) by linear interpolation between order statistics (numpy's
    default method); None for no values."""
    if not values:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside 0-100")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def arrival_offsets(
    rate: float, *, count: int, duration_s: float, poisson: bool, rng: random.Random
) -> list[float]:
    """Start times (seconds from the phase start) of at most ``count`` requests arriving at
    ``rate`` per second within ``duration_s``: evenly spaced, or a Poisson process."""
    if rate <= 0:
        raise ValueError(f"rate {rate} must be positive")
    offsets: list[float] = []
    t = 0.0
    while len(offsets) < count:
        if offsets or poisson:
            t += rng.expovariate(rate) if poisson else 1.0 / rate
        if t >= duration_s:
            break
        offsets.append(t)
    return offsets


def pick_models(mix: dict[str, float], n: int, rng: random.Random) -> list[str]:
    """``n`` model names drawn from the weighted ``mix`` (weights need not sum to 1)."""
    names = [m for m, w in mix.items() if w > 0]
    if not names:
        raise ValueError("the mix has no model with a positive weight")
    return rng.choices(names, weights=[mix[m] for m in names], k=n)


def parse_mix(text: str) -> dict[str, float]:
    """``"exaone=0.5,support-ko=0.3,legal-summary=0.2"`` -> weights."""
    mix: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, weight = item.partition("=")
        if not sep or not name:
            raise ValueError(f"{item!r} is not NAME=WEIGHT")
        value = float(weight)
        if value < 0 or not math.isfinite(value):
            raise ValueError(f"weight of {name!r} must be a finite number >= 0")
        mix[name.strip()] = value
    if not mix:
        raise ValueError("the mix is empty; allowed: NAME=WEIGHT,...")
    return mix


# --- records -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RequestResult:
    model: str
    phase: str  # sequential, concurrent, sweep, mixed
    rate: float | None  # offered requests/s (sweep, mixed)
    start_s: float  # from the start of the run
    ok: bool
    error: str = ""
    ttft_s: float | None = None
    itl_s: float | None = None  # decode time per token after the first, from usage
    e2e_s: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0  # usage
    streamed_tokens: int | None = None  # tokens seen in the stream (logprobs), when asked
    chunks: int = 0

    @property
    def tokens_per_s(self) -> float | None:
        if not self.ok or not self.e2e_s:
            return None
        return self.completion_tokens / self.e2e_s


@dataclass(frozen=True)
class Summary:
    group: str  # a model name, "all" or "rate=R"
    phase: str
    rate: float | None
    requests: int
    errors: int
    wall_s: float
    output_tokens: int
    throughput_tok_s: float  # all output tokens of the group / its wall time
    tok_s_per_request_p50: float | None
    ttft_p50: float | None
    ttft_p95: float | None
    ttft_p99: float | None
    itl_p50: float | None
    itl_p95: float | None
    itl_p99: float | None
    e2e_p50: float | None
    e2e_p95: float | None
    e2e_p99: float | None

    def p(self, metric: str, q: int) -> float | None:
        return getattr(self, f"{metric}_p{q}")


def summarize(results: Sequence[RequestResult], *, group: str, phase: str,
              rate: float | None = None) -> Summary:
    ok = [r for r in results if r.ok]

    def values(name: str) -> list[float]:
        return [v for r in ok if (v := getattr(r, name)) is not None]

    if results:
        begin = min(r.start_s for r in results)
        end = max(r.start_s + (r.e2e_s or 0.0) for r in results)
        wall = max(end - begin, 1e-9)
    else:
        wall = 0.0
    tokens = sum(r.completion_tokens for r in ok)
    stats: dict[str, float | None] = {}
    for metric, attr in (("ttft", "ttft_s"), ("itl", "itl_s"), ("e2e", "e2e_s")):
        data = values(attr)
        for q in (50, 95, 99):
            stats[f"{metric}_p{q}"] = percentile(data, q)
    return Summary(
        group=group, phase=phase, rate=rate, requests=len(results),
        errors=len(results) - len(ok), wall_s=wall, output_tokens=tokens,
        throughput_tok_s=tokens / wall if wall else 0.0,
        tok_s_per_request_p50=percentile(
            [v for r in ok if (v := r.tokens_per_s) is not None], 50),
        **stats,  # type: ignore[arg-type]
    )


# --- configuration and report --------------------------------------------------------------


@dataclass(frozen=True)
class BenchConfig:
    endpoint: str
    api_key: str | None = field(default=None, repr=False)
    models: tuple[str, ...] = ()  # empty: base and every adapter from /v1/models
    api: str = "completions"  # or "chat"
    prompt: str = DEFAULT_PROMPT
    max_tokens: int = 64
    ignore_eos: bool = True  # vLLM extension: every answer is max_tokens long
    count_tokens: bool = True  # ask for logprobs to count the stream's tokens
    requests_per_model: int = 3  # sequential and concurrent
    concurrency: int = 4
    rates: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)
    requests_per_rate: int = 8
    rate_duration_s: float = 30.0
    poisson: bool = True
    mix: dict[str, float] = field(default_factory=dict)  # empty: uniform over models
    mix_requests: int = 16
    mix_rate: float = 2.0
    p95_bound_s: float = 5.0
    slo_metric: str = "e2e"
    max_total_s: float = DEFAULT_MAX_TOTAL_SECONDS
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_SECONDS
    seed: int = 0
    warmup: int = 1  # unrecorded requests per model first (the first one pays for warm-up)
    api_servers: int = 1  # the server's --api-server-count (the verdict's CPU share per server)
    processes: int = 4  # load mode: client processes
    load_requests: int = 0  # load mode: requests in all; 0: 4 x concurrency
    nostream_reference: bool = False  # load mode: also the same requests unstreamed

    def public(self) -> dict[str, Any]:
        """The configuration as recorded in the JSON report: never the API key."""
        data = asdict(self)
        data.pop("api_key")
        return data


@dataclass(frozen=True)
class SweepPoint:
    rate: float
    summary: Summary
    breached: bool


@dataclass
class BenchReport:
    config: BenchConfig
    models: tuple[str, ...]
    started_at: str
    results: list[RequestResult] = field(default_factory=list)
    summaries: list[Summary] = field(default_factory=list)
    sweep: list[SweepPoint] = field(default_factory=list)
    breach_rate: float | None = None  # first offered rate whose p95 exceeded the bound
    stopped_early: str = ""  # why the run ended before its plan (the deadline)
    loads: list[Any] = field(default_factory=list)  # load.LoadResult of the load mode

    def to_json(self) -> dict[str, Any]:
        return {
            "config": self.config.public(),
            "models": list(self.models),
            "started_at": self.started_at,
            "slo": {"metric": self.config.slo_metric, "p95_bound_s": self.config.p95_bound_s,
                    "breach_rate": self.breach_rate},
            "stopped_early": self.stopped_early,
            "summaries": [asdict(s) for s in self.summaries],
            "sweep": [{"rate": p.rate, "breached": p.breached, **asdict(p.summary)}
                      for p in self.sweep],
            "load": [load.to_json() for load in self.loads],
            "requests": [{**asdict(r), "tokens_per_s": r.tokens_per_s} for r in self.results],
        }


# --- one streamed request ------------------------------------------------------------------


def parse_sse_line(line: str) -> dict[str, Any] | str | None:
    """One line of an SSE stream: the JSON event, ``"[DONE]"``, or None (comments, blanks)."""
    if not line.startswith("data:"):
        return None
    payload = line[len("data:"):].strip()
    if payload == "[DONE]":
        return "[DONE]"
    if not payload:
        return None
    event = json.loads(payload)
    if not isinstance(event, dict):
        raise ValueError(f"stream event is a JSON {type(event).__name__}")
    return event


def _event_tokens(event: dict[str, Any], api: str) -> tuple[bool, int | None]:
    """(does this event carry output?, how many tokens its logprobs list, if any)."""
    carries, counted = False, None
    for choice in event.get("choices") or []:
        if api == "chat":
            text = (choice.get("delta") or {}).get("content")
            listed = (choice.get("logprobs") or {}).get("content")
        else:
            text = choice.get("text")
            listed = (choice.get("logprobs") or {}).get("tokens")
        if isinstance(listed, list):
            counted = (counted or 0) + len(listed)
            carries = carries or bool(listed)
        carries = carries or bool(text)
    return carries, counted


def request_body(cfg: BenchConfig, model: str) -> tuple[str, dict[str, Any]]:
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": cfg.max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    if cfg.api == "chat":
        body["messages"] = [{"role": "user", "content": cfg.prompt}]
        if cfg.count_tokens:
            body["logprobs"] = True
        return "/v1/chat/completions", body
    body["prompt"] = cfg.prompt
    if cfg.count_tokens:
        body["logprobs"] = 0  # the sampled token only: enough to count tokens per chunk
    return "/v1/completions", body


async def stream_one(
    client: httpx.AsyncClient,
    cfg: BenchConfig,
    model: str,
    *,
    phase: str,
    rate: float | None,
    run_start: float,
    clock: Callable[[], float] = time.perf_counter,
) -> RequestResult:
    """Send one streaming request and time it; failures become a result with ``ok=False``."""
    path, body = request_body(cfg, model)
    start = clock()
    base = {"model": model, "phase": phase, "rate": rate, "start_s": start - run_start}
    first: float | None = None
    last: float | None = None
    chunks = 0
    streamed: int | None = None
    usage: dict[str, Any] | None = None
    done = False
    try:
        async with client.stream("POST", path, json=body,
                                 timeout=cfg.request_timeout_s) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")[:200]
                return RequestResult(**base, ok=False, error=f"HTTP {response.status_code}: "
                                     f"{text}", e2e_s=clock() - start)
            async for line in response.aiter_lines():
                event = parse_sse_line(line)
                if event is None:
                    continue
                if event == "[DONE]":
                    done = True
                    break
                assert isinstance(event, dict)
                if "error" in event:
                    message = event["error"]
                    if isinstance(message, dict):
                        message = message.get("message", message)
                    return RequestResult(**base, ok=False, error=f"in stream: {message}",
                                         e2e_s=clock() - start, chunks=chunks)
                now = clock()
                carries, counted = _event_tokens(event, cfg.api)
                if counted is not None:
                    streamed = (streamed or 0) + counted
                if carries:
                    chunks += 1
                    first = now if first is None else first
                    last = now
                if event.get("usage"):
                    usage = event["usage"]
    except httpx.TimeoutException:
        return RequestResult(**base, ok=False, error=f"timeout after {cfg.request_timeout_s:g} s",
                             e2e_s=clock() - start, chunks=chunks)
    except (httpx.HTTPError, ValueError) as exc:
        return RequestResult(**base, ok=False, error=f"{type(exc).__name__}: {exc}"[:200],
                             e2e_s=clock() - start, chunks=chunks)
    end = clock()
    if not done:
        return RequestResult(**base, ok=False, error="stream ended without [DONE]",
                             e2e_s=end - start, chunks=chunks)
    if usage is None:
        return RequestResult(**base, ok=False, error="no usage in the stream (does the server "
                             "support stream_options.include_usage?)", e2e_s=end - start,
                             chunks=chunks)
    tokens = int(usage.get("completion_tokens") or 0)
    ttft = None if first is None else first - start
    itl = None
    if first is not None and last is not None and tokens > 1:
        itl = (last - first) / (tokens - 1)
    return RequestResult(
        **base, ok=True, ttft_s=ttft, itl_s=itl, e2e_s=end - start,
        prompt_tokens=int(usage.get("prompt_tokens") or 0), completion_tokens=tokens,
        streamed_tokens=streamed if cfg.count_tokens else None, chunks=chunks,
    )


# --- phases --------------------------------------------------------------------------------


class _Run:
    """Shared state of one benchmark run: client, clock, deadline and the results."""

    def __init__(self, client: httpx.AsyncClient, cfg: BenchConfig, report: BenchReport):
        self.client, self.cfg, self.report = client, cfg, report
        self.start = time.perf_counter()
        self.deadline = self.start + cfg.max_total_s
        self.rng = random.Random(cfg.seed)
        self.gate = asyncio.Semaphore(MAX_IN_FLIGHT)

    def expired(self) -> bool:
        return time.perf_counter() >= self.deadline

    async def one(self, model: str, phase: str, rate: float | None = None) -> RequestResult:
        async with self.gate:
            result = await stream_one(self.client, self.cfg, model, phase=phase, rate=rate,
                                      run_start=self.start)
        self.report.results.append(result)
        return result

    async def scheduled(self, plan: Iterable[tuple[float, str]], phase: str,
                        rate: float | None) -> list[RequestResult]:
        """Start each (offset, model) at its offset from now; skip what the deadline cuts."""
        t0 = time.perf_counter()
        tasks = []
        for offset, model in plan:
            delay = t0 + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if self.expired():
                self.report.stopped_early = "deadline (max_total_s) reached"
                break
            tasks.append(asyncio.create_task(self.one(model, phase, rate)))
        return list(await asyncio.gather(*tasks))


async def _sequential(run: _Run, models: Sequence[str]) -> None:
    for model in models:
        batch = []
        for _ in range(run.cfg.requests_per_model):
            if run.expired():
                run.report.stopped_early = "deadline (max_total_s) reached"
                return
            batch.append(await run.one(model, "sequential"))
        run.report.summaries.append(summarize(batch, group=model, phase="sequential"))


async def _concurrent(run: _Run, models: Sequence[str]) -> None:
    queue = [m for _ in range(run.cfg.requests_per_model) for m in models]
    limit = asyncio.Semaphore(max(1, run.cfg.concurrency))
    results: list[RequestResult] = []

    async def worker(model: str) -> None:
        async with limit:
            if run.expired():
                run.report.stopped_early = "deadline (max_total_s) reached"
                return
            results.append(await run.one(model, "concurrent"))

    await asyncio.gather(*(worker(m) for m in queue))
    run.report.summaries.append(summarize(results, group="all", phase="concurrent"))
    for model in models:
        mine = [r for r in results if r.model == model]
        run.report.summaries.append(summarize(mine, group=model, phase="concurrent"))


def sweep_breached(summary: Summary, metric: str, bound_s: float) -> bool:
    """A rate breaches when its p95 exceeds the bound, or when any request failed."""
    value = summary.p(metric, 95)
    return summary.errors > 0 or value is None or value > bound_s


async def _sweep(run: _Run, models: Sequence[str]) -> None:
    cfg = run.cfg
    for rate in sorted(cfg.rates):
        if run.expired():
            run.report.stopped_early = "deadline (max_total_s) reached"
            return
        offsets = arrival_offsets(rate, count=cfg.requests_per_rate,
                                  duration_s=cfg.rate_duration_s, poisson=cfg.poisson,
                                  rng=run.rng)
        plan = [(t, models[i % len(models)]) for i, t in enumerate(offsets)]
        results = await run.scheduled(plan, "sweep", rate)
        summary = summarize(results, group=f"rate={rate:g}", phase="sweep", rate=rate)
        breached = sweep_breached(summary, cfg.slo_metric, cfg.p95_bound_s)
        run.report.sweep.append(SweepPoint(rate, summary, breached))
        run.report.summaries.append(summary)
        if breached:  # higher rates only load the server more: the curve ends here
            run.report.breach_rate = rate
            return


async def _mixed(run: _Run, models: Sequence[str]) -> None:
    cfg = run.cfg
    mix = cfg.mix or dict.fromkeys(models, 1.0)
    unknown = sorted(set(mix) - set(models))
    if unknown:
        raise BenchError(f"mix names {', '.join(unknown)}, not served here; served: "
                         f"{', '.join(models)}")
    picks = pick_models(mix, cfg.mix_requests, run.rng)
    offsets = arrival_offsets(cfg.mix_rate, count=cfg.mix_requests,
                              duration_s=cfg.max_total_s, poisson=cfg.poisson, rng=run.rng)
    results = await run.scheduled(zip(offsets, picks, strict=False), "mixed", cfg.mix_rate)
    run.report.summaries.append(summarize(results, group="all", phase="mixed",
                                          rate=cfg.mix_rate))
    for model in mix:
        mine = [r for r in results if r.model == model]
        if mine:
            run.report.summaries.append(summarize(mine, group=model, phase="mixed",
                                                  rate=cfg.mix_rate))


async def _load(run: _Run, models: Sequence[str]) -> None:
    from serving.bench.load import LoadSpec, run_load

    cfg = run.cfg
    requests = cfg.load_requests or 4 * cfg.concurrency
    for stream in (True, False) if cfg.nostream_reference else (True,):
        spec = LoadSpec(tuple(models), cfg.concurrency, requests, cfg.processes, stream,
                        label=f"load c={cfg.concurrency}" + ("" if stream else " unstreamed"))
        results, outcome = await asyncio.to_thread(run_load, cfg, spec)
        run.report.results += results
        run.report.summaries.append(outcome.summary)
        run.report.loads.append(outcome)


_PHASES = {"sequential": _sequential, "concurrent": _concurrent, "sweep": _sweep,
           "mixed": _mixed, "load": _load}


def _client(cfg: BenchConfig, transport: httpx.AsyncBaseTransport | None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    return httpx.AsyncClient(
        base_url=cfg.endpoint.rstrip("/"), headers=headers, transport=transport,
        timeout=httpx.Timeout(cfg.request_timeout_s, connect=CONNECT_TIMEOUT_SECONDS),
        limits=httpx.Limits(max_connections=MAX_IN_FLIGHT),
        trust_env=False,
    )


async def discover_models(client: httpx.AsyncClient) -> tuple[str, ...]:
    """Base model(s) first, then adapters (vLLM marks an adapter with ``parent``)."""
    try:
        response = await client.get("/v1/models", timeout=CONNECT_TIMEOUT_SECONDS * 2)
    except httpx.HTTPError as exc:
        raise BenchError(f"cannot reach {client.base_url}/v1/models: {exc}") from None
    if response.status_code == 401:
        raise BenchError(f"{client.base_url} refused the API key (401)")
    if response.status_code != 200:
        raise BenchError(f"{client.base_url}/v1/models answered {response.status_code}")
    cards = response.json().get("data") or []
    base = [str(c["id"]) for c in cards if not c.get("parent")]
    adapters = [str(c["id"]) for c in cards if c.get("parent")]
    if not base and not adapters:
        raise BenchError(f"{client.base_url} serves no models")
    return tuple(base + adapters)


async def run_async(cfg: BenchConfig, modes: Sequence[str] = DEFAULT_MODES, *,
                    transport: httpx.AsyncBaseTransport | None = None) -> BenchReport:
    unknown = [m for m in modes if m not in _PHASES]
    if unknown:
        raise BenchError(f"unknown mode(s) {', '.join(unknown)}; allowed: {', '.join(MODES)}")
    if cfg.slo_metric not in METRICS:
        raise BenchError(f"slo metric {cfg.slo_metric!r}; allowed: {', '.join(METRICS)}")
    async with _client(cfg, transport) as client:
        models = cfg.models or await discover_models(client)
        report = BenchReport(cfg, tuple(models), datetime.now(UTC).isoformat(timespec="seconds"))
        run = _Run(client, cfg, report)
        for model in models:
            for _ in range(cfg.warmup):
                await stream_one(client, cfg, model, phase="warmup", rate=None,
                                 run_start=run.start)
        for mode in modes:
            if run.expired():
                report.stopped_early = "deadline (max_total_s) reached"
                break
            await _PHASES[mode](run, list(models))
    return report


def run(cfg: BenchConfig, modes: Sequence[str] = DEFAULT_MODES, *,
        transport: httpx.AsyncBaseTransport | None = None) -> BenchReport:
    """Run the benchmark to completion (bounded by ``cfg.max_total_s``)."""
    return asyncio.run(run_async(cfg, modes, transport=transport))


# --- outputs -------------------------------------------------------------------------------

_REQUEST_FIELDS = [f for f in RequestResult.__dataclass_fields__] + ["tokens_per_s"]


def write_outputs(report: BenchReport, out_dir: Path) -> list[Path]:
    """bench.json (everything), requests.csv, summary.csv and, after a sweep, sweep.png."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    path = out_dir / "bench.json"
    path.write_text(json.dumps(report.to_json(), indent=2) + "\n")
    written.append(path)
    path = out_dir / "requests.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=_REQUEST_FIELDS)
        writer.writeheader()
        for r in report.results:
            writer.writerow({**asdict(r), "tokens_per_s": r.tokens_per_s})
    written.append(path)
    path = out_dir / "summary.csv"
    with path.open("w", newline="") as handle:
        fields = list(Summary.__dataclass_fields__)
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for s in report.summaries:
            writer.writerow(asdict(s))
    written.append(path)
    if report.sweep:
        written.append(plot_sweep(report, out_dir / "sweep.png"))
    if report.loads:
        written += write_load_outputs(report.loads, out_dir)
    return written


def report_from_json(doc: dict[str, Any]) -> BenchReport:
    """A report as ``to_json`` wrote it (bench.json), to draw its figure again."""
    config = BenchConfig(**{k: tuple(v) if isinstance(v, list) else v
                            for k, v in doc["config"].items()})
    summary_fields = {f.name for f in dataclasses.fields(Summary)}
    request_fields = {f.name for f in dataclasses.fields(RequestResult)}
    return BenchReport(
        config=config, models=tuple(doc["models"]), started_at=doc["started_at"],
        results=[RequestResult(**{k: v for k, v in r.items() if k in request_fields})
                 for r in doc["requests"]],
        summaries=[Summary(**s) for s in doc["summaries"]],
        sweep=[SweepPoint(p["rate"], Summary(**{k: v for k, v in p.items()
                                                 if k in summary_fields}), p["breached"])
               for p in doc["sweep"]],
        breach_rate=doc["slo"]["breach_rate"], stopped_early=doc.get("stopped_early", ""))


# A percentile is drawn only where the rate has this many answered requests: a tail estimate
# needs samples beyond it (with 24 requests, p99 is simply the maximum).
MIN_SAMPLES_FOR_PERCENTILE = {50: 1, 95: 40, 99: 200}


LOAD_FIELDS = ("label", "concurrency", "requests", "processes", "stream", "client_tok_s",
               "engine_tok_s", "limit", "reasons")


def write_load_outputs(loads: Sequence[Any], out_dir: Path) -> list[Path]:
    """load.csv (one row per load phase: client and engine tok/s, the verdict and its
    signals) and load.png."""
    path = out_dir / "load.csv"
    signal_names = sorted({k for r in loads for k in r.verdict.signals})
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[*LOAD_FIELDS, *signal_names])
        writer.writeheader()
        for r in loads:
            row = r.to_json()
            writer.writerow({**{k: row[k] for k in LOAD_FIELDS},
                             "reasons": "; ".join(row["reasons"]), **r.verdict.signals})
    return [path, plot_load(loads, out_dir / "load.png")]


def plot_load(loads: Sequence[Any], path: Path) -> Path:
    """Client-side against engine-side tokens/s per load phase, labelled with the verdict."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r.spec.label for r in loads]
    xs = range(len(loads))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(loads)), 4.2), dpi=110)
    ax.bar([x - 0.2 for x in xs], [r.client.tok_s for r in loads], 0.4, label="client")
    ax.bar([x + 0.2 for x in xs], [r.engine.generation_tok_s for r in loads], 0.4,
           label="engine (vLLM /metrics)")
    for x, r in zip(xs, loads, strict=True):
        ax.annotate(r.verdict.limit, (x, max(r.client.tok_s, r.engine.generation_tok_s)),
                    textcoords="offset points", xytext=(0, 4), ha="center", fontsize=8)
    ax.set_xticks(list(xs), labels, fontsize=8, rotation=15)
    ax.set_ylabel("output tokens/s")
    ax.set_title("client vs engine throughput; label: what limited it", fontsize=9)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_sweep(report: BenchReport, path: Path) -> Path:
    """Latency and achieved throughput versus offered load, each rate with its sample count
    and duration: p50 always, p95/p99 only with enough samples, every request's maximum, the
    bound, errors, and the planned rates that were not run (and why)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers or in CI
    import matplotlib.pyplot as plt

    cfg = report.config
    metric = cfg.slo_metric
    points = report.sweep
    rates = [p.rate for p in points]
    nan = float("nan")
    fig, (lat, thr) = plt.subplots(1, 2, figsize=(11, 4.4), dpi=110)
    for q, style in ((50, "o-"), (95, "s-"), (99, "^--")):
        need = MIN_SAMPLES_FOR_PERCENTILE[q]
        values = [p.summary.p(metric, q) if p.summary.requests - p.summary.errors >= need
                  else None for p in points]
        if any(v is not None for v in values):
            lat.plot(rates, [v if v is not None else nan for v in values], style,
                     label=f"p{q}" + (f" (where n >= {need})" if need > 1 else ""))
    maxes = []
    for rate in rates:
        seen = [getattr(r, f"{metric}_s") for r in report.results
                if r.phase == "sweep" and r.rate == rate and r.ok
                and getattr(r, f"{metric}_s") is not None]
        maxes.append(max(seen) if seen else nan)
    lat.plot(rates, maxes, "x", color="black", label="max of the rate's requests")
    lat.axhline(cfg.p95_bound_s, color="red", linestyle=":",
                label=f"p95 bound {cfg.p95_bound_s:g} s")
    if report.breach_rate is not None:
        lat.axvline(report.breach_rate, color="red", alpha=0.3,
                    label=f"bound exceeded at {report.breach_rate:g} req/s")
    labels = [f"{r:g}\nn={p.summary.requests}\n{p.summary.wall_s:.0f} s"
              for r, p in zip(rates, points, strict=True)]
    achieved = [(p.summary.requests - p.summary.errors) / p.summary.wall_s
                if p.summary.wall_s else nan for p in points]
    thr.plot(rates, rates, ":", color="grey", label="offered")
    thr.plot(rates, achieved, "o-", label="answered requests/s")
    for rate, point, got in zip(rates, points, achieved, strict=True):
        if point.summary.errors:
            thr.annotate(f"{point.summary.errors} err", (rate, got), textcoords="offset points",
                         xytext=(0, 8), ha="center", color="red", fontsize=8)
    errors = sum(p.summary.errors for p in points)
    for ax in (lat, thr):
        if len(rates) > 1 and max(rates) / min(rates) >= 8:
            ax.set_xscale("log", base=2)  # sweeps usually double the rate
        ax.set_xticks(rates, labels, fontsize=7)
        ax.set_xlabel("offered load (requests/s); n requests; seconds at that rate")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    lat.set_ylabel(f"{metric.upper()} latency (s)")
    thr.set_ylabel("requests/s")
    thr.set_title(f"achieved vs offered; errors: {errors or 'none'}", fontsize=9)
    not_run = [r for r in sorted(cfg.rates) if r not in rates]
    why = ("the sweep stops at the first rate over the bound" if report.breach_rate is not None
           else report.stopped_early or "")
    note = f"; not run: {', '.join(f'{r:g}' for r in not_run)} req/s ({why})" if not_run else ""
    lat.set_title(f"{metric.upper()} vs load, {cfg.max_tokens} output tokens, "
                  f"{len(report.models)} models" + (f"\n{note.removeprefix('; ')}" if note
                                                      else ""), fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
