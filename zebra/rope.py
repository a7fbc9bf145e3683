"""RoPE frequencies of a teacher through transformers' own rope initialisation, for every rope type it knows.

    params = rope_parameters(teacher.config)   # {"rope_type": "llama3", "rope_theta": 5e5, "factor": 32.0, ...}
    inv_freq, scaling = inverse_frequencies(params, head_dim=64, max_position_embeddings=131072)
    inv_freq, scaling = mla_frequencies(zebra_config)   # the same for a ZebraConfig (what MLAttention rotates at)

inv_freq [head_dim // 2] float32 equals the teacher's `LlamaRotaryEmbedding.inv_freq` bit for bit, and
`scaling` is its `attention_scaling` (cos and sin are multiplied by it; 1.0 except for yarn and longrope).
"default" RoPE is computed here as the Llama rotary embedding does; every other type goes through
`transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS` (linear, dynamic, yarn, longrope, llama3, ...).

A ZebraConfig carries a teacher's non-default parameters in its `teacher_rope_parameters` attribute
(zebra.convert.hybrid_config sets it; it is saved in config.json like any config attribute); without
it the MLA layers rotate at default RoPE of `rope_theta`.

Limit: "dynamic" and "longrope" change their frequencies once a sequence outgrows the original context
(transformers recomputes them in the forward pass); here they keep the values of their initialisation,
which are the teacher's within the original context.
"""
from __future__ import annotations

import logging

import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

log = logging.getLogger(__name__)

CONFIG_ATTR = "teacher_rope_parameters"
LENGTH_DEPENDENT = ("dynamic", "longrope")


def rope_parameters(config) -> dict:
    """The standardised RoPE parameters of a transformers config: rope_type, rope_theta and the type's keys.

    Reads `rope_parameters` (transformers 5) or the older `rope_theta` + `rope_scaling` attributes.
    Raises ValueError for per-layer-type parameters (a dict of dicts), which no Llama teacher has.
    """
    params = getattr(config, "rope_parameters", None)
    if params is None:
        params = dict(getattr(config, "rope_scaling", None) or {})
    params = dict(params)
    if any(isinstance(v, dict) for v in params.values()):
        raise ValueError(f"teacher rope_parameters are per layer type ({sorted(params)}); "
                         "only one RoPE per model is supported")
    params.setdefault("rope_type", params.pop("type", "default"))
    params.setdefault("rope_theta", float(getattr(config, "rope_theta", 10000.0)))
    return params


def inverse_frequencies(params: dict, head_dim: int, max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    """(inv_freq [head_dim // 2] float32 on the CPU, attention scaling) of RoPE parameters `params`.

    On the CPU also inside a meta-device context (transformers builds models there before loading)."""
    with torch.device("cpu"):
        return _inverse_frequencies(params, head_dim, max_position_embeddings)


def _inverse_frequencies(params: dict, head_dim: int, max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        return 1.0 / (params["rope_theta"] ** exponents), 1.0
    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"rope_type {rope_type!r} is unknown to transformers; it knows 'default', "
                         f"{', '.join(repr(k) for k in sorted(ROPE_INIT_FUNCTIONS))}")
    config = LlamaConfig(hidden_size=head_dim, num_attention_heads=1, num_key_value_heads=1, head_dim=head_dim,
                         max_position_embeddings=max_position_embeddings, rope_parameters=dict(params))
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, None)
    return inv_freq.float(), float(scaling)


def mla_frequencies(config) -> tuple[torch.Tensor, float]:
    """(inv_freq [head_dim // 2] float32, attention scaling) that a ZebraConfig's MLA layers rotate at:
    its teacher_rope_parameters, else default RoPE of its rope_theta. Raises ValueError when the two
    name different rope_theta values."""
    params = getattr(config, CONFIG_ATTR, None) or {"rope_type": "default", "rope_theta": config.rope_theta}
    if float(params.get("rope_theta", config.rope_theta)) != float(config.rope_theta):
        raise ValueError(f"config.{CONFIG_ATTR}['rope_theta'] = {params['rope_theta']} but config.rope_theta = "
                         f"{config.rope_theta}; they must agree")
    return inverse_frequencies(params, config.head_dim, config.max_position_embeddings)


def config_fields(teacher_config) -> dict:
    """The ZebraConfig fields for a teacher's RoPE: rope_theta, and teacher_rope_parameters when not default."""
    params = rope_parameters(teacher_config)
    fields = {"rope_theta": float(params["rope_theta"])}
    if params["rope_type"] != "default":
        fields[CONFIG_ATTR] = params
        if params["rope_type"] in LENGTH_DEPENDENT:
            log.warning("teacher RoPE %r depends on the sequence length; MLA layers keep its frequencies for the "
                        "original context", params["rope_type"])
    return fields
