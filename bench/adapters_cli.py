"""Wall time of the day-two adapter commands as an operator runs them: one process each.

    .venv/bin/python -m serving local start --stack local
    .venv/bin/python bench/adapters_cli.py [--cycles N]
    .venv/bin/python -m serving local stop --stack local

Against the local stack's running vLLM, each cycle runs `python -m serving adapters add`,
`hotfix`, `rollback` and `remove` as subprocesses on fresh adapter folders, with PEFT's
verdict cache (``serving.adapters.peftparse``) empty at the first command of the run ("cold":
PEFT is imported once) and kept after it ("warm"). Its own record folder: the server's
record and what was added by hand are not touched. Prints median and max per command.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from serving.adapters.peftparse import CACHE_ENV  # noqa: E402
from serving.local.loramaker import make_adapter  # noqa: E402
from serving.stack import layout as layouts  # noqa: E402
from serving.stack import stackfile  # noqa: E402

NAME = "bench-cli"


def _timed(argv: list[str], env: dict[str, str]) -> float:
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "serving", *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, check=False)
    seconds = time.monotonic() - started
    if done.returncode:
        raise SystemExit(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()}")
    return seconds


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cycles", type=int, default=3)
    args = p.parse_args()
    spec = stackfile.load(stack="local")
    base = Path(layouts.local(ROOT).model_path(spec))
    times: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-adapters-cli-") as tmp:
        env = {**os.environ, CACHE_ENV: str(Path(tmp, "peft"))}
        common = ["--stack", "local", "--state-dir", str(Path(tmp, "state"))]
        for cycle in range(args.cycles):
            folders = [make_adapter(Path(tmp, "in", f"{cycle}-{v}"), base=base, rank=8,
                                    seed=900 + 10 * cycle + v, base_model_id=spec.model.id)
                       for v in (1, 2)]
            if cycle == 0:  # the maker keeps PEFT's verdict: start the run cold
                for entry in Path(tmp, "peft").glob("*"):
                    entry.unlink()
            version = f"{cycle}"
            for label, argv in (
                ("add", ["add", NAME, f"{version}.1", "--from", str(folders[0])]),
                ("hotfix", ["hotfix", NAME, f"{version}.2", "--from", str(folders[1])]),
                ("rollback", ["rollback", NAME]),
                ("remove", ["remove", NAME]),
            ):
                key = f"{label} (cold)" if cycle == 0 and label == "add" else label
                times.setdefault(key, []).append(_timed(["adapters", *argv, *common], env))
        shutil.rmtree(Path(layouts.local(ROOT).adapters_dir, NAME), ignore_errors=True)
    table = Table(title=f"python -m serving adapters ..., wall seconds, {os.cpu_count()} cores, "
                        f"load {os.getloadavg()[0]:.1f}")
    for column in ("command", "runs", "median s", "max s"):
        table.add_column(column)
    for key, values in times.items():
        table.add_row(key, str(len(values)), f"{statistics.median(values):.2f}",
                      f"{max(values):.2f}")
    Console().print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
