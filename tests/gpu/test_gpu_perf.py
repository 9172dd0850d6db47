"""Tier 4 (``pytest -m gpu``): serving performance on a real GPU, the figures of the perf issue.

The same model and adapters as the adapter tier (EXAONE-3.5-2.4B shapes, random bf16, four
rank-32 adapters on all seven modules), served with the project's VM argv for a stack shaped
like Pulumi.dev.yaml (maxLoras 4, maxCpuLoras 8, maxModelLen 8192, gpuMemoryUtilization 0.90).
Each test starts its own servers (one per lever) through ``serving.bench.levers``:

- ``test_planner_matches_vllm``: the planner's KV tokens against vLLM's start-up line (goal:
  within 0.5%), vLLM's own memory split (weights, torch peak, CUDA graphs) and the cold-start
  phases from its log, into plan-check.json;
- ``test_front_end``: 1, 2 and 4 API servers (``EXAONE_GPU_API_SERVERS``) under the same
  streamed load at 256 concurrent, each with the unstreamed reference (goal: streamed >= 0.9
  x unstreamed), front-end-<counts>.*;
- ``test_vllm_bench_serve_cross_check``: vLLM's own `vllm bench serve` and the project's load
  on the same baseline server, client-side figures side by side (cross-check.json);
- ``test_lora_levers``: the LoRA levers at 1, 5 and 256 concurrent, base and adapters
  streamed (goals: adapters >= 0.85 x base at 256, >= 0.75 x at 1), levers-<subset>.*; and
  what the planner recommends from them.

Speed is measured, not asserted. ``EXAONE_GPU_LEVERS`` (comma-separated names) runs a subset
so each call stays within a time limit (a name twice starts that server twice, e.g. the
baseline first and last); ``bench/levers.py merge`` joins the subsets' files, and
``EXAONE_GPU_RUN_NAME`` names a run's files (default: from the subset).
Figures go to ``$EXAONE_GPU_OUT`` (default: a temporary folder).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import pytest
from test_gpu_adapters import _PASS, ADAPTERS, OUT, _prepare, _require_gpu, _values

from serving.bench import levers as lv
from serving.bench.engine import BenchConfig
from serving.local import lever_server
from serving.plan import capacity, measured
from serving.plan import cli as plan_cli
from serving.stack import stackfile
from serving.stack.digest import folder_digest

pytestmark = [pytest.mark.gpu]

PORT = 8124
START_DEADLINE_SECONDS = 900.0
MAX_TOKENS = int(os.environ.get("EXAONE_GPU_MAX_TOKENS", "128"))
PROCESSES = int(os.environ.get("EXAONE_GPU_PROCESSES", "8"))
CONCURRENCIES = tuple(int(c) for c in os.environ.get("EXAONE_GPU_CONCURRENCIES",
                                                      "1,5,256").split(","))
# Requests per lane: 4 keeps a full lever table within one call; more steadies c=1.
PER_LANE = int(os.environ.get("EXAONE_GPU_PER_LANE", str(lv.REQUESTS_PER_LANE)))
KV_LINE_RE = re.compile(r"GPU KV cache size: ([\d,]+) tokens")
# vLLM's own log lines (0.25-0.33): the memory split and the start-up phases.
LOG_FIGURES = {
    "kv_cache_gib": r"Available KV cache memory: ([\d.]+) GiB",
    "non_kv_gib": r"Total non KV cache memory: ([\d.]+)GiB",
    "torch_peak_increase_gib": r"torch peak memory increase: ([\d.]+)GiB",
    # 0.25.1 says "Model loading took 4.9 GiB and 3.57 seconds"; later releases "weights
    # memory: 4.9GiB".
    "weights_gib": r"(?:weights memory: |Model loading took )([\d.]+) ?GiB",
    "cuda_graph_estimate_gib": r"Estimated CUDA graph memory: ([\d.]+) GiB",
    "cuda_graph_gib": r"Graph capturing finished in [\d.]+ secs, took ([\d.]+) GiB",
    "cuda_graphs_s": r"Graph capturing finished in ([\d.]+) secs",
    "torch_compile_s": r"torch\.compile (?:takes|took) ([\d.]+) s in total",
    "weights_load_s": r"Loading weights took ([\d.]+) seconds",
    "engine_init_s": r"init engine \(profile, create kv cache, warmup model\) took ([\d.]+) s",
}


def log_figures(text: str) -> dict[str, float]:
    """The last value of each figure vLLM logged (a log may hold several starts)."""
    found = {}
    for name, pattern in LOG_FIGURES.items():
        values = re.findall(pattern, text)
        if values:
            found[name] = float(values[-1])
    return found


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    _, vllm = _require_gpu()
    root = Path(os.environ.get("EXAONE_GPU_ROOT") or tmp_path_factory.mktemp("gpu-perf"))
    _, layout, key = _prepare(root, vllm.__version__, state="perf", port=PORT, util="0.90")
    digests = {n: folder_digest(Path(layout.adapters_dir) / n / "1") for n in ADAPTERS}
    values = _values(root, vllm.__version__, digests)
    values.update({"vllmPort": PORT, "maxModelLen": 8192, "gpuMemoryUtilization": "0.90"})
    serve = lever_server.spec_server(
        values, layout, key, stack="gpu", deadline_s=START_DEADLINE_SECONDS,
        extra_env={k: os.environ[k] for k in _PASS if k in os.environ})
    cfg = BenchConfig(endpoint="", max_tokens=MAX_TOKENS, request_timeout_s=300,
                      max_total_s=900)
    OUT.mkdir(parents=True, exist_ok=True)
    return {"values": values, "layout": layout, "serve": serve, "cfg": cfg,
            "version": vllm.__version__}


def _log(setup: dict[str, Any]) -> str:
    return (Path(setup["layout"].state_dir) / "vllm.log").read_text(errors="replace")


def start_figures(text: str) -> list[dict[str, float]]:
    """KV tokens, memory split and phases of each start in a log, oldest first (the project's
    launcher writes a ``--- start`` line before each)."""
    starts = []
    for part in re.split(r"\n--- start [^\n]*---\n", text)[1:]:
        figures = log_figures(part)
        kv = KV_LINE_RE.findall(part)
        if kv:
            figures["vllm_kv_tokens"] = int(kv[-1].replace(",", ""))
        starts.append(figures)
    return starts


def _write_starts(setup: dict[str, Any], names: list[str], out_name: str) -> None:
    """Each lever's start figures: every lever is one more point for the planner's fit."""
    import torch

    starts = start_figures(_log(setup))[-len(names):]
    rows = [{"lever": n, **f} for n, f in zip(names, starts, strict=False)]
    document = {"gpu_total_gib": torch.cuda.mem_get_info()[1] / 2**30, "starts": rows}
    (OUT / f"{out_name}-starts.json").write_text(json.dumps(document, indent=2) + "\n")


def test_planner_matches_vllm(setup: dict[str, Any]) -> None:
    with setup["serve"](lv.Lever("baseline", "")) as target:
        start_s = target.start_s
    text = _log(setup)
    found = KV_LINE_RE.findall(text)
    assert found, "no 'GPU KV cache size' line in vLLM's log"
    vllm_tokens = int(found[-1].replace(",", ""))
    spec = stackfile.from_values(setup["values"], stack="gpu")
    import torch

    total = torch.cuda.mem_get_info()[1]
    p = plan_cli.plan_input(spec)
    assert p is not None
    hardware = capacity.Hardware("this GPU", "gpu", 1, total, os.cpu_count() or 0, 0,
                                 torch.cuda.get_device_name(0))
    planned = capacity.plan(dataclasses.replace(p, hardware=hardware))
    figures = {"vllm": setup["version"], "device": hardware.gpu_model,
               "gpu_total_gib": total / 2**30, "vllm_kv_tokens": vllm_tokens,
               "planned_kv_tokens": planned.kv.tokens,
               "planned_overhead_gib": planned.overhead_bytes_per_gpu / 2**30,
               "deviation": planned.kv.tokens / vllm_tokens - 1, "start_to_health_s": start_s,
               **log_figures(text)}
    (OUT / "plan-check.json").write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2), file=sys.stderr)
    assert abs(figures["deviation"]) <= 0.005, figures


def test_front_end(setup: dict[str, Any]) -> None:
    counts = tuple(int(c) for c in os.environ.get("EXAONE_GPU_API_SERVERS", "1,2,4").split(","))
    report = lv.run_levers(lv.front_end_levers(counts), setup["serve"], setup["cfg"],
                           kind="front-end", concurrencies=(256,), processes=PROCESSES,
                           unstreamed_reference=True)
    name = "front-end-" + "-".join(map(str, counts))
    lv.write_outputs(report, OUT, name)
    _write_starts(setup, [f"api-server-count {c}" for c in counts], name)
    assert not report.errors, report.errors
    advice = measured.advice([OUT / f"{name}.json"])
    (OUT / f"{name}-advice.json").write_text(json.dumps([a.__dict__ for a in advice],
                                                        indent=2) + "\n")


def test_lora_levers(setup: dict[str, Any]) -> None:
    spec = stackfile.from_values(setup["values"], stack="gpu")
    # EXAONE_TUNED_CONFIG_FOLDERS="label=folder,...": several tuned sets, a lever each.
    folders = dict(item.split("=", 1) for item in
                   os.environ.get("EXAONE_TUNED_CONFIG_FOLDERS", "").split(",") if "=" in item)
    levers = lv.lora_levers(spec, tuned_config_folder=os.environ.get(
        "EXAONE_TUNED_CONFIG_FOLDER", ""), tuned_config_folders=folders,
        batched_tokens=(2048, 16384))
    # The front end as a LoRA lever too: with several API servers the engine, not one
    # process, limits 256 streams, and only then does the adapters' own cost show.
    levers += lv.front_end_levers((4,))
    wanted = os.environ.get("EXAONE_GPU_LEVERS")
    if wanted:  # in the order given: a second run in reverse order shows order effects
        by_name = {lever.name: lever for lever in levers}
        levers = [by_name[n] for n in wanted.split(",") if n in by_name]
        # A name twice is a second server of it: "baseline (again)" measures the noise
        # between servers, which the planner takes as the margin a lever must beat.
        seen: set[str] = set()
        named: list[lv.Lever] = []
        for lever in levers:
            named.append(dataclasses.replace(lever, name=lv.unique_name(lever.name, seen)))
            seen.add(named[-1].name)
        levers = named
    # EXAONE_GPU_COMMON_API_SERVERS=4: every server of the run (the baseline's too) gets 4
    # API servers, so the 256-stream figures of each lever measure the engine.
    servers = int(os.environ.get("EXAONE_GPU_COMMON_API_SERVERS", "1"))
    common = lv.front_end_levers((servers,))[0] if servers > 1 else None
    if common:
        levers = [lever for lever in levers if "apiServerCount" not in lever.overrides]
    report = lv.run_levers(levers, setup["serve"], setup["cfg"], concurrencies=CONCURRENCIES,
                           processes=PROCESSES, per_lane=PER_LANE, common=common)
    subset = "all" if not wanted else re.sub(r"[^a-z0-9]+", "-", wanted.lower())[:40]
    subset += f"-{servers}-api-servers" if common else ""
    subset = os.environ.get("EXAONE_GPU_RUN_NAME") or subset
    lv.write_outputs(report, OUT, f"levers-{subset}")
    _write_starts(setup, [lever.name for lever in levers], f"levers-{subset}")
    assert "baseline" not in report.errors, report.errors.get("baseline")


def test_vllm_bench_serve_cross_check(setup: dict[str, Any]) -> None:
    """vLLM's own client against the baseline at 256 concurrent (one process, a random
    adapter per request), then the project's load over the same models: both client-side
    figures side by side in cross-check.json."""
    import subprocess

    from serving.bench.load import LoadSpec, run_load

    with setup["serve"](lv.Lever("baseline", "")) as target:
        models = (target.base, *target.adapters)
        env = {**os.environ, "OPENAI_API_KEY": target.api_key}
        spec = stackfile.from_values(setup["values"], stack="gpu")
        tokenizer = setup["layout"].model_path(spec)
        argv = [sys.executable, "-m", "vllm.entrypoints.cli.main", "bench", "serve",
                "--backend", "vllm", "--base-url", target.endpoint, "--model", target.base,
                "--tokenizer", tokenizer, "--dataset-name", "random", "--random-input-len",
                "32", "--random-output-len", str(MAX_TOKENS), "--ignore-eos",
                "--max-concurrency", "256", "--num-prompts", "1024", "--lora-modules",
                *target.adapters, "--save-result", "--result-dir", str(OUT),
                "--result-filename", "vllm-bench-serve.json"]
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=540)
        (OUT / "vllm-bench-serve.log").write_text(done.stdout[-20000:] + done.stderr[-20000:])
        cfg = dataclasses.replace(setup["cfg"], endpoint=target.endpoint,
                                  api_key=target.api_key)
        lv.warm_up(cfg, models)
        _, ours = run_load(cfg, LoadSpec(models, 256, 1024, PROCESSES, label="ours c=256"))
    theirs = {}
    if (OUT / "vllm-bench-serve.json").is_file():
        theirs = json.loads((OUT / "vllm-bench-serve.json").read_text())
    figures = {"vllm_bench_serve_rc": done.returncode,
               "vllm_bench_serve_output_tok_s": theirs.get("output_throughput"),
               "ours": ours.to_json()}
    (OUT / "cross-check.json").write_text(json.dumps(figures, indent=2) + "\n")
    assert done.returncode == 0, done.stderr[-2000:]
