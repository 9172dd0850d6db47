"""Model classes beside the tiny model's config, older-transformers style.

vLLM serves EXAONE with its own ``ExaoneForCausalLM`` and never imports this file; it is here
because LG's checkpoints ship a ``modeling_exaone.py`` whose imports break under transformers
5.19 in this same way: ``check_model_inputs`` and ``maybe_autocast`` are no longer importable
from ``transformers.modeling_utils`` (one statement, beside ``PreTrainedModel``, which still
is). Only the embedding, rotary table and final norm are here: enough to import and build.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.modeling_utils import PreTrainedModel, check_model_inputs, maybe_autocast

from .configuration_exaone import ExaoneConfig


class ExaoneRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        variance = hidden_states.float().pow(2).mean(-1, keepdim=True)
        normed = hidden_states.float() * torch.rsqrt(variance + self.eps)
        return self.weight * normed.to(hidden_states.dtype)


class ExaoneRotaryEmbedding(nn.Module):
    def __init__(self, config: ExaoneConfig) -> None:
        super().__init__()
        theta = (config.rope_parameters or {}).get("rope_theta", 10000.0)
        dim = config.head_dim
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with maybe_autocast(device_type=x.device.type, enabled=False):
            freqs = position_ids[..., None].float() * self.inv_freq
            emb = torch.cat((freqs, freqs), dim=-1)
            return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


class ExaonePreTrainedModel(PreTrainedModel):
    config_class = ExaoneConfig
    base_model_prefix = "transformer"


class ExaoneModel(ExaonePreTrainedModel):
    def __init__(self, config: ExaoneConfig) -> None:
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.rotary = ExaoneRotaryEmbedding(config)
        self.ln_f = ExaoneRMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.post_init()

    @check_model_inputs
    def forward(self, input_ids: torch.Tensor, **kwargs) -> BaseModelOutputWithPast:
        return BaseModelOutputWithPast(last_hidden_state=self.ln_f(self.wte(input_ids)))


__all__ = ["ExaoneModel", "ExaonePreTrainedModel"]
