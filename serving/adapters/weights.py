"""An adapter's safetensors file, read the way safetensors itself reads it, and its values.

safetensors refuses a file whose header does not describe the data exactly: tensors must
follow each other from offset 0 with no gap, no overlap and no trailing byte, and each one's
size must be its shape times its dtype's size. vLLM reads adapters through safetensors, so a
file that breaks those rules fails inside vLLM at load time, after the tools have already put
its folder in place; here it is refused before.

Values matter as much as shapes: a lora_B holding NaN or inf passes every shape check, and
vLLM on loading it served empty answers for every model on the server (the base model too)
until a restart. So every float tensor is scanned (a bounded, linear read of the file:
a rank-32 adapter of EXAONE 2.4B is 168 MB in fp32, well under a second) for non-finite and
absurdly large values.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from serving.adapters import safejson
from serving.atomic import replace_folder, write_file

# safetensors' own bound on the header (its MAX_HEADER_SIZE): anything larger is refused.
MAX_HEADER_BYTES = 100 * 1024 * 1024
# A header is {name: {dtype, shape, data_offsets: [a, b]}} plus {"__metadata__": {str: str}}.
MAX_HEADER_DEPTH = 4
FLOAT_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
OTHER_DTYPE_SIZES = {
    "I64": 8, "U64": 8, "I32": 4, "U32": 4, "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1,
}
# No trained LoRA weight comes near this; a larger one overflows half-precision activations.
MAX_ABS_WEIGHT = 1.0e4
# Per float dtype: the unsigned view of its bits and the mask of its exponent (all ones in
# the exponent is inf or NaN), and how to read its values as float32.
_BITS: dict[str, tuple[str, int]] = {
    "F64": ("<u8", 0x7FF0000000000000), "F32": ("<u4", 0x7F800000),
    "F16": ("<u2", 0x7C00), "BF16": ("<u2", 0x7F80),
}
_EXAMPLES = 3
ALLOWED = "allowed: a safetensors file as safetensors.save_file writes it"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _product(values: tuple[int, ...]) -> int:
    result = 1
    for value in values:
        result *= value
    return result


def _examples(items: list[str]) -> str:
    shown = "; ".join(items[:_EXAMPLES])
    return shown + (f" and {len(items) - _EXAMPLES} more" if len(items) > _EXAMPLES else "")


def read_layout(weights: Path, problem: Callable[[str], None]
                ) -> tuple[list[TensorInfo], int] | None:
    """The tensors of ``weights`` and where the data starts, when the file is one that
    safetensors accepts; else None, each reason given to ``problem``."""
    try:
        size = weights.stat().st_size
        with open(weights, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                problem(f"is {size} bytes, too short for a safetensors file; {ALLOWED}")
                return None
            length = int.from_bytes(prefix, "little")
            if length > min(size - 8, MAX_HEADER_BYTES):
                problem(f"header length {length} exceeds the file ({size} bytes) or "
                        f"safetensors' limit ({MAX_HEADER_BYTES} bytes); {ALLOWED}")
                return None
            raw = handle.read(length)
    except OSError as exc:
        problem(f"is not readable: {exc.strerror or exc}; {ALLOWED}, readable by the tools")
        return None
    try:
        header = safejson.loads(raw, max_bytes=MAX_HEADER_BYTES, max_depth=MAX_HEADER_DEPTH)
    except safejson.JsonLimitError as exc:
        message = str(exc)
        problem(f"header {message}" + ("" if "allowed" in message else f"; {ALLOWED}"))
        return None
    if not isinstance(header, dict):
        problem(f"header is not a JSON object; {ALLOWED}")
        return None
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(
            isinstance(v, str) for v in metadata.values())):
        problem(f"header __metadata__ is not a map of strings; {ALLOWED}")
        return None
    data_size = size - 8 - length
    tensors, bad = _tensors(header)
    if bad:
        problem(f"header entries with bad dtype/shape/offsets (truncated or corrupt file): "
                f"{_examples(bad)}; {ALLOWED} (known dtypes, size = shape x dtype size)")
        return None
    layout_problem = _layout_problem(tensors, data_size)
    if layout_problem:
        problem(f"{layout_problem}; allowed: what safetensors accepts (tensors one after "
                "another from offset 0, each its shape times its dtype size, nothing after)")
        return None
    return tensors, 8 + length


def _tensors(header: dict[str, Any]) -> tuple[list[TensorInfo], list[str]]:
    tensors: list[TensorInfo] = []
    bad: list[str] = []
    for name, entry in sorted(header.items()):
        shape = entry.get("shape") if isinstance(entry, dict) else None
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        dtype = entry.get("dtype") if isinstance(entry, dict) else None
        if not (isinstance(shape, list) and all(_is_count(n) for n in shape)
                and isinstance(offsets, list) and len(offsets) == 2
                and all(_is_count(n) for n in offsets) and isinstance(dtype, str)
                and offsets[0] <= offsets[1]):
            bad.append(name)
            continue
        itemsize = FLOAT_DTYPES.get(dtype, OTHER_DTYPE_SIZES.get(dtype))
        if itemsize is None or offsets[1] - offsets[0] != _product(tuple(shape)) * itemsize:
            bad.append(f"{name} ({dtype} {shape} in {offsets[1] - offsets[0]} bytes)")
            continue
        tensors.append(TensorInfo(name, dtype, tuple(shape), offsets[0], offsets[1]))
    return tensors, bad


def _layout_problem(tensors: list[TensorInfo], data_size: int) -> str | None:
    """What safetensors' validation would refuse in the offsets, or None."""
    position = 0
    for tensor in sorted(tensors, key=lambda t: (t.begin, t.end)):
        if tensor.begin < position:
            return f"tensor {tensor.name} overlaps the one before it (offset {tensor.begin})"
        if tensor.begin > position:
            return f"a gap of {tensor.begin - position} bytes before tensor {tensor.name}"
        position = tensor.end
    if position < data_size:
        return f"{data_size - position} trailing bytes after the last tensor"
    if position > data_size:
        return f"tensors end at byte {position} of a {data_size}-byte data section (truncated)"
    return None


