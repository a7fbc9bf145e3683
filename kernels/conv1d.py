"""Causal depthwise conv1d with an optional fused SiLU, forward and backward in Triton.

Same function as `kernels.ssd.causal_conv1d_ref` (then SiLU when activation="silu"):
    out[b, c, t] = act(bias[c] + sum_j weight[c, j] * in[b, c, t - (k-1) + j])
where `in` is x preceded by the k-1 inputs of `initial_window` (zeros when None). Any strides are
accepted; the Mamba2 mixer passes x channel-last (a transposed [b, l, c] tensor), and the output
keeps x's layout. Products and sums run in float32 whatever the input dtype.

Three layers: `_fwd_impl`/`_bwd_impl` launch the kernels and are registered as the torch.library custom ops
`_fwd`/`_bwd` (so torch.compile keeps them whole, with no graph break and no tracing into the launches),
`_CausalConv1d` is the autograd Function over them (the ops under torch.compile, the plain launchers in eager
mode, which saves the ops' host time: `kernels._eager.op_or_impl`), and `causal_conv1d_triton` is the public
function. The backward recomputes the pre-activation instead of saving it: a first kernel writes the gradient at
the pre-activation (float32) and per-block partial sums of the weight and bias gradients (deterministic, no
atomics; one torch.sum reduces them), a second gathers the input and window gradients from it.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._eager import op_or_impl

ACTIVATIONS = (None, "silu")
# Tiles and warps picked by register count for sm_90 (ptxas: 64-128 registers a thread, no spills):
# the forward and the input-gradient kernel take [BLOCK_L, BLOCK_C] tiles, the backward's first kernel
# up to BWD_STEPS consecutive [BWD_BLOCK_L, BLOCK_C] tiles per program.
BLOCK_C, BLOCK_L, WARPS = 64, 64, 8
BWD_BLOCK_L, BWD_STEPS, BWD_WARPS = 8, 32, 4
MAX_WIDTH = 4  # one weight-gradient accumulator per tap in the backward


@triton.jit
def _load_input(x_ptr, win_ptr, pos, offs_c, mask_c, L, sxc, sxl, swc, swl,
                KM1: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """The conv input at positions pos [BLOCK_L] and channels offs_c [BLOCK_C] as float32 [BLOCK_L, BLOCK_C]:
    x for 0 <= pos < L, the initial window (or 0) for -(k-1) <= pos < 0, 0 elsewhere."""
    inside = (pos >= 0) & (pos < L)
    vals = tl.load(x_ptr + pos[:, None] * sxl + offs_c[None, :] * sxc,
                   mask=inside[:, None] & mask_c[None, :], other=0.0).to(tl.float32)
    if HAS_WINDOW:
        before = (pos < 0) & (pos >= -KM1)
        vals += tl.load(win_ptr + (pos + KM1)[:, None] * swl + offs_c[None, :] * swc,
                        mask=before[:, None] & mask_c[None, :], other=0.0).to(tl.float32)
    return vals


@triton.jit
def _preact(x_ptr, win_ptr, w_ptr, b_ptr, pos, offs_c, mask_c, L, sxc, sxl, swc, swl, sw_c, sw_k,
            K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """bias + sum_j weight[:, j] * in[pos - (k-1) + j], float32 [BLOCK_L, BLOCK_C]."""
    acc = tl.zeros((pos.shape[0], offs_c.shape[0]), dtype=tl.float32)
    for j in tl.static_range(K):
        w = tl.load(w_ptr + offs_c * sw_c + j * sw_k, mask=mask_c, other=0.0).to(tl.float32)
        acc += w[None, :] * _load_input(x_ptr, win_ptr, pos - (K - 1) + j, offs_c, mask_c, L,
                                        sxc, sxl, swc, swl, K - 1, HAS_WINDOW)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _conv_fwd_kernel(x_ptr, win_ptr, w_ptr, b_ptr, out_ptr, C, L,
                     sxb, sxc, sxl, swb, swc, swl, sw_c, sw_k, sob, soc, sol,
                     K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_WINDOW: tl.constexpr, SILU: tl.constexpr,
                     BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    pid_b, pid_c, pid_l = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    pos = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    mask_c = offs_c < C
    x_ptr += pid_b * sxb
    win_ptr += pid_b * swb
    acc = _preact(x_ptr, win_ptr, w_ptr, b_ptr, pos, offs_c, mask_c, L, sxc, sxl, swc, swl, sw_c, sw_k,
                  K, HAS_BIAS, HAS_WINDOW)
    if SILU:
        acc = acc * tl.sigmoid(acc)
    out_ptrs = out_ptr + pid_b * sob + pos[:, None] * sol + offs_c[None, :] * soc
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(pos < L)[:, None] & mask_c[None, :])


@triton.jit
def _conv_bwd_dpre_kernel(dout_ptr, x_ptr, win_ptr, w_ptr, b_ptr, dpre_ptr, dw_part_ptr, db_part_ptr, C, L, STEPS,
                          sdb, sdc, sdl, sxb, sxc, sxl, swb, swc, swl, sw_c, sw_k, spb, spc, spl,
                          K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_WINDOW: tl.constexpr, SILU: tl.constexpr,
                          BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    """STEPS consecutive blocks of output positions: the gradient at the pre-activation (float32, to dpre),
    and this program's share of the weight and bias gradients (to the partial sums).

    One accumulator per tap (k <= 4), summed elementwise and reduced once at the end; each tap's input
    is loaded once and serves both the recomputed pre-activation and the weight gradient."""
    pid_b, pid_c, pid_l = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    x_ptr += pid_b * sxb
    win_ptr += pid_b * swb
    w0 = tl.load(w_ptr + offs_c * sw_c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    w1 = tl.load(w_ptr + offs_c * sw_c + sw_k, mask=mask_c & (K > 1), other=0.0).to(tl.float32)[None, :]
    w2 = tl.load(w_ptr + offs_c * sw_c + 2 * sw_k, mask=mask_c & (K > 2), other=0.0).to(tl.float32)[None, :]
    w3 = tl.load(w_ptr + offs_c * sw_c + 3 * sw_k, mask=mask_c & (K > 3), other=0.0).to(tl.float32)[None, :]
    dw0 = tl.zeros((BLOCK_L, BLOCK_C), dtype=tl.float32)
    dw1, dw2, dw3, db = dw0, dw0, dw0, dw0
    for step in range(STEPS):
        pos = (pid_l * STEPS + step) * BLOCK_L + tl.arange(0, BLOCK_L)
        valid = (pos < L)[:, None] & mask_c[None, :]
        g = tl.load(dout_ptr + pid_b * sdb + pos[:, None] * sdl + offs_c[None, :] * sdc, mask=valid, other=0.0)
        g = g.to(tl.float32)
        in0 = _load_input(x_ptr, win_ptr, pos - (K - 1), offs_c, mask_c, L, sxc, sxl, swc, swl, K - 1, HAS_WINDOW)
        pre = w0 * in0
        if K > 1:
            in1 = _load_input(x_ptr, win_ptr, pos - (K - 2), offs_c, mask_c, L, sxc, sxl, swc, swl, K - 1,
                              HAS_WINDOW)
            pre += w1 * in1
        if K > 2:
            in2 = _load_input(x_ptr, win_ptr, pos - (K - 3), offs_c, mask_c, L, sxc, sxl, swc, swl, K - 1,
                              HAS_WINDOW)
            pre += w2 * in2
        if K > 3:
            in3 = _load_input(x_ptr, win_ptr, pos - (K - 4), offs_c, mask_c, L, sxc, sxl, swc, swl, K - 1,
                              HAS_WINDOW)
            pre += w3 * in3
        if SILU:
            if HAS_BIAS:
                pre += tl.load(b_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
            sig = tl.sigmoid(pre)
            g = g * sig * (1.0 + pre * (1.0 - sig))
        tl.store(dpre_ptr + pid_b * spb + pos[:, None] * spl + offs_c[None, :] * spc, g, mask=valid)
        db += g
        dw0 += g * in0
        if K > 1:
            dw1 += g * in1
        if K > 2:
            dw2 += g * in2
        if K > 3:
            dw3 += g * in3
    part = (pid_b * tl.num_programs(2) + pid_l) * C + offs_c
    tl.store(dw_part_ptr + part * K, tl.sum(dw0, axis=0), mask=mask_c)
    if K > 1:
        tl.store(dw_part_ptr + part * K + 1, tl.sum(dw1, axis=0), mask=mask_c)
    if K > 2:
        tl.store(dw_part_ptr + part * K + 2, tl.sum(dw2, axis=0), mask=mask_c)
    if K > 3:
        tl.store(dw_part_ptr + part * K + 3, tl.sum(dw3, axis=0), mask=mask_c)
    if HAS_BIAS:
        tl.store(db_part_ptr + part, tl.sum(db, axis=0), mask=mask_c)


@triton.jit
def _conv_bwd_input_kernel(dpre_ptr, w_ptr, dx_ptr, dwin_ptr, C, L, spb, spc, spl, sxb, sxc, sxl, swb, swc, swl,
                           sw_c, sw_k, K: tl.constexpr, HAS_WINDOW: tl.constexpr,
                           BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    """One block of input positions p in [-(k-1), L) (window, then x): in[p] fed output p + (k-1) - j
    through weight[:, j], so its gradient is sum_j weight[:, j] * dpre[p + (k-1) - j]."""
    pid_b, pid_c, pid_l = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    pos = pid_l * BLOCK_L + tl.arange(0, BLOCK_L) - (K - 1)
    mask_c = offs_c < C
    din = tl.zeros((BLOCK_L, BLOCK_C), dtype=tl.float32)
    for j in tl.static_range(K):
        out_pos = pos + (K - 1) - j
        valid = ((out_pos >= 0) & (out_pos < L))[:, None] & mask_c[None, :]
        g = tl.load(dpre_ptr + pid_b * spb + out_pos[:, None] * spl + offs_c[None, :] * spc, mask=valid, other=0.0)
        din += tl.load(w_ptr + offs_c * sw_c + j * sw_k, mask=mask_c, other=0.0).to(tl.float32)[None, :] * g
    # dx and dwin are fresh tensors with the strides of x and of the window.
    in_x = ((pos >= 0) & (pos < L))[:, None] & mask_c[None, :]
    tl.store(dx_ptr + pid_b * sxb + pos[:, None] * sxl + offs_c[None, :] * sxc,
             din.to(dx_ptr.dtype.element_ty), mask=in_x)
    if HAS_WINDOW:
        in_win = ((pos < 0) & (pos >= -(K - 1)))[:, None] & mask_c[None, :]
        tl.store(dwin_ptr + pid_b * swb + (pos + K - 1)[:, None] * swl + offs_c[None, :] * swc,
                 din.to(dwin_ptr.dtype.element_ty), mask=in_win)


def _window_args(x, initial_window):
    """(tensor, batch stride, channel stride, position stride) of the window; x with zero strides when absent."""
    if initial_window is None:
        return x, 0, 0, 0
    return initial_window, *initial_window.stride()


def _fwd_impl(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
              initial_window: torch.Tensor | None, silu: bool) -> torch.Tensor:
    """x [b, c, l], weight [c, k], bias [c] or None, initial_window [b, c, k-1] or None
    -> out [b, c, l] in x's dtype and layout (torch.empty_like's: x's strides when x is dense)."""
    (b, c, l), k = x.shape, weight.shape[1]
    out = torch.empty_like(x)
    win, swb, swc, swl = _window_args(x, initial_window)
    grid = (b, triton.cdiv(c, BLOCK_C), triton.cdiv(l, BLOCK_L))
    _conv_fwd_kernel[grid](
        x, win, weight, weight if bias is None else bias, out, c, l, *x.stride(), swb, swc, swl, *weight.stride(),
        *out.stride(), K=k, HAS_BIAS=bias is not None, HAS_WINDOW=initial_window is not None, SILU=silu,
        BLOCK_C=BLOCK_C, BLOCK_L=BLOCK_L, num_warps=WARPS,
    )
    return out


