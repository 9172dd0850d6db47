"""``python -m serving bench``: benchmark an OpenAI-compatible endpoint, write JSON, CSV, PNG.

The API key is read from an environment variable, a 0600 file, or the stack's own reference
(``--stack``); never from argv, where ``ps`` would show it.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from rich.table import Table

from serving.bench import engine as bench
from serving.console import console, literal
from serving.stack import stackfile
from serving.stack.errors import Problem, SpecError

out = console()


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f}"


def summary_table(report: bench.BenchReport) -> Table:
    cfg = report.config
    table = Table(title=f"{cfg.endpoint}: {cfg.max_tokens} output tokens per request "
                  "(latencies in ms)")
    for column in ("phase", "group", "req", "err", "TTFT p50", "TTFT p95", "ITL p50",
                   "ITL p95", "E2E p50", "E2E p95", "E2E p99", "tok/s per req", "tok/s total"):
        table.add_column(column, justify="left" if column in ("phase", "group") else "right")
    for s in report.summaries:
        per_request = "-" if s.tok_s_per_request_p50 is None else f"{s.tok_s_per_request_p50:.1f}"
        table.add_row(
            s.phase, s.group, str(s.requests), str(s.errors),
            _ms(s.ttft_p50), _ms(s.ttft_p95), _ms(s.itl_p50), _ms(s.itl_p95),
            _ms(s.e2e_p50), _ms(s.e2e_p95), _ms(s.e2e_p99), per_request,
            f"{s.throughput_tok_s:.1f}", style="red" if s.errors else None,
        )
    return table


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def load_table(loads: list) -> Table:
    """One row per load phase: client against engine tokens/s and what limited them."""
    table = Table(title="load: client vs engine (vLLM /metrics over the same interval)")
    for column in ("phase", "conc", "procs", "client tok/s", "engine tok/s", "delivered",
                   "API server cores", "in engine", "waiting", "client CPU max", "limit"):
        table.add_column(column, justify="left" if column in ("phase", "limit") else "right")
    for r in loads:
        s = r.verdict.signals
        table.add_row(
            r.spec.label, str(r.spec.concurrency), str(r.client.processes),
            f"{r.client.tok_s:.1f}", f"{r.engine.generation_tok_s:.1f}",
            _share(s.get("delivered_share")), _share(s.get("api_server_cpu_cores")),
            _share(s.get("engine_in_flight_mean")), _share(s.get("engine_waiting_mean")),
            _share(s.get("client_cpu_max")), r.verdict.limit,
        )
    return table


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers"
                                         ) from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: rates must be positive")
    return values


def _api_key(args: argparse.Namespace) -> str | None:
    if args.api_key_file:
        path = Path(args.api_key_file)
        try:
            text = path.read_text().strip()
        except OSError as exc:
            raise SpecError([Problem("--api-key-file", f"cannot read {path}: {exc.strerror}")]
                            ) from None
        if path.stat().st_mode & 0o077:
            raise SpecError([Problem("--api-key-file", f"{path} is readable by group or others;"
                                     " allowed: mode 0600")])
        return text or None
    if args.stack:
        from serving.stack import secretref

        spec = stackfile.load(stack=args.stack)
        if spec.api_key.kind == "none":
            return None
        return secretref.resolve(spec.api_key, root=stackfile.ROOT, stack=args.stack)
    return os.environ.get(args.api_key_env) or None


def _endpoint(args: argparse.Namespace) -> str:
    if args.endpoint:
        return args.endpoint
    if args.stack:
        spec = stackfile.load(stack=args.stack)
        if spec.on.local_files:
            return f"http://127.0.0.1:{spec.vllm.port}"
    raise SpecError([Problem("--endpoint", (
        "is required (e.g. http://10.40.0.4:8000) unless --stack names the local stack"
    ))])


def config_from_args(args: argparse.Namespace) -> bench.BenchConfig:
    try:
        mix = bench.parse_mix(args.mix) if args.mix else {}
    except ValueError as exc:
        raise SpecError([Problem("--mix", str(exc))]) from None
    return bench.BenchConfig(
        endpoint=_endpoint(args),
        api_key=_api_key(args),
        models=tuple(m for m in (args.models or "").split(",") if m),
        api=args.api,
        prompt=args.prompt,
        max_tokens=args.max_tokens,
        ignore_eos=not args.allow_eos,
        requests_per_model=args.requests,
        concurrency=args.concurrency,
        rates=args.rates,
        requests_per_rate=args.requests_per_rate,
        rate_duration_s=args.rate_duration_s,
        poisson=not args.uniform_arrivals,
        mix=mix,
        mix_requests=args.mix_requests,
        mix_rate=args.mix_rate,
        p95_bound_s=args.p95_bound_s,
        slo_metric=args.slo_metric,
        max_total_s=args.max_total_s,
        request_timeout_s=args.request_timeout_s,
        seed=args.seed,
        warmup=args.warmup,
        api_servers=args.api_servers,
        processes=args.processes,
        load_requests=args.load_requests,
        nostream_reference=args.nostream_reference,
    )


def cmd_bench(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    modes = args.mode or list(bench.DEFAULT_MODES)
    try:
        report = bench.run(cfg, modes)
    except bench.BenchError as exc:
        raise SpecError([Problem(cfg.endpoint, str(exc))]) from None
    out.print(summary_table(report))
    if report.loads:
        out.print(load_table(report.loads))
        for r in report.loads:
            out.print(f"{r.spec.label}: {r.verdict.limit}: " + "; ".join(r.verdict.reasons))
    if report.sweep:
        bound = f"p95 {cfg.slo_metric} bound {cfg.p95_bound_s:g} s"
        if report.breach_rate is None:
            out.print(f"sweep: {bound} held up to {max(p.rate for p in report.sweep):g} req/s")
        else:
            out.print(f"sweep: {bound} exceeded at {report.breach_rate:g} req/s "
                      "(the sweep stops there)")
    if report.stopped_early:
        out.print(literal(f"stopped early: {report.stopped_early}"))
    for path in bench.write_outputs(report, Path(args.out)):
        out.print(literal(f"wrote {path}"))
    failed = sum(1 for r in report.results if not r.ok)
    return 1 if failed and args.fail_on_error else 0


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("bench", help="benchmark a vLLM (OpenAI-compatible) endpoint")
    p.add_argument("--endpoint", help="base URL, e.g. http://10.40.0.4:8000")
    p.add_argument("--stack", help="take the API key (and, for local, the endpoint) from it")
    p.add_argument("--api-key-env", default="EXAONE_API_KEY",
                   help="environment variable holding the key (default EXAONE_API_KEY)")
    p.add_argument("--api-key-file", help="file holding the key (mode 0600)")
    p.add_argument("--models", help="comma-separated; default: base and every adapter served")
    p.add_argument("--mode", action="append", choices=bench.MODES,
                   help="repeatable; default: " + ", ".join(bench.DEFAULT_MODES))
    p.add_argument("--api", choices=("completions", "chat"), default="completions")
    p.add_argument("--prompt", default=bench.DEFAULT_PROMPT)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--allow-eos", action="store_true",
                   help="let answers stop at EOS (default: ignore_eos, fixed-length answers)")
    p.add_argument("--requests", type=int, default=3, help="per model, sequential/concurrent")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--rates", type=_floats, default=(0.5, 1.0, 2.0, 4.0),
                   help="sweep rates in requests/s, e.g. 0.5,1,2,4")
    p.add_argument("--requests-per-rate", type=int, default=8)
    p.add_argument("--rate-duration-s", type=float, default=30.0,
                   help="longest time arrivals are scheduled at one rate")
    p.add_argument("--uniform-arrivals", action="store_true", help="evenly spaced, not Poisson")
    p.add_argument("--mix", help="adapter mix, e.g. exaone=0.5,support-ko=0.3,legal-summary=0.2")
    p.add_argument("--mix-requests", type=int, default=16)
    p.add_argument("--mix-rate", type=float, default=2.0)
    p.add_argument("--p95-bound-s", type=float, default=5.0)
    p.add_argument("--slo-metric", choices=bench.METRICS, default="e2e")
    p.add_argument("--max-total-s", type=float, default=bench.DEFAULT_MAX_TOTAL_SECONDS,
                   help="deadline of the whole run; nothing new starts after it")
    p.add_argument("--request-timeout-s", type=float, default=bench.DEFAULT_REQUEST_TIMEOUT_SECONDS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=1,
                   help="unrecorded requests per model before measuring")
    p.add_argument("--processes", type=int, default=4,
                   help="load mode: client processes, each with its own connection pool")
    p.add_argument("--load-requests", type=int, default=0,
                   help="load mode: requests in all (default 4 x concurrency)")
    p.add_argument("--nostream-reference", action="store_true",
                   help="load mode: also send the same requests unstreamed (the reference)")
    p.add_argument("--api-servers", type=int, default=1,
                   help="the server's apiServerCount (the verdict's CPU share per server)")
    p.add_argument("--out", default="bench-results", help="folder for JSON, CSV and PNG")
    p.add_argument("--fail-on-error", action="store_true", help="exit 1 if any request failed")
    p.set_defaults(func=cmd_bench)
    return p
