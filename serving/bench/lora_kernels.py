"""vLLM's LoRA Triton kernels run by hand on a CUDA GPU: the timing half of ``lora_tune``.

Each candidate config is handed to vLLM's own ``_lora_shrink`` / ``_lora_expand`` (the
functions the engine calls, not a copy of the kernels) by replacing, for the call, the
``get_lora_op_configs`` they look their config up with. The tensors have the shapes and
dtypes vLLM's LoRA layers use: bf16 activations and stacked weights of max-loras slots,
a float32 buffer between the ops, tokens spread over ``active`` adapters the way
``LoRAKernelMeta`` sorts them.

Times are CUDA-graph replays of many back-to-back calls, as in vLLM's decode steps (a
kernel of a few microseconds timed from Python would measure the launch, not the kernel).
Needs torch with CUDA and vLLM 0.25.x; imported only by a tuning run.
"""

from __future__ import annotations

import multiprocessing
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

from serving.bench.lora_tune import Shape

Job = tuple[Shape, int, list[dict[str, Any]]]
REPS_PER_GRAPH = 20
TRIALS = 7


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0)


def _call(shape: Shape, batch: int, *, rank: int, max_loras: int, active: int
          ) -> Callable[[dict[str, Any]], Callable[[], None]]:
    """Tensors for one point, and a function that binds a config into a zero-argument call."""
    import torch
    from vllm.lora.ops.triton_ops import lora_expand_op, lora_shrink_op
    from vllm.lora.ops.triton_ops.lora_kernel_metadata import LoRAKernelMeta

    dev = torch.device("cuda", 0)
    gen = torch.Generator(device=dev).manual_seed(batch * 7 + shape.k)
    meta = LoRAKernelMeta.make(max_loras, batch, dev)
    meta.prepare_tensors(torch.arange(batch, device=dev, dtype=torch.int32) % active)
    args = meta.meta_args(batch, False)
    buffer = torch.zeros((shape.num_slices, batch, rank), dtype=torch.float32, device=dev)
    if shape.op == "shrink":
        x = torch.randn((batch, shape.k), generator=gen, device=dev, dtype=torch.bfloat16)
        lora_a = [torch.randn((max_loras, 1, rank, shape.k), generator=gen, device=dev,
                              dtype=torch.bfloat16) * 0.02 for _ in range(shape.num_slices)]
        module: Any = lora_shrink_op

        def invoke() -> None:
            lora_shrink_op._lora_shrink(x, lora_a, buffer, *args, 1.0)
    else:
        out = torch.zeros((batch, sum(shape.slice_sizes)), device=dev, dtype=torch.bfloat16)
        buffer.normal_(generator=gen)
        lora_b = [torch.randn((max_loras, 1, size, rank), generator=gen, device=dev,
                              dtype=torch.bfloat16) * 0.02 for size in shape.slice_sizes]
        module = lora_expand_op

        def invoke() -> None:
            lora_expand_op._lora_expand(buffer, lora_b, out, *args, offset_start=0, add_inputs=True)

    def bind(config: dict[str, Any]) -> Callable[[], None]:
        def run() -> None:
            module.get_lora_op_configs = lambda *a, **k: config
            invoke()
        return run
    return bind


def _graph_us(run: Callable[[], None]) -> float:
    """Median microseconds per call over TRIALS replays of a graph of REPS_PER_GRAPH calls."""
    import torch

    run()  # compiles (or loads from Triton's cache) and fills vLLM's pointer tables
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(REPS_PER_GRAPH):
            run()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(TRIALS):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / REPS_PER_GRAPH)
    return statistics.median(times)


def time_candidates(shape: Shape, batch: int, cands: Sequence[dict[str, Any]], *, rank: int,
                    max_loras: int, active: int) -> tuple[dict[int, float], int]:
    """index -> microseconds for each candidate that ran; and how many failed (a config
    Triton cannot fit, e.g. too much shared memory)."""
    bind = _call(shape, batch, rank=rank, max_loras=max_loras, active=active)
    timed: dict[int, float] = {}
    failed = 0
    for i, config in enumerate(cands):
        try:
            timed[i] = _graph_us(bind(config))
        except Exception:  # a config the GPU refuses is a skipped candidate
            failed += 1
    return timed, failed


def _compile_worker(jobs: list[tuple[Shape, int, dict[str, Any]]], rank: int, max_loras: int,
                    active: int, until: float) -> int:
    """Run each (shape, batch, config) once, so Triton compiles it into its disk cache."""
    import torch

    done = 0
    binds: dict[tuple[Shape, int], Callable[[dict[str, Any]], Callable[[], None]]] = {}
    for shape, batch, config in jobs:
        if time.time() > until:
            break
        key = (shape, batch)
        if key not in binds:
            binds[key] = _call(shape, batch, rank=rank, max_loras=max_loras, active=active)
        try:
            binds[key](config)()
            torch.cuda.synchronize()
            done += 1
        except Exception:  # refused configs are skipped again when timed
            pass
    return done


def compile_all(jobs: Sequence[Job], *, rank: int, max_loras: int, active: int, workers: int,
                deadline_s: float, say: Callable[[str], None] = print) -> int:
    """Compile every candidate in ``workers`` processes (Triton's compile is CPU-bound; the
    timing pass then loads kernels from its cache). Returns how many ran."""
    flat = [(shape, batch, config) for shape, batch, cands in jobs for config in cands]
    # Round-robin, so each worker gets every shape and the slow ones are spread.
    parts = [flat[i::workers] for i in range(workers)]
    until = time.time() + deadline_s
    started = time.monotonic()
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers) as pool:
        counts = pool.starmap(_compile_worker,
                              [(part, rank, max_loras, active, until) for part in parts])
    say(f"compiled {sum(counts)} of {len(flat)} candidate runs in "
        f"{time.monotonic() - started:.0f} s")
    return sum(counts)
