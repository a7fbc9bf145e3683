"""The full-vocabulary KD loss fused into one Triton kernel: per-row KL, CE and the student's gradient.

For student logits zs [n, V] and teacher logits zt [n, V] at temperature T, row by row:
    q = softmax(zs / T)    p = softmax(zt / T)    s = softmax(zs)
    kl[r]   = sum_{v: p > 0} p (log p - log q)
    ce[r]   = -log s[target]                                   (0 where target == IGNORE_INDEX)
    grad[r] = kl_scale * (q - p) + ce_scale * (s - onehot(target))   (the CE term only where target is kept)
This is the arithmetic of zebra.losses._FullVocabKD.forward, whose chunked PyTorch loop stays the reference
(kernels/ does not import zebra/: the tests compare the two through zebra.losses.kd_loss). One program per row
reads zs and zt twice in their own dtype (an online max / log-sum-exp pass, then the KL and gradient pass),
accumulates in float32 and writes the gradient once in the student's dtype: no float32 [n, V] temporary
exists: ~10 bytes of traffic per logit in bfloat16 (two reads of each input, one write of the gradient).

Two layers (STYLE.md): the launcher `kd_rows_triton` and the check `unsupported`, which the dispatch point in
zebra.losses feeds to kernels.dispatch.use_kernel.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._layout import unit_stride_rows as _rows
from kernels.dispatch import device_reason

IGNORE_INDEX = -100  # zebra.losses.IGNORE_INDEX (kernels/ does not import zebra/)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_BLOCK_V = 4096  # vocab columns per step of a program's loop


@triton.jit
def _online_lse(m, s, x):
    """One step of an online log-sum-exp: running max m and sum s (scalars) updated by a block x [BLOCK_V]
    (-inf where masked)."""
    m_new = tl.maximum(m, tl.max(x, axis=0))
    return m_new, s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)


@triton.jit
def _kd_kernel(zs_ptr, zt_ptr, tgt_ptr, grad_ptr, kl_ptr, ce_ptr, V, s_zs, s_zt, s_grad, inv_t, kl_scale, ce_scale,
               IGNORE: tl.constexpr, HAS_CE: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    """One program per row r (grid (n,)): kl[r], ce[r] (float32) and, when WRITE_GRAD, grad[r, :]."""
    row = tl.program_id(0).to(tl.int64)
    zs_row, zt_row = zs_ptr + row * s_zs, zt_ptr + row * s_zt
    cols = tl.arange(0, BLOCK_V)
    # pass 1: log-sum-exp of zs / T (q), zt / T (p) and, for the CE term, zs (s), in one read of the row
    zero = tl.sum(tl.zeros((BLOCK_V,), dtype=tl.float32), axis=0)  # float32 scalars for the loop-carried sums
    m_q, s_q, m_p, s_p, m_s, s_s = zero - float("inf"), zero, zero - float("inf"), zero, zero - float("inf"), zero
    for start in range(0, V, BLOCK_V):
        mask = start + cols < V
        zs = tl.where(mask, tl.load(zs_row + start + cols, mask=mask, other=0.0).to(tl.float32), -float("inf"))
        zt = tl.where(mask, tl.load(zt_row + start + cols, mask=mask, other=0.0).to(tl.float32), -float("inf"))
        m_q, s_q = _online_lse(m_q, s_q, zs * inv_t)
        m_p, s_p = _online_lse(m_p, s_p, zt * inv_t)
        if HAS_CE:
            m_s, s_s = _online_lse(m_s, s_s, zs)
    lse_q, lse_p = m_q + tl.log(s_q), m_p + tl.log(s_p)
    if HAS_CE:
        lse_s = m_s + tl.log(s_s)
        target = tl.load(tgt_ptr + row)
        keep = target != IGNORE
        z_target = tl.load(zs_row + tl.where(keep, target, 0)).to(tl.float32)
        tl.store(ce_ptr + row, tl.where(keep, lse_s - z_target, 0.0))
        ce_row_scale = tl.where(keep, ce_scale, 0.0)
    # pass 2: KL and gradient
    kl = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for start in range(0, V, BLOCK_V):
        idx = start + cols
        mask = idx < V
        zs = tl.load(zs_row + idx, mask=mask, other=0.0).to(tl.float32)
        zt = tl.load(zt_row + idx, mask=mask, other=0.0).to(tl.float32)
        log_q, log_p = zs * inv_t - lse_q, zt * inv_t - lse_p
        p = tl.where(mask, tl.exp(log_p), 0.0)
        kl += tl.where(p > 0, p * (log_p - log_q), 0.0)
        if WRITE_GRAD:
            g = (tl.exp(log_q) - p) * kl_scale
            if HAS_CE:
                g += (tl.exp(zs - lse_s) - tl.where(idx == target, 1.0, 0.0)) * ce_row_scale
            tl.store(grad_ptr + row * s_grad + idx, g.to(grad_ptr.dtype.element_ty), mask=mask)
    tl.store(kl_ptr + row, tl.sum(kl, axis=0))


def _check(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor | None) -> None:
    if student.dim() != 2 or teacher.shape != student.shape:
        raise ValueError(f"kd_rows: need student and teacher logits of one shape [n, V]; got student "
                         f"{tuple(student.shape)}, teacher {tuple(teacher.shape)}")
    if targets is not None and targets.shape != student.shape[:1]:
        raise ValueError(f"kd_rows: targets must be [n] = [{student.shape[0]}]; got {tuple(targets.shape)}")


def kd_rows_triton(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor | None, temperature: float,
                   kl_scale: float, ce_scale: float, write_grad: bool = True
                   ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Per-row KD terms by the fused kernel.

    student, teacher  [n, V] logits (float16 / bfloat16 / float32, any row stride)
    targets           [n] int64 CE targets (IGNORE_INDEX where none), or None for no CE term
    -> grad [n, V] in student's dtype (None unless write_grad), kl [n] float32, ce [n] float32 (zeros without
       targets); see the module docstring for the formulas.
    """
    _check(student, teacher, targets)
    student, teacher = _rows(student), _rows(teacher)
    n, vocab = student.shape
    kl = torch.empty(n, device=student.device, dtype=torch.float32)
    ce = torch.zeros(n, device=student.device, dtype=torch.float32)
    grad = torch.empty(n, vocab, device=student.device, dtype=student.dtype) if write_grad else None
    if n == 0:
        return grad, kl, ce
    has_ce = targets is not None
    tgt = targets.to(device=student.device, dtype=torch.int64).contiguous() if has_ce else kl
    out = grad if write_grad else kl  # a placeholder pointer, never written without WRITE_GRAD
    block = min(MAX_BLOCK_V, triton.next_power_of_2(vocab))
    _kd_kernel[(n,)](student, teacher, tgt, out, kl, ce, vocab, student.stride(0), teacher.stride(0),
                     grad.stride(0) if write_grad else 0, 1.0 / temperature, kl_scale, ce_scale,
                     IGNORE=IGNORE_INDEX, HAS_CE=has_ce, WRITE_GRAD=write_grad, BLOCK_V=block,
                     num_warps=8 if block >= 2048 else 4)
    return grad, kl, ce


def unsupported(student: torch.Tensor, teacher: torch.Tensor, backend: str) -> str | None:
    """Why the kernel cannot take this call (None when it can). Besides CUDA, backend "triton" runs it on CPU
    tensors under TRITON_INTERPRET=1 (the tests); "auto" never picks the interpreter."""
    reason = device_reason(student, backend)
    if reason is not None:
        return reason
    if teacher.device != student.device:
        return f"teacher logits are on {teacher.device}, student logits on {student.device}"
    for name, t in (("student", student), ("teacher", teacher)):
        if t.dtype not in KERNEL_DTYPES:
            return f"{name} dtype {t.dtype} has no kernel"
    return None
