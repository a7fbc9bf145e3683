"""Mamba2 (SSD) token mixer in the MambaInLlama layout, so that it can start from a Llama attention layer.

One projection of the input gives, per token,
    z [heads * P]      gate of the output norm
    x [groups * P]     values, one group per Llama KV head     (init: W_v)
    B [groups * N]     input map, one group per KV head        (init: W_k)
    C [heads * N]      output map, one per head                (init: W_q)
    dt [heads]         step size, dt = softplus(dt_raw + dt_bias)
x|B|C pass a causal depthwise conv and SiLU; x and B are repeated from groups to heads as GQA
repeats K/V (head i reads group i // (heads // groups)). Then per head
    S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T      y_t = S_t C_t + D x_t      (A = -exp(A_log))
and out = out_proj(RMSNorm(y * silu(z)) * weight), the RMS taken per head as MambaInLlama does
(mamba_ssm RMSNormGated with group_size = head_dim, norm_before_gate=False).

Decode state per layer (ZebraCache): conv window [batch, conv_dim, d_conv] (the last d_conv conv
inputs) and SSM state [batch, heads, P, N] (float32 or wider), updated in place.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kernels.decode import mamba2_decode
from kernels.norm import gated_rms_norm
from kernels.ssd import causal_conv1d, causal_conv1d_step, ssd_scan, ssd_step

from .cache import ZebraCache, new_token_mask
from .config import ZebraConfig

DECODE_BACKEND = {"auto": "auto", "torch": "torch", "cuda": "triton"}  # mamba_backend -> kernels.decode's name
DT_RANGE = (1e-3, 1e-1)  # softplus(dt_bias) is drawn log-uniform in this range
DT_FLOOR = 1e-4
A_RANGE = (1.0, 16.0)  # -A is drawn uniform in this range
PAD_MIN_ROWS = 256  # in_proj runs on a weight padded to 16-byte rows from this many token rows (see _in_proj)


class GatedRMSNorm(nn.Module):
    """RMSNorm(y * silu(z)) * weight, the RMS taken over consecutive groups of `group_size` channels;
    kernels.norm's Triton kernel on CUDA (backend as ZebraConfig.mamba_backend), its reference elsewhere."""

    def __init__(self, dim: int, group_size: int, eps: float, backend: str = "auto"):
        super().__init__()
        self.group_size, self.eps, self.backend = group_size, eps, backend
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """y, z [..., dim] -> [..., dim] in y's dtype (computed in at least float32)."""
        return gated_rms_norm(y, z, self.weight, self.group_size, self.eps, self.backend)


