"""Benchmark of `fab deploy` on real test hosts (systemd in nspawn, Blob from Azurite, the CPU
profile of vLLM).

    sudo .venv/bin/python bench/deploy.py [--repeats R] [--out DIR]

Measures, with the fab CLI as an operator runs it:
- the first deploy of one fresh host (venv, model, patch, adapters, unit, health);
- a no-change re-deploy of that host, R times (the bar: under 10 s per host).
Several hosts at once (--parallel N) are not measured here: the test hosts share this
machine's network namespace, so their vLLMs would compete for the one vllmPort and a health
gate could be answered by another host's server. That needs a private network per host.
Prints a table, writes bench/results/deploy.json and a PNG of the step times. Needs root,
debootstrap, systemd-nspawn and Azurite (`make tools`).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from deploy_env import DeployEnv, make_env  # noqa: E402

console = Console()


def timed_deploy(env: DeployEnv, stack: Path, hosts: list[str], parallel: int, tag: str
                 ) -> dict:
    report = env.work / f"{tag}.json"
    started = time.monotonic()
    done = env.fab("deploy", "--report", str(report), "--parallel", str(parallel),
                   stack=stack, hosts=",".join(hosts))
    wall = time.monotonic() - started
    if done.returncode:
        raise SystemExit(f"{tag}: fab deploy failed\n{done.stdout[-4000:]}\n{done.stderr}")
    doc = json.loads(report.read_text())
    return {"tag": tag, "hosts": len(hosts), "parallel": parallel, "wall_s": round(wall, 2),
            "per_host": doc["hosts"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--work", type=Path, default=Path("/tmp/exaone-bench-deploy"))
    args = p.parse_args()

    env = make_env(args.work, name="bench-0")

    runs: list[dict] = []
    try:
        stack = env.write_stack("bench")
        with console.status("first deploy of one fresh host"):
            runs.append(timed_deploy(env, stack, [env.host.host_string], 1, "first-1"))
        for i in range(args.repeats):
            with console.status(f"no-change re-deploy {i + 1}/{args.repeats}"):
                runs.append(timed_deploy(env, stack, [env.host.host_string], 1, f"again-1-{i}"))
    finally:
        env.stop()

    table = Table(title="fab deploy (CPU profile test hosts, this machine)")
    for col in ("run", "hosts", "parallel", "wall s", "slowest step"):
        table.add_column(col)
    for run in runs:
        steps = [s for h in run["per_host"] for s in h["steps"]]
        slow = max(steps, key=lambda s: s["seconds"])
        table.add_row(run["tag"], str(run["hosts"]), str(run["parallel"]), f"{run['wall_s']:.1f}",
                      f"{slow['step']} {slow['seconds']:.1f} s")
    console.print(table)
    again1 = [r["wall_s"] for r in runs if r["tag"].startswith("again-1-")]
    summary = {"first_deploy_s": runs[0]["wall_s"],
               "no_change_median_s": statistics.median(again1),
               "no_change_max_s": max(again1)}
    console.print(summary)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "deploy.json").write_text(json.dumps(
        {"machine": platform.node(), "cpus": __import__("os").cpu_count(), "summary": summary,
         "runs": runs}, indent=2) + "\n")
    plot(runs, args.out / "deploy.png")
    console.print(f"wrote {args.out / 'deploy.json'} and {args.out / 'deploy.png'}")
    return 0


def plot(runs: list[dict], path: Path) -> None:
    """Linear seconds per step: the first deploy (one run) beside every no-change re-deploy
    (median bar, each run a dot), totals in the legend; a skipped step is a labelled gap, not
    a bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    def steps_of(run: dict) -> dict[str, dict]:
        return {s["step"]: s for s in run["per_host"][0]["steps"]}

    first = steps_of(runs[0])
    agains = [steps_of(r) for r in runs if r["tag"].startswith("again-1-")]
    names = list(first)
    fig, ax = plt.subplots(figsize=(10, 4.4))
    for x, name in enumerate(names):
        for offset, runs_of, color in ((-0.2, [first], "tab:blue"), (0.2, agains, "tab:orange")):
            done = [r[name] for r in runs_of if name in r and r[name]["status"] != "skipped"]
            if not done:
                ax.text(x + offset, 0, "skipped", rotation=90, ha="center", va="bottom",
                        fontsize=7, color="grey")
                continue
            seconds = [s["seconds"] for s in done]
            ax.bar(x + offset, statistics.median(seconds), 0.4, color=color)
            if len(seconds) > 1:
                ax.scatter([x + offset] * len(seconds), seconds, color="black", s=8, zorder=3)
    total_first = runs[0]["wall_s"]
    again_walls = [r["wall_s"] for r in runs if r["tag"].startswith("again-1-")]
    handles = [Patch(color="tab:blue", label=f"first deploy: {total_first:.0f} s in all"),
               Patch(color="tab:orange", label=(
                   f"no-change re-deploy, {len(again_walls)} runs: median "
                   f"{statistics.median(again_walls):.1f} s, "
                   f"{min(again_walls):.1f}-{max(again_walls):.1f} s"
                   if again_walls else "no-change re-deploy: not run"))]
    ax.set_xticks(list(range(len(names))), names, rotation=30, ha="right")
    ax.set_ylabel("seconds")
    ax.set_title("fab deploy per step, one CPU-profile test host (bars: median; dots: each run; "
                 "skipped steps were not needed)", fontsize=9)
    ax.legend(handles=handles, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
