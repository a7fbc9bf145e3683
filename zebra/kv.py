"""KV-cache size: the one definition used by init, SMART, Tune, reports and Serve.

`kv_bytes_per_token` counts what the cache grows by for every token of context:
  Llama teacher:  layers x 2 (K and V) x kv_heads x head_dim
  Zebra hybrid:   MLA layers x (kv_rank + qk_rope_dim)      (latent + shared RoPE key)
Mamba2 layers add no per-token bytes; their fixed state per sequence is `state_bytes_per_sequence`
(conv window in the cache dtype, SSM state in `ssm_state_dtype`: at least float32, since bf16 rounding
compounds over a long generation). zebra.cache.ZebraCache holds exactly these bytes.
"""
from __future__ import annotations

import torch


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def ssm_state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the SSM state is kept in for a cache in `dtype`: float32, or float64 for a float64 cache."""
    return torch.promote_types(dtype, torch.float32)


def kv_values_per_token(config) -> int:
    """Cached values per token of context (dtype-free), for a Llama-like or a Zebra config."""
    if getattr(config, "model_type", None) == "zebra":
        return len(config.mla_layers) * (config.kv_rank + config.qk_rope_dim)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return config.num_hidden_layers * 2 * kv_heads * head_dim


def kv_bytes_per_token(config, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes the cache grows by per token of context, cache stored in `dtype`."""
    return kv_values_per_token(config) * _itemsize(dtype)


def mla_layer_bytes_per_token(config, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes per token that one MLA layer adds (what each extra MLA layer costs the budget)."""
    return (config.kv_rank + config.qk_rope_dim) * _itemsize(dtype)


def state_bytes_per_sequence(config, dtype: torch.dtype = torch.bfloat16) -> int:
    """Fixed bytes per sequence of the Mamba2 layers (conv window in `dtype` + SSM state in
    ssm_state_dtype(dtype)); 0 for a teacher."""
    if getattr(config, "model_type", None) != "zebra":
        return 0
    conv_dim = (config.mamba_groups * config.mamba_head_dim + config.mamba_groups * config.d_state
                + config.mamba_heads * config.d_state)
    ssm = config.mamba_heads * config.mamba_head_dim * config.d_state
    per_layer = conv_dim * config.d_conv * _itemsize(dtype) + ssm * _itemsize(ssm_state_dtype(dtype))
    return len(config.mamba_layers) * per_layer


def kv_fraction(student_config, teacher_config) -> float:
    """Student KV bytes per token over the teacher's (dtype cancels)."""
    return kv_values_per_token(student_config) / kv_values_per_token(teacher_config)
