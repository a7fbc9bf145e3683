"""MLA's training attention inputs in one Triton kernel: RoPE on the query's and the key's rotary parts, and the
assembly of the per-head query, key and value tensors that SDPA takes (forward and backward).

Inputs as MLA's projections give them (zebra.mla.MLAttention, H heads, query/key head dim NOPE + ROPE, value V):
    q     [b, t, H * (NOPE + ROPE)]   q_proj (or q_b_proj) output: per head the no-RoPE part, then the rotary part
    kv    [b, t, H * (NOPE + V)]      kv_b_proj output: per head the key's no-RoPE part, then the value
    k_pe  [b, t, ROPE]                the rotary key shared by all heads (a slice of kv_a_proj's output)
    cos, sin [b, t, ROPE]             zebra.mla.rope_cos_sin (float32)
Outputs, contiguous:
    Q [b, H, t, NOPE + ROPE] = (q_nope, rope(q_pe))     K [b, H, t, NOPE + ROPE] = (k_nope, rope(k_pe))
    V [b, H, t, V]
with rope(x) = x * cos + rotate_half(x) * sin in the rotate_half layout (dim p pairs with p + ROPE/2), computed in
float32 and rounded once to the inputs' dtype. The backward writes dq, dkv and dk_pe (summed over heads) in one
pass each: the PyTorch path (zebra.mla.apply_rope, two cats, the views' and splits' backward) makes ~14 kernels
forward and ~20 backward per layer, and the ILD step runs 30 MLA layers (notes/GPU.md session 8: `cat` 7.5% and
the elementwise multiplies 11.6% of that step).

`mla_qkv_ref` is the formula in PyTorch (the tests' float64 reference); `mla_qkv_triton` the kernels behind an
autograd Function; `unsupported` says why the kernel cannot take the inputs, for the dispatch in zebra.mla.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.dispatch import device_reason

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BLOCK_T = 16  # tokens a program (each program loops over the heads)


def mla_qkv_ref(q: torch.Tensor, kv: torch.Tensor, k_pe: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                heads: int, nope: int, v_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The module docstring's formula: (Q, K, V) in q's dtype, RoPE computed in promote_types(q, float32)."""
    (b, t, _), rope = q.shape, k_pe.shape[-1]
    dtype = torch.promote_types(q.dtype, torch.float32)
    cos, sin = cos.to(dtype)[:, None], sin.to(dtype)[:, None]

    def rotate(x):  # x [..., rope] in dtype
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin

    q = q.view(b, t, heads, nope + rope).transpose(1, 2)
    kv = kv.view(b, t, heads, nope + v_dim).transpose(1, 2)
    k_rot = rotate(k_pe.to(dtype)[:, None]).to(q.dtype).expand(b, heads, t, rope)
    big_q = torch.cat((q[..., :nope], rotate(q[..., nope:].to(dtype)).to(q.dtype)), dim=-1)
    big_k = torch.cat((kv[..., :nope], k_rot), dim=-1)
    return big_q.contiguous(), big_k.contiguous(), kv[..., nope:].contiguous()


