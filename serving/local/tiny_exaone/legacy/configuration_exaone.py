"""Configuration of an EXAONE 3.5 (``model_type: exaone``) checkpoint, older-transformers style.

The tiny model's ``configuration_exaone.py`` as remote code written for transformers 4.x
imports it: ``PretrainedConfig`` from ``transformers.modeling_utils``, which re-exported it
there; transformers 5 no longer does, so under the serving venv this file fails to import
until ``python -m serving.host.exaone_patch`` rewrites that import (LG's EXAONE 3.5 remote code
fails the same way on ``check_model_inputs``/``maybe_autocast``; see ``modeling_exaone.py``).
The class body is the transformers 5 one: configs are dataclasses there.
"""

from __future__ import annotations

from typing import ClassVar

from transformers.modeling_rope_utils import RopeParameters
from transformers.modeling_utils import PretrainedConfig
from transformers.utils import logging

logger = logging.get_logger(__name__)


class ExaoneConfig(PretrainedConfig):
    model_type = "exaone"
    keys_to_ignore_at_inference: ClassVar[list[str]] = ["past_key_values"]
    # EXAONE says num_layers; vLLM and transformers read num_hidden_layers.
    attribute_map: ClassVar[dict[str, str]] = {"num_hidden_layers": "num_layers"}

    vocab_size: int = 102400
    max_position_embeddings: int = 2048
    hidden_size: int = 2048
    num_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    intermediate_size: int | None = None
    activation_function: str = "silu"
    rope_parameters: RopeParameters | dict | None = None
    embed_dropout: float = 0.0
    attention_dropout: float = 0.0
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    use_cache: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.intermediate_size is None:
            self.intermediate_size = self.hidden_size * 4
        super().__post_init__(**kwargs)


__all__ = ["ExaoneConfig"]