def value_problems(weights: Path, tensors: list[TensorInfo], start: int) -> list[str]:
    """Float tensors holding NaN, inf or values beyond ``MAX_ABS_WEIGHT``, in words."""
    nonfinite: list[str] = []
    huge: list[str] = []
    floats = [t for t in tensors if t.dtype in FLOAT_DTYPES and t.end > t.begin]
    if not floats:
        return []
    with open(weights, "rb") as handle:
        for tensor in floats:
            bits_dtype, exponent = _BITS[tensor.dtype]
            handle.seek(start + tensor.begin)
            bits = np.fromfile(handle, dtype=bits_dtype,
                               count=(tensor.end - tensor.begin) // np.dtype(bits_dtype).itemsize)
            if np.any((bits & exponent) == exponent):
                nonfinite.append(tensor.name)
            elif _largest(bits, tensor.dtype) > MAX_ABS_WEIGHT:
                huge.append(tensor.name)
    out = []
    if nonfinite:
        out.append(f"NaN or infinite values in {_examples(nonfinite)}; allowed: finite weights "
                   "(vLLM serving such an adapter answered empty for every model on the server)")
    if huge:
        out.append(f"values beyond ±{MAX_ABS_WEIGHT:g} in {_examples(huge)}; allowed: "
                   f"|w| <= {MAX_ABS_WEIGHT:g} (trained LoRA weights are far smaller)")
    return out


def _largest(bits: np.ndarray, dtype: str) -> float:
    if dtype == "BF16":
        values = (bits.astype(np.uint32) << 16).view(np.float32)
    else:
        values = bits.view({"F64": "<f8", "F32": "<f4", "F16": "<f2"}[dtype])
    return float(np.max(np.abs(values))) if values.size else 0.0


def write_zero_adapter(dest: Path, dims: Any, base_model_id: str) -> Path:
    """A rank-1 LoRA adapter on layer 0's ``q_proj`` whose weights are all zero: through it
    the base model answers exactly as itself (it adds 0.0 to one projection). ``dims`` is the
    base model's ``ModelDims``. Put in place whole (readable by the serving user); returns
    ``dest``."""
    in_features, out_features = dims.lora_shapes("q_proj")
    prefix = "base_model.model.transformer.h.0.attn.attention.q_proj"
    a_bytes, b_bytes = 4 * in_features, 4 * out_features
    header: dict[str, Any] = {
        "__metadata__": {"format": "pt"},
        f"{prefix}.lora_A.weight": {"dtype": "F32", "shape": [1, in_features],
                                    "data_offsets": [0, a_bytes]},
        f"{prefix}.lora_B.weight": {"dtype": "F32", "shape": [out_features, 1],
                                    "data_offsets": [a_bytes, a_bytes + b_bytes]},
    }
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data to 8 bytes
    config = {
        "peft_type": "LORA", "base_model_name_or_path": base_model_id, "r": 1,
        "lora_alpha": 1, "lora_dropout": 0.0, "target_modules": ["q_proj"], "bias": "none",
        "modules_to_save": None, "use_dora": False, "use_rslora": False,
        "fan_in_fan_out": False, "rank_pattern": {}, "alpha_pattern": {},
    }

    def fill(folder: Path) -> None:
        write_file(folder / "adapter_config.json",
                   (json.dumps(config, indent=2) + "\n").encode(), 0o644)
        write_file(folder / "adapter_model.safetensors",
                   struct.pack("<Q", len(raw)) + raw + bytes(a_bytes + b_bytes), 0o644)

    return replace_folder(dest, fill)