@triton.jit
def _rows(ptr, base, cols, mask):
    return tl.load(ptr + base[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _tile(cos_ptr, sin_ptr, T, s_cb, s_ct, NOPE: tl.constexpr, HALF: tl.constexpr, VD: tl.constexpr,
          B_NOPE: tl.constexpr, B_HALF: tl.constexpr, B_V: tl.constexpr, BLOCK_T: tl.constexpr):
    """A program's tokens t of sequence b, the column ranges and masks of the no-RoPE part (n), each rotary half
    (h) and the value (v), and cos, sin of its tokens split in halves (float32 [BLOCK_T, B_HALF])."""
    b, tb = tl.program_id(0), tl.program_id(1)
    t = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    mt = t < T
    cn, ch, cv = tl.arange(0, B_NOPE), tl.arange(0, B_HALF), tl.arange(0, B_V)
    mn, mh, mv = mt[:, None] & (cn < NOPE)[None, :], mt[:, None] & (ch < HALF)[None, :], mt[:, None] & (cv < VD)[None, :]
    cbase = b * s_cb + t * s_ct
    c1, c2 = _rows(cos_ptr, cbase, ch, mh), _rows(cos_ptr, cbase + HALF, ch, mh)
    s1, s2 = _rows(sin_ptr, cbase, ch, mh), _rows(sin_ptr, cbase + HALF, ch, mh)
    return b, t, cn, ch, cv, mn, mh, mv, c1, c2, s1, s2


@triton.jit
def _fwd_kernel(q_ptr, kv_ptr, pe_ptr, cos_ptr, sin_ptr, oq_ptr, ok_ptr, ov_ptr, T, H,
                s_qb, s_qt, s_kvb, s_kvt, s_pb, s_pt, s_cb, s_ct,
                NOPE: tl.constexpr, HALF: tl.constexpr, VD: tl.constexpr,
                B_NOPE: tl.constexpr, B_HALF: tl.constexpr, B_V: tl.constexpr, BLOCK_T: tl.constexpr):
    """Grid (b, cdiv(T, BLOCK_T)): BLOCK_T tokens of one sequence, every head."""
    b, t, cn, ch, cv, mn, mh, mv, c1, c2, s1, s2 = _tile(cos_ptr, sin_ptr, T, s_cb, s_ct, NOPE, HALF, VD, B_NOPE, B_HALF,
                                                         B_V, BLOCK_T)
    pbase = b * s_pb + t * s_pt
    p1, p2 = _rows(pe_ptr, pbase, ch, mh), _rows(pe_ptr, pbase + HALF, ch, mh)
    k1, k2 = p1 * c1 - p2 * s1, p2 * c2 + p1 * s2
    D = NOPE + 2 * HALF
    for h in range(H):
        qbase = b * s_qb + t * s_qt + h * D
        q1, q2 = _rows(q_ptr, qbase + NOPE, ch, mh), _rows(q_ptr, qbase + NOPE + HALF, ch, mh)
        obase = ((b * H + h) * T + t) * D
        tl.store(oq_ptr + obase[:, None] + cn[None, :], _rows(q_ptr, qbase, cn, mn).to(oq_ptr.dtype.element_ty), mask=mn)
        tl.store(oq_ptr + (obase + NOPE)[:, None] + ch[None, :], (q1 * c1 - q2 * s1).to(oq_ptr.dtype.element_ty), mask=mh)
        tl.store(oq_ptr + (obase + NOPE + HALF)[:, None] + ch[None, :], (q2 * c2 + q1 * s2).to(oq_ptr.dtype.element_ty),
                 mask=mh)
        kvbase = b * s_kvb + t * s_kvt + h * (NOPE + VD)
        tl.store(ok_ptr + obase[:, None] + cn[None, :], _rows(kv_ptr, kvbase, cn, mn).to(ok_ptr.dtype.element_ty), mask=mn)
        tl.store(ok_ptr + (obase + NOPE)[:, None] + ch[None, :], k1.to(ok_ptr.dtype.element_ty), mask=mh)
        tl.store(ok_ptr + (obase + NOPE + HALF)[:, None] + ch[None, :], k2.to(ok_ptr.dtype.element_ty), mask=mh)
        vbase = ((b * H + h) * T + t) * VD
        tl.store(ov_ptr + vbase[:, None] + cv[None, :], _rows(kv_ptr, kvbase + NOPE, cv, mv).to(ov_ptr.dtype.element_ty),
                 mask=mv)


@triton.jit
def _bwd_kernel(dq_out_ptr, dk_out_ptr, dv_out_ptr, cos_ptr, sin_ptr, dq_ptr, dkv_ptr, dpe_ptr, T, H,
                s_cb, s_ct, s_pb, s_pt,
                NOPE: tl.constexpr, HALF: tl.constexpr, VD: tl.constexpr,
                B_NOPE: tl.constexpr, B_HALF: tl.constexpr, B_V: tl.constexpr, BLOCK_T: tl.constexpr):
    """Grid (b, cdiv(T, BLOCK_T)): dq [b, T, H * D], dkv [b, T, H * (NOPE + VD)] (contiguous) and dk_pe [b, T, 2 HALF]
    (strides s_pb, s_pt) from dQ, dK [b, H, T, D] and dV [b, H, T, VD] (contiguous)."""
    b, t, cn, ch, cv, mn, mh, mv, c1, c2, s1, s2 = _tile(cos_ptr, sin_ptr, T, s_cb, s_ct, NOPE, HALF, VD, B_NOPE, B_HALF,
                                                         B_V, BLOCK_T)
    D = NOPE + 2 * HALF
    acc1 = tl.zeros((BLOCK_T, B_HALF), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_T, B_HALF), dtype=tl.float32)
    for h in range(H):
        obase = ((b * H + h) * T + t) * D
        qbase = (b * T + t) * (H * D) + h * D
        y1, y2 = _rows(dq_out_ptr, obase + NOPE, ch, mh), _rows(dq_out_ptr, obase + NOPE + HALF, ch, mh)
        tl.store(dq_ptr + qbase[:, None] + cn[None, :], _rows(dq_out_ptr, obase, cn, mn).to(dq_ptr.dtype.element_ty),
                 mask=mn)
        tl.store(dq_ptr + (qbase + NOPE)[:, None] + ch[None, :], (y1 * c1 + y2 * s2).to(dq_ptr.dtype.element_ty), mask=mh)
        tl.store(dq_ptr + (qbase + NOPE + HALF)[:, None] + ch[None, :], (y2 * c2 - y1 * s1).to(dq_ptr.dtype.element_ty),
                 mask=mh)
        kvbase = (b * T + t) * (H * (NOPE + VD)) + h * (NOPE + VD)
        tl.store(dkv_ptr + kvbase[:, None] + cn[None, :], _rows(dk_out_ptr, obase, cn, mn).to(dkv_ptr.dtype.element_ty),
                 mask=mn)
        g1, g2 = _rows(dk_out_ptr, obase + NOPE, ch, mh), _rows(dk_out_ptr, obase + NOPE + HALF, ch, mh)
        acc1 += g1 * c1 + g2 * s2
        acc2 += g2 * c2 - g1 * s1
        vbase = ((b * H + h) * T + t) * VD
        tl.store(dkv_ptr + (kvbase + NOPE)[:, None] + cv[None, :],
                 _rows(dv_out_ptr, vbase, cv, mv).to(dkv_ptr.dtype.element_ty), mask=mv)
    pbase = b * s_pb + t * s_pt
    tl.store(dpe_ptr + pbase[:, None] + ch[None, :], acc1.to(dpe_ptr.dtype.element_ty), mask=mh)
    tl.store(dpe_ptr + (pbase + HALF)[:, None] + ch[None, :], acc2.to(dpe_ptr.dtype.element_ty), mask=mh)


def _blocks(nope: int, half: int, v_dim: int) -> dict:
    return dict(NOPE=nope, HALF=half, VD=v_dim, B_NOPE=triton.next_power_of_2(nope),
                B_HALF=triton.next_power_of_2(half), B_V=triton.next_power_of_2(v_dim), BLOCK_T=BLOCK_T)


class _MLAQKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, kv, k_pe, cos, sin, heads: int, nope: int, v_dim: int):
        (b, t, _), rope = q.shape, k_pe.shape[-1]
        q, kv = q.contiguous(), kv.contiguous()
        cos, sin = cos.float().contiguous(), sin.float().contiguous()
        big_q = torch.empty(b, heads, t, nope + rope, device=q.device, dtype=q.dtype)
        big_k = torch.empty(b, heads, t, nope + rope, device=q.device, dtype=q.dtype)
        big_v = torch.empty(b, heads, t, v_dim, device=q.device, dtype=q.dtype)
        _fwd_kernel[(b, triton.cdiv(t, BLOCK_T))](
            q, kv, k_pe, cos, sin, big_q, big_k, big_v, t, heads, q.stride(0), q.stride(1), kv.stride(0),
            kv.stride(1), k_pe.stride(0), k_pe.stride(1), cos.stride(0), cos.stride(1),
            **_blocks(nope, rope // 2, v_dim))
        ctx.save_for_backward(cos, sin)
        ctx.shape = (b, t, heads, nope, rope, v_dim, q.dtype, kv.dtype, k_pe.dtype)
        return big_q, big_k, big_v

    @staticmethod
    def backward(ctx, d_q, d_k, d_v):
        cos, sin = ctx.saved_tensors
        b, t, heads, nope, rope, v_dim, q_dtype, kv_dtype, pe_dtype = ctx.shape
        dq = torch.empty(b, t, heads * (nope + rope), device=cos.device, dtype=q_dtype)
        dkv = torch.empty(b, t, heads * (nope + v_dim), device=cos.device, dtype=kv_dtype)
        dpe = torch.empty(b, t, rope, device=cos.device, dtype=pe_dtype)
        _bwd_kernel[(b, triton.cdiv(t, BLOCK_T))](
            d_q.contiguous(), d_k.contiguous(), d_v.contiguous(), cos, sin, dq, dkv, dpe, t, heads,
            cos.stride(0), cos.stride(1), dpe.stride(0), dpe.stride(1), **_blocks(nope, rope // 2, v_dim))
        return dq, dkv, dpe, None, None, None, None, None


def mla_qkv_triton(q: torch.Tensor, kv: torch.Tensor, k_pe: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   heads: int, nope: int, v_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same arguments and results as `mla_qkv_ref` (up to rounding) by the Triton kernels; differentiable in q,
    kv and k_pe (cos and sin are constants of the positions)."""
    b, t, rope = *q.shape[:2], k_pe.shape[-1]
    expected = {"q": (b, t, heads * (nope + rope)), "kv": (b, t, heads * (nope + v_dim)), "cos": (b, t, rope),
                "sin": (b, t, rope)}
    for name, tensor in (("q", q), ("kv", kv), ("cos", cos), ("sin", sin)):
        if tuple(tensor.shape) != expected[name]:
            raise ValueError(f"mla_qkv: {name} shape {tuple(tensor.shape)}, expected {expected[name]}")
    if rope % 2 or k_pe.stride(-1) != 1:
        raise ValueError(f"mla_qkv: k_pe [b, t, rope] needs an even rope dim and unit stride, got "
                         f"{tuple(k_pe.shape)} strides {k_pe.stride()}")
    return _MLAQKV.apply(q, kv, k_pe, cos, sin, heads, nope, v_dim)


def unsupported(q: torch.Tensor, k_pe: torch.Tensor, backend: str) -> str | None:
    """Why mla_qkv_triton cannot take the query projection q and the rotary key k_pe (kv_b_proj's output has q's
    dtype) (None when it can), for kernels.dispatch.use_kernel."""
    reason = device_reason(q, backend)
    dtypes = {q.dtype, k_pe.dtype}
    if reason is None and not dtypes <= set(KERNEL_DTYPES):
        reason = f"dtypes {sorted(map(str, dtypes))} have no kernel"
    return reason
