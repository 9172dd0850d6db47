"""Tier 4 (``pytest -m gpu``): the adapter life cycle on a real GPU with CUDA vLLM.

An EXAONE-3.5-2.4B-shaped model with random bf16 weights and rank-32 adapters on all seven
modules (``serving.local.tinymodel.make_model``, ``serving.local.loramaker``), served by vLLM
with the project's own VM argv and environment (``vllm_args``), bound to loopback. The tests:

- record teacher-forced scores of the base and three adapters, every other repeat under
  concurrent load, as the fixture the CPU unit tests replay (tests/fixtures/gpu/scores.json);
- run hotfix + rollback cycles while a bounded client streams to every adapter and the base,
  each verified by the answer check, with the adapter's tokens/s after each hotfix measured
  against an untouched adapter in the same moments;
- measure the failed-request risk of a forced settle under back-to-back traffic;
- time add and remove;
- measure vLLM's batch-invariant mode against the default (noise and tokens/s) on two more
  servers of its own (batch-invariant.json).

Figures go to ``$EXAONE_GPU_OUT`` (default: a temporary folder) as gpu-adapters.json and
scores.json. The server keeps running between invocations when ``EXAONE_GPU_ROOT`` names a
folder (its pid, key and logs live there), so a run cut by a time limit can continue.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from serving.adapters.answer import SCORE_TEXTS, Reference, Scores, decide, parse_scores
from serving.adapters.client import VllmClient, VllmError
from serving.adapters.ops import AdapterOps, OperationError
from serving.adapters.record import RecordStore
from serving.local import run as localrun
from serving.stack import layout as layouts
from serving.stack import stackfile
from serving.stack.catalog import EXAONE_MODELS
from serving.stack.digest import folder_digest
from serving.stack.layout import Layout
from serving.stack.spec import Spec

pytestmark = [pytest.mark.gpu]

MODEL_ID = "LGAI-EXAONE/EXAONE-3.5-2.4B-Instruct"
ADAPTERS = ("gpu-a", "gpu-b", "gpu-c", "gpu-d")
HOTFIXED, UNTOUCHED, SETTLED = "gpu-a", "gpu-b", "gpu-c"
CYCLES = int(os.environ.get("EXAONE_GPU_CYCLES", "20"))
PORT = 8123
START_DEADLINE_SECONDS = 900.0
# After each hotfix the adapter must serve at least this share of its tokens/s before it.
THROUGHPUT_FLOOR = 0.90
MEASURE_TOKENS = 512
LOAD_TOKENS = 64
OUT = Path(os.environ.get("EXAONE_GPU_OUT") or tempfile.mkdtemp(prefix="exaone-gpu-out-"))
# What the GPU host's vLLM needs from the caller's environment: the offline install's path and
# the host's own safety settings (NVLink multicast stays off on shared hosts).
_PASS = ("PYTHONPATH", "VLLM_USE_FLASHINFER_SAMPLER", "LD_LIBRARY_PATH", "CUDA_VISIBLE_DEVICES",
         "TRANSFORMERS_OFFLINE", "NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST",
         "NVSHMEM_DISABLE_NVLS")


@dataclasses.dataclass
class GpuEnv:
    ops: AdapterOps
    client: VllmClient
    endpoint: str
    key: str
    base: str
    root: Path
    figures: dict[str, Any]


def _save(env: GpuEnv) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "gpu-adapters.json").write_text(json.dumps(env.figures, indent=2) + "\n")


def _values(root: Path, version: str, digests: dict[str, str]) -> dict[str, Any]:
    document = yaml.safe_load(stackfile.stack_path("dev").read_text())
    values = {k.split(":", 1)[1]: v for k, v in document["config"].items()}
    values.update({
        "modelId": MODEL_ID, "vllmVersion": version, "dtype": "bfloat16", "vllmPort": PORT,
        "maxLoras": 4, "maxCpuLoras": 8, "maxModelLen": 4096, "gpuMemoryUtilization": "0.5",
        "apiKeyRef": f"file:{root / 'api-key'}",
        "adapters": [{"name": n, "version": "1", "source": f"blob://adapters/{n}/1",
                      "sha256": digests[n], "rank": 32} for n in ADAPTERS],
    })
    return values


def _require_gpu() -> tuple[Any, Any]:
    import torch

    if not torch.cuda.is_available():
        pytest.fail("the gpu tier needs a CUDA GPU (torch.cuda.is_available() is False)")
    try:
        import vllm
    except ImportError as exc:
        pytest.fail(f"the gpu tier needs CUDA vLLM importable ({exc}); see README, GPU tier")
    return torch, vllm


def _prepare(root: Path, version: str, *, state: str = "state", port: int = PORT,
             util: str = "0.5") -> tuple[Spec, Layout, str]:
    """The model, adapters and key under ``root`` (made once, reused), and the spec and layout
    of a server on ``port`` whose state folder ``root/state`` holds them (another ``state``
    links to the same model and adapters)."""
    from serving.local.loramaker import make_adapter
    from serving.local.tinymodel import make_model

    root.mkdir(parents=True, exist_ok=True)
    layout = dataclasses.replace(
        layouts.VM, python=sys.executable, state_dir=str(root / "state"),
        cache_dir=str(root / "cache"), config_dir=str(root / "etc"), venv_dir="",
        host="127.0.0.1")
    adapters = Path(layout.adapters_dir)
    dims = EXAONE_MODELS[MODEL_ID]
    digests: dict[str, str] = {}
    for i, name in enumerate([*ADAPTERS, "gpu-new"]):
        for version_ in ("1", "2") if name == HOTFIXED else ("1",):
            folder = adapters / name / version_
            if not folder.is_dir():
                make_adapter(folder, base=dims, rank=32, seed=1000 + 10 * i + int(version_),
                             base_model_id=MODEL_ID)
        digests[name] = folder_digest(adapters / name / "1")
    key_file = root / "api-key"
    if not key_file.exists():
        key_file.write_text(secrets.token_urlsafe(24) + "\n")
        key_file.chmod(0o600)
    key = key_file.read_text().strip()
    values = _values(root, version, digests)
    values.update({"vllmPort": port, "gpuMemoryUtilization": util})
    spec = stackfile.from_values(values, stack="gpu")
    model = Path(layout.model_path(spec))
    if not (model / "model.safetensors").is_file():
        started = time.monotonic()
        make_model(model, dims, model_id=MODEL_ID, device="cuda", max_positions=32768)
        print(f"model made in {time.monotonic() - started:.1f} s", flush=True)
    if state != "state":
        own = dataclasses.replace(layout, state_dir=str(root / state),
                                  cache_dir=str(root / f"cache-{state}"))
        Path(own.state_dir).mkdir(parents=True, exist_ok=True)
        for folder in ("models", "adapters"):
            link = Path(own.state_dir, folder)
            if not link.exists():
                link.symlink_to(Path(layout.state_dir, folder))
        layout = own
    return spec, layout, key


@pytest.fixture(scope="module")
def gpu(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GpuEnv]:
    torch, vllm = _require_gpu()
    keep = bool(os.environ.get("EXAONE_GPU_ROOT"))
    root = Path(os.environ.get("EXAONE_GPU_ROOT") or tmp_path_factory.mktemp("gpu"))
    spec, layout, key = _prepare(root, vllm.__version__)
    server = localrun.LocalServer(spec, layout)
    started = time.monotonic()
    localrun.start(server, key, deadline_s=START_DEADLINE_SECONDS,
                   extra_env={k: os.environ[k] for k in _PASS if k in os.environ})
    start_s = time.monotonic() - started
    client = server.client(key)
    ops = AdapterOps(spec, layout, client, RecordStore(layout.state_dir),
                     say=lambda m: print(m, flush=True))
    figures: dict[str, Any] = {}
    existing = OUT / "gpu-adapters.json"
    if existing.is_file():
        figures = json.loads(existing.read_text())
    figures.update({"device": torch.cuda.get_device_name(0), "vllm": vllm.__version__,
                    "torch": torch.__version__, "model": MODEL_ID + " shapes, random bf16",
                    "adapters": "rank 32, all 7 modules", "start_to_health_s": round(start_s, 1),
                    "argv": " ".join(a for a in server_argv(spec, layout))})
    env = GpuEnv(ops, client, server.endpoint, key, spec.model.served_name, root, figures)
    _save(env)
    try:
        yield env
    finally:
        _save(env)
        log = Path(server.log_file)
        if log.is_file():
            (OUT / "vllm.log").write_text("\n".join(log.read_text(errors="replace")
                                                    .splitlines()[-400:]) + "\n")
        if not keep:
            localrun.stop(server)
        client.close()


def server_argv(spec, layout) -> list[str]:
    from serving.render import vllm_args

    return vllm_args.command(spec, layout)


# --- traffic ------------------------------------------------------------------------------------


class Traffic(threading.Thread):
    """A bounded client: streams to ``models`` in turn until stopped (or ``limit_s``),
    counting completed and failed requests. Every failure is kept with its message."""

    def __init__(self, endpoint: str, key: str, models: list[str], *, tokens: int = LOAD_TOKENS,
                 limit_s: float = 900.0, offset: int = 0):
        super().__init__(daemon=True)
        self.client = VllmClient(endpoint, key)
        self.models, self.tokens, self.limit_s, self.offset = models, tokens, limit_s, offset
        self.stop_event = threading.Event()
        self.ok = 0
        self.failures: list[str] = []

    def run(self) -> None:
        end = time.monotonic() + self.limit_s
        i = self.offset
        while not self.stop_event.is_set() and time.monotonic() < end:
            model = self.models[i % len(self.models)]
            i += 1
            try:
                # Random weights generate ids the small tokenizer decodes to no text: count
                # tokens from the stream's usage, not text pieces.
                self.client.stream_tokens(model, "Tell me about the sea.",
                                          max_tokens=self.tokens, ignore_eos=True)
                self.ok += 1
            except VllmError as exc:
                self.failures.append(f"{model}: {exc.message}")

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=120)
        self.client.close()


def _tok_s(client: VllmClient, model: str, tokens: int = MEASURE_TOKENS) -> float:
    started = time.monotonic()
    count = client.stream_tokens(model, "Count slowly.", max_tokens=tokens, ignore_eos=True)
    return count / (time.monotonic() - started)


def _ratio(client: VllmClient, model: str, reference: str, rounds: int = 3) -> float:
    """``model``'s single-stream tokens/s over ``reference``'s, taken in turn in the same
    moments (medians of ``rounds`` long streams each).

    Not streamed at the same time: two requests in one batch share every engine step, so a
    slowdown of the whole step (an unsettled adapter's re-read) would hide. Long streams
    (MEASURE_TOKENS) average over the phase of other traffic, which with short streams moved
    the ratio between 0.6 and 1.0 from one hotfix to the next."""
    mine, theirs = [], []
    for _ in range(rounds):
        mine.append(_tok_s(client, model))
        theirs.append(_tok_s(client, reference))
    return statistics.median(mine) / statistics.median(theirs)


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 3), "max": round(max(values), 3),
            "min": round(min(values), 3), "n": len(values)}


# --- the tests ------------------------------------------------------------------------------------


def test_record_scores_under_load(gpu: GpuEnv) -> None:
    """8 repeats of the teacher-forced scores of the base and three adapters, every other one
    under 16 concurrent streams to other models; replayed, each repeat decides its model."""
    models = [gpu.base, HOTFIXED, UNTOUCHED, SETTLED]
    samples: dict[str, list[Scores]] = {m: [] for m in models}
    for repeat in range(8):
        load = [Traffic(gpu.endpoint, gpu.key, ["gpu-d", gpu.base], offset=i, tokens=256)
                for i in range(16)] if repeat % 2 else []
        for t in load:
            t.start()
        time.sleep(0.5 if load else 0)
        for model in models:
            choices = gpu.client.score(model, SCORE_TEXTS)
            samples[model].append(parse_scores(choices, SCORE_TEXTS))
        for t in load:
            t.stop()
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "scores.json").write_text(json.dumps({
        "about": "teacher-forced scores (serving.adapters.answer.SCORE_TEXTS) recorded by "
                 "tests/gpu/test_gpu_adapters.py; odd repeats under 16 concurrent streams",
        "device": gpu.figures["device"], "vllm": gpu.figures["vllm"], "base": gpu.base,
        "models": {m: [[list(row) for row in s.values] for s in v] for m, v in samples.items()},
    }) + "\n")
    refs = [Reference.from_samples(m, v[:3]) for m, v in samples.items()]
    noise = {r.label: round(Reference.from_samples(r.label, samples[r.label]).noise, 4)
             for r in refs}
    distances = {f"{a.label}~{b.label}": round(a.mean.distance(b.mean), 3)
                 for a in refs for b in refs if a.label < b.label}
    gpu.figures["scores"] = {"noise": noise, "distances": distances}
    _save(gpu)
    floor = max(r.noise for r in refs if r.label != gpu.base)
    for model, rows in samples.items():
        rest = iter(rows[3:] * 2)
        verdict = decide(lambda it=rest: next(it), refs, floor=floor)
        assert verdict.is_(model), verdict.describe()


def test_hotfix_rollback_cycles_under_streaming_load(gpu: GpuEnv) -> None:
    """CYCLES hotfix + rollback cycles of one adapter while a bounded client streams to every
    adapter and the base: every operation verified, no request failed, and within 30 s of each
    hotfix the adapter serves at least 90% of its tokens/s before (against an untouched
    adapter measured in the same moments)."""
    ops = gpu.ops
    ops.reconcile()
    before = _ratio(gpu.client, HOTFIXED, UNTOUCHED, rounds=3)
    traffic = Traffic(gpu.endpoint, gpu.key, [gpu.base, *ADAPTERS])
    traffic.start()
    hotfix_s, rollback_s, live_s, settle_s, after, problems = [], [], [], [], [], []
    try:
        for cycle in range(CYCLES):
            started = time.monotonic()
            try:
                outcome = ops.hotfix(HOTFIXED, "2")
            except OperationError as exc:
                problems.append(f"cycle {cycle} hotfix: {exc.message}")
                ops.reconcile()
                continue
            hotfix_s.append(time.monotonic() - started)
            print(outcome.message, flush=True)
            live_s.append(outcome.live_s or 0.0)
            settle_s.append(outcome.settle_s or 0.0)
            if time.monotonic() - started < 30.0:
                after.append(_ratio(gpu.client, HOTFIXED, UNTOUCHED) / before)
            started = time.monotonic()
            try:
                ops.rollback(HOTFIXED)
            except OperationError as exc:
                problems.append(f"cycle {cycle} rollback: {exc.message}")
                ops.reconcile()
                continue
            rollback_s.append(time.monotonic() - started)
            gpu.figures["cycles_so_far"] = {"done": cycle + 1, "after": after,
                                            "hotfix_s": hotfix_s, "rollback_s": rollback_s,
                                            "traffic_failed": len(traffic.failures)}
            _save(gpu)
            print(f"cycle {cycle}: hotfix {hotfix_s[-1]:.2f} s, rollback {rollback_s[-1]:.2f} s,"
                  f" throughput after hotfix {after[-1] if after else 0:.2f}x", flush=True)
    finally:
        traffic.stop()
    gpu.figures["cycles"] = {
        "cycles": CYCLES, "problems": problems, "traffic_ok": traffic.ok,
        "traffic_failed": len(traffic.failures), "failures": traffic.failures[:10],
        "hotfix_s": _summary(hotfix_s) if hotfix_s else None,
        "hotfix_live_s": _summary(live_s) if live_s else None,
        "hotfix_settle_s": _summary(settle_s) if settle_s else None,
        "rollback_s": _summary(rollback_s) if rollback_s else None,
        "ratio_before": round(before, 3),
        "throughput_after_hotfix": _summary(after) if after else None,
    }
    _save(gpu)
    assert problems == []
    assert traffic.failures == [] and traffic.ok > 0
    # Settled runs near 1.0 of before, an unsettled adapter near 0.05 (unsettled_vs_settled):
    # every hotfix must be the nearer of the two, and the median meet the floor.
    assert len(after) == CYCLES and min(after) > 0.5, after
    assert statistics.median(after) >= THROUGHPUT_FLOOR, after
    rows = {r["name"]: r for r in ops.rows()}
    assert rows[HOTFIXED]["version"] == "1" and rows[HOTFIXED]["verified"]
    assert all(r["in_sync"] and r["settled"] for r in rows.values())


def test_forced_settle_risk_under_back_to_back_traffic(gpu: GpuEnv) -> None:
    """The measured risk behind ``adapterSettle: force``: four clients stream back to back to
    one adapter (no pause ever comes) while it is reloaded in place and force-settled again
    and again. Records the failed requests per settle; the adapter ends verified."""
    ops = gpu.ops
    served = ops.record().serving()[SETTLED]
    # What settling is for: the same adapter loaded in place and not settled, against an
    # untouched one, in the same moments.
    settled_ratio = _ratio(gpu.client, SETTLED, UNTOUCHED, rounds=2)
    gpu.client.load(SETTLED, served.path, inplace=True)
    unsettled_ratio = _ratio(gpu.client, SETTLED, UNTOUCHED, rounds=2)
    gpu.figures["unsettled_vs_settled"] = round(unsettled_ratio / settled_ratio, 3)
    _save(gpu)
    clients = [Traffic(gpu.endpoint, gpu.key, [SETTLED], tokens=32, offset=i) for i in range(4)]
    for c in clients:
        c.start()
    settles, seconds = 10, []
    try:
        for _ in range(settles):
            gpu.client.load(SETTLED, served.path, inplace=True)
            ops._mark(SETTLED, served.version, settled=False)
            started = time.monotonic()
            ops.settle([SETTLED], wait_s=0.5, force=True)
            seconds.append(time.monotonic() - started)
    finally:
        for c in clients:
            c.stop()
    failed = sum(len(c.failures) for c in clients)
    ok = sum(c.ok for c in clients)
    gpu.figures["forced_settle"] = {
        "settles": settles, "requests_ok": ok, "requests_failed": failed,
        "failures": [f for c in clients for f in c.failures][:5],
        "settle_s": _summary(seconds)}
    _save(gpu)
    rows = {r["name"]: r for r in ops.rows()}
    assert rows[SETTLED]["settled"] and rows[SETTLED]["in_sync"] and ok > 0


def test_add_and_remove_latency(gpu: GpuEnv) -> None:
    ops = gpu.ops
    add_s, remove_s = [], []
    for _ in range(5):
        started = time.monotonic()
        ops.add("gpu-new", "1")
        add_s.append(time.monotonic() - started)
        started = time.monotonic()
        ops.remove("gpu-new")
        remove_s.append(time.monotonic() - started)
    gpu.figures["add_s"], gpu.figures["remove_s"] = _summary(add_s), _summary(remove_s)
    _save(gpu)
    with pytest.raises(VllmError):
        gpu.client.complete("gpu-new", "x", max_tokens=1)


def _aggregate_tok_s(endpoint: str, key: str, model: str, streams: int = 16,
                     seconds: float = 8.0) -> float:
    """Tokens/s of ``streams`` concurrent clients streaming to ``model`` for ``seconds``."""
    load = [Traffic(endpoint, key, [model], tokens=128, limit_s=seconds, offset=i)
            for i in range(streams)]
    started = time.monotonic()
    for t in load:
        t.start()
    for t in load:
        t.join(timeout=seconds + 120)
        t.client.close()
    failed = [f for t in load for f in t.failures]
    assert not failed, failed[:3]
    return sum(t.ok for t in load) * 128 / (time.monotonic() - started)


def test_batch_invariant_mode(tmp_path_factory: pytest.TempPathFactory) -> None:
    """vLLM's ``VLLM_BATCH_INVARIANT=1`` against the default, with the same model, adapters
    and argv: two servers on the same GPU (started one after the other: vLLM's memory
    profile at start-up counts another process's allocations as its own), measured in turn.
    Records the scores' repeat noise under concurrent load on each and the mode's cost in
    tokens/s; the answer check must decide every model on both."""
    _torch, vllm = _require_gpu()
    root = Path(os.environ.get("EXAONE_GPU_ROOT") or tmp_path_factory.mktemp("gpu"))
    extra = {k: os.environ[k] for k in _PASS if k in os.environ}
    modes = {"default": {}, "batch_invariant": {"VLLM_BATCH_INVARIANT": "1"}}
    servers: dict[str, localrun.LocalServer] = {}
    key, base, figures = "", "", {}
    clients: dict[str, VllmClient] = {}
    try:
        for i, (mode, env) in enumerate(modes.items()):
            spec, layout, key = _prepare(root, vllm.__version__, state=f"state-{mode}",
                                         port=PORT + 10 + i, util="0.4")
            servers[mode] = server = localrun.LocalServer(spec, layout)
            base = spec.model.served_name
            started = time.monotonic()
            localrun.start(server, key, deadline_s=START_DEADLINE_SECONDS,
                           extra_env={**extra, **env})
            figures[mode] = {"start_to_health_s": round(time.monotonic() - started, 1)}
            print(f"{mode}: healthy after {figures[mode]['start_to_health_s']} s", flush=True)
            clients[mode] = server.client(key)
        models = [base, HOTFIXED, UNTOUCHED]
        samples: dict[str, dict[str, list[Scores]]] = {m: {x: [] for x in models} for m in modes}
        for repeat in range(6):
            for mode, server in servers.items():
                load = [Traffic(server.endpoint, key, ["gpu-d", base], offset=i, tokens=256)
                        for i in range(16)] if repeat % 2 else []
                for t in load:
                    t.start()
                time.sleep(0.5 if load else 0)
                for model in models:
                    choices = clients[mode].score(model, SCORE_TEXTS)
                    samples[mode][model].append(parse_scores(choices, SCORE_TEXTS))
                for t in load:
                    t.stop()
        single: dict[str, dict[str, list[float]]] = {m: {x: [] for x in models[:2]}
                                                     for m in modes}
        for _ in range(3):
            for mode in modes:
                for model in models[:2]:
                    single[mode][model].append(_tok_s(clients[mode], model))
        concurrent = {mode: {model: _aggregate_tok_s(servers[mode].endpoint, key, model)
                             for model in models[:2]} for mode in modes}
        for mode in modes:
            refs = [Reference.from_samples(m, v) for m, v in samples[mode].items()]
            figures[mode].update({
                "noise": {r.label: round(r.noise, 4) for r in refs},
                "identical_repeats": {m: len({s.values for s in v}) == 1
                                      for m, v in samples[mode].items()},
                "single_stream_tok_s": {m: round(statistics.median(v), 1)
                                        for m, v in single[mode].items()},
                "concurrent_16_tok_s": {m: round(v, 1) for m, v in concurrent[mode].items()},
            })
            floor = max(r.noise for r in refs if r.label != base)
            for model, rows in samples[mode].items():
                rest = iter(rows * 2)
                verdict = decide(lambda it=rest: next(it), refs, floor=floor)
                assert verdict.is_(model), f"{mode}: {verdict.describe()}"
        inv, dflt = figures["batch_invariant"], figures["default"]
        figures["cost"] = {
            kind: {m: round(inv[kind][m] / dflt[kind][m], 3) for m in models[:2]}
            for kind in ("single_stream_tok_s", "concurrent_16_tok_s")}
    finally:
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "batch-invariant.json").write_text(json.dumps(figures, indent=2) + "\n")
        for mode, server in servers.items():
            log = Path(server.log_file)
            if log.is_file():
                (OUT / f"vllm-{mode}.log").write_text("\n".join(
                    log.read_text(errors="replace").splitlines()[-200:]) + "\n")
            localrun.stop(server)
        for c in clients.values():
            c.close()
