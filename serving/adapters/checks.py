"""Checks of a LoRA adapter folder before vLLM ever sees it.

Everything wrong is reported at once, each problem naming the file to fix. Nothing here loads
tensors or runs code from the folder: the config goes through PEFT's own parser (once per
distinct file, ``serving.adapters.peftparse``) and its values are checked from the JSON, the
safetensors header is read as JSON, and pickles or code files are refused outright.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from serving.adapters import safejson
from serving.adapters.peftparse import verdict as peft_verdict
from serving.adapters.weights import FLOAT_DTYPES, read_layout, value_problems
from serving.stack.catalog import (
    EXAONE_ATTN_MODULES,
    EXAONE_LORA_MODULES,
    EXAONE_MLP_MODULES,
    EXAONE_MODELS,
    ModelDims,
)
from serving.stack.digest import DigestError, folder_digest
from serving.stack.errors import Problem, SpecError

if TYPE_CHECKING:
    from serving.stack.spec import AdapterSpec, Spec

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

# torch.load unpickles (.bin/.pt/.pth/.ckpt), numpy too with allow_pickle; code files can be
# imported by a loader that trusts the folder. None of them belongs in a LoRA adapter.
FORBIDDEN_SUFFIXES = frozenset({
    ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".joblib", ".npy", ".npz",
    ".py", ".pyc", ".pyo", ".so", ".dylib", ".dll", ".exe",
})

# vLLM reads the B matrices only as weights: no bias, no DoRA magnitudes, no extra modules.
TENSOR_RE = re.compile(
    r"^base_model\.model\.transformer\.h\.(\d+)\.(attn\.attention|mlp)\.(\w+)\.lora_([AB])\.weight$"
)
# adapter_config.json: a PEFT config is a flat object with a few small maps and lists.
MAX_CONFIG_BYTES = 1024 * 1024
MAX_CONFIG_DEPTH = 8
# The LoRA scaling vLLM applies (lora_alpha / r, or / sqrt(r) with use_rslora): trained
# adapters use 0.25..4; beyond this bound the adapter's output swamps the base model's.
MAX_LORA_SCALING = 1024.0
_EXAMPLES = 3


def base_dims(model_id_or_path: str) -> ModelDims:
    """Dims of an EXAONE 3.5 checkpoint: from the catalog by id, else a local folder's config.json.

    Raises SpecError naming the id or file when neither gives EXAONE dims.
    """
    if model_id_or_path in EXAONE_MODELS:
        return EXAONE_MODELS[model_id_or_path]
    folder = Path(model_id_or_path)
    config_path = folder / "config.json"
    if not config_path.is_file():
        known = ", ".join(EXAONE_MODELS)
        raise SpecError([Problem(model_id_or_path, (
            "is neither a known EXAONE 3.5 model nor a folder with config.json; "
            f"allowed: {known}, or a local model folder"
        ))])
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SpecError([Problem(str(config_path), f"is not readable JSON: {exc}")]) from None
    if not isinstance(config, dict) or config.get("model_type") != "exaone":
        found = config.get("model_type") if isinstance(config, dict) else type(config).__name__
        raise SpecError([Problem(str(config_path), (
            f"model_type is {found!r}; allowed: 'exaone' (EXAONE 3.5)"
        ))])
    try:
        return ModelDims.from_config(config)
    except (KeyError, TypeError, ValueError) as exc:
        raise SpecError([Problem(str(config_path), f"lacks EXAONE dimensions: {exc}")]) from None


def check_adapter(
    path: Path,
    *,
    dims: ModelDims,
    base_model_id: str | None,
    max_lora_rank: int,
    sha256: str | None = None,
) -> list[Problem]:
    """Every problem of the adapter folder ``path`` for a base model of ``dims``."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        what = "is a symlink" if path.is_symlink() else "is not a folder"
        allowed = f"a folder with {CONFIG_FILE} and {WEIGHTS_FILE}"
        return [Problem(str(path), f"{what}; allowed: {allowed}")]
    problems: list[Problem] = []
    has_links = _check_files(path, problems)
    lora = _check_config(path, problems, base_model_id=base_model_id, max_lora_rank=max_lora_rank)
    _check_tensors(path, problems, dims=dims, lora=lora)
    if sha256 and not has_links:
        try:
            actual = folder_digest(path)
        except (DigestError, OSError) as exc:
            problems.append(Problem(str(path), f"cannot be digested: {exc}"))
        else:
            if actual != sha256:
                problems.append(Problem(str(path), (
                    f"folder digest is {actual}, the spec pins sha256 {sha256}; "
                    "the files changed since the pin (or the pin is wrong)"
                )))
    return problems


