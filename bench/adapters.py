"""Benchmark of runtime adapter operations on the local CPU target.

    .venv/bin/python bench/adapters.py [--cycles N] [--requests N] [--repeats N] [--out DIR]

Starts the local stack's vLLM if it is not running (and stops it again after), then:
- latency of add, hotfix, rollback and remove, each verified by answers as in production,
  median and max over N add->hotfix->rollback->remove cycles after one warm-up cycle (the
  first time this process and this server do each operation; recorded apart); hotfix and
  rollback also split into "answers" (the new version answers, checked) and "settle" (the
  plain reload after it, including the wait for a 1 s pause in the adapter's requests);
- single-stream tokens per second on one adapter before a hotfix, after the in-place swap
  before it is settled, and after the settle (vLLM re-reads in-place loaded weights on every
  step until then);
- generated tokens per second on the base model, on one adapter, and spread over all
  adapters, under the same load (fixed request count, concurrency and length).
Prints tables and writes adapters.json and adapters.png to --out (default bench/results).
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

from serving.adapters.client import VllmClient  # noqa: E402
from serving.adapters.ops import AdapterOps  # noqa: E402
from serving.adapters.record import RecordStore  # noqa: E402
from serving.local import run as localrun  # noqa: E402
from serving.local.loramaker import make_adapter  # noqa: E402
from serving.stack import layout as layouts  # noqa: E402
from serving.stack import secretref, stackfile  # noqa: E402

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


def _single_stream(client: VllmClient, model: str, requests: int = 6, tokens: int = 64) -> float:
    started = time.monotonic()
    done = sum(client.complete(model, PROMPT, max_tokens=tokens, ignore_eos=True)
               .completion_tokens for _ in range(requests))
    return done / (time.monotonic() - started)


def _settle_phases(ops: AdapterOps, client: VllmClient, versions: dict[str, Path],
                   repeats: int) -> dict[str, list[float]]:
    """Single-stream tok/s on NAME: before, after an unsettled in-place hotfix, after settle."""
    def measure() -> list[float]:
        _single_stream(client, NAME, requests=2)  # warm up
        return [_single_stream(client, NAME) for _ in range(repeats)]

    ops.add(NAME, "1", versions["1"])
    phases = {"before hotfix": measure()}
    wait = ops.settle_wait_s
    ops.settle_wait_s = 0  # swap in place only
    try:
        ops.hotfix(NAME, "2", versions["2"])
    finally:
        ops.settle_wait_s = wait
    phases["in place, not settled"] = measure()
    ops.settle([NAME])
    phases["after settle"] = measure()
    ops.remove(NAME)
    return phases


def plot(latencies: dict[str, list[float]], phases: dict[str, list[float]], path: Path, *,
         warmup: dict[str, float] | None = None, note: str = "") -> None:
    """Left: each operation's whole (every cycle a dot, the median a bar); hotfix and rollback
    split into their parts, stacked, so the parts add up to the whole. The run's first cycle
    (the first time this process and this server do each operation) is drawn apart and left
    out of the medians. Right: tokens/s of one stream around a hotfix, every repeat."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6))
    ops = [op for op in latencies if ":" not in op]
    for i, op in enumerate(ops):
        whole = latencies[op]
        parts = [f"{op}: answers", f"{op}: settle"]
        if all(latencies.get(part) for part in parts):
            bottom = 0.0
            for part, color in zip(parts, ("tab:blue", "tab:cyan"), strict=True):
                height = statistics.median(latencies[part])
                left.bar(i, height, bottom=bottom, color=color, width=0.6,
                         label=part.split(": ")[1] + " (median)" if i == 1 else None)
                bottom += height
        else:
            left.bar(i, statistics.median(whole), color="tab:blue", width=0.6)
        left.scatter([i] * len(whole), whole, color="black", s=12, zorder=3,
                     label="each cycle (whole operation)" if i == 0 else None)
        if warmup and op in warmup:
            left.scatter([i + 0.25], [warmup[op]], facecolors="none", edgecolors="red", s=30,
                         zorder=3, label="first cycle of the run (warm-up), not in the medians"
                         if i == 0 else None)
    left.set_xticks(range(len(ops)), [f"{op}\nn={len(latencies[op])}" for op in ops])
    left.set_ylabel("seconds")
    left.set_title(f"adapter operations, verified by answers{note}", fontsize=9)
    left.legend(fontsize=7)
    labels = list(phases)
    for i, label in enumerate(labels):
        values = phases[label]
        right.bar(i, statistics.median(values), width=0.6,
                  color=["tab:green", "tab:orange", "tab:green"][i % 3])
        right.scatter([i] * len(values), values, color="black", s=12, zorder=3)
    right.set_xticks(range(len(labels)), [f"{lb}\nn={len(phases[lb])}" for lb in labels],
                     fontsize=8)
    right.set_ylabel("tokens/s, one stream (bar: median; dots: each repeat)")
    right.set_title("one adapter around a hotfix", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=5)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
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
    latencies: dict[str, list[float]] = {op: [] for op in (
        "add", "hotfix", "hotfix: answers", "hotfix: settle", "rollback", "rollback: answers",
        "rollback: settle", "remove")}
    warmup: dict[str, float] = {}
    try:
        if NAME in client.adapters():
            ops.remove(NAME)
        for cycle in range(args.cycles + 1):
            for op, call in (("add", lambda: ops.add(NAME, "1", versions["1"])),
                             ("hotfix", lambda: ops.hotfix(NAME, "2", versions["2"])),
                             ("rollback", lambda: ops.rollback(NAME)),
                             ("remove", lambda: ops.remove(NAME))):
                t0 = time.monotonic()
                outcome = call()
                if cycle == 0:  # warm-up: recorded apart, not in the medians
                    warmup[op] = time.monotonic() - t0
                    continue
                latencies[op].append(time.monotonic() - t0)
                if outcome.live_s is not None and outcome.settle_s is not None:
                    latencies[f"{op}: answers"].append(outcome.live_s)
                    latencies[f"{op}: settle"].append(outcome.settle_s)
        phases = _settle_phases(ops, client, versions, args.repeats)

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
    phase_table = Table(title=f"Single-stream tokens/s on {NAME} around a hotfix "
                              f"({args.repeats} repeats x 6 requests x 64 tokens)")
    for column in ("phase", "median tok/s", "min", "max", "vs before"):
        phase_table.add_column(column, justify="right" if column != "phase" else "left")
    base_speed = statistics.median(phases["before hotfix"])
    for label, values in phases.items():
        phase_table.add_row(label, f"{statistics.median(values):.1f}", f"{min(values):.1f}",
                            f"{max(values):.1f}",
                            f"{statistics.median(values) / base_speed - 1:+.1%}")
    console.print(ops_table)
    console.print(phase_table)
    console.print(tps_table)

    results = args.out
    results.mkdir(parents=True, exist_ok=True)
    plot(latencies, phases, results / "adapters.png", warmup=warmup,
         note=f" ({args.cycles} cycles after one warm-up, {__import__('os').cpu_count()} "
              "CPU cores, tiny model)")
    out = results / "adapters.json"
    out.write_text(json.dumps({
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version()},
        "stack": spec.stack, "vllm": f"{spec.vllm.package} {spec.vllm.version}",
        "cycles": args.cycles, "warmup_cycle_s": warmup, "latency_s": {
            op: {"median": statistics.median(v), "max": max(v), "all": v}
            for op, v in latencies.items()},
        "single_stream_tokens_per_s": {k: {"median": statistics.median(v), "all": v}
                                       for k, v in phases.items()},
        "throughput": {"requests": args.requests, "max_tokens": MAX_TOKENS,
                       "concurrency": CONCURRENCY,
                       "tokens_per_s": {k: {"median": statistics.median(v), "all": v}
                                        for k, v in speeds.items()}},
    }, indent=2) + "\n")
    console.print(f"wrote {out} and {results / 'adapters.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
