"""``fab -H HOST[,HOST...] bench --stack dev``: the serving benchmark against each host.

It runs on the operator's machine, not on the host: each host's vLLM API is reached at
http://HOST:<vllmPort> (the API port must be open to the operator's network, see apiCidrs),
with the API key from the stack's apiKey/apiKeyRef. Results go to OUT/<stack>/<host>/.
"""

from __future__ import annotations

from pathlib import Path

from fabric import task
from invoke.exceptions import Exit

from serving.bench import engine
from serving.stack import secretref, stackfile
from serving.stack.errors import SpecError
from serving.stack.spec import Spec


def bench_host(
    host: str,
    spec: Spec,
    api_key: str | None,
    *,
    out: Path,
    modes: list[str],
    config: dict,
) -> tuple[engine.BenchReport, list[Path]]:
    """Benchmark one host's endpoint and write its files; ``config`` holds BenchConfig fields."""
    cfg = engine.BenchConfig(endpoint=f"http://{host}:{spec.vllm.port}", api_key=api_key,
                             **config)
    report = engine.run(cfg, modes)
    return report, engine.write_outputs(report, out / spec.stack / host)


@task(help={
    "stack": "stack name: Pulumi.<STACK>.yaml (port and API key come from it)",
    "out": "results folder (per stack and host below it)",
    "modes": "comma-separated: sequential,concurrent,sweep,mixed",
    "requests": "requests per model (sequential, concurrent)",
    "rates": "sweep rates in requests/s, comma-separated",
    "max_tokens": "output tokens per request",
    "p95_bound_s": "p95 end-to-end latency bound of the sweep, in seconds",
    "max_total_s": "deadline per host, in seconds",
    "mix": "adapter mix NAME=WEIGHT,... (default: uniform over base and adapters)",
})
def bench(c, stack: str = "dev", out: str = "bench-results",
          modes: str = ",".join(engine.MODES), requests: int = 3, rates: str = "0.5,1,2,4",
          max_tokens: int = 64, p95_bound_s: float = 5.0,
          max_total_s: float = engine.DEFAULT_MAX_TOTAL_SECONDS, mix: str = "") -> None:
    """Benchmark each host's vLLM endpoint from this machine (hosts from --hosts/-H)."""
    from serving.bench.cli import out as console
    from serving.bench.cli import summary_table

    host = getattr(c, "host", None)
    if not host:
        raise Exit("no host: give the VMs with --hosts/-H (e.g. fab -H 10.40.0.4 bench)", code=2)
    try:
        spec = stackfile.load(stack=stack)
        key = None if spec.api_key.kind == "none" else secretref.resolve(
            spec.api_key, root=stackfile.ROOT, stack=stack)
        config = {
            "requests_per_model": requests,
            "rates": tuple(float(r) for r in rates.split(",") if r.strip()),
            "max_tokens": max_tokens,
            "p95_bound_s": p95_bound_s,
            "max_total_s": max_total_s,
            "mix": engine.parse_mix(mix) if mix else {},
        }
    except SpecError as exc:
        raise Exit("\n".join(str(p) for p in exc.problems), code=2) from None
    except ValueError as exc:
        raise Exit(f"bad option: {exc}", code=2) from None
    try:
        report, files = bench_host(host, spec, key, out=Path(out),
                                   modes=[m for m in modes.split(",") if m], config=config)
    except engine.BenchError as exc:
        raise Exit(f"{host}: {exc}", code=1) from None
    console.print(summary_table(report))
    if report.stopped_early:
        console.print(f"{host}: stopped early: {report.stopped_early}")
    for path in files:
        console.print(f"wrote {path}")
