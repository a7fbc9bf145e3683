"""Initialise a Mamba2 mixer from a Llama attention layer (MambaInLlama).

Causal attention reads o_t = W_o sum_s softmax_s(q_t . k_s) v_s. A Mamba2 head unrolled is
    y_t = sum_{s <= t} (C_t . B_s) exp(A (dt_{s+1} + ... + dt_t)) dt_s x_s + D x_t,
a linear attention with query C, key B, value x and a learned decay in place of the softmax.
So the teacher's projections go where they play the same part:
    C <- W_q (one per head),  B <- W_k (one per KV head = group),  x <- W_v (per group),  out_proj <- W_o,
and x, B are shared across a group's heads exactly as GQA shares K and V.

The conv starts as the identity (last tap 1, the others and the bias 0): a random conv would mix
each q/k/v with its neighbours' and hide the teacher's map, while the identity starts the layer as
the linear-attention form above (with SiLU as feature map) that distillation then refines.
z and dt_raw rows get a small random init (normal, std = initializer_range), as MambaInLlama keeps
theirs random: the gate's scale cancels in the RMSNorm that follows, and a small dt_raw leaves
dt ~ softplus(dt_bias). dt_bias, A_log and D keep Mamba2's draws (Mamba2Mixer.reset_ssm_parameters).
"""
from __future__ import annotations

import torch

from .config import ZebraConfig
from .mamba2 import Mamba2Mixer


def _check_shapes(attn, config: ZebraConfig) -> None:
    """Raise ValueError naming the config field that does not fit the attention's weights."""
    head_dim = attn.head_dim
    needed = {
        "hidden_size": attn.q_proj.in_features,
        "d_state": head_dim,  # B, C rows are k, q head rows
        "mamba_head_dim": head_dim,  # x rows are v head rows, out_proj columns o_proj's
        "mamba_heads": attn.q_proj.out_features // head_dim,
        "mamba_groups": attn.k_proj.out_features // head_dim,
    }
    for field, want in needed.items():
        if getattr(config, field) != want:
            raise ValueError(
                f"{field} is {getattr(config, field)}, but initialising from this attention layer needs {want}"
            )
    with_bias = [n for n in ("q_proj", "k_proj", "v_proj", "o_proj") if getattr(attn, n).bias is not None]
    if with_bias:
        raise ValueError(f"attention has biases in {with_bias}; Mamba2Mixer's in_proj/out_proj have none")


@torch.no_grad()
def mamba_from_llama_attention(attn, config: ZebraConfig, layer_idx: int) -> Mamba2Mixer:
    """A Mamba2Mixer for layer `layer_idx` from an HF LlamaAttention, on its device and in its dtype."""
    _check_shapes(attn, config)
    weight = attn.q_proj.weight
    mixer = Mamba2Mixer(config, layer_idx).to(device=weight.device, dtype=torch.float64)
    z, x, B, C, dt = mixer.in_proj.weight.split(
        [mixer.d_inner, mixer.d_xb, mixer.groups * mixer.d_state, mixer.heads * mixer.d_state, mixer.heads]
    )
    z.normal_(0.0, config.initializer_range)
    dt.normal_(0.0, config.initializer_range)
    x.copy_(attn.v_proj.weight.double())
    B.copy_(attn.k_proj.weight.double())
    C.copy_(attn.q_proj.weight.double())
    mixer.out_proj.weight.copy_(attn.o_proj.weight.double())
    mixer.conv1d.weight.zero_()
    mixer.conv1d.weight[..., -1] = 1.0
    mixer.conv1d.bias.zero_()
    mixer.norm.weight.fill_(1.0)
    return mixer.to(weight.dtype)
