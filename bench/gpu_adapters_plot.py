"""Plot of the GPU tier's adapter figures (``pytest -m gpu tests/gpu`` writes them).

    .venv/bin/python bench/gpu_adapters_plot.py [JSON] [--out PNG]

Reads docs/bench-gpu-adapters/gpu-adapters.json (or JSON) and draws two panels: the answer
check's margin (each candidate's repeat noise against the distances between candidates) and
the operations' latency on the GPU next to the CPU benchmark's (docs/bench-adapters).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ROOT = Path(__file__).resolve().parent.parent
GPU = ROOT / "docs" / "bench-gpu-adapters" / "gpu-adapters.json"
CPU = ROOT / "docs" / "bench-adapters" / "adapters.json"


def _cpu_latency() -> dict[str, dict[str, float]]:
    try:
        data = json.loads(CPU.read_text())
    except (OSError, ValueError):
        return {}
    ops = data.get("latency_s") or data.get("latency") or {}
    return {k: v for k, v in ops.items() if isinstance(v, dict) and "median" in v}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="?", default=str(GPU))
    parser.add_argument("--out", default=str(GPU.with_suffix(".png")))
    args = parser.parse_args()
    data = json.loads(Path(args.json).read_text())
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))

    scores = data["answer_check_scores"]
    noise, distances = scores["noise"], scores["distances"]
    left.bar(list(noise), list(noise.values()), color="tab:orange", label="repeat noise")
    left.axhline(min(distances.values()), color="tab:blue", linestyle="--",
                 label=f"closest two candidates ({min(distances.values()):.2f})")
    left.set_yscale("log")
    left.set_ylim(0.005, 3 * max(distances.values()))
    left.set_ylabel("mean |logprob difference| per token")
    left.set_title("answer check on the GPU: noise vs distance between candidates")
    left.legend(loc="center right")

    gpu = {"add": data["add_s"], "remove": data["remove_s"],
           "hotfix (under load)": data["cycles_under_streaming_load"]["hotfix_s"],
           "rollback (under load)": data["cycles_under_streaming_load"]["rollback_s"]}
    cpu = _cpu_latency()
    names = list(gpu)
    x = range(len(names))
    right.bar([i - 0.2 for i in x], [gpu[n]["median"] for n in names], width=0.4,
              label=f"GPU ({data['device']}, vLLM {data['vllm']}) median", color="tab:green")
    right.scatter([i - 0.2 for i in x], [gpu[n]["max"] for n in names], color="tab:red",
                  zorder=3, label="max")
    cpu_names = [n.split(" ")[0] for n in names]
    if cpu:
        right.bar([i + 0.2 for i in x], [cpu.get(n, {}).get("median", 0) for n in cpu_names],
                  width=0.4, label="CPU (2 cores, no other load) median", color="tab:gray")
    right.set_xticks(list(x), names, rotation=15)
    right.set_ylabel("seconds")
    right.set_ylim(0, 1.6 * max(v["max"] for v in gpu.values()))
    right.set_title("adapter operations, verified by the answer check")
    right.legend(loc="upper left", fontsize="small")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
