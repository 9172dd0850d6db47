"""A tiny EXAONE-architecture model for tests and the local CPU target.

Same config keys, tensor names and remote-code layout as LG's EXAONE 3.5 checkpoints, at a
size that builds in well under a second and that vLLM's CPU build serves. Weights are random
(deterministic per seed); the tokenizer is a small byte-level BPE trained on built-in text.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file

from serving.atomic import replace_folder
from serving.stack.catalog import TINY_MODEL_DIMS, ModelDims

DEFAULT_MODEL_ID = "local/exaone-3.5-tiny"
MARKER = ".tiny-model"
# Bump when the recipe changes, so existing folders are rebuilt.
RECIPE_VERSION = 2

TINY_MAX_POSITIONS = 1024
TOKENIZER_VOCAB_TARGET = TINY_MODEL_DIMS.vocab_size
# With every weight at std 0.02 the logits are nearly flat (each token's logprob near
# -ln(vocab)), so greedy answers hinge on differences of 1e-3 that batching noise can flip.
# A wider head gives clear winners; adapter checks compare greedy answers.
LM_HEAD_STD = 0.5

PAD, BOS, EOT, UNK = "[PAD]", "[BOS]", "[|endofturn|]", "[UNK]"
# EXAONE 3.5's chat markers; a turn ends with [|endofturn|], which is also the EOS token.
ROLE_TOKENS = ("[|system|]", "[|user|]", "[|assistant|]")
SPECIAL_TOKENS = (PAD, BOS, EOT, UNK, *ROLE_TOKENS)

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '[|system|][|endofturn|]\\n' }}{% endif %}"
    "{{ '[|' + message['role'] + '|]' + message['content'] }}"
    "{% if message['role'] == 'user' %}{{ '\\n' }}{% else %}{{ '[|endofturn|]\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '[|assistant|]' }}{% endif %}"
)

_TEXT = """\
EXAONE is a family of bilingual language models. This tiny model shares its architecture:
an embedding, a stack of decoder blocks, each with RMS normalisation, grouped-query attention
with rotary positions, and a gated feed-forward layer, then a final normalisation and a head.
The weights are random, so the words it writes mean nothing; the tests only need outputs that
change when a LoRA adapter is applied on top of the base model.
Adapters are small: two thin matrices per linear layer, A and B, whose product is added to the
frozen weight. A server can hold many of them and pick one per request.
Hello! How are you today? I am fine, thank you. What would you like to know?
Please answer briefly and politely. Write a short, formal reply. Write a casual reply.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 16 32 64 128 256 512 1024 2048.
안녕하세요. 만나서 반갑습니다. 오늘 날씨가 좋네요. 무엇을 도와드릴까요?
감사합니다. 짧고 정중하게 답해 주세요. 편하게 이야기해요.
"""


def tiny_dims(vocab_size: int) -> ModelDims:
    return dataclasses.replace(TINY_MODEL_DIMS, vocab_size=vocab_size)


RemoteCode = Literal["plain", "legacy"]
# "plain": a configuration_exaone.py that imports under transformers 5. "legacy": remote code
# as written for an older transformers (configuration_exaone.py and a small modeling_exaone.py),
# whose imports fail under the serving venv until `python -m serving.host.exaone_patch` rewrites
# them.
REMOTE_CODE_PACKAGES: dict[str, str] = {
    "plain": "serving.local.tiny_exaone",
    "legacy": "serving.local.tiny_exaone.legacy",
}
REMOTE_CODE_FILES: dict[str, tuple[str, ...]] = {
    "plain": ("configuration_exaone.py",),
    "legacy": ("configuration_exaone.py", "modeling_exaone.py"),
}


def remote_code_source(name: str, remote_code: RemoteCode = "plain") -> str:
    """Source of remote-code file ``name`` of a variant, copied next to the weights."""
    return (resources.files(REMOTE_CODE_PACKAGES[remote_code]) / name).read_text()


def config_source(remote_code: RemoteCode = "plain") -> str:
    """Source of the remote ``configuration_exaone.py`` copied next to the weights."""
    return remote_code_source("configuration_exaone.py", remote_code)


def _marker_text(seed: int, model_id: str, remote_code: RemoteCode = "plain") -> str:
    recipe: dict[str, object] = {
        "recipe": RECIPE_VERSION,
        "seed": seed,
        "model_id": model_id,
        "configuration_exaone_sha256": _sha256(config_source(remote_code)),
    }
    if remote_code != "plain":  # the default marker stays as it was
        recipe["remote_code"] = remote_code
        recipe["remote_code_sha256"] = {
            name: _sha256(remote_code_source(name, remote_code))
            for name in REMOTE_CODE_FILES[remote_code]
        }
    return json.dumps(recipe, sort_keys=True) + "\n"


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _train_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_TARGET,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_TEXT.splitlines(), trainer)
    return tokenizer


def _config(dims: ModelDims, model_id: str, ids: dict[str, int], *,
            max_positions: int = TINY_MAX_POSITIONS, torch_dtype: str = "float32") -> dict:
    return {
        "_name_or_path": model_id,
        "architectures": ["ExaoneForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_exaone.ExaoneConfig"},
        "model_type": "exaone",
        "activation_function": "silu",
        "attention_dropout": 0.0,
        "embed_dropout": 0.0,
        "bos_token_id": ids[BOS],
        "eos_token_id": ids[EOT],
        "pad_token_id": ids[PAD],
        "head_dim": dims.head_dim,
        "hidden_size": dims.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": dims.intermediate_size,
        "layer_norm_epsilon": 1e-5,
        "max_position_embeddings": max_positions,
        "num_attention_heads": dims.num_attention_heads,
        "num_key_value_heads": dims.num_key_value_heads,
        "num_layers": dims.num_layers,
        # Both spellings: transformers 5 reads rope_parameters, older readers rope_theta.
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "rope_theta": 10000.0,
        "tie_word_embeddings": dims.tie_word_embeddings,
        "torch_dtype": torch_dtype,
        "use_cache": True,
        "vocab_size": dims.vocab_size,
    }


def _weights(dims: ModelDims, seed: int, *, device: str = "cpu",
             dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(seed)

    def normal(out_features: int, in_features: int) -> torch.Tensor:
        weight = torch.randn((out_features, in_features), generator=gen, device=device) * 0.02
        return weight.to(dtype)

    def ones(size: int) -> torch.Tensor:
        return torch.ones(size, device=device, dtype=dtype)

    hidden = dims.hidden_size
    tensors = {"transformer.wte.weight": normal(dims.vocab_size, hidden)}
    for i in range(dims.num_layers):
        block = f"transformer.h.{i}"
        tensors[f"{block}.ln_1.weight"] = ones(hidden)
        tensors[f"{block}.ln_2.weight"] = ones(hidden)
        for module in ("q_proj", "k_proj", "v_proj", "out_proj"):
            in_features, out_features = dims.lora_shapes(module)
            tensors[f"{block}.attn.attention.{module}.weight"] = normal(out_features, in_features)
        for module in ("c_fc_0", "c_fc_1", "c_proj"):
            in_features, out_features = dims.lora_shapes(module)
            tensors[f"{block}.mlp.{module}.weight"] = normal(out_features, in_features)
    tensors["transformer.ln_f.weight"] = ones(hidden)
    if not dims.tie_word_embeddings:  # tied (EXAONE 3.5 2.4B): the head is the embedding
        tensors["lm_head.weight"] = normal(dims.vocab_size, hidden) * (LM_HEAD_STD / 0.02)
    return {name: t.cpu() for name, t in tensors.items()}


_TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def _build(folder: Path, *, seed: int, model_id: str, remote_code: RemoteCode = "plain",
           dims: ModelDims | None = None, dtype: str = "float32", device: str = "cpu",
           max_positions: int = TINY_MAX_POSITIONS) -> None:
    """The model's files in ``folder``: the tiny model, or one of ``dims`` (real sizes)."""
    tokenizer = _train_tokenizer()
    tokenizer.save(str(folder / "tokenizer.json"))
    ids = {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}
    dims = dims or tiny_dims(tokenizer.get_vocab_size())

    _write_json(folder / "config.json", _config(dims, model_id, ids,
                                                max_positions=max_positions, torch_dtype=dtype))
    for name in REMOTE_CODE_FILES[remote_code]:
        (folder / name).write_text(remote_code_source(name, remote_code))
    _write_json(folder / "generation_config.json", {
        "bos_token_id": ids[BOS], "eos_token_id": ids[EOT], "pad_token_id": ids[PAD],
    })
    _write_json(folder / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOT,
        "pad_token": PAD,
        "unk_token": UNK,
        "additional_special_tokens": list(ROLE_TOKENS),
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_positions,
        "chat_template": CHAT_TEMPLATE,
    })
    _write_json(folder / "special_tokens_map.json", {
        "bos_token": BOS, "eos_token": EOT, "pad_token": PAD, "unk_token": UNK,
        "additional_special_tokens": list(ROLE_TOKENS),
    })
    weights = _weights(dims, seed, device=device, dtype=_TORCH_DTYPES[dtype])
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    for path in folder.iterdir():
        path.chmod(0o644)  # safetensors writes 0600; the serving user reads these