_fwd = torch.library.custom_op("zebra::causal_conv1d_fwd", _fwd_impl, mutates_args=())


@_fwd.register_fake
def _(x, weight, bias, initial_window, silu):
    return torch.empty_like(x)


def _bwd_impl(dout: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
              initial_window: torch.Tensor | None, silu: bool
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of `_fwd`'s output given dout [b, c, l]: dx (x's dtype and layout), dweight [c, k] (weight's
    dtype), dbias [c] (bias's dtype), dwindow [b, c, k-1] (the window's dtype and layout). A custom op returns
    tensors only: without a bias, dbias is an empty [0] tensor in weight's dtype, and without a window dwindow
    an empty [0] tensor in x's dtype (the autograd Function maps both back to None)."""
    (b, c, l), k = x.shape, weight.shape[1]
    win, swb, swc, swl = _window_args(x, initial_window)
    dpre = torch.empty_like(x, dtype=torch.float32)
    c_blocks = triton.cdiv(c, BLOCK_C)
    steps = min(BWD_STEPS, triton.cdiv(l, BWD_BLOCK_L))
    parts = triton.cdiv(l, BWD_BLOCK_L * steps)
    dw_part = torch.empty(b * parts, c, k, device=x.device, dtype=torch.float32)
    db_part = torch.empty(b * parts, c, device=x.device, dtype=torch.float32)
    _conv_bwd_dpre_kernel[(b, c_blocks, parts)](
        dout, x, win, weight, weight if bias is None else bias, dpre, dw_part, db_part, c, l, steps, *dout.stride(),
        *x.stride(), swb, swc, swl, *weight.stride(), *dpre.stride(), K=k, HAS_BIAS=bias is not None,
        HAS_WINDOW=initial_window is not None, SILU=silu, BLOCK_C=BLOCK_C, BLOCK_L=BWD_BLOCK_L,
        num_warps=BWD_WARPS,
    )
    dx = torch.empty_like(x)
    dwin = None if initial_window is None else torch.empty_like(initial_window)
    _, swb, swc, swl = _window_args(x, dwin)
    _conv_bwd_input_kernel[(b, c_blocks, triton.cdiv(l + k - 1, BLOCK_L))](
        dpre, weight, dx, x if dwin is None else dwin, c, l, *dpre.stride(), *dx.stride(), swb, swc, swl,
        *weight.stride(), K=k, HAS_WINDOW=dwin is not None, BLOCK_C=BLOCK_C, BLOCK_L=BLOCK_L, num_warps=WARPS,
    )
    dbias = weight.new_empty(0) if bias is None else db_part.sum(0).to(bias.dtype)
    return dx, dw_part.sum(0).to(weight.dtype), dbias, x.new_empty(0) if dwin is None else dwin


