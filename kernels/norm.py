"""Mamba2's gated RMSNorm, out = RMSNorm(y * silu(z)) * weight with the RMS taken per group of channels, and
the decoder layers' plain RMSNorm (LlamaRMSNorm's numerics, `rms_norm`; see its section below): each a
plain-PyTorch reference, Triton kernels (forward and backward) and one dispatch point.

For each row m and group j of `group_size` consecutive channels (g = y * silu(z) on that group):
    rstd[m, j] = 1 / sqrt(mean(g^2) + eps)        out = g * rstd * weight
This is mamba_ssm's RMSNormGated with norm_before_gate=False. The kernels read y and z in their own dtype
(bfloat16 under autocast), compute in float32 and write the output in y's dtype, so no float32 copy of a
[batch, seq, dim] tensor is ever made; the backward recomputes g from y and z and needs only rstd.

Three layers (STYLE.md): the launchers `_fwd_impl` and `_bwd_impl`, registered as the torch.library custom ops
`_fwd` and `_bwd` (so torch.compile keeps them whole, with no graph break) with their autograd formula, and
`_GatedRMSNorm`, an autograd Function with the same formula over the plain launchers, which eager mode calls
instead of the ops to save their host time (as `kernels._eager.op_or_impl`); then the dispatch point
`gated_rms_norm`, which picks the kernel on CUDA and `gated_rms_norm_ref` elsewhere. `rms_norm` has the same.
"""
from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl

from kernels._eager import eager_twin
from kernels._layout import row_blocks
from kernels._layout import unit_stride_rows as _rows
from kernels.dispatch import device_reason, use_kernel

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "cuda", "triton")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Under torch.compile, backends "auto" and "cuda" take the PyTorch formula: inductor fuses it with the residual adds
# and casts around it into kernels that the compiled graph launches without a custom op's host time (176 of a
# compiled KD step's 282 custom-op launches were these norms, notes/GPU.md session 12). False keeps the kernels
# inside compiled graphs too (benchmarks.train_step --compiled-norms kernel compares the two).
FORMULA_UNDER_COMPILE = True
BLOCK_M = 32  # rows per tile
ROW_STEPS = 16  # tiles per program: the weight gradient has one partial sum per program and group


