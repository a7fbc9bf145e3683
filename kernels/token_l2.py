"""Per-token L2 distance of two [rows, dim] tensors, the term of the official ILD loss (zebra.losses.ild_loss):
a plain-PyTorch reference and Triton kernels (forward and backward).

For each row m:   norm[m] = || student[m] - teacher[m] ||_2        (float32, from inputs in their own dtype)
Gradient of a loss L(norm):   dstudent[m] = dL/dnorm[m] * (student[m] - teacher[m]) / norm[m]   (0 where norm == 0,
as torch.linalg.vector_norm's backward), dteacher = -dstudent.

Why a kernel: the reference casts both [batch, seq, d_model] inputs to float32, subtracts, reduces, and its
backward makes three more float32 tensors of that size and casts the gradient back: ~16 tensor passes of
float32 per call. The ILD step calls it 120 times (30 layers x 2 students x layer and mixer output); on an H200
these copies and elementwise kernels were ~15% of the step's device time (notes/GPU.md, session 8). The kernels
read both inputs once in the forward (writing one float per row) and once in the backward (writing the gradient
in the student's dtype): 2 + 3 passes of the inputs' dtype. Measured on an H200 (notes/GPU.md, session 9) they
are nonetheless slower than the formula: one layer's forward + backward at 16 x 2048 took 1.09-1.35 ms against
0.93-0.98 ms, so zebra.losses.ild_loss uses them only when asked (backend "triton"); `python -m
benchmarks.train_step`'s `ild_loss` row times both.

Layers as kernels/norm.py (STYLE.md): launchers `_fwd_impl` / `_bwd_impl` registered as torch.library custom ops
(torch.compile keeps them whole) with their autograd formula, and `_TokenL2`, their eager twin
(kernels._eager); `token_l2_triton` calls one or the other; `unsupported` says why the kernel cannot run, for
the dispatch point in zebra.losses (kernels/ does not import zebra/).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._eager import eager_twin
from kernels._layout import row_blocks
from kernels._layout import unit_stride_rows as _rows
from kernels.dispatch import device_reason

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_DIM = 16384  # one row in one tile (d_model of Llama-family models up to 70B is 8192)


def token_l2_ref(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """student, teacher [..., dim] -> [...] the L2 norm of each row's difference, in promote_types(float32, inputs)
    (computed in that dtype, as zebra.losses did before the kernel)."""
    dtype = torch.promote_types(torch.promote_types(student.dtype, teacher.dtype), torch.float32)
    return torch.linalg.vector_norm(student.to(dtype) - teacher.to(dtype), dim=-1)


@triton.jit
def _fwd_kernel(s_ptr, t_ptr, norm_ptr, inv_ptr, M, N, s_s, s_t, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """BLOCK_M rows a program, grid (cdiv(M, BLOCK_M),): norm [M] and inv [M] = 1 / norm (0 where norm == 0),
    float32."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    s = tl.load(s_ptr + rows[:, None] * s_s + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    t = tl.load(t_ptr + rows[:, None] * s_t + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    d = s - t
    norm = tl.sqrt(tl.sum(d * d, axis=1))
    tl.store(norm_ptr + rows, norm, mask=rows < M)
    tl.store(inv_ptr + rows, tl.where(norm > 0.0, 1.0 / tl.where(norm > 0.0, norm, 1.0), 0.0), mask=rows < M)


