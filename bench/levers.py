"""Server levers on the local CPU target: each on a freshly started vLLM, one table.

    .venv/bin/python bench/levers.py lora [--concurrency 1,2] [--max-tokens 16] [--out DIR]
    .venv/bin/python bench/levers.py front-end [--counts 1,2] [--concurrency 8] [--out DIR]

``lora``: the LoRA levers of the local stack's adapter set (``serving.bench.levers``):
adapter/base tokens/s per concurrency, streamed, and what limited each figure.
``front-end``: the same streamed load on servers with each API-server count, with the
unstreamed reference; ratios against the first count.
Writes levers.json/.csv/.md/.png or front-end.* to --out (default bench/results). The GPU
tier runs the same machinery on the GPU host (tests/gpu/test_gpu_perf.py). On two shared CPU
cores the figures show the machinery works, not what a GPU does.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from serving.bench import levers as lv  # noqa: E402
from serving.bench.engine import BenchConfig  # noqa: E402
from serving.local import lever_server  # noqa: E402
from serving.local import run as localrun  # noqa: E402
from serving.stack import layout as layouts  # noqa: E402
from serving.stack import secretref, stackfile  # noqa: E402

out = Console(width=None if sys.stdout.isatty() else 200)


def ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def local_values() -> dict:
    document = yaml.safe_load(stackfile.stack_path("local").read_text())
    return {k.split(":", 1)[1]: v for k, v in document["config"].items()}


def print_table(report: lv.Doc | lv.LeverReport, title: str) -> None:
    header, rows = lv.table_rows(report)
    table = Table(title=title)
    for column in header:
        table.add_column(column, justify="left" if column in ("lever", "error") else "right")
    for row in rows:
        table.add_row(*row[:len(header)])
    out.print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=("lora", "front-end", "merge"),
                        help="merge: one table from several results files (--files)")
    parser.add_argument("--files", nargs="+", type=Path, default=[],
                        help="merge: levers/front-end JSON files of separate runs")
    parser.add_argument("--concurrency", type=ints, default=None,
                        help="comma-separated (lora default 1,2; front-end default 8)")
    parser.add_argument("--counts", type=ints, default=(1, 2),
                        help="front-end: API-server counts to compare")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--per-lane", type=int, default=4, help="requests per open request")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--tuned-config-folder", default="")
    parser.add_argument("--only", help="comma-separated lever names (lora)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--name", default="", help="merge: the output files' name "
                        "(default levers or front-end)")
    args = parser.parse_args(argv)
    if args.kind == "merge":
        doc = lv.merge_docs([json.loads(f.read_text()) for f in args.files])
        name = args.name or ("levers" if doc["kind"] == "lora" else "front-end")
        print_table(doc, f"{name} (merged from {len(args.files)} files)")
        for path in lv.write_outputs(doc, args.out, name):
            out.print(f"wrote {path}")
        return 0

    spec = stackfile.load(stack="local")
    layout = layouts.local(ROOT)
    localrun.setup_files(spec, layout, root=ROOT)
    key = secretref.resolve(spec.api_key, root=ROOT, stack=spec.stack)
    # A free port: other checkouts on this machine may serve the local stack's own.
    values = {**local_values(), "vllmPort": free_port()}
    serve = lever_server.spec_server(values, layout, key, stack="local")
    cfg = BenchConfig(endpoint="", max_tokens=args.max_tokens, warmup=0,
                      request_timeout_s=300, max_total_s=1800)
    if args.kind == "lora":
        levers = lv.lora_levers(spec, tuned_config_folder=args.tuned_config_folder,
                                batched_tokens=(256,))
        if args.only:
            wanted = set(args.only.split(","))
            levers = [lever for lever in levers if lever.name in wanted]
        report = lv.run_levers(levers, serve, cfg, concurrencies=args.concurrency or (1, 2),
                               processes=args.processes, per_lane=args.per_lane)
        name, title = "levers", "LoRA levers (local CPU): adapter/base tokens/s, streamed"
    else:
        report = lv.run_levers(lv.front_end_levers(args.counts), serve, cfg, kind="front-end",
                               concurrencies=args.concurrency or (8,),
                               processes=args.processes, per_lane=args.per_lane,
                               unstreamed_reference=True)
        name, title = "front-end", "API-server count (local CPU): streamed tokens/s"
    print_table(report, title)
    for path in lv.write_outputs(report, args.out, name):
        out.print(f"wrote {path}")
    return 1 if report.errors and len(report.errors) == len(report.levers) else 0


if __name__ == "__main__":
    sys.exit(main())
