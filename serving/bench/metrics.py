"""What the engine did while the client measured: vLLM's own /metrics over the same interval.

A client-side tokens/s figure describes the whole path: the client, vLLM's API server
(tokenising, detokenising, one SSE chunk per token per stream, in one Python process) and the
engine. On a GPU at high concurrency the API server, not the engine, is often the limit (a
2.4B model on an H200: 5-9k tok/s streamed against 16k non-streamed). So the bench reads
vLLM's Prometheus counters before and after a load phase and samples its gauges during it,
and states which part limited the figure (``verdict``) from signals anyone can re-check:

- engine tokens/s: the delta of ``vllm:generation_tokens_total`` over the interval;
- time in the engine: the deltas of ``vllm:request_queue_time_seconds_sum`` and
  ``vllm:request_inference_time_seconds_sum`` (each request's time waiting in and running
  in vLLM's scheduler) against the client's summed request time: the share a request spends
  in the engine, exact where sampled gauges alias (a tiny model's requests run in waves
  shorter than any sampling interval); the rest is spent in the API server (tokenising,
  streaming out) and on the way. ``num_requests_running``/``waiting`` are sampled too;
- the API server's CPU: ``process_cpu_seconds_total`` of the process that serves /metrics
  (one API server); vLLM drops it with several API servers (Prometheus multiprocess mode);
- the client's own CPU: each load process measures its CPU time against its wall time.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import httpx

GENERATION_TOKENS = "vllm:generation_tokens_total"
PROMPT_TOKENS = "vllm:prompt_tokens_total"
REQUESTS_FINISHED = "vllm:request_success_total"
RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
PROCESS_CPU = "process_cpu_seconds_total"
QUEUE_TIME = "vllm:request_queue_time_seconds_sum"
INFERENCE_TIME = "vllm:request_inference_time_seconds_sum"

# A process using at least this share of one core is saturated (the API server and each
# client process run one Python event loop: one core is their ceiling).
CPU_SATURATED = 0.90
# Requests spend less than this share of their time in the engine (and queue in it for
# almost none): the rest is spent in front of it.
ENGINE_UNDERFED = 0.75
# vLLM's own queue holds requests for at least this share of their time: the engine is full.
ENGINE_QUEUED = 0.05
# The client received less than this share of the tokens the engine generated meanwhile.
DELIVERY_SHORT = 0.90
METRICS_TIMEOUT_SECONDS = 5.0
SAMPLE_INTERVAL_SECONDS = 0.5
# Fewer gauge samples than this say nothing about the requests in the engine (a run shorter
# than a few sampling intervals): the verdict then rests on CPU figures alone.
MIN_GAUGE_SAMPLES = 4

Limit = Literal["engine", "front-end", "client", "unknown"]

_SAMPLE_RE = re.compile(
    r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})?\s+(?P<value>\S+)(?:\s+\S+)?$"
)
_LABEL_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class Snapshot:
    """One scrape of /metrics: every sample, keyed by name and sorted label pairs."""

    t: float  # time.perf_counter() when the scrape returned
    samples: Mapping[tuple[str, tuple[tuple[str, str], ...]], float]

    def total(self, name: str) -> float | None:
        """The sum over every label set of ``name`` (engines, models, finish reasons); None
        when vLLM does not expose it."""
        values = [v for (n, _), v in self.samples.items() if n == name]
        return math.fsum(values) if values else None


def parse(text: str, *, t: float = 0.0) -> Snapshot:
    """Prometheus text exposition format, the subset vLLM writes (no escapes in names)."""
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE_RE.match(line)
        if not match:
            continue
        try:
            value = float(match["value"])
        except ValueError:
            continue
        labels = tuple(sorted(_LABEL_RE.findall(match["labels"] or "")))
        samples[(match["name"], labels)] = value
    return Snapshot(t, samples)


def scrape(client: httpx.Client) -> Snapshot:
    response = client.get("/metrics", timeout=METRICS_TIMEOUT_SECONDS)
    response.raise_for_status()
    return parse(response.text, t=time.perf_counter())


@dataclass(frozen=True)
class Gauges:
    t: float
    running: float
    waiting: float


class Sampler:
    """Scrapes the queue gauges every ``interval_s`` in a thread until stopped."""

    def __init__(self, endpoint: str, *, interval_s: float = SAMPLE_INTERVAL_SECONDS):
        self.endpoint, self.interval_s = endpoint.rstrip("/"), interval_s
        self.samples: list[Gauges] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="metrics-sampler", daemon=True)

    def _loop(self) -> None:
        # /metrics needs no API key (vLLM guards /v1/* only).
        with httpx.Client(base_url=self.endpoint, trust_env=False) as client:
            while not self._stop.is_set():
                try:
                    snap = scrape(client)
                except httpx.HTTPError:
                    snap = None
                if snap is not None:
                    self.samples.append(Gauges(snap.t, snap.total(RUNNING) or 0.0,
                                               snap.total(WAITING) or 0.0))
                self._stop.wait(self.interval_s)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=METRICS_TIMEOUT_SECONDS * 2)


@dataclass(frozen=True)
class EngineDelta:
    """vLLM's counters over one interval, and its gauges sampled during it."""

    interval_s: float
    generation_tokens: float
    prompt_tokens: float
    requests_finished: float | None
    api_cpu_s: float | None  # None: not exposed (several API servers)
    running_mean: float | None
    waiting_mean: float | None
    waiting_max: float | None
    gauge_samples: int = 0
    engine_request_s: float | None = None  # summed time requests spent queued + running
    queue_s: float | None = None  # summed time requests spent queued

    @property
    def generation_tok_s(self) -> float:
        return self.generation_tokens / self.interval_s if self.interval_s > 0 else 0.0

    @property
    def api_cpu_cores(self) -> float | None:
        if self.api_cpu_s is None or self.interval_s <= 0:
            return None
        return self.api_cpu_s / self.interval_s