_bwd = torch.library.custom_op("zebra::causal_conv1d_bwd", _bwd_impl, mutates_args=())


@_bwd.register_fake
def _(dout, x, weight, bias, initial_window, silu):
    return (torch.empty_like(x), weight.new_empty(weight.shape), weight.new_empty(0) if bias is None else
            bias.new_empty(bias.shape), x.new_empty(0) if initial_window is None else torch.empty_like(initial_window))


class _CausalConv1d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, initial_window, silu: bool):
        ctx.save_for_backward(x, weight, bias, initial_window)
        ctx.silu = silu
        return op_or_impl(_fwd, _fwd_impl)(x, weight, bias, initial_window, silu)

    @staticmethod
    def backward(ctx, dout):
        x, weight, bias, initial_window = ctx.saved_tensors
        dx, dweight, dbias, dwin = op_or_impl(_bwd, _bwd_impl)(dout, x, weight, bias, initial_window, ctx.silu)
        return dx, dweight, None if bias is None else dbias, None if initial_window is None else dwin, None


def causal_conv1d_triton(x, weight, bias=None, initial_window=None, activation: str | None = None,
                         return_final_window: bool = False):
    """Causal depthwise conv (then SiLU when activation="silu") by the Triton kernels; differentiable in every input.

    x [b, c, l] (any strides; float16, bfloat16 or float32), weight [c, k] with k <= 4, bias [c] or None,
    initial_window [b, c, k-1]: the k-1 inputs before x (zeros when None)
    -> out [b, c, l] in x's dtype, and with return_final_window also final_window [b, c, k-1]: the last
    k-1 inputs (window then x), which continues the conv on the next chunk.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"causal_conv1d_triton: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if x.dim() != 3 or weight.dim() != 2 or weight.shape[0] != x.shape[1]:
        raise ValueError(f"causal_conv1d_triton: need x [b, c, l] and weight [c, k], got x {tuple(x.shape)}, "
                         f"weight {tuple(weight.shape)}")
    k = weight.shape[1]
    if not 1 <= k <= MAX_WIDTH:
        raise ValueError(f"causal_conv1d_triton: kernel width (weight.shape[1]) must be in 1..{MAX_WIDTH}, got {k}")
    if initial_window is not None and initial_window.shape != (x.shape[0], x.shape[1], k - 1):
        raise ValueError(f"causal_conv1d_triton: initial_window must be {(x.shape[0], x.shape[1], k - 1)}, "
                         f"got {tuple(initial_window.shape)}")
    out = _CausalConv1d.apply(x, weight, bias, initial_window, activation == "silu")
    if not return_final_window:
        return out
    before = x.new_zeros(x.shape[0], x.shape[1], k - 1) if initial_window is None else initial_window.to(x.dtype)
    full = torch.cat([before, x[..., max(x.shape[-1] - (k - 1), 0):]], dim=-1)
    return out, full[..., full.shape[-1] - (k - 1):]
