"""Benchmark of runtime adapter operations on the local CPU target.

    .venv/bin/python bench/adapters.py [--cycles N] [--requests N] [--repeats N]

Starts the local stack's vLLM if it is not running (and stops it again after), then:
- latency of add, hotfix, rollback and remove, each verified by answers as in production,
  median and max over N add->hotfix->rollback->remove cycles;
- generated tokens per second on the base model, on one adapter, and spread over all
  adapters, under the same load (fixed request count, concurrency and length).
Prints a table and writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from serving import layout as layouts  # noqa: E402
from serving import localrun, secretref, stackfile  # noqa: E402
from serving.adapter_ops import AdapterOps  # noqa: E402
from serving.adapter_record import RecordStore  # noqa: E402
from serving.loramaker import make_adapter  # noqa: E402
from serving.vllm_client import VllmClient  # noqa: E402

NAME = "bench-adapter"
CONCURRENCY = 4
MAX_TOKENS = 32
PROMPT = "Hello! How are you today?"


def _throughput(client: VllmClient, models: list[str], requests: int) -> float:
    def one(i: int) -> int:
        return client.complete(models[i % len(models)], PROMPT, max_tokens=MAX_TOKENS,
                               ignore_eos=True).completion_tokens

    with ThreadPoolExecutor(max_workers=CONCURRENCY) as pool:
        started = time.monotonic()
        tokens = sum(pool.map(one, range(requests)))
        return tokens / (time.monotonic() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=5)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    console = Console()

    spec = stackfile.load(stack="local")
    layout = layouts.local(ROOT)
    server = localrun.LocalServer(spec, layout)
    localrun.setup_files(spec, layout, root=ROOT)
    key = secretref.resolve(spec.api_key, root=ROOT, stack=spec.stack)
    started_here = server.pid() is None
    localrun.start(server, key)
    client = VllmClient(server.endpoint, key)
    # Its own record: the bench adapter never enters the stack's record.
    ops = AdapterOps(spec, layout, client, RecordStore(Path(layout.state_dir, "bench-state")))
    model = Path(layout.model_path(spec))
    incoming = Path(layout.state_dir, "incoming", NAME)
    versions = {v: make_adapter(incoming / v, base=model, rank=8, seed=seed,
                                base_model_id=spec.model.id)
                for v, seed in (("1", 401), ("2", 402))}
    latencies: dict[str, list[float]] = {op: [] for op in ("add", "hotfix", "rollback", "remove")}
    try:
        if NAME in client.adapters():
            ops.remove(NAME)
        for _ in range(args.cycles):
            for op, call in (("add", lambda: ops.add(NAME, "1", versions["1"])),
                             ("hotfix", lambda: ops.hotfix(NAME, "2", versions["2"])),
                             ("rollback", lambda: ops.rollback(NAME)),
                             ("remove", lambda: ops.remove(NAME))):
                t0 = time.monotonic()
                call()
                latencies[op].append(time.monotonic() - t0)

        adapters = [a.name for a in spec.adapters]
        loads = {
            f"base ({spec.model.served_name})": [spec.model.served_name],
            f"one adapter ({adapters[0]})": adapters[:1],
            f"all adapters ({', '.join(adapters)})": adapters,
            "base + adapters mixed": [spec.model.served_name, *adapters],
        }
        _throughput(client, [spec.model.served_name, *adapters], CONCURRENCY)  # warm up
        speeds = {label: [_throughput(client, models, args.requests)
                          for _ in range(args.repeats)] for label, models in loads.items()}
    finally:
        client.close()
        if started_here:
            localrun.stop(server)

    ops_table = Table(title=f"Adapter operations, {args.cycles} cycles (verified by answers)")
    for column in ("operation", "median s", "max s"):
        ops_table.add_column(column, justify="right" if column != "operation" else "left")
    for op, values in latencies.items():
        ops_table.add_row(op, f"{statistics.median(values):.3f}", f"{max(values):.3f}")
    tps_table = Table(title=(f"Generated tokens/s: {args.requests} requests x {MAX_TOKENS} tokens, "
                             f"concurrency {CONCURRENCY}, {args.repeats} repeats"))
    for column in ("load", "median tok/s", "min", "max"):
        tps_table.add_column(column, justify="right" if column != "load" else "left")
    for label, values in speeds.items():
        tps_table.add_row(label, f"{statistics.median(values):.1f}", f"{min(values):.1f}",
                          f"{max(values):.1f}")
    console.print(ops_table)
    console.print(tps_table)

    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    out = results / f"adapters-{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.write_text(json.dumps({
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version()},
        "stack": spec.stack, "vllm": f"{spec.vllm.package} {spec.vllm.version}",
        "cycles": args.cycles, "latency_s": {
            op: {"median": statistics.median(v), "max": max(v), "all": v}
            for op, v in latencies.items()},
        "throughput": {"requests": args.requests, "max_tokens": MAX_TOKENS,
                       "concurrency": CONCURRENCY,
                       "tokens_per_s": {k: {"median": statistics.median(v), "all": v}
                                        for k, v in speeds.items()}},
    }, indent=2) + "\n")
    console.print(f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