def _delta(before: Snapshot, after: Snapshot, name: str) -> float | None:
    a, b = before.total(name), after.total(name)
    return None if a is None or b is None else b - a


def _mean(values: Sequence[float]) -> float | None:
    return math.fsum(values) / len(values) if values else None


def engine_delta(before: Snapshot, after: Snapshot, gauges: Iterable[Gauges] = (),
                 *, steady: tuple[float, float] | None = None,
                 phase: tuple[float, float] | None = None) -> EngineDelta:
    """Counters from ``before`` to ``after``; gauge means over ``steady`` (perf_counter
    bounds: while the client held its full load) when at least MIN_GAUGE_SAMPLES fell in it,
    else over ``phase`` (first start to last finish), else over all samples. Samples from
    before the first request or after the last would count an idle engine as underfed."""
    every = list(gauges)
    points = every
    for bounds in (steady, phase):
        if bounds is None:
            continue
        inside = [g for g in every if bounds[0] <= g.t <= bounds[1]]
        points = inside
        if len(inside) >= MIN_GAUGE_SAMPLES:
            break
    generated = _delta(before, after, GENERATION_TOKENS)
    queued, running = _delta(before, after, QUEUE_TIME), _delta(before, after, INFERENCE_TIME)
    prompts = _delta(before, after, PROMPT_TOKENS)
    if generated is None or prompts is None:
        raise ValueError(f"/metrics has no {GENERATION_TOKENS} / {PROMPT_TOKENS}: not vLLM?")
    return EngineDelta(
        interval_s=after.t - before.t,
        generation_tokens=generated,
        prompt_tokens=prompts,
        requests_finished=_delta(before, after, REQUESTS_FINISHED),
        api_cpu_s=_delta(before, after, PROCESS_CPU),
        running_mean=_mean([g.running for g in points]),
        waiting_mean=_mean([g.waiting for g in points]),
        waiting_max=max((g.waiting for g in points), default=None),
        gauge_samples=len(points),
        engine_request_s=None if queued is None or running is None else queued + running,
        queue_s=queued,
    )


