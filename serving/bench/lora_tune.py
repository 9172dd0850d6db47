"""Triton LoRA kernel configs tuned for one GPU, in the files vLLM reads from
``VLLM_TUNED_CONFIG_FOLDER``.

vLLM runs every LoRA linear layer as two Triton kernels: *shrink* (input x lora_A, into a
float32 buffer of rank columns) and *expand* (buffer x lora_B, added to the layer's output).
Without tuned configs it uses one block shape per op for every GPU and model (the defaults
below, copied from vLLM 0.25.1's ``get_lora_op_configs``). This module measures candidates
for the shapes one stack actually runs and writes the winners:

- ``shapes``: the (op, slices, k, n) each LoRA layer of an EXAONE model calls, from the
  catalogue's dimensions (vLLM merges q/k/v into one 3-slice layer and the MLP's two input
  projections into one 2-slice layer);
- ``candidates``: block shapes, split-K, warps and stages, pruned to what fits the shape;
- ``run_tuning`` (GPU): compiles every candidate in worker processes (Triton's compile is
  CPU-bound: 0.5-1 s a kernel), then times each, one process alone on the GPU, as CUDA
  graph replays (the way vLLM runs decode steps), and keeps a candidate only when it beats
  vLLM's default by more than ``KEEP_MARGIN``;
- ``config_document`` / ``lookup``: the JSON layout vLLM reads,
  ``data[max_loras][num_slices][m][k][n]``, and vLLM's own nearest-key lookup, so the CPU
  tests check that every shape the model calls finds its entry.

vLLM's lookup surprises: ``max_loras`` there is the number of LoRA id slots the kernel
launches for, max-loras + 1 ("no adapter" is a slot); ``num_slices`` is looked up exactly
(a missing slice count raises KeyError inside the engine), every other level by nearest key.
The file name carries ``torch.cuda.get_device_name()`` with spaces and dashes as
underscores: configs tuned on one GPU model are never read on another.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from serving.stack.catalog import ModelDims

# Token counts per step to tune for: decode batches (vLLM's CUDA-graph sizes run 1..512) and
# prefill chunks. vLLM picks the nearest tuned count, so powers of two cover every step.
BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 2048, 8192)
# A candidate replaces vLLM's default only when it is this much faster in the same run:
# graph replays of one kernel repeat within about 1-2% on an H200.
KEEP_MARGIN = 0.03
# Candidates timed per (shape, batch), vLLM's default always among them.
MAX_CANDIDATES = 32


@dataclass(frozen=True)
class Shape:
    """One call of a LoRA op: ``k`` x ``n`` per slice, as vLLM keys its configs (shrink: k
    the layer's input size, n the rank; expand: k the rank, n the largest slice output)."""

    op: str  # "shrink" or "expand"
    layer: str  # which layers call it, for the report
    num_slices: int
    k: int
    n: int
    slice_sizes: tuple[int, ...]  # expand: each slice's output size; shrink: the rank each
    per_token_calls: int  # calls of this shape in one forward step (layers x modules)


def shapes(dims: ModelDims, rank: int) -> list[Shape]:
    """The shrink and expand calls of one EXAONE forward step with adapters on all seven
    linear modules (tensor parallel 1). Layers with the same key share an entry."""
    q = dims.num_attention_heads * dims.head_dim
    kv = dims.num_key_value_heads * dims.head_dim
    hidden, ffn, layers = dims.hidden_size, dims.intermediate_size, dims.num_layers
    # (layer, input size, output slices): vLLM's merged layers of ExaoneForCausalLM.
    linear = [("qkv_proj", hidden, (q, kv, kv)), ("out_proj", q, (hidden,)),
              ("gate_up (c_fc_0, c_fc_1)", hidden, (ffn, ffn)), ("down (c_proj)", ffn, (hidden,))]
    found: dict[tuple[str, int, int, int], Shape] = {}
    for layer, k_in, outs in linear:
        for op, k, n, sizes in (("shrink", k_in, rank, (rank,) * len(outs)),
                                ("expand", rank, max(outs), outs)):
            key = (op, len(outs), k, n)
            if key in found:
                old = found[key]
                # Same vLLM key, other layer (out_proj and down share expand's 1 x 2560).
                found[key] = Shape(op, f"{old.layer}, {layer}", old.num_slices, k, n,
                                   old.slice_sizes, old.per_token_calls + layers)
            else:
                found[key] = Shape(op, layer, len(outs), k, n, sizes, layers)
    return list(found.values())


def default_config(op: str, batch: int) -> dict[str, Any]:
    """vLLM 0.25.1's built-in config (``get_lora_op_configs`` without a tuned file)."""
    if op == "shrink":
        return {"block_m": 32, "block_n": 16, "block_k": 256 if batch < 128 else 32,
                "split_k": 64 if batch < 128 else 8, "num_warps": 4, "num_ctas": 1,
                "group_size_m": 8, "num_stages": 2, "max_nreg": None}
    return {"block_m": 64, "block_n": 128, "block_k": 32, "num_warps": 4, "num_ctas": 1,
            "num_stages": 2, "max_nreg": None}


def _default_for(shape: Shape, batch: int) -> dict[str, Any]:
    config = default_config(shape.op, batch)
    if shape.op == "expand" and shape.num_slices > 1:
        config["block_n"] = 64  # vLLM: 64 for merged layers, 128 for single ones
    return config


def candidates(shape: Shape, batch: int, tokens_per_lora: int, *,
               limit: int = MAX_CANDIDATES) -> list[dict[str, Any]]:
    """Configs worth timing for ``shape`` at ``batch`` tokens (``tokens_per_lora`` of them
    for each adapter): vLLM's default first, then a fixed sample of the pruned grid.

    Pruned: block_m no taller than the tokens one adapter has (rounded up to Triton's
    minimum 16), block_n no wider than the rank (shrink), block_k no deeper than k, split-K
    only where block_k x split_k still fits in k. The sample is each config's place in one
    fixed hash order, so batches of one shape share most candidates and Triton compiles
    each once."""
    top_m = max(16, 1 << max(0, (tokens_per_lora - 1).bit_length()))
    block_ms = [m for m in (16, 32, 64, 128) if m <= top_m]
    grid: list[dict[str, Any]] = []
    if shape.op == "shrink":
        for bm, bn, bk, sk, warps, stages in itertools.product(
                block_ms, (16, 32, 64), (32, 64, 128, 256), (1, 2, 4, 8, 16, 32, 64),
                (2, 4, 8), (2, 3, 4)):
            if bn > max(16, shape.n) or bk > shape.k or bk * sk > shape.k:
                continue
            grid.append({"block_m": bm, "block_n": bn, "block_k": bk, "split_k": sk,
                         "num_warps": warps, "num_ctas": 1, "group_size_m": 8,
                         "num_stages": stages, "max_nreg": None})
    else:
        for bm, bn, bk, warps, stages in itertools.product(
                block_ms, (32, 64, 128, 256), (16, 32, 64), (2, 4, 8), (2, 3, 4)):
            if bk > max(16, shape.k) or shape.k % bk:
                continue
            grid.append({"block_m": bm, "block_n": bn, "block_k": bk, "num_warps": warps,
                         "num_ctas": 1, "num_stages": stages, "max_nreg": None})
    default = _default_for(shape, batch)
    rest = sorted((c for c in grid if c != default), key=_order)
    return [default, *rest[:max(0, limit - 1)]]


def _order(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


# --- the files vLLM reads ------------------------------------------------------------------


def file_names(gpu_name: str) -> dict[str, str]:
    """op -> the file vLLM looks for (expand with add_inputs, as every linear layer calls it)."""
    stem = gpu_name.replace(" ", "_").replace("-", "_")
    return {"shrink": f"{stem}_SHRINK.json", "expand": f"{stem}_EXPAND_TRUE.json"}


def config_document(choices: Iterable[tuple[Shape, int, dict[str, Any]]], *, max_loras: int,
                    op: str) -> dict[str, Any]:
    """``data[lora slots][num_slices][m][k][n]`` for one op (keys are strings, as vLLM's
    json.load gives them); lora slots = max_loras + 1."""
    doc: dict[str, Any] = {}
    for shape, batch, config in choices:
        if shape.op != op:
            continue
        (doc.setdefault(str(max_loras + 1), {}).setdefault(str(shape.num_slices), {})
         .setdefault(str(batch), {}).setdefault(str(shape.k), {}))[str(shape.n)] = config
    return doc


def _nearest(level: dict[str, Any], value: int) -> Any:
    return level.get(str(value)) or level[min(level, key=lambda x: abs(int(x) - value))]


def lookup(doc: dict[str, Any], *, max_loras: int, num_slices: int, batch: int, k: int,
           n: int) -> dict[str, Any]:
    """The config vLLM 0.25.1 picks from ``doc`` for one call (``max_loras`` as vLLM passes
    it: the slot count). Nearest key at every level but ``num_slices``, which must exist."""
    level = _nearest(doc, max_loras)[str(num_slices)]
    return _nearest(_nearest(_nearest(level, batch), k), n)


# --- the run ---------------------------------------------------------------------------------


@dataclass
class Point:
    """One (shape, batch): vLLM's default and the best candidate, microseconds per call."""

    op: str
    layer: str
    num_slices: int
    k: int
    n: int
    batch: int
    default_us: float
    best_us: float
    kept: bool  # the best beat the default by more than KEEP_MARGIN
    config: dict[str, Any]
    timed: int
    failed: int


@dataclass
class TuneReport:
    gpu: str
    model: str
    rank: int
    max_loras: int
    active_loras: int
    points: list[Point] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    compile_s: float = 0.0
    time_s: float = 0.0

    def per_step_us(self, batch: int, shape_list: Sequence[Shape]) -> tuple[float, float]:
        """LoRA kernel time of one forward step at ``batch`` tokens, default vs tuned:
        every shape's call count times its time at the nearest tuned batch."""
        default = tuned = 0.0
        for shape in shape_list:
            pts = [p for p in self.points if (p.op, p.num_slices, p.k, p.n)
                   == (shape.op, shape.num_slices, shape.k, shape.n)]
            if not pts:
                continue
            p = min(pts, key=lambda q: abs(q.batch - batch))
            default += shape.per_token_calls * p.default_us
            tuned += shape.per_token_calls * (p.best_us if p.kept else p.default_us)
        return default, tuned

    def to_json(self, shape_list: Sequence[Shape]) -> dict[str, Any]:
        batches = sorted({p.batch for p in self.points})
        return {"gpu": self.gpu, "model": self.model, "rank": self.rank,
                "max_loras": self.max_loras, "active_loras": self.active_loras,
                "keep_margin": KEEP_MARGIN, "compile_s": self.compile_s,
                "time_s": self.time_s, "files": self.files,
                "points": [asdict(p) for p in self.points],
                "per_step": [{"batch": b, "default_us": d, "tuned_us": t}
                             for b in batches
                             for d, t in [self.per_step_us(b, shape_list)]]}


def choose(default_us: float, timed: dict[int, float]) -> tuple[int, float, bool]:
    """Index and time of the fastest candidate, and whether it replaces the default (index
    0) by beating it by more than KEEP_MARGIN."""
    best = min(timed, key=timed.__getitem__)
    keep = best != 0 and timed[best] < default_us * (1 - KEEP_MARGIN)
    return (best, timed[best], keep) if keep else (0, default_us, False)


def plan_jobs(shape_list: Sequence[Shape], batches: Sequence[int], active: int,
              limit: int = MAX_CANDIDATES) -> list[tuple[Shape, int, list[dict[str, Any]]]]:
    """(shape, batch, candidates) for every point, most-used batches first (single stream,
    small batches, then the rest), so a run cut by its deadline has tuned those."""
    order = sorted(batches, key=lambda b: (b not in (1, 8, 256), b))
    return [(s, b, candidates(s, b, max(1, -(-b // active)), limit=limit))
            for b in order for s in shape_list]


def run_tuning(dims: ModelDims, *, model: str, rank: int, max_loras: int, active: int,
               out_dir: Path, batches: Sequence[int] = BATCHES, workers: int = 8,
               deadline_s: float = 300.0, limit: int = MAX_CANDIDATES,
               say: Callable[[str], None] = print) -> TuneReport:
    """Tune on this machine's first CUDA GPU and write vLLM's files to ``out_dir``."""
    import time

    from serving.bench import lora_kernels

    started = time.monotonic()
    shape_list = shapes(dims, rank)
    jobs = plan_jobs(shape_list, batches, active, limit)
    gpu = lora_kernels.device_name()
    report = TuneReport(gpu, model, rank, max_loras, active)
    say(f"{gpu}: {len(shape_list)} shapes x {len(batches)} batches, "
        f"{sum(len(c) for _, _, c in jobs)} candidates; compiling in {workers} processes")
    lora_kernels.compile_all(jobs, rank=rank, max_loras=max_loras, active=active,
                             workers=workers, deadline_s=deadline_s * 0.5, say=say)
    report.compile_s = time.monotonic() - started
    for shape, batch, cands in jobs:
        if time.monotonic() - started > deadline_s:
            say(f"deadline reached: {len(report.points)} of {len(jobs)} points tuned")
            break
        timed, failed = lora_kernels.time_candidates(shape, batch, cands, rank=rank,
                                                     max_loras=max_loras, active=active)
        if 0 not in timed:
            say(f"{shape.op} {shape.layer} m={batch}: the default failed; left to vLLM")
            continue
        best, best_us, keep = choose(timed[0], timed)
        report.points.append(Point(shape.op, shape.layer, shape.num_slices, shape.k, shape.n,
                                   batch, timed[0], best_us, keep, cands[best], len(timed),
                                   failed))
        say(f"{shape.op:6} {shape.layer[:24]:24} m={batch:<5} default {timed[0]:7.1f} us, "
            f"best {best_us:7.1f} us{' (kept)' if keep else ''}")
    report.time_s = time.monotonic() - started - report.compile_s
    report.files = write_files(choices_of(report), shape_list, gpu=gpu, max_loras=max_loras,
                               out_dir=out_dir)
    return report


def write_files(chosen: Sequence[tuple[Shape, int, dict[str, Any]]],
                shape_list: Sequence[Shape], *, gpu: str, max_loras: int,
                out_dir: Path) -> list[str]:
    """vLLM's two files for ``chosen`` in ``out_dir``; the names written."""
    chosen = list(chosen)
    # vLLM looks num_slices up exactly: a shape the deadline left untuned still needs an
    # entry (vLLM's own default, on both sides of its batch-128 switch), or the engine fails.
    tuned = {_key(s) for s, _, _ in chosen}
    for shape in shape_list:
        if _key(shape) not in tuned:
            chosen += [(shape, b, _default_for(shape, b)) for b in (1, 128)]
    out_dir.mkdir(parents=True, exist_ok=True)
    names = []
    for op, name in file_names(gpu).items():
        doc = config_document(chosen, max_loras=max_loras, op=op)
        if doc:
            (out_dir / name).write_text(json.dumps(doc, indent=1) + "\n")
            names.append(name)
    return names


# --- a recorded run, limited to small batches ------------------------------------------------


def report_from_json(doc: dict[str, Any]) -> TuneReport:
    """The report ``TuneReport.to_json`` wrote (lora-tune.json)."""
    report = TuneReport(doc["gpu"], doc["model"], doc["rank"], doc["max_loras"],
                        doc["active_loras"], compile_s=doc.get("compile_s", 0.0),
                        time_s=doc.get("time_s", 0.0))
    report.points = [Point(**p) for p in doc["points"]]
    return report


def limited(report: TuneReport, up_to: int) -> TuneReport:
    """``report`` with tuned configs kept only for batches of at most ``up_to`` tokens per
    step: above it, vLLM's default (written at those batches, so the nearest-key lookup of a
    large step never lands on a small batch's config).

    Why: on the H200 the full tuned set won single streams (+9-12% adapter tok/s) and lost
    16-22% at 256 streams, although each kernel alone was faster at 256: only the small
    batches' configs are trusted end to end until a GPU run says otherwise."""
    points = []
    for p in report.points:
        keep = p.kept and p.batch <= up_to
        points.append(replace(p, kept=keep, config=p.config if keep else
                              _default_for(_shape_of(p), p.batch)))
    return replace(report, points=points, files=[])


def _key(shape: Shape) -> tuple[str, int, int, int]:
    return shape.op, shape.num_slices, shape.k, shape.n


def _shape_of(p: Point) -> Shape:
    return Shape(p.op, p.layer, p.num_slices, p.k, p.n, (), 0)


def choices_of(report: TuneReport) -> list[tuple[Shape, int, dict[str, Any]]]:
    """(shape, batch, config) of every point: the best where kept, else vLLM's default."""
    return [(_shape_of(p), p.batch, p.config if p.kept else _default_for(_shape_of(p), p.batch))
            for p in report.points]
