"""Tier 1: adapter checks on real PEFT adapter folders, the folder digest, and the makers."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from serving.adapters.checks import base_dims, check_adapter, check_spec_adapter
from serving.local.loramaker import exaone_module_tree, make_adapter
from serving.local.tinymodel import DEFAULT_MODEL_ID as TINY_ID
from serving.local.tinymodel import make_tiny_model
from serving.stack import stackfile
from serving.stack.catalog import EXAONE_LORA_MODULES, EXAONE_MODELS, ModelDims
from serving.stack.digest import DigestError, folder_digest
from serving.stack.errors import SpecError

TINY_MAX_RANK = 16  # the local stack's rank limit
EXAONE_24B = "LGAI-EXAONE/EXAONE-3.5-2.4B-Instruct"


def check(path: Path, tiny_model: Path, **overrides: Any) -> list[str]:
    options: dict[str, Any] = {
        "dims": base_dims(str(tiny_model)), "base_model_id": TINY_ID,
        "max_lora_rank": TINY_MAX_RANK, **overrides,
    }
    problems = check_adapter(path, **options)
    for problem in problems:
        assert problem.where.startswith(str(path)), problem
    return [str(p) for p in problems]


@pytest.mark.parametrize("name", ["all-modules", "attention-only", "rank-pattern"])
def test_good_adapters_pass(name: str, good_adapters: dict[str, Path], tiny_model: Path) -> None:
    path = good_adapters[name]
    assert check(path, tiny_model) == []
    assert check(path, tiny_model, sha256=folder_digest(path)) == []


# --- one adapter per fault: (build it, check options, distinctive parts of each problem) ---

Builder = Callable[[Path, Path, Path], Path]  # (tmp dir, tiny model, a good adapter) -> folder


def _made(**kwargs: Any) -> Builder:
    def build(tmp: Path, tiny: Path, good: Path) -> Path:
        options = {"rank": 8, "seed": 7, "base_model_id": TINY_ID, **kwargs}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PEFT warns about some of these faults itself
            return make_adapter(tmp / "adapter", base=options.pop("base", tiny), **options)

    return build


def _copy_then(change: Callable[[Path], None]) -> Builder:
    def build(tmp: Path, tiny: Path, good: Path) -> Path:
        folder = Path(shutil.copytree(good, tmp / "adapter"))
        change(folder)
        return folder

    return build


def _save_config(config_factory: Callable[[], Any]) -> Callable[[Path], None]:
    def change(folder: Path) -> None:
        (folder / "adapter_config.json").unlink()
        config_factory().save_pretrained(str(folder))

    return change


def _ia3():
    from peft import IA3Config

    return IA3Config(target_modules=["k_proj", "v_proj", "c_proj"], feedforward_modules=["c_proj"],
                     base_model_name_or_path=TINY_ID)


def _all_linear():
    from peft import LoraConfig

    return LoraConfig(r=8, lora_alpha=8, target_modules="all-linear",
                      base_model_name_or_path=TINY_ID)


def _pickle_next_to(folder: Path) -> None:
    from safetensors.torch import load_file

    torch.save(load_file(folder / "adapter_model.safetensors"), folder / "adapter_model.bin")


def _truncate(folder: Path) -> None:
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def _tiny_dims(**changes: Any) -> Callable[[Path], ModelDims]:
    return lambda tiny: dataclasses.replace(base_dims(str(tiny)), **changes)


def _made_for(dims_of: Callable[[Path], ModelDims]) -> Builder:
    def build(tmp: Path, tiny: Path, good: Path) -> Path:
        return make_adapter(tmp / "adapter", base=dims_of(tiny), rank=8, seed=7,
                            base_model_id=TINY_ID)

    return build


FAULTS: dict[str, tuple[Builder, dict[str, Any], list[str]]] = {
    "ia3-not-lora": (_copy_then(_save_config(_ia3)), {},
                     ["adapter_config.json: peft_type is 'IA3'; allowed: 'LORA'"]),
    "rank-above-max": (_made(rank=32), {}, ["r is 32, above the max LoRA rank 16"]),
    "rank-pattern-above-max": (_made(rank_pattern={"c_proj": 32}), {},
                               ["rank_pattern has ranks above the max LoRA rank 16 (c_proj: 32)"]),
    "target-outside-exaone": (_made(targets=["q_proj", "lm_head"]), {},
                              ["target_modules has lm_head",
                               "not an EXAONE LoRA tensor: base_model.model.lm_head.lora_A"]),
    "regex-targets": (_made(targets=r".*\.(q_proj|v_proj)"), {},
                      ["target_modules is the regex"]),
    "all-linear": (_copy_then(_save_config(_all_linear)), {},
                   ["target_modules is 'all-linear'"]),
    "modules-to-save": (_made(modules_to_save=["lm_head"]), {},
                        ["modules_to_save is ['lm_head']",
                         "not an EXAONE LoRA tensor: base_model.model.lm_head.weight"]),
    "dora": (_made(use_dora=True), {},
             ["use_dora is true", "not an EXAONE LoRA tensor: base_model.model.transformer.h.0."
              "attn.attention.k_proj.lora_magnitude_vector"]),
    "bias": (_made(bias="lora_only"), {}, ["bias is 'lora_only'; allowed: 'none'"]),
    "lora-bias": (_made(lora_bias=True), {},
                  ["lora_bias is true", "not an EXAONE LoRA tensor: base_model.model.transformer.h"
                   ".0.attn.attention.k_proj.lora_B.bias"]),
    "wrong-base-model": (_made(base_model_id=EXAONE_24B), {},
                         [f"base_model_name_or_path is '{EXAONE_24B}'; allowed: '{TINY_ID}'"]),
    "missing-safetensors": (
        _copy_then(lambda f: (f / "adapter_model.safetensors").unlink()), {},
        ["adapter_model.safetensors: is missing"],
    ),
    "pickle-present": (_copy_then(_pickle_next_to), {},
                       ["adapter_model.bin: .bin files can run code"]),
    "python-file": (_copy_then(lambda f: (f / "handler.py").write_text("import os\n")), {},
                    ["handler.py: .py files can run code"]),
    "symlink": (
        _copy_then(lambda f: os.symlink("adapter_model.safetensors", f / "extra.safetensors")),
        {"sha256": "0" * 64},
        ["extra.safetensors: is a symlink"],
    ),
    "layer-beyond-base": (_made_for(_tiny_dims(num_layers=3)), {},
                          ["tensors for layer(s) 2 but the base model has 2 layers"]),
    "other-hidden-size": (_made_for(_tiny_dims(hidden_size=256, intermediate_size=512)), {},
                          ["tensor(s) do not fit the base model"]),
    "sha256-mismatch": (_copy_then(lambda f: None), {"sha256": "0" * 64},
                        ["the spec pins sha256 0000"]),
    "broken-json": (_copy_then(lambda f: (f / "adapter_config.json").write_text("{\"r\": 8,")),
                    {}, ["adapter_config.json: is not valid JSON"]),
    "truncated-safetensors": (_copy_then(_truncate), {},
                              ["adapter_model.safetensors: tensors end at byte"]),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_each_fault_is_reported(fault: str, tmp_path: Path, tiny_model: Path,
                                good_adapters: dict[str, Path]) -> None:
    build, options, expected = FAULTS[fault]
    folder = build(tmp_path, tiny_model, good_adapters["all-modules"])
    problems = check(folder, tiny_model, **options)
    assert len(problems) == len(expected), problems
    for part, problem in zip(expected, problems, strict=True):
        assert part in problem, problems


def test_every_problem_at_once(tmp_path: Path, tiny_model: Path) -> None:
    folder = make_adapter(tmp_path / "a", base=tiny_model, rank=32, seed=1,
                          base_model_id=EXAONE_24B, use_dora=True)
    (folder / "setup.py").write_text("")
    problems = check(folder, tiny_model)
    for part in ("setup.py", "r is 32", "use_dora", "base_model_name_or_path", "lora_magnitude"):
        assert any(part in p for p in problems), (part, problems)


def test_not_a_folder(tmp_path: Path, tiny_model: Path) -> None:
    assert check(tmp_path / "nope", tiny_model) == [
        f"{tmp_path / 'nope'}: is not a folder; allowed: a folder with adapter_config.json and "
        "adapter_model.safetensors"
    ]


def test_spec_adapter_of_local_stack(tmp_path: Path, tiny_model: Path) -> None:
    spec = stackfile.load("local")
    adapter = spec.adapter("tone-formal")
    folder = make_adapter(tmp_path / "tone-formal", base=tiny_model, rank=adapter.rank, seed=1,
                          base_model_id=spec.model.id)
    assert check_spec_adapter(spec, adapter, folder, model_path=tiny_model) == []
    wrong = make_adapter(tmp_path / "wrong", base=tiny_model, rank=16, seed=1,
                         base_model_id=spec.model.id)
    [problem] = check_spec_adapter(spec, adapter, wrong, model_path=tiny_model)
    assert "largest rank is 16 but the spec declares rank 8 for tone-formal/1" in str(problem)


def test_base_dims(tiny_model: Path, tmp_path: Path) -> None:
    assert base_dims(EXAONE_24B) is EXAONE_MODELS[EXAONE_24B]
    assert base_dims(str(tiny_model)).num_layers == 2
    with pytest.raises(SpecError, match=r"neither a known EXAONE 3\.5 model"):
        base_dims("meta-llama/Llama-3-8B")
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(SpecError, match="model_type is 'llama'"):
        base_dims(str(tmp_path))


# --- the folder digest ---


def test_folder_digest_matches_sha256sum(tmp_path: Path) -> None:
    root = tmp_path / "folder"
    (root / "a" / "deep").mkdir(parents=True)
    (root / "a.txt").write_text("dot sorts before slash in byte order\n")
    (root / "a" / "b").write_bytes(b"\x00\x01binary")
    (root / "a" / "deep" / "with space.json").write_text("{}")
    (root / "B-upper").write_text("upper case sorts first")
    (root / "empty").write_bytes(b"")
    script = ("(cd \"$1\" && find . -type f -printf '%P\\n' | LC_ALL=C sort "
              "| xargs -d '\\n' sha256sum) | sha256sum")
    shell = subprocess.run(["bash", "-c", script, "digest", str(root)], check=True,
                           capture_output=True, text=True).stdout.split()[0]
    assert folder_digest(root) == shell


def test_folder_digest_refuses_symlinks(tmp_path: Path) -> None:
    (tmp_path / "real").write_text("x")
    os.symlink("real", tmp_path / "link")
    with pytest.raises(DigestError, match="symlink"):
        folder_digest(tmp_path)


# --- the makers ---


def test_tiny_model_is_exaone_and_idempotent(tiny_model: Path, tmp_path: Path) -> None:
    config = json.loads((tiny_model / "config.json").read_text())
    assert config["model_type"] == "exaone"
    assert config["architectures"] == ["ExaoneForCausalLM"]
    assert config["auto_map"]["AutoConfig"] == "configuration_exaone.ExaoneConfig"
    heads = (config["hidden_size"], config["num_attention_heads"], config["head_dim"])
    assert heads == (128, 2, 64)
    with safe_open(str(tiny_model / "model.safetensors"), "pt") as weights:
        names = set(weights.keys())
    assert {"transformer.wte.weight", "transformer.h.1.ln_2.weight", "transformer.ln_f.weight",
            "transformer.h.0.attn.attention.out_proj.weight", "transformer.h.1.mlp.c_fc_1.weight",
            "lm_head.weight"} <= names

    before = {p.name: p.stat().st_mtime_ns for p in tiny_model.iterdir()}
    make_tiny_model(tiny_model, seed=0, model_id=TINY_ID)
    assert {p.name: p.stat().st_mtime_ns for p in tiny_model.iterdir()} == before
    again = make_tiny_model(tmp_path / "again", seed=0, model_id=TINY_ID)
    assert folder_digest(again) == folder_digest(tiny_model)
    other = make_tiny_model(tmp_path / "other", seed=1, model_id=TINY_ID)
    assert folder_digest(other) != folder_digest(tiny_model)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "keep.txt").write_text("not ours")
    with pytest.raises(FileExistsError):
        make_tiny_model(tmp_path / "foreign")


def test_tiny_model_loads_with_transformers(tiny_model: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(str(tiny_model), trust_remote_code=True)
    assert (config.model_type, config.num_hidden_layers) == ("exaone", 2)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model), trust_remote_code=True)
    assert len(tokenizer) == config.vocab_size
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt == "[|system|][|endofturn|]\n[|user|]Hello\n[|assistant|]"
    assert tokenizer.eos_token_id == config.eos_token_id


def test_make_adapter_is_deterministic_and_not_a_no_op(tmp_path: Path, tiny_model: Path,
                                                       good_adapters: dict[str, Path]) -> None:
    good = good_adapters["all-modules"]
    same = make_adapter(tmp_path / "same", base=tiny_model, rank=8, seed=1, base_model_id=TINY_ID)
    assert folder_digest(same) == folder_digest(good)
    other = make_adapter(tmp_path / "other", base=tiny_model, rank=8, seed=2, base_model_id=TINY_ID)
    assert folder_digest(other) != folder_digest(good)
    config = json.loads((good / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert config["target_modules"] == sorted(EXAONE_LORA_MODULES)
    with safe_open(str(good / "adapter_model.safetensors"), "pt") as weights:
        assert len(list(weights.keys())) == 2 * 7 * 2
        b = weights.get_tensor("base_model.model.transformer.h.1.mlp.c_proj.lora_B.weight")
    assert b.abs().max() > 0  # PEFT's default B is zero, which would leave the base unchanged


# --- LoRA size of the real 2.4B model (FACTS: 43,991,040 parameters at rank 32, 7 modules) ---


def test_lora_parameters_of_exaone_24b() -> None:
    from peft import LoraConfig, inject_adapter_in_model

    dims = EXAONE_MODELS[EXAONE_24B]
    by_shapes = dims.num_layers * sum(32 * (i + o) for i, o in map(dims.lora_shapes,
                                                                 EXAONE_LORA_MODULES))
    assert by_shapes == 43_991_040
    tree = exaone_module_tree(dims, device="meta")
    model = inject_adapter_in_model(LoraConfig(r=32, target_modules=list(EXAONE_LORA_MODULES)),
                                    tree)
    by_peft = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    assert by_peft == 43_991_040


def _layers_pattern_alone(folder: Path) -> None:
    """A config every JSON rule accepts and PEFT itself refuses."""
    path = folder / "adapter_config.json"
    raw = json.loads(path.read_text())
    path.write_text(json.dumps({**raw, "layers_pattern": "h", "layers_to_transform": None}))


def test_peft_verdict_is_kept_per_config_and_still_refuses(
        good_adapters: dict[str, Path], tiny_model: Path, tmp_path: Path) -> None:
    """PEFT parses a config once; its refusal is reported again from the cache, and a check
    of a folder whose config PEFT has seen imports neither PEFT nor torch."""
    import sys

    bad = Path(shutil.copytree(good_adapters["all-modules"], tmp_path / "bad"))
    _layers_pattern_alone(bad)
    for _ in range(2):
        assert any("PEFT cannot read it" in p and "layers_to_transform" in p
                   for p in check(bad, tiny_model)), check(bad, tiny_model)
    script = (
        "import sys; from pathlib import Path; "
        "from serving.adapters.checks import base_dims, check_adapter; "
        f"p = check_adapter(Path({str(bad)!r}), dims=base_dims({str(tiny_model)!r}), "
        "base_model_id=None, max_lora_rank=16); "
        "print(len(p), 'peft' in sys.modules, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=True, cwd=stackfile.ROOT)
    assert done.stdout.split() == ["1", "False", "False"], done.stdout + done.stderr