def check_spec_adapter(
    spec: Spec, adapter: AdapterSpec, path: Path, *, model_path: Path | None = None
) -> list[Problem]:
    """Check ``path`` as ``adapter`` of ``spec``: its base model, max rank, pinned digest and
    declared rank. ``model_path`` gives the base folder when the model id is not in the catalog
    (the local target); by default the spec's local model source is used."""
    if model_path is not None:
        dims = base_dims(str(model_path))
    elif spec.model.id in EXAONE_MODELS:
        dims = EXAONE_MODELS[spec.model.id]
    else:
        from serving.stack import layout, stackfile

        dims = base_dims(layout.for_target(spec, stackfile.ROOT).model_path(spec))
    problems = check_adapter(
        path, dims=dims, base_model_id=spec.model.id, max_lora_rank=spec.max_lora_rank,
        sha256=adapter.sha256 or None,
    )
    ranks = _declared_ranks(Path(path) / CONFIG_FILE)
    if ranks and max(ranks) != adapter.rank:
        problems.append(Problem(str(Path(path) / CONFIG_FILE), (
            f"largest rank is {max(ranks)} but the spec declares rank {adapter.rank} for "
            f"{adapter.key}; set the adapter's rank in the stack config to {max(ranks)}"
        )))
    return problems


def _declared_ranks(config_path: Path) -> list[int]:
    try:
        raw = safejson.loads(config_path.read_bytes(), max_bytes=MAX_CONFIG_BYTES,
                             max_depth=MAX_CONFIG_DEPTH)
    except (OSError, safejson.JsonLimitError):
        return []
    if not isinstance(raw, dict):
        return []
    values = [raw.get("r"), *(raw.get("rank_pattern") or {}).values()]
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool)]


def _check_files(path: Path, problems: list[Problem]) -> bool:
    """Symlinks and forbidden files anywhere under ``path``; True when a symlink was found."""
    has_links = False
    for folder, dirs, files in os.walk(path):
        for name in sorted(dirs + files):
            entry = Path(folder, name)
            if entry.is_symlink():
                has_links = True
                problems.append(Problem(str(entry), (
                    "is a symlink; allowed: regular files only (a link can point outside the "
                    "folder)"
                )))
            elif entry.is_file() and entry.suffix.lower() in FORBIDDEN_SUFFIXES:
                problems.append(Problem(str(entry), (
                    f"{entry.suffix} files can run code when loaded (pickle or native code); "
                    f"allowed: {CONFIG_FILE}, {WEIGHTS_FILE} and plain data such as README.md"
                )))
    return has_links


@dataclass(frozen=True)
class _Lora:
    """What the tensor checks need from a LoRA config that PEFT accepted (None: unknown)."""

    rank: int | None
    targets: set[str] | None
    rank_pattern: dict[str, Any]

    def rank_of(self, module_name: str) -> int | None:
        if self.rank is None:
            return None
        if not self.rank_pattern:
            return self.rank
        from peft.utils.other import get_pattern_key

        # The same lookup PEFT does when it builds each layer.
        key = get_pattern_key(list(self.rank_pattern), module_name)
        value = self.rank_pattern.get(key, self.rank)
        return value if isinstance(value, int) else None