@triton.jit
def _bwd_kernel(dnorm_ptr, s_ptr, t_ptr, inv_ptr, ds_ptr, M, N, s_s, s_t, s_ds,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dstudent [M, N] in its dtype from dnorm [M] and the forward's inv [M] (both float32)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    s = tl.load(s_ptr + rows[:, None] * s_s + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    t = tl.load(t_ptr + rows[:, None] * s_t + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(dnorm_ptr + rows, mask=rows < M, other=0.0) * tl.load(inv_ptr + rows, mask=rows < M, other=0.0)
    tl.store(ds_ptr + rows[:, None] * s_ds + cols[None, :], ((s - t) * scale[:, None]).to(ds_ptr.dtype.element_ty),
             mask=mask)


def _fwd_impl(student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """student, teacher [m, dim] -> norm [m], inv [m] (1 / norm, 0 where norm == 0: the backward's), float32."""
    (m, dim), s, t = student.shape, _rows(student), _rows(teacher)
    norm, inv = (torch.empty(m, device=s.device, dtype=torch.float32) for _ in range(2))
    block_m, block_n = row_blocks(dim)
    _fwd_kernel[(triton.cdiv(m, block_m),)](s, t, norm, inv, m, dim, s.stride(0), t.stride(0),
                                            BLOCK_M=block_m, BLOCK_N=block_n)
    return norm, inv


_fwd = torch.library.custom_op("zebra::token_l2_fwd", _fwd_impl, mutates_args=())


@_fwd.register_fake
def _(student, teacher):
    norm = student.new_empty(student.shape[0], dtype=torch.float32)
    return norm, torch.empty_like(norm)


def _bwd_impl(dnorm: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    """dstudent [m, dim] in student's dtype, given dnorm [m] and the forward's inv [m]."""
    (m, dim), s, t = student.shape, _rows(student), _rows(teacher)
    ds = torch.empty(m, dim, device=s.device, dtype=s.dtype)
    block_m, block_n = row_blocks(dim)
    _bwd_kernel[(triton.cdiv(m, block_m),)](dnorm.float().contiguous(), s, t, inv, ds, m, dim, s.stride(0),
                                            t.stride(0), ds.stride(0), BLOCK_M=block_m, BLOCK_N=block_n)
    return ds


_bwd = torch.library.custom_op("zebra::token_l2_bwd", _bwd_impl, mutates_args=())


@_bwd.register_fake
def _(dnorm, student, teacher, inv):
    return torch.empty_like(student, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    student, teacher = inputs
    ctx.save_for_backward(student, teacher, output[1])


def _backward(ctx, dnorm, _dsaved, bwd=_bwd):
    student, teacher, inv = ctx.saved_tensors
    ds = bwd(dnorm, student, teacher, inv)
    dt = -ds.to(teacher.dtype) if ctx.needs_input_grad[1] else None
    return (ds if ctx.needs_input_grad[0] else None), dt


_fwd.register_autograd(_backward, setup_context=_setup_context)

_TokenL2 = eager_twin("_TokenL2", _fwd_impl, _bwd_impl, _setup_context, _backward)


def token_l2_triton(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Same arguments and result as `token_l2_ref` for float16/bfloat16/float32 inputs (float32 out), by the
    Triton kernels; differentiable in both inputs."""
    if student.shape != teacher.shape:
        raise ValueError(f"token_l2: student shape {tuple(student.shape)} != teacher {tuple(teacher.shape)}")
    dim = student.shape[-1]
    args = (student.reshape(-1, dim), teacher.reshape(-1, dim))
    # The op under torch.compile, its eager twin otherwise: see kernels._eager.op_or_impl.
    norm = _fwd(*args)[0] if torch.compiler.is_compiling() else _TokenL2.apply(*args)
    return norm.view(student.shape[:-1])


def unsupported(student: torch.Tensor, teacher: torch.Tensor, backend: str) -> str | None:
    """Why token_l2_triton cannot take these inputs (None when it can), for kernels.dispatch.use_kernel."""
    reason = device_reason(student, backend)
    if reason is None and (student.dtype not in KERNEL_DTYPES or teacher.dtype not in KERNEL_DTYPES):
        reason = f"dtypes {student.dtype}/{teacher.dtype} have no kernel"
    if reason is None and student.shape[-1] > MAX_DIM:
        reason = f"rows of {student.shape[-1]} elements exceed the kernel's {MAX_DIM}"
    if reason is None and student.device != teacher.device:
        reason = f"student on {student.device}, teacher on {teacher.device}"
    return reason