@dataclass(frozen=True)
class ClientSide:
    """What the load processes saw over the same interval."""

    tokens: int  # completion tokens received (usage)
    wall_s: float
    concurrency: int  # requests the client kept open
    processes: int
    cpu_shares: tuple[float, ...]  # each process's CPU time / its wall time
    request_s: float = 0.0  # summed end-to-end time of the requests

    @property
    def tok_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else 0.0


@dataclass(frozen=True)
class Verdict:
    limit: Limit
    reasons: tuple[str, ...]
    signals: dict[str, float | None] = field(default_factory=dict)


def verdict(client: ClientSide, engine: EngineDelta, *, api_servers: int = 1) -> Verdict:
    """Which part limited the client's figure, and the signals that say so.

    client: a load process used >= CPU_SATURATED of its core. front-end: the API server's CPU
    was saturated, or the engine held < ENGINE_UNDERFED of the open requests with none
    queued (they waited in the API server). engine: otherwise; vLLM's own queue or the
    requests it ran were the bound.
    """
    cpu_max = max(client.cpu_shares, default=0.0)
    held = queued = in_engine = None
    if engine.engine_request_s is not None and client.request_s > 0:
        # Little's law: time shares are the mean numbers of requests held.
        held = engine.engine_request_s / client.request_s
        queued = (engine.queue_s or 0.0) / client.request_s
        in_engine = held * client.request_s / client.wall_s if client.wall_s else None
    elif engine.running_mean is not None and engine.gauge_samples >= MIN_GAUGE_SAMPLES:
        in_engine = engine.running_mean + (engine.waiting_mean or 0.0)
        held = in_engine / client.concurrency if client.concurrency else None
        queued = (engine.waiting_mean or 0.0) / client.concurrency if client.concurrency \
            else None
    api = engine.api_cpu_cores
    api_per_server = api / api_servers if api is not None else None
    delivered = client.tokens / engine.generation_tokens if engine.generation_tokens else None
    signals: dict[str, float | None] = {
        "client_tok_s": client.tok_s, "engine_tok_s": engine.generation_tok_s,
        "delivered_share": delivered, "client_cpu_max": cpu_max,
        "api_server_cpu_cores": api, "engine_in_flight_mean": in_engine,
        "engine_held_share": held, "engine_queued_share": queued,
        "engine_waiting_mean": engine.waiting_mean, "concurrency": float(client.concurrency),
    }
    notes: list[str] = []
    if delivered is not None and delivered < DELIVERY_SHORT:
        notes.append(f"the client received {delivered:.0%} of the tokens the engine generated "
                     "meanwhile (streams lag behind the engine)")
    if cpu_max >= CPU_SATURATED:
        return Verdict("client", (
            f"a client process used {cpu_max:.0%} of a core: add --processes",
            *notes), signals)
    if api_per_server is not None and api_per_server >= CPU_SATURATED:
        return Verdict("front-end", (
            f"vLLM's API server used {api:.2f} cores over {api_servers} process(es): its "
            "event loop is saturated; raise apiServerCount", *notes), signals)
    if held is not None and held < ENGINE_UNDERFED and (queued or 0.0) < ENGINE_QUEUED:
        return Verdict("front-end", (
            f"requests spent {held:.0%} of their time in vLLM's scheduler (queued "
            f"{queued or 0.0:.0%}): of {client.concurrency} open, {in_engine or 0.0:.1f} were "
            "in the engine on average; the rest waited in the API server", *notes), signals)
    if held is None and api is None:
        return Verdict("unknown", ("no engine request times, too few gauge samples and no "
                                   "API-server CPU: run longer", *notes), signals)
    if queued is not None and queued >= ENGINE_QUEUED:
        why = f"requests spent {queued:.0%} of their time in vLLM's own queue"
    elif held is not None:
        why = f"requests spent {held:.0%} of their time in vLLM's scheduler"
    else:
        why = "the API server's CPU was not saturated"
    return Verdict("engine", (why, *notes), signals)