def _check_config(
    path: Path, problems: list[Problem], *, base_model_id: str | None, max_lora_rank: int
) -> _Lora:
    where = str(path / CONFIG_FILE)
    unknown = _Lora(None, None, {})

    def problem(message: str) -> None:
        problems.append(Problem(where, message))

    config_path = path / CONFIG_FILE
    if config_path.is_symlink() or not config_path.is_file():
        problem("is missing; allowed: a PEFT LoRA config (LoraConfig.save_pretrained)")
        return unknown
    try:
        with open(config_path, "rb") as handle:
            data = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        problem(f"is not readable: {exc.strerror or exc}; allowed: a readable PEFT config")
        return unknown
    try:
        raw = safejson.loads(data, max_bytes=MAX_CONFIG_BYTES, max_depth=MAX_CONFIG_DEPTH)
    except safejson.JsonLimitError as exc:
        problem(str(exc))
        return unknown
    if not isinstance(raw, dict):
        problem(f"is a JSON {type(raw).__name__}; allowed: an object (a PEFT config)")
        return unknown
    peft_type = raw.get("peft_type")
    if peft_type != "LORA":
        problem(f"peft_type is {peft_type!r}; allowed: 'LORA' (vLLM serves LoRA adapters only)")
        return unknown
    verdict = peft_verdict(config_path)
    if verdict:
        problem(verdict)
        return unknown

    # What PEFT accepted, read from the JSON with PEFT's defaults for absent keys: the same
    # values LoraConfig holds, without importing PEFT (and torch) for every check.
    r = raw.get("r", 8)
    rank = r if isinstance(r, int) and not isinstance(r, bool) else None
    if rank is None or rank < 1:
        problem(f"r is {_shown(r)}; allowed: a whole number from 1 to {max_lora_rank}")
        rank = None
    elif rank > max_lora_rank:
        problem(f"r is {_shown(rank)}, above the max LoRA rank {max_lora_rank}; allowed: "
                f"1..{max_lora_rank} (or raise maxLoraRank)")
        rank = None  # the shapes cannot be judged against it
    rank_pattern = dict(raw.get("rank_pattern") or {})
    invalid = {k: v for k, v in rank_pattern.items()
               if not isinstance(v, int) or isinstance(v, bool) or v < 1}
    too_big = {k: v for k, v in rank_pattern.items() if k not in invalid and v > max_lora_rank}
    if invalid:
        problem(f"rank_pattern has ranks that are not whole numbers >= 1 ({_pairs(invalid)}); "
                f"allowed: 1..{max_lora_rank}")
    if too_big:
        problem(f"rank_pattern has ranks above the max LoRA rank {max_lora_rank} "
                f"({_pairs(too_big)}); allowed: 1..{max_lora_rank} (or raise maxLoraRank)")
    _check_numbers(raw, rank, problem)

    targets = _check_targets(raw.get("target_modules"), problem)
    if raw.get("modules_to_save"):
        problem(f"modules_to_save is {list(raw['modules_to_save'])}; allowed: none (vLLM loads "
                "LoRA weights only, fully trained modules are not applied)")
    if raw.get("use_dora"):
        problem("use_dora is true; allowed: false (vLLM does not serve DoRA adapters)")
    if raw.get("bias", "none") != "none":
        problem(f"bias is {raw.get('bias')!r}; allowed: 'none' (vLLM loads no LoRA bias)")
    if raw.get("lora_bias"):
        problem("lora_bias is true; allowed: false (vLLM loads no LoRA bias)")
    for key in ("layer_replication", "trainable_token_indices", "target_parameters",
                "alora_invocation_tokens"):
        if raw.get(key):
            problem(f"{key} is set; allowed: unset (vLLM does not apply it)")
    if base_model_id is not None and raw.get("base_model_name_or_path") != base_model_id:
        problem(f"base_model_name_or_path is {raw.get('base_model_name_or_path')!r}; allowed: "
                f"{base_model_id!r} (the adapter was trained for another base model)")
    return _Lora(rank, targets, rank_pattern)


