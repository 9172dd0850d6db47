"""Configuration of an EXAONE 3.5 (``model_type: exaone``) checkpoint.

A minimal stand-in for the remote ``configuration_exaone.py`` of LG's checkpoints, for the
tiny test model: written for transformers 5, whose configs are dataclasses (a subclass
becomes one, so fields are declared, not passed through ``__init__``).
"""

from __future__ import annotations

from typing import ClassVar

from transformers import PreTrainedConfig


class ExaoneConfig(PreTrainedConfig):
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
    rope_parameters: dict | None = None
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
