"""Mamba2's chunked SSD scan as Triton kernels, forward and backward; `kernels.ssd.ssd_chunked_ref` is the truth.

Per (batch, head) and chunk c of Q positions, with a_t = dt_t A, acum_t the cumsum of a within the chunk
(acum_end its last value), xdt_s = dt_s x_s and H_c [p, n] the state entering chunk c (H_0 = initial state):
    S_c     = sum_s exp(acum_end - acum_s) xdt_s B_s^T                                        chunk state
    H_{c+1} = exp(acum_end) H_c + S_c                                                          state passing
    y_t     = exp(acum_t) H_c C_t + sum_{s<=t} (C_t.B_s) exp(acum_t - acum_s) xdt_s + D x_t    chunk output
Positions past the sequence end load as dt = 0 and x = B = C = 0, which leaves the state unchanged, so any
length works without a padded copy. Matrix products run through tl.dot on the inputs' dtype (bf16/fp16, or
fp32 in full precision, not TF32) and accumulate in float32; decays, states and the final state are float32.

Three layers (STYLE.md): the launchers `_fwd_impl` and `_bwd_impl`, registered as the torch.library custom ops
`_fwd` and `_bwd` (so that torch.compile keeps each whole instead of tracing into the launches: no graph break),
the autograd Function `_SSDScan` (the ops under torch.compile, the plain launchers in eager mode, which saves the
ops' host time: `kernels._eager.op_or_impl`), and the public `ssd_scan_triton`, with the reference's signature.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._eager import op_or_impl

MIN_BLOCK = 16  # tl.dot needs every dimension >= 16
BLOCK_T = 64  # positions per block inside a chunk
STATE_BLOCK = 256  # state elements (p * n) per program of the state-passing kernels
NUM_WARPS = 4  # of the chunk kernels (the tl.dot ones)


# -- kernels --------------------------------------------------------------------------------------
@triton.jit
def _chunk_cumsum_kernel(dt_ptr, A_ptr, acum_ptr, seqlen, heads, s_dt_b, s_dt_l, s_dt_h, L_PAD, Q: tl.constexpr):
    """acum[b, h, t] = cumsum of dt * A within each chunk; grid (b * heads, chunks)."""
    bh, c = tl.program_id(0), tl.program_id(1)
    b, h = bh // heads, bh % heads
    t = c * Q + tl.arange(0, Q)
    dt = tl.load(dt_ptr + b * s_dt_b + h * s_dt_h + t * s_dt_l, mask=t < seqlen, other=0.0).to(tl.float32)
    a = dt * tl.load(A_ptr + h).to(tl.float32)
    tl.store(acum_ptr + bh * L_PAD + t, tl.cumsum(a, axis=0))


@triton.jit
def _chunk_state_kernel(
    u_ptr, v_ptr, dt_ptr, acum_ptr, out_ptr, seqlen, heads, group_ratio, P, N, L_PAD,
    s_u_b, s_u_l, s_u_h, s_u_p, s_v_b, s_v_l, s_v_h, s_v_n, s_dt_b, s_dt_l, s_dt_h,
    Q: tl.constexpr, BT: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, DOT_PREC: tl.constexpr, FORWARD: tl.constexpr,
):
    """out[b, c, h] = sum_t w_t u_t v_t^T [P, N], float32; grid (b * heads, chunks).

    FORWARD: u = x, v = B (head h reads group h // group_ratio), w_t = dt_t exp(acum_end - acum_t): the chunk
    state S_c. Else u = dy, v = C, w_t = exp(acum_t): the gradient the chunk output sends to H_c.
    """
    bh, c = tl.program_id(0), tl.program_id(1)
    b, h = bh // heads, bh % heads
    rp, rn = tl.arange(0, BP), tl.arange(0, BN)
    u_ptr += b * s_u_b + h * s_u_h + rp[None, :] * s_u_p
    v_ptr += b * s_v_b + (h // group_ratio) * s_v_h + rn[None, :] * s_v_n
    acum_ptr += bh * L_PAD
    acum_end = tl.load(acum_ptr + c * Q + Q - 1)
    acc = tl.zeros((BP, BN), dtype=tl.float32)
    for t0 in range(0, Q, BT):
        t = c * Q + t0 + tl.arange(0, BT)
        valid = t < seqlen
        u = tl.load(u_ptr + t[:, None] * s_u_l, mask=valid[:, None] & (rp[None, :] < P), other=0.0)
        v = tl.load(v_ptr + t[:, None] * s_v_l, mask=valid[:, None] & (rn[None, :] < N), other=0.0)
        acum = tl.load(acum_ptr + t)
        if FORWARD:
            dt = tl.load(dt_ptr + b * s_dt_b + h * s_dt_h + t * s_dt_l, mask=valid, other=0.0).to(tl.float32)
            w = dt * tl.exp(acum_end - acum)
        else:
            w = tl.where(valid, tl.exp(acum), 0.0)
        acc += tl.dot(tl.trans(u), (v * w[:, None]).to(u.dtype), input_precision=DOT_PREC)
    out = out_ptr + (b * tl.num_programs(1) + c) * heads * P * N + h * P * N
    tl.store(out + rp[:, None] * N + rn[None, :], acc, mask=(rp[:, None] < P) & (rn[None, :] < N))


@triton.jit
def _state_passing_fwd_kernel(
    S_ptr, acum_ptr, init_ptr, states_ptr, final_ptr, chunks, heads, PN, L_PAD,
    Q: tl.constexpr, BLOCK: tl.constexpr, HAS_INIT: tl.constexpr,
):
    """states[b, c, h] = H_c (the state entering chunk c), final[b, h] = H_chunks; grid (b * heads, PN / BLOCK).

    S, states [b, chunks, heads, PN], init, final [b, heads, PN], all float32.
    """
    bh, pid = tl.program_id(0), tl.program_id(1)
    b, h = bh // heads, bh % heads
    r = pid * BLOCK + tl.arange(0, BLOCK)
    mask = r < PN
    if HAS_INIT:
        H = tl.load(init_ptr + bh * PN + r, mask=mask, other=0.0)
    else:
        H = tl.zeros((BLOCK,), dtype=tl.float32)
    for c in range(chunks):
        at = ((b * chunks + c) * heads + h) * PN + r
        tl.store(states_ptr + at, H, mask=mask)
        decay = tl.exp(tl.load(acum_ptr + bh * L_PAD + c * Q + Q - 1))
        H = decay * H + tl.load(S_ptr + at, mask=mask, other=0.0)
    tl.store(final_ptr + bh * PN + r, H, mask=mask)


@triton.jit
def _chunk_output_kernel(
    x_ptr, B_ptr, C_ptr, dt_ptr, acum_ptr, states_ptr, D_ptr, y_ptr, seqlen, heads, group_ratio, P, N, L_PAD,
    s_x_b, s_x_l, s_x_h, s_x_p, s_B_b, s_B_l, s_B_h, s_B_n, s_C_b, s_C_l, s_C_h, s_C_n, s_dt_b, s_dt_l, s_dt_h,
    s_y_b, s_y_l, s_y_h, s_y_p,
    Q: tl.constexpr, BT: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, DOT_PREC: tl.constexpr, HAS_D: tl.constexpr,
):
    """y for BT positions t of one chunk: inter-chunk exp(acum_t) H_c C_t, intra-chunk masked-decay
    (C B^T) xdt, and D x; grid (b * heads, chunks * Q / BT)."""
    bh, pid = tl.program_id(0), tl.program_id(1)
    b, h, g = bh // heads, bh % heads, (bh % heads) // group_ratio
    c, t0 = pid // (Q // BT), (pid % (Q // BT)) * BT
    rp, rn, rt = tl.arange(0, BP), tl.arange(0, BN), tl.arange(0, BT)
    x_ptr += b * s_x_b + h * s_x_h + rp[None, :] * s_x_p
    B_ptr += b * s_B_b + g * s_B_h + rn[None, :] * s_B_n
    C_ptr += b * s_C_b + g * s_C_h + rn[None, :] * s_C_n
    dt_ptr += b * s_dt_b + h * s_dt_h
    acum_ptr += bh * L_PAD
    pmask, nmask = rp[None, :] < P, rn[None, :] < N
    t = c * Q + t0 + rt
    cc = tl.load(C_ptr + t[:, None] * s_C_l, mask=(t[:, None] < seqlen) & nmask, other=0.0)
    acum_t = tl.load(acum_ptr + t)
    H = tl.load(states_ptr + ((b * (L_PAD // Q) + c) * heads + h) * P * N + rp[:, None] * N + rn[None, :],
                mask=(rp[:, None] < P) & nmask, other=0.0)
    acc = tl.dot(cc, tl.trans(H.to(cc.dtype)), input_precision=DOT_PREC) * tl.exp(acum_t)[:, None]
    for s0 in range(0, t0 + BT, BT):
        s = c * Q + s0 + rt
        valid = s < seqlen
        bs = tl.load(B_ptr + s[:, None] * s_B_l, mask=valid[:, None] & nmask, other=0.0)
        xs = tl.load(x_ptr + s[:, None] * s_x_l, mask=valid[:, None] & pmask, other=0.0)
        dt = tl.load(dt_ptr + s * s_dt_l, mask=valid, other=0.0).to(tl.float32)
        causal = (t0 + rt)[:, None] >= (s0 + rt)[None, :]
        decay = tl.exp(tl.where(causal, acum_t[:, None] - tl.load(acum_ptr + s)[None, :], float("-inf")))
        m = tl.dot(cc, tl.trans(bs), input_precision=DOT_PREC) * decay * dt[None, :]
        acc += tl.dot(m.to(xs.dtype), xs, input_precision=DOT_PREC)
    mask = (t[:, None] < seqlen) & pmask
    if HAS_D:
        xt = tl.load(x_ptr + t[:, None] * s_x_l, mask=mask, other=0.0).to(tl.float32)
        acc += tl.load(D_ptr + h).to(tl.float32) * xt
    tl.store(y_ptr + b * s_y_b + h * s_y_h + t[:, None] * s_y_l + rp[None, :] * s_y_p, acc, mask=mask)


@triton.jit
def _state_passing_bwd_kernel(
    G_ptr, acum_ptr, states_ptr, dfinal_ptr, dS_ptr, dinit_ptr, dend_ptr, chunks, heads, PN, L_PAD,
    Q: tl.constexpr, BLOCK: tl.constexpr,
):
    """Backward of H_{c+1} = exp(acum_end) H_c + S_c, chunks in reverse; grid (b * heads, PN / BLOCK).

    G [b, chunks, heads, PN]: what the chunk outputs send to H_c. Writes dS[b, c, h] = dL/dH_{c+1},
    dinit = dL/dH_0 and dend[b, h, c, pid] = this block's part of dL/d acum_end through the decay.
    """
    bh, pid = tl.program_id(0), tl.program_id(1)
    b, h = bh // heads, bh % heads
    r = pid * BLOCK + tl.arange(0, BLOCK)
    mask = r < PN
    dH = tl.load(dfinal_ptr + bh * PN + r, mask=mask, other=0.0)
    for i in range(chunks):
        c = chunks - 1 - i
        at = ((b * chunks + c) * heads + h) * PN + r
        tl.store(dS_ptr + at, dH, mask=mask)
        decay = tl.exp(tl.load(acum_ptr + bh * L_PAD + c * Q + Q - 1))
        H = tl.load(states_ptr + at, mask=mask, other=0.0)
        tl.store(dend_ptr + (bh * chunks + c) * tl.num_programs(1) + pid, decay * tl.sum(dH * H, axis=0))
        dH = tl.load(G_ptr + at, mask=mask, other=0.0) + decay * dH
    tl.store(dinit_ptr + bh * PN + r, dH, mask=mask)


@triton.jit
def _chunk_bwd_dc_kernel(
    x_ptr, B_ptr, C_ptr, dt_ptr, acum_ptr, states_ptr, dy_ptr, dC_ptr, dacum_ptr, seqlen, heads, group_ratio,
    P, N, L_PAD,
    s_x_b, s_x_l, s_x_h, s_x_p, s_B_b, s_B_l, s_B_h, s_B_n, s_C_b, s_C_l, s_C_h, s_C_n, s_dt_b, s_dt_l, s_dt_h,
    s_dy_b, s_dy_l, s_dy_h, s_dy_p,
    Q: tl.constexpr, BT: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """For BT positions t of one chunk, as readers: dC_t [b, l, h, n] (per head) and the part of
    dL/d acum_t where t is the reading position, dacum[b, h, t]; grid (b * heads, chunks * Q / BT)."""
    bh, pid = tl.program_id(0), tl.program_id(1)
    b, h, g = bh // heads, bh % heads, (bh % heads) // group_ratio
    c, t0 = pid // (Q // BT), (pid % (Q // BT)) * BT
    rp, rn, rt = tl.arange(0, BP), tl.arange(0, BN), tl.arange(0, BT)
    x_ptr += b * s_x_b + h * s_x_h + rp[None, :] * s_x_p
    B_ptr += b * s_B_b + g * s_B_h + rn[None, :] * s_B_n
    dt_ptr += b * s_dt_b + h * s_dt_h
    acum_ptr += bh * L_PAD
    pmask, nmask = rp[None, :] < P, rn[None, :] < N
    t = c * Q + t0 + rt
    tvalid = t[:, None] < seqlen
    cc = tl.load(C_ptr + b * s_C_b + g * s_C_h + t[:, None] * s_C_l + rn[None, :] * s_C_n, mask=tvalid & nmask,
                 other=0.0)
    dy = tl.load(dy_ptr + b * s_dy_b + h * s_dy_h + t[:, None] * s_dy_l + rp[None, :] * s_dy_p,
                 mask=tvalid & pmask, other=0.0).to(cc.dtype)
    acum_t = tl.load(acum_ptr + t)
    H = tl.load(states_ptr + ((b * (L_PAD // Q) + c) * heads + h) * P * N + rp[:, None] * N + rn[None, :],
                mask=(rp[:, None] < P) & nmask, other=0.0)
    dc = tl.dot(dy, H.to(dy.dtype), input_precision=DOT_PREC) * tl.exp(acum_t)[:, None]
    dacum = tl.sum(dc * cc.to(tl.float32), axis=1)  # dy_t . (exp(acum_t) H_c C_t)
    for s0 in range(0, t0 + BT, BT):
        s = c * Q + s0 + rt
        valid = s < seqlen
        bs = tl.load(B_ptr + s[:, None] * s_B_l, mask=valid[:, None] & nmask, other=0.0)
        xs = tl.load(x_ptr + s[:, None] * s_x_l, mask=valid[:, None] & pmask, other=0.0)
        dt = tl.load(dt_ptr + s * s_dt_l, mask=valid, other=0.0).to(tl.float32)
        causal = (t0 + rt)[:, None] >= (s0 + rt)[None, :]
        decay = tl.exp(tl.where(causal, acum_t[:, None] - tl.load(acum_ptr + s)[None, :], float("-inf")))
        dm = tl.dot(dy, tl.trans(xs.to(dy.dtype)), input_precision=DOT_PREC) * (dt[None, :] * decay)  # dy_t . xdt_s, masked decay
        dc += tl.dot(dm.to(bs.dtype), bs, input_precision=DOT_PREC)
        dacum += tl.sum(dm * tl.dot(cc, tl.trans(bs), input_precision=DOT_PREC), axis=1)
    tl.store(dC_ptr + ((b * seqlen + t[:, None]) * heads + h) * N + rn[None, :], dc, mask=tvalid & nmask)
    tl.store(dacum_ptr + bh * L_PAD + t, dacum)


@triton.jit
def _chunk_bwd_dx_kernel(
    x_ptr, B_ptr, C_ptr, dt_ptr, acum_ptr, dS_ptr, dy_ptr, D_ptr,
    dx_ptr, dB_ptr, dacum_ptr, r_ptr, ddt_ptr, dD_ptr, seqlen, heads, group_ratio, P, N, L_PAD,
    s_x_b, s_x_l, s_x_h, s_x_p, s_B_b, s_B_l, s_B_h, s_B_n, s_C_b, s_C_l, s_C_h, s_C_n, s_dt_b, s_dt_l, s_dt_h,
    s_dy_b, s_dy_l, s_dy_h, s_dy_p, s_dx_b, s_dx_l, s_dx_h, s_dx_p,
    Q: tl.constexpr, BT: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, DOT_PREC: tl.constexpr, HAS_D: tl.constexpr,
):
    """For BT positions s of one chunk, as writers: dx, dB [b, l, h, n] (per head), and per position the part of
    dL/d acum_s where s writes (dacum), r_s = xdt_s . dL/dxdt_s through S_c (which dL/d acum_end gains),
    x_s . dL/dxdt_s (ddt) and dy_s . x_s (dD); grid (b * heads, chunks * Q / BT)."""
    bh, pid = tl.program_id(0), tl.program_id(1)
    b, h, g = bh // heads, bh % heads, (bh % heads) // group_ratio
    c, s0 = pid // (Q // BT), (pid % (Q // BT)) * BT
    rp, rn, rt = tl.arange(0, BP), tl.arange(0, BN), tl.arange(0, BT)
    C_ptr += b * s_C_b + g * s_C_h + rn[None, :] * s_C_n
    dy_ptr += b * s_dy_b + h * s_dy_h + rp[None, :] * s_dy_p
    acum_ptr += bh * L_PAD
    pmask, nmask = rp[None, :] < P, rn[None, :] < N
    s = c * Q + s0 + rt
    svalid = s < seqlen
    xs = tl.load(x_ptr + b * s_x_b + h * s_x_h + s[:, None] * s_x_l + rp[None, :] * s_x_p,
                 mask=svalid[:, None] & pmask, other=0.0)
    bs = tl.load(B_ptr + b * s_B_b + g * s_B_h + s[:, None] * s_B_l + rn[None, :] * s_B_n,
                 mask=svalid[:, None] & nmask, other=0.0)
    dt = tl.load(dt_ptr + b * s_dt_b + h * s_dt_h + s * s_dt_l, mask=svalid, other=0.0).to(tl.float32)
    acum_s = tl.load(acum_ptr + s)
    dS = tl.load(dS_ptr + ((b * (L_PAD // Q) + c) * heads + h) * P * N + rp[None, :] * N + rn[:, None],
                 mask=(rp[None, :] < P) & (rn[:, None] < N), other=0.0)  # dL/dH_{c+1}, transposed: [BN, BP]
    w = tl.exp(tl.load(acum_ptr + c * Q + Q - 1) - acum_s)
    dxdt = tl.dot(bs, dS.to(bs.dtype), input_precision=DOT_PREC) * w[:, None]
    xdt = xs.to(tl.float32) * dt[:, None]
    r = tl.sum(xdt * dxdt, axis=1)
    db = tl.dot(xdt.to(xs.dtype), tl.trans(dS).to(xs.dtype), input_precision=DOT_PREC) * w[:, None]
    dacum = -r
    for t0 in range(s0, Q, BT):
        t = c * Q + t0 + rt
        valid = t < seqlen
        ct = tl.load(C_ptr + t[:, None] * s_C_l, mask=valid[:, None] & nmask, other=0.0)
        dy = tl.load(dy_ptr + t[:, None] * s_dy_l, mask=valid[:, None] & pmask, other=0.0).to(xs.dtype)
        causal = (t0 + rt)[None, :] >= (s0 + rt)[:, None]
        decay = tl.exp(tl.where(causal, tl.load(acum_ptr + t)[None, :] - acum_s[:, None], float("-inf")))
        cb = tl.dot(bs, tl.trans(ct), input_precision=DOT_PREC)  # [s, t] = B_s . C_t
        dxdt += tl.dot((cb * decay).to(dy.dtype), dy, input_precision=DOT_PREC)
        dm = tl.dot(xs, tl.trans(dy), input_precision=DOT_PREC) * (dt[:, None] * decay)  # [s, t] = xdt_s . dy_t, masked decay
        db += tl.dot(dm.to(ct.dtype), ct, input_precision=DOT_PREC)
        dacum -= tl.sum(dm * cb, axis=1)
    dy_s = tl.load(dy_ptr + s[:, None] * s_dy_l, mask=svalid[:, None] & pmask, other=0.0).to(tl.float32)
    dx = dxdt * dt[:, None]
    if HAS_D:
        dx += tl.load(D_ptr + h).to(tl.float32) * dy_s
    mask = svalid[:, None] & pmask
    tl.store(dx_ptr + b * s_dx_b + h * s_dx_h + s[:, None] * s_dx_l + rp[None, :] * s_dx_p, dx, mask=mask)
    tl.store(dB_ptr + ((b * seqlen + s[:, None]) * heads + h) * N + rn[None, :], db, mask=svalid[:, None] & nmask)
    tl.store(dacum_ptr + bh * L_PAD + s, dacum)
    tl.store(r_ptr + bh * L_PAD + s, r)
    tl.store(ddt_ptr + bh * L_PAD + s, tl.sum(dxdt * xs.to(tl.float32), axis=1))
    tl.store(dD_ptr + bh * tl.num_programs(1) + pid, tl.sum(tl.sum(dy_s * xs.to(tl.float32), axis=1), axis=0))


@triton.jit
def _chunk_cumsum_bwd_kernel(
    dacum_ptr, r_ptr, dend_ptr, ddt_part_ptr, dt_ptr, A_ptr, ddt_ptr, dA_ptr, seqlen, heads, n_dend, L_PAD,
    s_dt_b, s_dt_l, s_dt_h, s_ddt_b, s_ddt_l, s_ddt_h, Q: tl.constexpr, BLOCK_DEND: tl.constexpr,
):
    """From dL/d acum to dL/d a_s = (reverse cumsum of dacum within the chunk)_s + dL/d acum_end, then
    ddt = da A + ddt_part and dA's part of this chunk, dA[b, h, c]; grid (b * heads, chunks)."""
    bh, c = tl.program_id(0), tl.program_id(1)
    b, h = bh // heads, bh % heads
    t = c * Q + tl.arange(0, Q)
    rd = tl.arange(0, BLOCK_DEND)
    dend = tl.sum(tl.load(dend_ptr + (bh * tl.num_programs(1) + c) * n_dend + rd, mask=rd < n_dend, other=0.0))
    dend += tl.sum(tl.load(r_ptr + bh * L_PAD + t), axis=0)
    da = tl.cumsum(tl.load(dacum_ptr + bh * L_PAD + t), axis=0, reverse=True) + dend
    valid = t < seqlen
    dt = tl.load(dt_ptr + b * s_dt_b + h * s_dt_h + t * s_dt_l, mask=valid, other=0.0).to(tl.float32)
    ddt = da * tl.load(A_ptr + h).to(tl.float32) + tl.load(ddt_part_ptr + bh * L_PAD + t)
    tl.store(ddt_ptr + b * s_ddt_b + h * s_ddt_h + t * s_ddt_l, ddt, mask=valid)
    tl.store(dA_ptr + bh * tl.num_programs(1) + c, tl.sum(da * dt, axis=0))


# -- launchers ------------------------------------------------------------------------------------
def _blocks(chunk_size: int, p: int, n: int, dtype: torch.dtype) -> dict:
    """Launch options of the chunk kernels: BT positions, BP >= p, BN >= n (powers of two, >= 16 for tl.dot).

    float32 inputs get float32 products ("ieee"; Triton's default would be TF32, ~1e-3 relative error): the
    fast path is bf16, and float32 callers (tests, the pipeline on float32 weights) expect float32 accuracy.
    """
    return dict(Q=chunk_size, BT=min(BLOCK_T, chunk_size), BP=max(MIN_BLOCK, triton.next_power_of_2(p)),
                BN=max(MIN_BLOCK, triton.next_power_of_2(n)), num_warps=NUM_WARPS,
                DOT_PREC="ieee" if dtype == torch.float32 else "tf32")


def _fwd_impl(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, chunk_size: int,
              D: torch.Tensor | None, initial_state: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward launchers. Shapes as `ssd_scan_triton` -> y [b, l, h, p], final [b, h, p, n],
    acum [b, h, chunks * chunk_size], states [b, chunks, h, p, n] (the state entering each chunk)."""
    (b, l, h, p), g, n = x.shape, B.shape[2], B.shape[3]
    chunks = triton.cdiv(l, chunk_size)
    l_pad, blk, f32 = chunks * chunk_size, _blocks(chunk_size, p, n, x.dtype), torch.float32
    acum = torch.empty(b, h, l_pad, device=x.device, dtype=f32)
    _chunk_cumsum_kernel[(b * h, chunks)](dt, A, acum, l, h, *dt.stride(), l_pad, Q=chunk_size)
    S = torch.empty(b, chunks, h, p, n, device=x.device, dtype=f32)
    _chunk_state_kernel[(b * h, chunks)](x, B, dt, acum, S, l, h, h // g, p, n, l_pad, *x.stride(), *B.stride(),
                                         *dt.stride(), **blk, FORWARD=True)
    states, final = torch.empty_like(S), torch.empty(b, h, p, n, device=x.device, dtype=f32)
    init = None if initial_state is None else initial_state.to(f32).contiguous()
    _state_passing_fwd_kernel[(b * h, triton.cdiv(p * n, STATE_BLOCK))](
        S, acum, init if init is not None else final, states, final, chunks, h, p * n, l_pad,
        Q=chunk_size, BLOCK=STATE_BLOCK, HAS_INIT=init is not None)
    y = torch.empty_like(x)
    _chunk_output_kernel[(b * h, l_pad // blk["BT"])](
        x, B, C, dt, acum, states, D if D is not None else A, y, l, h, h // g, p, n, l_pad,
        *x.stride(), *B.stride(), *C.stride(), *dt.stride(), *y.stride(), **blk, HAS_D=D is not None)
    return y, final, acum, states


_fwd = torch.library.custom_op("zebra::ssd_scan_fwd", _fwd_impl, mutates_args=())


@_fwd.register_fake
def _(x, dt, A, B, C, chunk_size, D, initial_state):
    (b, l, h, p), n, f32 = x.shape, B.shape[3], torch.float32
    chunks = triton.cdiv(l, chunk_size)
    return (torch.empty_like(x), x.new_empty(b, h, p, n, dtype=f32), x.new_empty(b, h, chunks * chunk_size, dtype=f32),
            x.new_empty(b, chunks, h, p, n, dtype=f32))


def _bwd_impl(dy: torch.Tensor, dfinal: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor,
              B: torch.Tensor, C: torch.Tensor, D: torch.Tensor | None, acum: torch.Tensor, states: torch.Tensor,
              chunk_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                        torch.Tensor, torch.Tensor]:
    """Backward launchers: -> dx, ddt, dA, dB, dC, dD (in A's dtype without D), dinit [b, h, p, n] (float32).
    dB, dC are summed over the heads of each group and returned in B's dtype (B and C share it)."""
    (b, l, h, p), g, n = x.shape, B.shape[2], B.shape[3]
    chunks, l_pad, blk = triton.cdiv(l, chunk_size), acum.shape[-1], _blocks(chunk_size, p, n, x.dtype)
    f32, dev, n_blk = torch.float32, x.device, triton.cdiv(p * n, STATE_BLOCK)
    G = torch.empty_like(states)
    _chunk_state_kernel[(b * h, chunks)](dy, C, dt, acum, G, l, h, h // g, p, n, l_pad, *dy.stride(), *C.stride(),
                                         *dt.stride(), **blk, FORWARD=False)
    dS, dinit = torch.empty_like(states), torch.empty(b, h, p, n, device=dev, dtype=f32)
    dend = torch.empty(b, h, chunks, n_blk, device=dev, dtype=f32)
    _state_passing_bwd_kernel[(b * h, n_blk)](G, acum, states, dfinal.to(f32).contiguous(), dS, dinit, dend,
                                             chunks, h, p * n, l_pad, Q=chunk_size, BLOCK=STATE_BLOCK)
    grid = (b * h, l_pad // blk["BT"])
    # Per-head dB, dC: in B's dtype when each head has its own group, else float32 and summed over the group.
    dBC_dtype = B.dtype if g == h else f32
    dC, dacum_read = torch.empty(b, l, h, n, device=dev, dtype=dBC_dtype), torch.empty_like(acum)
    _chunk_bwd_dc_kernel[grid](x, B, C, dt, acum, states, dy, dC, dacum_read, l, h, h // g, p, n, l_pad,
                               *x.stride(), *B.stride(), *C.stride(), *dt.stride(), *dy.stride(), **blk)
    dx, dB = torch.empty_like(x), torch.empty(b, l, h, n, device=dev, dtype=dBC_dtype)
    dacum_write, r, ddt_part = torch.empty_like(acum), torch.empty_like(acum), torch.empty_like(acum)
    dD = torch.empty(b, h, grid[1], device=dev, dtype=f32)
    _chunk_bwd_dx_kernel[grid](
        x, B, C, dt, acum, dS, dy, D if D is not None else A, dx, dB, dacum_write, r, ddt_part, dD,
        l, h, h // g, p, n, l_pad, *x.stride(), *B.stride(), *C.stride(), *dt.stride(), *dy.stride(),
        *dx.stride(), **blk, HAS_D=D is not None)
    ddt, dA = torch.empty(b, l, h, device=dev, dtype=f32), torch.empty(b, h, chunks, device=dev, dtype=f32)
    _chunk_cumsum_bwd_kernel[(b * h, chunks)](
        dacum_read + dacum_write, r, dend, ddt_part, dt, A, ddt, dA, l, h, n_blk, l_pad, *dt.stride(),
        *ddt.stride(), Q=chunk_size, BLOCK_DEND=triton.next_power_of_2(n_blk))
    if g != h:
        dB, dC = (t.view(b, l, g, h // g, n).sum(3).to(B.dtype) for t in (dB, dC))
    dD = dD.sum((0, 2)).to(A.dtype if D is None else D.dtype)
    return dx, ddt.to(dt.dtype), dA.sum((0, 2)).to(A.dtype), dB, dC, dD, dinit


_bwd = torch.library.custom_op("zebra::ssd_scan_bwd", _bwd_impl, mutates_args=())


@_bwd.register_fake
def _(dy, dfinal, x, dt, A, B, C, D, acum, states, chunk_size):
    (b, l, h, p), n = x.shape, B.shape[3]
    return (torch.empty_like(x), dt.new_empty(b, l, h), A.new_empty(h), B.new_empty(B.shape), C.new_empty(C.shape),
            (A if D is None else D).new_empty(h), x.new_empty(b, h, p, n, dtype=torch.float32))


# -- autograd and the public function -------------------------------------------------------------
class _SSDScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, chunk_size, D, initial_state):
        y, final, acum, states = op_or_impl(_fwd, _fwd_impl)(x, dt, A, B, C, chunk_size, D, initial_state)
        ctx.save_for_backward(x, dt, A, B, C, D, acum, states)
        ctx.chunk_size, ctx.init_dtype = chunk_size, None if initial_state is None else initial_state.dtype
        return y, final

    @staticmethod
    def backward(ctx, dy, dfinal):
        x, dt, A, B, C, D, acum, states = ctx.saved_tensors
        bwd = op_or_impl(_bwd, _bwd_impl)
        dx, ddt, dA, dB, dC, dD, dinit = bwd(dy, dfinal, x, dt, A, B, C, D, acum, states, ctx.chunk_size)
        dinit = None if ctx.init_dtype is None else dinit.to(ctx.init_dtype)
        return dx, ddt, dA, dB, dC, None, None if D is None else dD, dinit


def ssd_scan_triton(x, dt, A, B, C, chunk_size: int, D=None, initial_state=None):
    """Chunked SSD scan on the GPU (or the Triton interpreter), differentiable in every tensor argument.

    x [b, l, h, p] (float32, bfloat16 or float16), dt [b, l, h] (> 0, already softplus'ed), A [h] (< 0),
    B, C [b, l, g, n] with g dividing h (head i reads group i // (h // g); cast to x's dtype), D [h] or None,
    initial_state [b, h, p, n] or None (zeros); chunk_size a power of two >= 16, any l >= 1
    -> y [b, l, h, p] in x's dtype, final_state [b, h, p, n] float32. Same results as `ssd_chunked_ref`.
    """
    b, l, h, p = x.shape
    if chunk_size < MIN_BLOCK or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a power of two >= {MIN_BLOCK}, got {chunk_size}")
    if B.shape != C.shape or B.shape[:2] != (b, l) or h % B.shape[2]:
        raise ValueError(f"B and C must be [b, l, g, n] with g dividing h = {h}; got B {tuple(B.shape)}, "
                         f"C {tuple(C.shape)} for x {tuple(x.shape)}")
    if dt.shape != (b, l, h) or A.shape != (h,):
        raise ValueError(f"dt must be {(b, l, h)} and A {(h,)}; got dt {tuple(dt.shape)}, A {tuple(A.shape)}")
    if initial_state is not None and initial_state.shape != (b, h, p, B.shape[3]):
        raise ValueError(f"initial_state must be {(b, h, p, B.shape[3])}, got {tuple(initial_state.shape)}")
    return _SSDScan.apply(x, dt, A, B.to(x.dtype), C.to(x.dtype), chunk_size, D, initial_state)