def _is_number(value: Any) -> bool:
    """A finite int or float that fits a float (a 400-digit integer does not)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}...({len(text)} characters)"


def _check_numbers(raw: dict[str, Any], rank: int | None,
                   problem: Callable[[str], None]) -> None:
    """lora_alpha (and alpha_pattern) positive with a sane scaling, lora_dropout in [0, 1),
    read from the config's JSON with PEFT's defaults for absent keys.

    The JSON reader has already refused NaN and infinities anywhere in the file."""
    rslora = raw.get("use_rslora", False)
    if not isinstance(rslora, bool):
        problem(f"use_rslora is {_shown(rslora)}; allowed: true or false")

    def scaling(alpha: float, r: int) -> float:
        return alpha / math.sqrt(r) if rslora is True else alpha / r

    formula = "lora_alpha / sqrt(r)" if rslora is True else "lora_alpha / r"
    alpha = raw.get("lora_alpha", 8)
    if not _is_number(alpha) or alpha <= 0:
        problem(f"lora_alpha is {_shown(alpha)}; allowed: a positive finite number")
    elif rank is not None and scaling(alpha, rank) > MAX_LORA_SCALING:
        problem(f"lora_alpha is {_shown(alpha)}, a LoRA scaling of {scaling(alpha, rank):.4g} "
                f"({formula}); allowed: a scaling up to {MAX_LORA_SCALING:g}")
    alphas = raw.get("alpha_pattern") or {}
    if not isinstance(alphas, dict):
        problem(f"alpha_pattern is {_shown(alphas)}; allowed: a map of module name to alpha")
        alphas = {}
    bad = {k: v for k, v in alphas.items() if not _is_number(v) or v <= 0
           or (rank is not None and scaling(v, rank) > MAX_LORA_SCALING)}
    if bad:
        problem(f"alpha_pattern has values that are not positive numbers with a scaling up to "
                f"{MAX_LORA_SCALING:g} ({_pairs({k: _Shown(v) for k, v in bad.items()})}); "
                "allowed: like lora_alpha")
    dropout = raw.get("lora_dropout", 0.0)
    if not _is_number(dropout) or not 0 <= dropout < 1:
        problem(f"lora_dropout is {_shown(dropout)}; allowed: a number from 0 to below 1")


class _Shown:
    """A value that prints short (``_shown``) inside a message."""

    def __init__(self, value: Any):
        self.value = value

    def __repr__(self) -> str:
        return _shown(self.value)


def _pairs(mapping: dict[str, Any]) -> str:
    return ", ".join(f"{k}: {v!r}" for k, v in sorted(mapping.items()))


def _check_targets(value: Any, problem: Callable[[str], None]) -> set[str] | None:
    allowed = ", ".join(EXAONE_LORA_MODULES)
    if isinstance(value, str):
        what = "'all-linear'" if value == "all-linear" else f"the regex {value!r}"
        problem(f"target_modules is {what}; allowed: an explicit list of EXAONE modules "
                f"({allowed}); PEFT has no EXAONE default and a pattern can match other layers")
        return None
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        problem(f"target_modules is {value!r}; allowed: a non-empty list from {allowed}")
        return None
    outside = sorted(set(value) - set(EXAONE_LORA_MODULES))
    if outside:
        problem(f"target_modules has {', '.join(outside)}, not LoRA layers of vLLM's "
                f"ExaoneForCausalLM; allowed: {allowed}")
    return set(value) & set(EXAONE_LORA_MODULES)


def _examples(items: list[str]) -> str:
    shown = "; ".join(items[:_EXAMPLES])
    return shown + (f" and {len(items) - _EXAMPLES} more" if len(items) > _EXAMPLES else "")


def _check_tensors(path: Path, problems: list[Problem], *, dims: ModelDims, lora: _Lora) -> None:
    weights = path / WEIGHTS_FILE
    where = str(weights)

    def problem(message: str) -> None:
        problems.append(Problem(where, message))

    if weights.is_symlink():
        return  # reported with the other links
    if not weights.is_file():
        problem("is missing; allowed: the adapter's LoRA weights in safetensors format "
                "(PeftModel.save_pretrained writes it)")
        return
    layout = read_layout(weights, problem)
    if layout is None:
        return
    tensors, start = layout
    if not tensors:
        problem("holds no tensors; allowed: lora_A/lora_B weights of EXAONE modules")
        return

    bad_name: list[str] = []
    bad_dtype: dict[str, list[str]] = {}
    beyond: set[int] = set()
    untargeted: set[str] = set()
    bad_shape: list[str] = []
    halves: dict[tuple[int, str], set[str]] = {}
    for tensor in tensors:
        name, dtype, shape = tensor.name, tensor.dtype, list(tensor.shape)
        if dtype not in FLOAT_DTYPES:
            bad_dtype.setdefault(dtype, []).append(name)
        match = TENSOR_RE.fullmatch(name)
        if not match:
            bad_name.append(name)
            continue
        layer, block, module, half = int(match[1]), match[2], match[3], match[4]
        in_block = EXAONE_ATTN_MODULES if block == "attn.attention" else EXAONE_MLP_MODULES
        if module not in in_block:
            bad_name.append(name)
            continue
        if layer >= dims.num_layers:
            beyond.add(layer)
            continue
        if lora.targets is not None and module not in lora.targets:
            untargeted.add(module)
        halves.setdefault((layer, f"{block}.{module}"), set()).add(half)
        expected = _expected_shape(dims, module, half, lora.rank_of(
            f"transformer.h.{layer}.{block}.{module}"))
        if len(shape) != 2 or any(e is not None and e != s for e, s in zip(expected, shape,
                                                                           strict=False)):
            shown = "[" + ", ".join(str(e) if e is not None else "r" for e in expected) + "]"
            bad_shape.append(f"{name.removeprefix('base_model.model.')} is {shape}, "
                             f"expected {shown}")

    for dtype, names in sorted(bad_dtype.items()):
        problem(f"tensors of dtype {dtype}: {_examples(names)}; allowed: F32, F16, BF16, F64")
    if bad_name:
        problem(f"not an EXAONE LoRA tensor: {_examples(bad_name)}; allowed: base_model.model."
                "transformer.h.<i>.(attn.attention|mlp).<module>.lora_(A|B).weight")
    if beyond:
        layers = sorted(beyond)
        problem(f"tensors for layer(s) {_examples([str(n) for n in layers])} but the base model "
                f"has {dims.num_layers} layers (0-{dims.num_layers - 1}); made for another model")
    if untargeted:
        problem(f"tensors for {', '.join(sorted(untargeted))}, which adapter_config.json's "
                "target_modules does not list")
    if bad_shape:
        problem(f"{len(bad_shape)} tensor(s) do not fit the base model (lora_A is [r, in], "
                f"lora_B is [out, r]): {_examples(bad_shape)}; made for another model size?")
    unpaired = sorted(
        f"transformer.h.{layer}.{module}" for (layer, module), seen in halves.items()
        if seen != {"A", "B"}
    )
    if unpaired:
        problem(f"lora_A without lora_B or the reverse: {_examples(unpaired)}")
    # Values last, and only of tensors that fit the base model: what is read is bounded by
    # the model's dimensions and the max rank, not by what the file claims.
    if not (bad_name or beyond or bad_shape):
        for message in value_problems(weights, tensors, start):
            problem(message)


def _expected_shape(dims: ModelDims, module: str, half: str, rank: int | None
                    ) -> tuple[int | None, int | None]:
    in_features, out_features = dims.lora_shapes(module)
    return (rank, in_features) if half == "A" else (out_features, rank)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _product(values: Iterable[int]) -> int:
    result = 1
    for value in values:
        result *= value
    return result
