"""Real PEFT LoRA adapters for an EXAONE-architecture model, made without its weights.

PEFT has no EXAONE default, so ``target_modules`` is always explicit. The adapter is injected
into a bare module tree that carries the checkpoint's names; only the LoRA tensors are saved,
under the ``base_model.model.`` prefix that ``PeftModel.save_pretrained`` would give them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as save_safetensors
from torch import nn

from serving.adapters.peftparse import verdict as peft_verdict
from serving.atomic import replace_folder
from serving.stack.catalog import (
    EXAONE_ATTN_MODULES,
    EXAONE_LORA_MODULES,
    EXAONE_MLP_MODULES,
    ModelDims,
)

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
PEFT_PREFIX = "base_model.model."


def _linear(dims: ModelDims, module: str) -> nn.Linear:
    in_features, out_features = dims.lora_shapes(module)
    return nn.Linear(in_features, out_features, bias=False)


def exaone_module_tree(dims: ModelDims, *, device: str | torch.device = "cpu") -> nn.Module:
    """Modules named like an EXAONE checkpoint (``transformer.h.N.attn.attention.q_proj``...).

    Use ``device="meta"`` for real model sizes: nothing is allocated.
    """
    with torch.device(device):
        root = nn.Module()
        root.transformer = nn.Module()
        root.transformer.wte = nn.Embedding(dims.vocab_size, dims.hidden_size)
        blocks = []
        for _ in range(dims.num_layers):
            block = nn.Module()
            block.ln_1 = nn.RMSNorm(dims.hidden_size)
            block.attn = nn.Module()
            block.attn.attention = nn.Module()
            for module in EXAONE_ATTN_MODULES:
                setattr(block.attn.attention, module, _linear(dims, module))
            block.ln_2 = nn.RMSNorm(dims.hidden_size)
            block.mlp = nn.Module()
            for module in EXAONE_MLP_MODULES:
                setattr(block.mlp, module, _linear(dims, module))
            blocks.append(block)
        root.transformer.h = nn.ModuleList(blocks)
        root.transformer.ln_f = nn.RMSNorm(dims.hidden_size)
        root.lm_head = nn.Linear(dims.hidden_size, dims.vocab_size, bias=False)
    return root


def read_dims(base: Path | ModelDims) -> ModelDims:
    if isinstance(base, ModelDims):
        return base
    return ModelDims.from_config(json.loads((Path(base) / "config.json").read_text()))


def lora_config(
    *,
    rank: int,
    targets: Sequence[str] | str,
    base_model_id: str,
    alpha: float | None = None,
    rank_pattern: Mapping[str, int] | None = None,
    **options: Any,
):
    from peft import LoraConfig

    return LoraConfig(
        r=rank,
        lora_alpha=rank if alpha is None else alpha,
        target_modules=targets if isinstance(targets, str) else list(targets),
        rank_pattern=dict(rank_pattern or {}),
        lora_dropout=0.0,
        bias=options.pop("bias", "none"),
        base_model_name_or_path=base_model_id,
        **options,
    )


# Above this many base weights the module tree is built on the meta device (nothing
# allocated) and only the LoRA tensors are drawn: EXAONE 3.5 2.4B would take 10 GB otherwise.
_META_TREE_PARAMS = 50_000_000


def adapter_tensors(
    dims: ModelDims, config, *, seed: int, scale: float
) -> dict[str, torch.Tensor]:
    """Inject ``config`` into a module tree of ``dims`` and return the saved-form state dict."""
    from peft import get_peft_model_state_dict, inject_adapter_in_model

    big = dims.num_layers * dims.hidden_size * (dims.hidden_size + 3 * dims.intermediate_size)
    if big > _META_TREE_PARAMS:
        return _big_adapter_tensors(dims, config, seed=seed, scale=scale)
    model = inject_adapter_in_model(config, exaone_module_tree(dims))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            # PEFT starts lora_B at zero (adapter = no-op); random B makes outputs differ.
            if ".lora_A." in name:
                param.copy_(torch.randn(param.shape, generator=gen) / math.sqrt(param.shape[1]))
            elif ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=gen) * scale)
    state = get_peft_model_state_dict(model, save_embedding_layers=False)
    return {PEFT_PREFIX + key: value.detach().contiguous() for key, value in sorted(state.items())}


def _big_adapter_tensors(dims: ModelDims, config, *, seed: int,
                         scale: float) -> dict[str, torch.Tensor]:
    """The same tensors for real model sizes: PEFT injects into a meta tree (it names and
    shapes every LoRA matrix), and the values are drawn in the same order as above."""
    from peft import inject_adapter_in_model

    if config.bias != "none" or config.modules_to_save:
        raise ValueError("adapters of real model sizes carry LoRA matrices only")
    model = inject_adapter_in_model(config, exaone_module_tree(dims, device="meta"))
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, param in sorted(model.named_parameters()):
        if ".lora_A." in name:
            value = torch.randn(param.shape, generator=gen) / math.sqrt(param.shape[1])
        elif ".lora_B." in name:
            value = torch.randn(param.shape, generator=gen) * scale
        else:
            continue
        # PEFT's saved names drop the adapter's own name ("default").
        out[PEFT_PREFIX + name.replace(".default.", ".")] = value.contiguous()
    return dict(sorted(out.items()))


def _canonical_config(config) -> bytes:
    # PEFT saves target_modules from a set, in hash-seed order; sort so files are reproducible.
    data = config.to_dict()
    for key, value in data.items():
        if isinstance(value, set | frozenset):
            data[key] = sorted(value)
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


def make_adapter(
    dest: Path,
    *,
    base: Path | ModelDims,
    rank: int,
    targets: Sequence[str] | str = EXAONE_LORA_MODULES,
    seed: int,
    base_model_id: str,
    scale: float = 0.05,
    alpha: float | None = None,
    rank_pattern: Mapping[str, int] | None = None,
    **lora_options: Any,
) -> Path:
    """Write a PEFT LoRA adapter folder for ``base`` (a model folder or its dims) to ``dest``.

    ``scale`` is the standard deviation of lora_B; lora_A has unit gain; alpha defaults to the
    rank (scaling 1). Extra keyword arguments go to ``peft.LoraConfig`` (e.g. ``use_dora``).
    Deterministic per seed; files already holding the same bytes are left untouched.
    """
    dest = Path(dest)
    config = lora_config(
        rank=rank, targets=targets, base_model_id=base_model_id, alpha=alpha,
        rank_pattern=rank_pattern, **lora_options,
    )
    tensors = adapter_tensors(read_dims(base), config, seed=seed, scale=scale)
    contents = {
        "adapter_config.json": _canonical_config(config),
        "adapter_model.safetensors": save_safetensors(tensors, metadata={"format": "pt"}),
    }
    if not (dest.is_dir() and all(
        (dest / name).is_file() and (dest / name).read_bytes() == data
        for name, data in contents.items()
    )):
        if dest.exists() and not set(p.name for p in dest.iterdir()) <= set(ADAPTER_FILES):
            raise FileExistsError(f"{dest} holds files other than {', '.join(ADAPTER_FILES)}")

        def fill(staging: Path) -> None:
            for name, data in contents.items():
                (staging / name).write_bytes(data)

        replace_folder(dest, fill)
    # PEFT is loaded here anyway: its verdict on this config is kept, so the adapter commands
    # that check the folder later need not import it (serving.adapters.peftparse).
    peft_verdict(dest / "adapter_config.json")
    return dest
