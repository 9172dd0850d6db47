"""Capacity plan: does a model, an adapter set and a context length fit a GPU (or the CPU build)?

Pure arithmetic: dataclasses in, dataclasses out, no printing and no I/O. The formulas follow
what vLLM does at start-up (0.32/0.33 source), so the numbers can be checked against its log:

- weights: every parameter of the checkpoint in the serving dtype, sharded over tensor
  parallel ranks (norms are replicated); tied embeddings are stored once;
- LoRA slots: with ``--enable-lora`` vLLM allocates, at start-up and per GPU, ``max-loras``
  slots of ``max-lora-rank`` for *every* LoRA-capable layer, whatever the adapters target:
  the 7 linear layers of each block plus the input embedding and the logits head;
- KV cache: what is left of ``gpu-memory-utilization`` x GPU memory after weights, LoRA slots
  and what vLLM's profile reserves (activation peak, CUDA graphs, non-torch memory:
  ``vllm_overhead``), cut into blocks of ``block_size`` tokens; the CPU build takes
  VLLM_CPU_KVCACHE_SPACE GiB as is;
- token capacity and concurrency exactly as vLLM logs them ("GPU/CPU KV cache size: N tokens,
  Maximum concurrency for L tokens per request: Xx").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from serving.stack.catalog import (
    DTYPE_BYTES,
    EXAONE_LORA_MODULES,
    GPU_SKUS,
    GpuSku,
    ModelDims,
    adapter_params,
    layer_linear_params,
    weight_params,
)

GiB = 1 << 30
GB = 10**9


# Azure and NVIDIA sell the H100 NVL as "94 GB"; CUDA reports 93.0 GiB of total capacity,
# which is what vLLM multiplies by --gpu-memory-utilization.
# An H200 (141 GB) reported 139.8 GiB to vLLM on the measured host.
GPU_VISIBLE_GIB = {"H100 NVL": 93.0, "H200": 139.8}

# vLLM's default KV block size: 16 tokens for the CUDA attention backends; the CPU build
# switches to 128 (vllm/platforms/cpu.py) unless --block-size is given.
GPU_BLOCK_SIZE = 16
CPU_BLOCK_SIZE = 128

# Per GPU, what vLLM's start-up profile reserves besides weights (LoRA buffers included) and
# the KV cache, the way vLLM >= 0.21 counts it (v1/worker/gpu_worker.py,
# determine_available_memory): the activation peak of a dummy forward pass at
# max-num-batched-tokens (torch peak increase), the memory of the CUDA graphs it will capture
# (estimated and subtracted by default since 0.21), and non-torch allocations (cuBLAS/cuDNN
# workspaces, NCCL). See ``vllm_overhead``. The activation peak follows from the model's
# shapes; CUDA graphs and non-torch cannot be derived from shapes alone: their sum per layer
# is what an H200 with vLLM 0.25.1 showed for EXAONE-3.5-2.4B at the dev stack's argv
# (0.93 GiB in all, of which the activation formula gives 0.41 GiB), split by the usual
# 0.25 GiB of non-torch memory. The GPU tier reads vLLM's own split from its log.
NON_TORCH_GIB = 0.25
CUDA_GRAPH_BYTES_PER_LAYER = int(9.3 * 2**20)
# vLLM's --max-num-batched-tokens default for the OpenAI server (engine/arg_utils.py): 16384
# on GPUs with >= 160 GiB, 8192 on H100/H200-class (>= 70 GiB, not A100), 2048 below.
def default_max_num_batched_tokens(gpu_memory_bytes: int) -> int:
    if gpu_memory_bytes >= 160 * GiB:
        return 16384
    return 8192 if gpu_memory_bytes >= 70 * GiB else 2048


# vLLM's --max-num-seqs defaults for the OpenAI server: 1024 on H100-class GPUs (>= 70 GiB,
# not A100), 128 per CPU worker (vllm/engine/arg_utils.py).
VLLM_DEFAULT_MAX_NUM_SEQS = {"gpu": 1024, "cpu": 128}

# vLLM pads the vocabulary of its embedding and head to a multiple of 64.
VOCAB_PADDING = 64

# Recommendation limits: LoRA slots may take this share of a GPU's budget, and the host's
# adapter cache this share of the VM's RAM (the rest is for the OS, the model files' page
# cache and vLLM's own processes).
LORA_GPU_SHARE = 0.10
HOST_RAM_LORA_SHARE = 0.25

# How vLLM shards each EXAONE linear layer over tensor-parallel ranks. Column-parallel layers
# split their output (LoRA B), row-parallel ones their input (LoRA A).
_COLUMN_PARALLEL = frozenset({"q_proj", "k_proj", "v_proj", "c_fc_0", "c_fc_1"})


def dtype_bytes(dtype: str) -> int:
    try:
        return DTYPE_BYTES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPE_BYTES)}") from None


def resolve_dtype(dtype: str, *, config_dtype: str, device: str) -> str:
    """The dtype vLLM serves in: ``auto`` is the checkpoint's, except that vLLM downcasts a
    float32 checkpoint to bfloat16 on a GPU."""
    if dtype != "auto":
        return dtype
    if config_dtype == "float32" and device == "gpu":
        return "bfloat16"
    return config_dtype


def _pad(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


# --- parameter counts ----------------------------------------------------------------------


def weight_bytes_per_gpu(dims: ModelDims, dtype: str, tp: int) -> int:
    """Bytes of weights one tensor-parallel rank holds: linear layers, embedding and head are
    sharded (vocab padded to 64 per rank), norms are replicated."""
    size = dtype_bytes(dtype)
    vocab = _pad(dims.vocab_size, VOCAB_PADDING * tp) // tp
    embed = vocab * dims.hidden_size
    head = 0 if dims.tie_word_embeddings else embed
    linear = dims.num_layers * layer_linear_params(dims) // tp
    norms = (2 * dims.num_layers + 1) * dims.hidden_size
    return (linear + embed + head + norms) * size


def lora_slot_params_per_gpu(dims: ModelDims, max_rank: int, tp: int) -> int:
    """Parameters of ONE GPU LoRA slot on one rank: vLLM's buffers at max-lora-rank for every
    LoRA-capable layer (vllm/lora/layers): the 7 linear layers of each block (packed qkv and
    gate_up keep one A and one B per slice), the input embedding (A: vocab x r, B: hidden x r)
    and the logits head (A: r x hidden, B: vocab x r), the last two unsharded."""
    per_layer = 0
    for module in EXAONE_LORA_MODULES:
        in_features, out_features = dims.lora_shapes(module)
        if module in _COLUMN_PARALLEL:
            per_layer += max_rank * in_features + max_rank * (out_features // tp)
        else:
            per_layer += max_rank * (in_features // tp) + max_rank * out_features
    embed_and_head = 2 * max_rank * (dims.vocab_size + dims.hidden_size)
    return dims.num_layers * per_layer + embed_and_head


# --- KV cache ------------------------------------------------------------------------------


def kv_heads_per_gpu(dims: ModelDims, tp: int) -> int:
    # With fewer KV heads than ranks, vLLM replicates them: each rank keeps one.
    return max(1, dims.num_key_value_heads // tp)


def kv_bytes_per_token(dims: ModelDims, kv_dtype: str, tp: int = 1) -> int:
    """K and V of one token over all layers, on one rank (2.4B bf16: 76,800 bytes)."""
    return (
        2 * dims.num_layers * kv_heads_per_gpu(dims, tp) * dims.head_dim * dtype_bytes(kv_dtype)
    )


@dataclass(frozen=True)
class KvCapacity:
    block_size: int
    bytes_per_block: int
    num_blocks: int
    tokens: int  # vLLM's "KV cache size: N tokens"
    max_concurrency: float  # vLLM's "Maximum concurrency for L tokens per request"


def kv_capacity(
    available_bytes: int, *, per_token_bytes: int, block_size: int, max_model_len: int
) -> KvCapacity:
    """Blocks and tokens the way vLLM's kv_cache_utils computes them from the bytes left."""
    bytes_per_block = per_token_bytes * block_size
    num_blocks = max(0, available_bytes) // bytes_per_block
    blocks_per_request = -(-max_model_len // block_size)
    concurrency = num_blocks / blocks_per_request
    # vLLM logs int(concurrency * max_model_len), not num_blocks * block_size.
    return KvCapacity(
        block_size, bytes_per_block, num_blocks, int(concurrency * max_model_len), concurrency
    )


# --- plan ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hardware:
    """Where one vLLM instance runs: an NC H100 v5 size, or this machine's CPU."""

    name: str
    device: str  # "gpu" or "cpu"
    gpus: int
    gpu_memory_bytes: int  # per GPU, as CUDA reports it; 0 on the CPU
    vcpus: int
    host_ram_bytes: int  # 0 when unknown (the local CPU)
    gpu_model: str = ""

    @classmethod
    def from_sku(cls, sku: GpuSku) -> Hardware:
        visible = GPU_VISIBLE_GIB.get(sku.gpu_model)
        memory = int(visible * GiB) if visible else sku.gpu_memory_gb * GB
        return cls(sku.name, "gpu", sku.gpus, memory, sku.vcpus, sku.ram_gib * GiB, sku.gpu_model)

    @classmethod
    def local_cpu(cls) -> Hardware:
        return cls("this CPU", "cpu", 0, 0, 0, 0)


@dataclass(frozen=True)
class AdapterInput:
    name: str
    rank: int
    targets: tuple[str, ...] = EXAONE_LORA_MODULES
    targets_known: bool = False  # False: the stack does not record them; all 7 assumed


@dataclass(frozen=True)
class PlanInput:
    model_id: str
    dims: ModelDims
    dtype: str  # resolved: float32, bfloat16 or float16
    kv_cache_dtype: str  # resolved
    hardware: Hardware
    adapters: tuple[AdapterInput, ...]
    max_lora_rank: int
    max_loras: int
    max_cpu_loras: int
    max_model_len: int
    max_num_seqs: int = 0  # 0: vLLM's default
    gpu_memory_utilization: float = 0.9
    tensor_parallel_size: int = 1
    cpu_kv_cache_gib: int = 0  # the CPU build's VLLM_CPU_KVCACHE_SPACE
    block_size: int = 0  # 0: vLLM's default for the device
    overhead_bytes: int | None = None  # None: modelled (vllm_overhead); else as stated
    max_num_batched_tokens: int = 0  # 0: vLLM's default for the GPU


@dataclass(frozen=True)
class Overhead:
    """What vLLM's start-up profile reserves on one GPU besides weights and KV cache."""

    activation_bytes: int  # torch peak increase of the profile run
    cuda_graph_bytes: int
    non_torch_bytes: int
    batched_tokens: int  # max-num-batched-tokens the profile ran at
    stated: bool = False  # True: one figure given by the caller, not modelled

    @property
    def total(self) -> int:
        return self.activation_bytes + self.cuda_graph_bytes + self.non_torch_bytes


def activation_peak_bytes(dims: ModelDims, dtype: str, tp: int, *, batched_tokens: int,
                          max_num_seqs: int) -> int:
    """The larger of vLLM's two dummy runs: the forward pass over ``batched_tokens`` tokens
    (the residual and normed hidden states, and the MLP's gate/up output beside its
    activation: 2 x hidden + 3 x FFN per token, the FFN sharded over TP) and the sampler run
    over ``max_num_seqs`` rows of float32 logits (the vocabulary sharded over TP)."""
    forward = batched_tokens * (2 * dims.hidden_size + 3 * dims.intermediate_size // tp)
    sampler = max_num_seqs * _pad(dims.vocab_size, VOCAB_PADDING * tp) // tp * 4
    return max(forward * dtype_bytes(dtype), sampler)


def vllm_overhead(p: PlanInput) -> Overhead:
    """The non-KV, non-weight memory vLLM reserves at start-up on one GPU (see the
    constants); a stated ``overhead_bytes`` replaces the model."""
    hw = p.hardware
    tokens = p.max_num_batched_tokens or default_max_num_batched_tokens(hw.gpu_memory_bytes)
    if p.overhead_bytes is not None:
        return Overhead(p.overhead_bytes, 0, 0, tokens, stated=True)
    seqs = p.max_num_seqs or VLLM_DEFAULT_MAX_NUM_SEQS["gpu"]
    return Overhead(
        activation_bytes=activation_peak_bytes(p.dims, p.dtype, p.tensor_parallel_size,
                                               batched_tokens=tokens, max_num_seqs=seqs),
        cuda_graph_bytes=p.dims.num_layers * CUDA_GRAPH_BYTES_PER_LAYER,
        non_torch_bytes=int(NON_TORCH_GIB * GiB),
        batched_tokens=tokens,
    )


@dataclass(frozen=True)
class AdapterCost:
    name: str
    rank: int
    targets: tuple[str, ...]
    params: int
    bytes: int  # in the serving dtype (vLLM's LoRA dtype follows the model's)


@dataclass(frozen=True)
class Shortfall:
    """Something that does not fit: which setting, what is needed, what there is."""

    what: str  # "gpu-memory", "kv-cache", "host-ram"
    need: float
    have: float
    detail: str


@dataclass(frozen=True)
class Plan:
    input: PlanInput
    weight_params: int
    weight_bytes_per_gpu: int
    adapters: tuple[AdapterCost, ...]
    lora_slot_params: int  # one slot, one rank
    lora_slots_bytes_per_gpu: int  # max-loras slots
    overhead_bytes_per_gpu: int
    budget_bytes_per_gpu: int  # utilization x GPU memory (GPU) or the KV space (CPU)
    kv_available_bytes: int
    kv_bytes_per_token: int  # whole model, one replica
    kv_bytes_per_token_per_gpu: int
    kv: KvCapacity
    host_lora_bytes: int  # the largest max-cpu-loras adapters of the set
    host_lora_bytes_worst: int  # max-cpu-loras adapters at max-lora-rank on all modules
    max_num_seqs_default: int
    overhead: Overhead | None = None  # the GPU's breakdown; None on the CPU
    shortfalls: tuple[Shortfall, ...] = field(default_factory=tuple)

    @property
    def fits(self) -> bool:
        return not self.shortfalls

    @property
    def full_length_sequences(self) -> int:
        """Sequences of max-model-len tokens that fit in the KV cache together."""
        return int(self.kv.max_concurrency)

    @property
    def required_utilization(self) -> float:
        """The smallest gpu-memory-utilization that leaves KV room for one full sequence."""
        hw = self.input.hardware
        if hw.device != "gpu" or not hw.gpu_memory_bytes:
            return 0.0
        one_sequence = self.kv.bytes_per_block * -(
            -self.input.max_model_len // self.kv.block_size
        )
        need = (
            self.weight_bytes_per_gpu
            + self.lora_slots_bytes_per_gpu
            + self.overhead_bytes_per_gpu
            + one_sequence
        )
        return need / hw.gpu_memory_bytes


def _adapter_cost(dims: ModelDims, adapter: AdapterInput, size: int) -> AdapterCost:
    params = adapter_params(dims, adapter.rank, adapter.targets)
    return AdapterCost(adapter.name, adapter.rank, tuple(adapter.targets), params, params * size)


def plan(p: PlanInput) -> Plan:
    hw, dims, tp = p.hardware, p.dims, p.tensor_parallel_size
    size = dtype_bytes(p.dtype)
    weights = weight_bytes_per_gpu(dims, p.dtype, tp)
    costs = tuple(_adapter_cost(dims, a, size) for a in p.adapters)
    slot_params = lora_slot_params_per_gpu(dims, p.max_lora_rank, tp)
    slots = p.max_loras * slot_params * size
    per_token_gpu = kv_bytes_per_token(dims, p.kv_cache_dtype, tp)
    per_token = kv_bytes_per_token(dims, p.kv_cache_dtype, 1)
    if hw.device == "cpu":
        block = p.block_size or CPU_BLOCK_SIZE
        budget = p.cpu_kv_cache_gib * GiB
        breakdown = None
        overhead = 0
        available = budget  # the CPU build takes the KV space as given, beside the weights
    else:
        block = p.block_size or GPU_BLOCK_SIZE
        budget = int(p.gpu_memory_utilization * hw.gpu_memory_bytes)
        breakdown = vllm_overhead(p)
        overhead = breakdown.total
        available = budget - weights - slots - overhead
    kv = kv_capacity(
        available, per_token_bytes=per_token_gpu, block_size=block, max_model_len=p.max_model_len
    )
    by_size = sorted((c.bytes for c in costs), reverse=True)
    host = sum(by_size[: p.max_cpu_loras])
    worst = p.max_cpu_loras * adapter_params(dims, p.max_lora_rank) * size
    result = Plan(
        input=p,
        weight_params=weight_params(dims),
        weight_bytes_per_gpu=weights,
        adapters=costs,
        lora_slot_params=slot_params,
        lora_slots_bytes_per_gpu=slots,
        overhead_bytes_per_gpu=overhead,
        budget_bytes_per_gpu=budget,
        kv_available_bytes=available,
        kv_bytes_per_token=per_token,
        kv_bytes_per_token_per_gpu=per_token_gpu,
        kv=kv,
        host_lora_bytes=host,
        host_lora_bytes_worst=worst,
        max_num_seqs_default=VLLM_DEFAULT_MAX_NUM_SEQS[hw.device],
        overhead=breakdown,
    )
    return replace(result, shortfalls=tuple(_shortfalls(result)))


def _shortfalls(r: Plan) -> list[Shortfall]:
    p, hw = r.input, r.input.hardware
    out: list[Shortfall] = []
    if hw.device == "gpu":
        fixed = r.weight_bytes_per_gpu + r.lora_slots_bytes_per_gpu + r.overhead_bytes_per_gpu
        if fixed > r.budget_bytes_per_gpu:
            out.append(Shortfall(
                "gpu-memory", fixed, r.budget_bytes_per_gpu,
                "weights + LoRA slots + overhead exceed gpu-memory-utilization x GPU memory",
            ))
    if r.kv.max_concurrency < 1 and not out:
        # vLLM refuses to start: "To serve at least one request with the model's max seq len".
        need = r.kv.bytes_per_block * -(-p.max_model_len // r.kv.block_size)
        out.append(Shortfall(
            "kv-cache", need, max(0, r.kv_available_bytes),
            "the KV cache cannot hold one sequence of max-model-len tokens",
        ))
    if hw.host_ram_bytes:
        limit = HOST_RAM_LORA_SHARE * hw.host_ram_bytes
        if r.host_lora_bytes > limit:
            out.append(Shortfall(
                "host-ram", r.host_lora_bytes, limit,
                f"max-cpu-loras adapters exceed {HOST_RAM_LORA_SHARE:.0%} of the VM's RAM",
            ))
    return out


# --- recommendation ------------------------------------------------------------------------


@dataclass(frozen=True)
class Recommendation:
    sku: str
    tensor_parallel_size: int
    instances_per_vm: int
    max_loras: int
    max_cpu_loras: int
    max_num_seqs: int
    plan: Plan  # the plan with these settings
    reasons: tuple[str, ...]


def _candidates(p: PlanInput, skus: Sequence[GpuSku]) -> list[tuple[Hardware, int]]:
    """The configured size first (smallest TP that divides it), then the others by GPU count."""
    current = next((s for s in skus if s.name == p.hardware.name), None)
    ordered = ([current] if current else []) + sorted(
        (s for s in skus if s is not current), key=lambda s: (s.gpus, s.name)
    )
    out = []
    for sku in ordered:
        for tp in (1, 2, 4, 8):
            if tp <= sku.gpus and sku.gpus % tp == 0:
                out.append((Hardware.from_sku(sku), tp))
    return out


def recommend(p: PlanInput, skus: Sequence[GpuSku] | None = None) -> Recommendation | None:
    """Settings that follow from the plan; None when no size and TP fit the model at all.

    - size and TP: the configured size if it fits, at the smallest TP that leaves KV room
      for one max-model-len sequence; else the smallest size that does;
    - max-loras: every adapter of the set resident (too few GPU slots cost up to a third of
      throughput), never below the configured value (room for adapters loaded at runtime),
      while the slots take at most LORA_GPU_SHARE of the budget;
    - max-cpu-loras: at least max-loras and the whole set, within HOST_RAM_LORA_SHARE of RAM;
    - max-num-seqs: the sequences that fit at full max-model-len (no preemption even if every
      request uses the whole context), capped at vLLM's default.
    """
    n = len(p.adapters)
    reasons: list[str] = []
    if p.hardware.device == "cpu":
        options: list[tuple[Hardware, int]] = [(p.hardware, 1)]
    else:
        options = _candidates(p, list(skus if skus is not None else GPU_SKUS.values()))
    for hw, tp in options:
        base = replace(p, hardware=hw, tensor_parallel_size=tp)
        loras = max(1, n, p.max_loras)
        if hw.device == "gpu":
            slot = lora_slot_params_per_gpu(p.dims, p.max_lora_rank, tp) * dtype_bytes(p.dtype)
            cap = max(1, int(LORA_GPU_SHARE * p.gpu_memory_utilization * hw.gpu_memory_bytes
                             // max(1, slot)))
            if loras > cap:
                reasons.append(f"max-loras capped at {cap}: LoRA slots within "
                               f"{LORA_GPU_SHARE:.0%} of the GPU budget")
                loras = cap
        cpu_loras = max(loras, n, p.max_cpu_loras)
        if hw.host_ram_bytes:
            per = adapter_params(p.dims, max((a.rank for a in p.adapters), default=1))
            each = max(1, per * dtype_bytes(p.dtype))
            room = int(HOST_RAM_LORA_SHARE * hw.host_ram_bytes // each)
            cpu_loras = max(loras, min(cpu_loras, room))
        trial = plan(replace(base, max_loras=loras, max_cpu_loras=cpu_loras))
        if not trial.fits:
            continue
        default = trial.max_num_seqs_default
        seqs = max(1, min(default, trial.full_length_sequences))
        final = plan(replace(trial.input, max_num_seqs=seqs))
        if hw.name != p.hardware.name:
            reasons.insert(0, f"{p.hardware.name} does not fit; {hw.name} does")
        if tp > 1:
            reasons.insert(0, f"tensor parallel {tp}: one GPU cannot hold the model with KV room")
        return Recommendation(
            sku=hw.name,
            tensor_parallel_size=tp,
            instances_per_vm=max(1, hw.gpus // tp) if hw.device == "gpu" else 1,
            max_loras=loras,
            max_cpu_loras=cpu_loras,
            max_num_seqs=seqs,
            plan=final,
            reasons=tuple(reasons),
        )
    return None


def minimal_fit(p: PlanInput) -> float:
    """gpu-memory-utilization needed for one max-model-len sequence (rounded up to 0.01)."""
    return math.ceil(plan(p).required_utilization * 100) / 100