class Mamba2Mixer(nn.Module):
    """Mamba2 token mixer of one ZebraForCausalLM layer. Linear weights are [out, in], no biases."""

    def __init__(self, config: ZebraConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.heads, self.head_dim = config.mamba_heads, config.mamba_head_dim
        self.d_state, self.groups = config.d_state, config.mamba_groups
        self.chunk_size, self.backend = config.chunk_size, config.mamba_backend
        self.d_inner = self.heads * self.head_dim
        self.d_xb = self.groups * self.head_dim
        self.conv_dim = self.d_xb + self.groups * self.d_state + self.heads * self.d_state
        self.in_proj = nn.Linear(config.hidden_size, self.d_inner + self.conv_dim + self.heads, bias=False)
        # Depthwise, with bias; applied causally through kernels.ssd (never through Conv1d.forward).
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, config.d_conv, groups=self.conv_dim)
        self.dt_bias = nn.Parameter(torch.empty(self.heads))
        self.A_log = nn.Parameter(torch.empty(self.heads))
        self.D = nn.Parameter(torch.ones(self.heads))
        self.norm = GatedRMSNorm(self.d_inner, self.head_dim, config.rms_norm_eps, config.mamba_backend)
        self.out_proj = nn.Linear(self.d_inner, config.hidden_size, bias=False)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """Mamba2's draws: softplus(dt_bias) log-uniform in DT_RANGE, A_log = log(uniform(A_RANGE)), D = 1."""
        lo, hi = map(math.log, DT_RANGE)
        dt = torch.exp(torch.rand(self.heads, dtype=torch.float64) * (hi - lo) + lo).clamp(min=DT_FLOOR)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus
        self.A_log.copy_(torch.empty(self.heads, dtype=torch.float64).uniform_(*A_RANGE).log())
        self.D.fill_(1.0)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cache: ZebraCache | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden_states [batch, new, d_model] -> [batch, new, d_model]. position_ids are unused (no positions).

        cache: a one-token step (new == 1) or a scan from the stored conv window and SSM state (from zeros on
        a fresh prefill); the new state is stored in place. attention_mask: 0/1 left-padding mask, [batch, new]
        without a cache, one column per cache position with one; or None. Padded positions are zeroed before
        in_proj and after the conv, so they leave the conv window and SSM state as zeros. A right-padded prefill
        (cache.valid set): dt = 0 past each row's real tokens, so exp(dt A) = 1 and the pads add nothing to the
        SSM state, and the stored conv window ends at the row's last real token.
        """
        new = hidden_states.shape[1]
        mask = None
        if attention_mask is not None:
            mask = new_token_mask(attention_mask, cache, new)[..., None].to(hidden_states.dtype)
        if mask is not None:
            hidden_states = hidden_states * mask
        z, xbc, dt = self._in_proj(hidden_states).split([self.d_inner, self.conv_dim, self.heads], dim=-1)
        dtype = torch.promote_types(hidden_states.dtype, torch.float32)
        dt = F.softplus((dt + self.dt_bias).to(dtype))
        valid = cache.valid if cache is not None else None
        if valid is not None:
            dt = dt * (torch.arange(new, device=dt.device) < valid[:, None])[..., None]
        state = cache.mamba_state(self.layer_idx) if cache is not None else None
        if state is not None and new == 1 and valid is None:
            y = self._step(xbc[:, 0], dt[:, 0], *state, mask)
        else:
            y, window, ssm = self._scan(xbc, dt, state, mask, valid, keep_window=cache is not None)
            if cache is not None:
                cache.set_mamba_state(self.layer_idx, window, ssm)
        return self.out_proj(self.norm(y.flatten(-2), z))

    def _in_proj(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """in_proj(hidden_states) [..., d_inner + conv_dim + heads]. Its width is odd where heads is (SmolLM2:
        576 + 960 + 9 = 1545), and cuBLAS runs a bf16 product whose rows are not a multiple of 8 elements (16
        bytes) on slow fallback kernels (an H200 profile: 27 such calls per pass, ~45 ms of a 239 ms training
        step); so the weight is zero-padded to a multiple of 8 rows for the product and the output cut back.
        Only for products of at least PAD_MIN_ROWS token rows: a decode step (one row per sequence) is a
        memory-bound matrix-vector product that the fallback does not slow, and padding there would copy the
        weight (1.8 MB a layer on SmolLM2) on every generated token."""
        weight, width = self.in_proj.weight, self.in_proj.out_features
        pad = -width % 8
        if pad == 0 or hidden_states.numel() < PAD_MIN_ROWS * hidden_states.shape[-1]:
            return self.in_proj(hidden_states)
        return F.linear(hidden_states, F.pad(weight, (0, 0, 0, pad)))[..., :width]

    def _scan(self, xbc, dt, state, mask, valid=None, keep_window=True):
        """xbc [b, t, conv_dim], dt [b, t, heads], state (window, ssm) or None, mask [b, t, 1] or None, valid
        int [b] or None (real tokens per row, the window ends at the last) -> y [b, t, heads, P],
        window [b, conv_dim, d_conv] (None unless keep_window: a training pass keeps no cache), ssm [b, heads, P, N]."""
        window, ssm = state if state is not None else (None, None)
        conv_in = xbc.transpose(1, 2)
        initial = None if window is None else window[..., 1:]
        conv_out = causal_conv1d(conv_in, self.conv1d.weight[:, 0], self.conv1d.bias, initial, self.backend,
                                 activation="silu").transpose(1, 2)
        x, B, C = self._heads(conv_out if mask is None else conv_out * mask)  # masked positions feed no state
        y, ssm = ssd_scan(x, dt, self._A(), B, C, self.chunk_size, D=self.D, initial_state=ssm, backend=self.backend)
        return y, self._last_window(conv_in, window, valid) if keep_window else None, ssm

    def _step(self, xbc, dt, window, ssm, mask):
        """One token: xbc [b, conv_dim], dt [b, heads], mask [b, 1, 1] or None -> y [b, 1, heads, P]; updates
        window [b, conv_dim, d_conv] and ssm [b, heads, P, N] in place (one kernel launch without a mask)."""
        weight, bias = self.conv1d.weight[:, 0], self.conv1d.bias
        if mask is None:
            y = mamba2_decode(xbc, dt, window, ssm, weight, bias, self._A(), self.D, backend=DECODE_BACKEND[self.backend])
            return y[:, None]
        conv_out, new_window = causal_conv1d_step(window, xbc, weight, bias)
        x, B, C = self._heads(self._activate(conv_out[:, None], mask))
        y, new_ssm = ssd_step(ssm, x[:, 0], dt, self._A(), B[:, 0], C[:, 0], self.D)
        window.copy_(new_window)
        ssm.copy_(new_ssm)
        return y[:, None]

    def _activate(self, conv_out, mask):
        """SiLU of the conv output [b, t, conv_dim]; masked positions set to 0 so they feed no state."""
        out = F.silu(conv_out)
        return out if mask is None else out * mask

    def _heads(self, xbc):
        """[b, t, conv_dim] -> x [b, t, heads, P], B, C [b, t, heads, N]; x and B repeated from groups to heads."""
        x, B, C = xbc.split([self.d_xb, self.groups * self.d_state, self.heads * self.d_state], dim=-1)
        rep = self.heads // self.groups
        x = x.unflatten(-1, (self.groups, self.head_dim)).repeat_interleave(rep, dim=2)
        B = B.unflatten(-1, (self.groups, self.d_state)).repeat_interleave(rep, dim=2)
        return x, B, C.unflatten(-1, (self.heads, self.d_state))

    def _A(self) -> torch.Tensor:
        return -torch.exp(self.A_log.to(torch.promote_types(self.A_log.dtype, torch.float32)))

    def _last_window(self, conv_in, window, valid=None):
        """The last d_conv conv inputs [b, conv_dim, d_conv] of conv_in [b, conv_dim, t], left-padded with the
        previous window (or zeros); with valid int [b], row r's end at its valid[r]-th input (0: the old window)."""
        k = self.conv1d.kernel_size[0]
        if window is None:
            window = conv_in.new_zeros(*conv_in.shape[:2], k)
        if valid is None:
            return torch.cat([window.to(conv_in.dtype), conv_in[..., -k:]], dim=-1)[..., -k:]
        joined = torch.cat([window.to(conv_in.dtype), conv_in], dim=-1)  # input j of this call at k + j
        index = valid[:, None] + torch.arange(k, device=valid.device)  # [b, k]: inputs valid-k .. valid-1
        return joined.gather(-1, index[:, None, :].expand(-1, conv_in.shape[1], -1))