def make_tiny_model(
    dest: Path, *, seed: int = 0, model_id: str = DEFAULT_MODEL_ID,
    remote_code: RemoteCode = "plain",
) -> Path:
    """Write the tiny model to ``dest`` (skipped when ``dest`` already holds this recipe).

    A folder that exists without this maker's marker is not overwritten (raises
    FileExistsError); one with an older marker is replaced as a whole. ``remote_code="legacy"``
    ships remote code that needs ``python -m serving.host.exaone_patch`` under transformers 5.19.
    """
    if remote_code not in REMOTE_CODE_PACKAGES:
        raise ValueError(f"remote_code must be one of {sorted(REMOTE_CODE_PACKAGES)}")
    dest = Path(dest)
    marker = dest / MARKER
    wanted = _marker_text(seed, model_id, remote_code)
    if marker.is_file() and marker.read_text() == wanted:
        return dest
    if dest.exists() and not marker.is_file() and any(dest.iterdir()):
        raise FileExistsError(f"{dest} exists and was not made by make_tiny_model; not replaced")
    def build(staging: Path) -> None:
        _build(staging, seed=seed, model_id=model_id, remote_code=remote_code)
        (staging / MARKER).write_text(_marker_text(seed, model_id, remote_code))

    return replace_folder(dest, build)


def make_model(
    dest: Path, dims: ModelDims, *, seed: int = 0, model_id: str,
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16", device: str = "cpu",
    max_positions: int = 32768,
) -> Path:
    """A model of real EXAONE dimensions (``catalog.EXAONE_MODELS``) with random weights, for
    the GPU tier: the tiny model's config, remote code and tokenizer (its few hundred tokens
    index into the full vocabulary), every weight at ``dims``, tied embeddings when ``dims``
    says so. ``device="cuda"`` draws the 2.4B model's weights in seconds; always rebuilt.
    """
    return replace_folder(Path(dest), lambda staging: _build(
        staging, seed=seed, model_id=model_id, dims=dims, dtype=dtype, device=device,
        max_positions=max_positions))