def gated_rms_norm_ref(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, group_size: int,
                       eps: float) -> torch.Tensor:
    """y, z [..., dim], weight [dim], group_size dividing dim -> [..., dim] in y's dtype (computed in at least
    float32)."""
    dtype = torch.promote_types(y.dtype, torch.float32)
    g = (y.to(dtype) * torch.nn.functional.silu(z.to(dtype))).unflatten(-1, (-1, group_size))
    g = g * torch.rsqrt(g.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (g.flatten(-2) * weight.to(dtype)).to(y.dtype)


# -- kernels --------------------------------------------------------------------------------------
@triton.jit
def _load_gate(y_ptr, z_ptr, rows, cols, M, s_y, s_z, mask_c):
    """g = y * silu(z), y and z (float32 [BLOCK_M, BLOCK_N]) at rows, cols; 0 outside."""
    mask = (rows < M)[:, None] & mask_c[None, :]
    y = tl.load(y_ptr + rows[:, None] * s_y + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + rows[:, None] * s_z + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(z)
    return y * z * sig, y, z, sig


@triton.jit
def _fwd_kernel(y_ptr, z_ptr, w_ptr, out_ptr, rstd_ptr, M, G, GS, s_y, s_z, s_out, eps,
                STEPS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Group j of STEPS * BLOCK_M rows; grid (G, cdiv(M, STEPS * BLOCK_M)). rstd [M, G] float32."""
    j, pid = tl.program_id(0), tl.program_id(1)
    rn = tl.arange(0, BLOCK_N)
    mask_c = rn < GS
    cols = j * GS + rn
    w = tl.load(w_ptr + cols, mask=mask_c, other=0.0).to(tl.float32)
    for step in range(STEPS):
        rows = (pid * STEPS + step) * BLOCK_M + tl.arange(0, BLOCK_M)
        g, y, z, sig = _load_gate(y_ptr, z_ptr, rows, cols, M, s_y, s_z, mask_c)
        rstd = 1.0 / tl.sqrt(tl.sum(g * g, axis=1) / GS + eps)
        out = g * rstd[:, None] * w[None, :]
        tl.store(out_ptr + rows[:, None] * s_out + cols[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=(rows < M)[:, None] & mask_c[None, :])
        tl.store(rstd_ptr + rows * G + j, rstd, mask=rows < M)


@triton.jit
def _bwd_kernel(dout_ptr, y_ptr, z_ptr, w_ptr, rstd_ptr, dy_ptr, dz_ptr, dw_part_ptr, M, G, GS,
                s_dout, s_y, s_z, s_dy, s_dz,
                STEPS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Gradients of `_fwd_kernel`'s tile of rows: dy, dz, and this program's partial sum of dweight
    (dw_part [programs along M, dim], float32); grid as the forward's."""
    j, pid = tl.program_id(0), tl.program_id(1)
    rn = tl.arange(0, BLOCK_N)
    mask_c = rn < GS
    cols = j * GS + rn
    w = tl.load(w_ptr + cols, mask=mask_c, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in range(STEPS):
        rows = (pid * STEPS + step) * BLOCK_M + tl.arange(0, BLOCK_M)
        mask = (rows < M)[:, None] & mask_c[None, :]
        g, y, z, sig = _load_gate(y_ptr, z_ptr, rows, cols, M, s_y, s_z, mask_c)
        rstd = tl.load(rstd_ptr + rows * G + j, mask=rows < M, other=0.0)
        dout = tl.load(dout_ptr + rows[:, None] * s_dout + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        n = g * rstd[:, None]
        dw += dout * n
        dn = dout * w[None, :]
        dg = rstd[:, None] * (dn - n * (tl.sum(dn * n, axis=1) / GS)[:, None])
        tl.store(dy_ptr + rows[:, None] * s_dy + cols[None, :], (dg * z * sig).to(dy_ptr.dtype.element_ty), mask=mask)
        dz = dg * y * sig * (1.0 + z * (1.0 - sig))
        tl.store(dz_ptr + rows[:, None] * s_dz + cols[None, :], dz.to(dz_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_part_ptr + pid * G * GS + cols, tl.sum(dw, axis=0), mask=mask_c)


# -- launchers as custom ops ----------------------------------------------------------------------
def _grid(m: int, groups: int) -> tuple[int, int]:
    return groups, triton.cdiv(m, ROW_STEPS * BLOCK_M)


def _fwd_impl(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, group_size: int,
              eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """y, z [m, dim] (rows of any stride), weight [dim] -> out [m, dim] in y's dtype, rstd [m, dim // group_size]
    float32."""
    (m, dim), groups = y.shape, y.shape[1] // group_size
    y, z = _rows(y), _rows(z)
    out = torch.empty(m, dim, device=y.device, dtype=y.dtype)
    rstd = torch.empty(m, groups, device=y.device, dtype=torch.float32)
    _fwd_kernel[_grid(m, groups)](y, z, weight, out, rstd, m, groups, group_size, y.stride(0), z.stride(0),
                                  out.stride(0), eps, STEPS=ROW_STEPS, BLOCK_M=BLOCK_M,
                                  BLOCK_N=triton.next_power_of_2(group_size))
    return out, rstd


_fwd = torch.library.custom_op("zebra::gated_rms_norm_fwd", _fwd_impl, mutates_args=())


@_fwd.register_fake
def _(y, z, weight, group_size, eps):
    return torch.empty_like(y, memory_format=torch.contiguous_format), y.new_empty(
        y.shape[0], y.shape[1] // group_size, dtype=torch.float32)


def _bwd_impl(dout: torch.Tensor, y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
              group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients dy [m, dim] (y's dtype), dz [m, dim] (z's dtype), dweight [dim] (weight's dtype) given
    dout [m, dim] and the forward's rstd."""
    (m, dim), groups = y.shape, y.shape[1] // group_size
    dout, y, z = _rows(dout), _rows(y), _rows(z)
    dy = torch.empty(m, dim, device=y.device, dtype=y.dtype)
    dz = torch.empty(m, dim, device=y.device, dtype=z.dtype)
    grid = _grid(m, groups)
    dw_part = torch.empty(grid[1], dim, device=y.device, dtype=torch.float32)
    _bwd_kernel[grid](dout, y, z, weight, rstd, dy, dz, dw_part, m, groups, group_size, dout.stride(0),
                      y.stride(0), z.stride(0), dy.stride(0), dz.stride(0), STEPS=ROW_STEPS, BLOCK_M=BLOCK_M,
                      BLOCK_N=triton.next_power_of_2(group_size))
    return dy, dz, dw_part.sum(0).to(weight.dtype)


_bwd = torch.library.custom_op("zebra::gated_rms_norm_bwd", _bwd_impl, mutates_args=())


@_bwd.register_fake
def _(dout, y, z, weight, rstd, group_size):
    return (torch.empty_like(y, memory_format=torch.contiguous_format),
            torch.empty_like(z, memory_format=torch.contiguous_format), torch.empty_like(weight))


def _setup_context(ctx, inputs, output):
    y, z, weight, group_size, _ = inputs
    ctx.save_for_backward(y, z, weight, output[1])
    ctx.group_size = group_size


def _backward(ctx, dout, _drstd, bwd=_bwd):
    y, z, weight, rstd = ctx.saved_tensors
    dy, dz, dweight = bwd(dout, y, z, weight, rstd, ctx.group_size)
    return dy, dz, dweight, None, None


_fwd.register_autograd(_backward, setup_context=_setup_context)


_GatedRMSNorm = eager_twin("_GatedRMSNorm", _fwd_impl, _bwd_impl, _setup_context, _backward)


def gated_rms_norm_triton(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, group_size: int,
                          eps: float) -> torch.Tensor:
    """Same arguments and result as `gated_rms_norm_ref`, by the Triton kernels (float32 inside);
    differentiable in y, z and weight."""
    dim = y.shape[-1]
    if z.shape != y.shape or weight.shape != (dim,) or dim % group_size:
        raise ValueError(f"gated_rms_norm: need y, z [..., dim], weight [dim] and group_size dividing dim; got "
                         f"y {tuple(y.shape)}, z {tuple(z.shape)}, weight {tuple(weight.shape)}, "
                         f"group_size {group_size}")
    args = (y.reshape(-1, dim), z.reshape(-1, dim), weight, group_size, eps)
    # The op under torch.compile, its eager twin otherwise: see kernels._eager.op_or_impl.
    out = _fwd(*args)[0] if torch.compiler.is_compiling() else _GatedRMSNorm.apply(*args)
    return out.view(y.shape)


# -- dispatch -------------------------------------------------------------------------------------


def _unsupported(y: torch.Tensor, backend: str) -> str | None:
    """Why the Triton kernel cannot take this call (None when it can). Besides CUDA, backend "triton" runs it on
    CPU tensors under TRITON_INTERPRET=1. Under torch.compile only "triton" insists (FORMULA_UNDER_COMPILE)."""
    if FORMULA_UNDER_COMPILE and backend in ("auto", "cuda") and torch.compiler.is_compiling():
        return "under torch.compile, which fuses the formula"
    reason = device_reason(y, backend)
    if reason is not None:
        return reason
    if y.dtype not in KERNEL_DTYPES:
        return f"dtype {y.dtype} has no kernel"
    return None


def gated_rms_norm(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, group_size: int, eps: float,
                   backend: str = "auto") -> torch.Tensor:
    """RMSNorm(y * silu(z)) * weight per group of `group_size` channels; the one dispatch point between the
    Triton kernels and `gated_rms_norm_ref`.

    y, z [..., dim], weight [dim] -> [..., dim] in y's dtype. backend (ZebraConfig.mamba_backend) "auto" and
    "cuda": the kernel on CUDA, else the reference; "triton": the kernel or an error; "torch": the reference.
    """
    if backend not in BACKENDS:
        raise ValueError(f"gated_rms_norm: backend must be one of {BACKENDS}, got {backend!r}")
    reason = "backend='torch'" if backend == "torch" else _unsupported(y, backend)
    if use_kernel(log, "gated_rms_norm", "kernels.norm.gated_rms_norm_triton", reason, backend):
        return gated_rms_norm_triton(y, z, weight, group_size, eps)
    return gated_rms_norm_ref(y, z, weight, group_size, eps)


# == plain RMSNorm (the decoder layers' input/post-attention norms and the final norm) ===================
# y = weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype), the mean over the last dim: transformers'
# LlamaRMSNorm. The normalised x is computed in float32 and cast to x's dtype BEFORE the weight multiplies it;
# the output has dtype promote_types(x.dtype, weight.dtype) (float32 for bfloat16 x and a float32 weight).
# The kernels read x once and write y once; the backward reads x, dy and rstd [m] (float32) and writes dx and
# one float32 partial sum of dweight per program. The cast of the normalised x is treated as the identity in dx
# (as a straight-through rounding), so dx equals the reference's up to rounding.


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., dim], weight [dim] -> [..., dim] in promote_types(x.dtype, weight.dtype); LlamaRMSNorm.forward
    op for op (float32 inside whatever x's dtype, float64 included)."""
    input_dtype = x.dtype
    hidden = x.to(torch.float32)
    variance = hidden.pow(2).mean(-1, keepdim=True)
    hidden = hidden * torch.rsqrt(variance + eps)
    return weight * hidden.to(input_dtype)


@triton.jit
def _rms_fwd_kernel(x_ptr, w_ptr, out_ptr, rstd_ptr, M, N, s_x, s_out, eps,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """BLOCK_M rows of x [M, N] per program, grid (cdiv(M, BLOCK_M),); rstd [M] float32."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    w = tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + rows[:, None] * s_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / N + eps)
    normed = (x * rstd[:, None]).to(x_ptr.dtype.element_ty).to(tl.float32)  # LlamaRMSNorm's cast before weight
    tl.store(out_ptr + rows[:, None] * s_out + cols[None, :], (normed * w[None, :]).to(out_ptr.dtype.element_ty),
             mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=rows < M)


@triton.jit
def _rms_bwd_kernel(dout_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_part_ptr, M, N, s_dout, s_x, s_dx,
                    STEPS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dx for STEPS tiles of BLOCK_M rows and this program's partial sum of dweight (dw_part [programs, N],
    float32); grid (cdiv(M, STEPS * BLOCK_M),)."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask_c = cols < N
    w = tl.load(w_ptr + cols, mask=mask_c, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in range(STEPS):
        rows = (pid * STEPS + step) * BLOCK_M + tl.arange(0, BLOCK_M)
        mask = (rows < M)[:, None] & mask_c[None, :]
        x = tl.load(x_ptr + rows[:, None] * s_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dout = tl.load(dout_ptr + rows[:, None] * s_dout + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=rows < M, other=0.0)
        n = x * rstd[:, None]
        dw += dout * n.to(x_ptr.dtype.element_ty).to(tl.float32)
        dn = dout * w[None, :]
        dx = rstd[:, None] * (dn - n * (tl.sum(dn * n, axis=1) / N)[:, None])
        tl.store(dx_ptr + rows[:, None] * s_dx + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_part_ptr + pid * N + cols, tl.sum(dw, axis=0), mask=mask_c)


def _rms_fwd_impl(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x [m, dim] (rows of any stride), weight [dim] -> out [m, dim] in promote_types(x, weight), rstd [m]
    float32."""
    (m, dim), x = x.shape, _rows(x)
    out = torch.empty(m, dim, device=x.device, dtype=torch.promote_types(x.dtype, weight.dtype))
    rstd = torch.empty(m, device=x.device, dtype=torch.float32)
    block_m, block_n = row_blocks(dim)
    _rms_fwd_kernel[(triton.cdiv(m, block_m),)](x, weight, out, rstd, m, dim, x.stride(0), out.stride(0), eps,
                                                BLOCK_M=block_m, BLOCK_N=block_n)
    return out, rstd


_rms_fwd = torch.library.custom_op("zebra::rms_norm_fwd", _rms_fwd_impl, mutates_args=())


@_rms_fwd.register_fake
def _(x, weight, eps):
    out = x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype))
    return out, x.new_empty(x.shape[0], dtype=torch.float32)


def _rms_bwd_impl(dout: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                  rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients dx [m, dim] (x's dtype) and dweight [dim] (weight's dtype) given dout [m, dim] and the
    forward's rstd [m]."""
    (m, dim), dout, x = x.shape, _rows(dout), _rows(x)
    dx = torch.empty(m, dim, device=x.device, dtype=x.dtype)
    block_m, block_n = row_blocks(dim)
    programs = triton.cdiv(m, ROW_STEPS * block_m)
    dw_part = torch.empty(programs, dim, device=x.device, dtype=torch.float32)
    _rms_bwd_kernel[(programs,)](dout, x, weight, rstd, dx, dw_part, m, dim, dout.stride(0), x.stride(0),
                                 dx.stride(0), STEPS=ROW_STEPS, BLOCK_M=block_m, BLOCK_N=block_n)
    return dx, dw_part.sum(0).to(weight.dtype)


_rms_bwd = torch.library.custom_op("zebra::rms_norm_bwd", _rms_bwd_impl, mutates_args=())


@_rms_bwd.register_fake
def _(dout, x, weight, rstd):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(weight)


def _rms_setup_context(ctx, inputs, output):
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight, output[1])


def _rms_backward(ctx, dout, _drstd, bwd=_rms_bwd):
    x, weight, rstd = ctx.saved_tensors
    dx, dweight = bwd(dout, x, weight, rstd)
    return dx, dweight, None


_rms_fwd.register_autograd(_rms_backward, setup_context=_rms_setup_context)


_RMSNorm = eager_twin("_RMSNorm", _rms_fwd_impl, _rms_bwd_impl, _rms_setup_context, _rms_backward)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Same arguments and result as `rms_norm_ref` (up to rounding), by the Triton kernels; differentiable in x
    and weight."""
    dim = x.shape[-1]
    if weight.shape != (dim,):
        raise ValueError(f"rms_norm: need x [..., dim] and weight [dim]; got x {tuple(x.shape)}, "
                         f"weight {tuple(weight.shape)}")
    args = (x.reshape(-1, dim), weight, eps)
    # The op under torch.compile, its eager twin otherwise: see kernels._eager.op_or_impl.
    out = _rms_fwd(*args)[0] if torch.compiler.is_compiling() else _RMSNorm.apply(*args)
    return out.view(*x.shape[:-1], dim)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, backend: str = "auto") -> torch.Tensor:
    """weight * RMSNorm(x) over the last dim with LlamaRMSNorm's numerics; the one dispatch point between the
    Triton kernels and `rms_norm_ref`.

    x [..., dim], weight [dim] -> [..., dim] in promote_types(x.dtype, weight.dtype). backend
    (ZebraConfig.mamba_backend) "auto" and "cuda": the kernel on CUDA, else the reference; "triton": the kernel
    or an error (CPU tensors only under TRITON_INTERPRET=1); "torch": the reference.
    """
    if backend not in BACKENDS:
        raise ValueError(f"rms_norm: backend must be one of {BACKENDS}, got {backend!r}")
    reason = "backend='torch'" if backend == "torch" else _unsupported(x, backend)
    if reason is None and weight.dtype not in KERNEL_DTYPES:
        reason = f"weight dtype {weight.dtype} has no kernel"
    if use_kernel(log, "rms_norm", "kernels.norm.rms_norm_triton", reason, backend):
        return rms_norm_triton(x, weight, eps)
    return rms_norm_ref(x, weight, eps)
