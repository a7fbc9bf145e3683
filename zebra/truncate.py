"""Shrink the ranks of trained MLA layers: a kv_rank / q_rank below the one they were trained at.

There is no norm between an MLA layer's factors (zebra.mla), so its key/value path is one linear
map of the normed input, W_kv = kv_b_proj.weight @ kv_a_proj.weight[:kv_rank]  [heads*(nope+v), D],
and its query path another, W_q = q_proj.weight (or q_b_proj.weight @ q_a_proj.weight)  [heads*(nope+rope), D].
A layer of smaller rank r holds the best rank-r approximation of each map (Eckart-Young: the
truncated SVD), in balanced factors b = U_r S_r^1/2, a = S_r^1/2 V_r^T as zebra.init_mla makes them.
The RoPE key rows of kv_a_proj (rows kv_rank:) and o_proj are kept as they are.

    small = truncate_ranks(hybrid, kv_rank=64, q_rank=256)     # a new ZebraForCausalLM; hybrid is unchanged

Ray Tune (tune/) uses this to cut the MLA layers of one ILD-trained student to every rank it tries.
The math runs in float64; results are cast back to the layer's dtype and device.
"""
from __future__ import annotations

import copy

import torch

from .config import ZebraConfig
from .init_mla import _low_rank
from .mla import MLAttention
from .modeling import ZebraForCausalLM


def truncate_mla(mla: MLAttention, config: ZebraConfig) -> MLAttention:
    """A new MLAttention at config.kv_rank and config.q_rank, no larger than mla's.

    q_rank None (a full-rank q_proj) is allowed only when mla's is None too. Raises ValueError
    naming the field that would grow.
    """
    _check_ranks(mla, config.kv_rank, config.q_rank)
    w = {name: p.detach().double() for name, p in mla.named_parameters()}
    rope_rows = w["kv_a_proj.weight"][mla.kv_rank:]
    kv_b, latent_a = _low_rank(w["kv_b_proj.weight"] @ w["kv_a_proj.weight"][: mla.kv_rank], config.kv_rank)
    weights = {"kv_a_proj": torch.cat([latent_a, rope_rows]), "kv_b_proj": kv_b, "o_proj": w["o_proj.weight"]}
    if config.q_rank is None:
        weights["q_proj"] = w["q_proj.weight"]
    else:
        q_map = w["q_proj.weight"] if mla.q_rank is None else w["q_b_proj.weight"] @ w["q_a_proj.weight"]
        weights["q_b_proj"], weights["q_a_proj"] = _low_rank(q_map, config.q_rank)
    ref = mla.kv_a_proj.weight
    out = MLAttention(config, mla.layer_idx).to(device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        for name, weight in weights.items():
            getattr(out, name).weight.copy_(weight)
        out.rope_freq_idx.copy_(mla.rope_freq_idx)
    return out


def _check_ranks(mla: MLAttention, kv_rank: int, q_rank: int | None) -> None:
    if kv_rank > mla.kv_rank:
        raise ValueError(f"kv_rank {kv_rank} exceeds the layer's kv_rank {mla.kv_rank}; truncation only shrinks")
    if q_rank is None and mla.q_rank is not None:
        raise ValueError(f"q_rank None (full rank) exceeds the layer's q_rank {mla.q_rank}; truncation only shrinks")
    if q_rank is not None and mla.q_rank is not None and q_rank > mla.q_rank:
        raise ValueError(f"q_rank {q_rank} exceeds the layer's q_rank {mla.q_rank}; truncation only shrinks")


def truncate_ranks(model: ZebraForCausalLM, kv_rank: int, q_rank: int | None) -> ZebraForCausalLM:
    """A copy of model whose MLA layers are cut to kv_rank / q_rank (truncate_mla); all else is copied.

    The result's ZebraConfig carries the new ranks, so zebra.kv counts its smaller cache.
    """
    config = copy.deepcopy(model.config)
    config.kv_rank, config.q_rank = kv_rank, q_rank
    state = model.state_dict()
    for i in config.mla_layers:
        prefix = f"model.layers.{i}.mixer."
        state = {k: v for k, v in state.items() if not k.startswith(prefix)}
        small = truncate_mla(model.model.layers[i].mixer, config)
        state.update({prefix + k: v for k, v in small.state_dict().items()})
    out = ZebraForCausalLM(config).to(device=model.device, dtype=model.dtype)
    out.load_state_dict(state)
    return out.train(model.training)
