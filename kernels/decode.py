"""One-token decode kernels in Triton, each beside its plain-PyTorch reference and one dispatch point.

MLA absorbed decode attention (FlashMLA / flash-decoding style). Per batch row b and head h, over the
cached tokens t with starts[b] <= t < lengths[b]:
    s_t = scale * (q_latent[b, h] . latent[b, t] + q_pe[b, h] . k_pe[b, t])
    out[b, h] = sum_t softmax(s)_t latent[b, t]
The context is split into blocks handled by separate programs (so a small batch with a long context
still fills the GPU), each program takes every head of one batch row, so a block of the latent cache
is read once for all heads, and a second kernel merges the splits by their log-sum-exp. lengths[b]
bounds a row of a static cache; starts[b] (optional) skips its left padding.

Mamba2 one-token step (as mamba_ssm's selective_state_update, plus the conv): conv window shift,
depthwise conv, SiLU, optional dt softplus, SSM state update in float32 in place, y = C.state + D x.
Everything between the mixer's in_proj and its gated norm, in one launch.

Neither kernel has a backward: they serve decoding only.
"""
from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.dispatch import use_kernel
from kernels.ssd import causal_conv1d_step, ssd_step

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "triton")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2E = 1.4426950408889634




def _use_triton(op: str, backend: str, x: torch.Tensor) -> bool:
    """True for the Triton kernel: backend "triton" (or an error saying why not), or "auto" with x on CUDA."""
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        reason = "backend='torch'"
    elif not x.is_cuda:
        reason = f"tensors are on {x.device.type}"
    elif x.dtype not in KERNEL_DTYPES:
        reason = f"dtype {x.dtype} has no kernel"
    else:
        reason = None
    return use_kernel(log, op, "", reason, backend)


# -- MLA absorbed decode attention ----------------------------------------------------------------
@triton.jit
def _mla_split_kernel(q_ptr, qpe_ptr, lat_ptr, kpe_ptr, starts_ptr, lengths_ptr, acc_ptr, m_ptr, l_ptr,
                      H, R, DR, split_len, scale_log2,
                      sqb, sqh, sqr, spb, sph, spd, slb, slt, slr, skb, skt, skd,
                      BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr,
                      BLOCK_DR: tl.constexpr, HAS_STARTS: tl.constexpr, PRECISION: tl.constexpr):
    """One (batch row, head group, split): online softmax over the split's valid tokens; writes the
    unnormalised output acc [BLOCK_H, R], the running max m (log2 units) and the sum l to the partials."""
    # int64 batch index: offsets into large caches pass 2^31 elements
    pid_b, pid_h, pid_s = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_r, offs_d = tl.arange(0, BLOCK_R), tl.arange(0, BLOCK_DR)
    mask_h, mask_r, mask_d = offs_h < H, offs_r < R, offs_d < DR
    q = tl.load(q_ptr + pid_b * sqb + offs_h[:, None] * sqh + offs_r[None, :] * sqr,
                mask=mask_h[:, None] & mask_r[None, :], other=0.0)
    qpe = tl.load(qpe_ptr + pid_b * spb + offs_h[:, None] * sph + offs_d[None, :] * spd,
                  mask=mask_h[:, None] & mask_d[None, :], other=0.0)
    start = pid_s * split_len
    if HAS_STARTS:
        start = tl.maximum(tl.load(starts_ptr + pid_b), start)
    end = tl.minimum(tl.load(lengths_ptr + pid_b), (pid_s + 1) * split_len)
    m_i = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_R), dtype=tl.float32)
    for t0 in range(start, end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mask_t = offs_t < end
        lat = tl.load(lat_ptr + pid_b * slb + offs_t[:, None] * slt + offs_r[None, :] * slr,
                      mask=mask_t[:, None] & mask_r[None, :], other=0.0)
        kpe = tl.load(kpe_ptr + pid_b * skb + offs_t[:, None] * skt + offs_d[None, :] * skd,
                      mask=mask_t[:, None] & mask_d[None, :], other=0.0)
        s = tl.dot(q, tl.trans(lat), input_precision=PRECISION)
        # float32 whatever the caller passed: torch.compile (inductor) hands a Python float in as fp64, which would
        # make the running max, alpha and so the accumulator fp64 (a tl.dot acc must stay float32)
        s = (tl.dot(qpe, tl.trans(kpe), acc=s, input_precision=PRECISION) * scale_log2).to(tl.float32)
        s = tl.where(mask_t[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = tl.dot(p.to(lat.dtype), lat, acc=acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    n_splits = tl.num_programs(2)
    row = (pid_b * H + offs_h) * n_splits + pid_s  # partials [b, h, splits, (r)]
    tl.store(acc_ptr + row[:, None] * R + offs_r[None, :], acc, mask=mask_h[:, None] & mask_r[None, :])
    tl.store(m_ptr + row, m_i, mask=mask_h)
    tl.store(l_ptr + row, l_i, mask=mask_h)


@triton.jit
def _mla_combine_kernel(acc_ptr, m_ptr, l_ptr, out_ptr, H, R, n_splits, sob, soh, sor,
                        BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr):
    """out[b, h] = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s (0 when no split saw a token)."""
    pid_b, pid_h = tl.program_id(0).to(tl.int64), tl.program_id(1)
    offs_s, offs_r = tl.arange(0, BLOCK_S), tl.arange(0, BLOCK_R)
    mask_s, mask_r = offs_s < n_splits, offs_r < R
    row = (pid_b * H + pid_h) * n_splits + offs_s
    m = tl.load(m_ptr + row, mask=mask_s, other=float("-inf"))
    m_max = tl.max(m, axis=0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp2(m - m_max)
    den = tl.sum(w * tl.load(l_ptr + row, mask=mask_s, other=0.0), axis=0)
    acc = tl.load(acc_ptr + row[:, None] * R + offs_r[None, :], mask=mask_s[:, None] & mask_r[None, :], other=0.0)
    out = tl.sum(w[:, None] * acc, axis=0) / tl.where(den > 0, den, 1.0)
    tl.store(out_ptr + pid_b * sob + pid_h * soh + offs_r * sor, out.to(out_ptr.dtype.element_ty), mask=mask_r)


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _mla_splits(batch: int, head_groups: int, context: int, device: torch.device, block_t: int) -> int:
    """Context splits: a power of two near 4 programs per SM (8 splits at batch 64 on an H200: 92% of copy
    bandwidth against 71% with 9), each split at least 4 token blocks long."""
    wanted = 4 * _sm_count(device) // (batch * head_groups)
    return max(1, min(1 << max(wanted, 1).bit_length() - 1, triton.cdiv(context, 4 * block_t)))


def _mla_check(q_latent, q_pe, latent, k_pe, lengths, starts):
    """Raise a ValueError naming the argument whose shape disagrees with the others."""
    (b, h, r), (_, t, _) = q_latent.shape, latent.shape
    expected = {"q_pe": (b, h, k_pe.shape[-1]), "latent": (b, t, r), "k_pe": (b, t, q_pe.shape[-1]),
                "lengths": (b,), "starts": (b,)}
    for name, tensor in (("q_pe", q_pe), ("latent", latent), ("k_pe", k_pe), ("lengths", lengths),
                         ("starts", starts)):
        if tensor is not None and tuple(tensor.shape) != expected[name]:
            raise ValueError(f"mla_decode: {name} has shape {tuple(tensor.shape)}, expected {expected[name]} "
                             f"(q_latent [b, h, r] = {(b, h, r)}, latent [b, T, r] with T = {t})")
    for name, tensor in (("lengths", lengths), ("starts", starts)):
        if tensor is not None and (tensor.dtype.is_floating_point or tensor.dtype == torch.bool):
            raise ValueError(f"mla_decode: {name} must be an integer tensor, got {tensor.dtype}")


def mla_decode_attention(q_latent, q_pe, latent, k_pe, lengths, scale: float, starts=None,
                         num_splits: int | None = None, block_t: int = 64) -> torch.Tensor:
    """MLA absorbed decode attention by the Triton kernels (no gradient).

    q_latent [b, h, r] (the no-RoPE query times W_kb, in latent space), q_pe [b, h, dr] (rotated),
    latent [b, T, r], k_pe [b, T, dr] (rotated; shared by all heads), lengths [b] int: tokens t < lengths[b]
    are attended, starts [b] int or None (zeros): tokens t < starts[b] (left padding) are not,
    scale: the softmax scale -> out [b, h, r] in q_latent's dtype, float32 accumulation; a row with no
    valid token gives zeros. num_splits: context splits (default: enough to fill the GPU).
    """
    _mla_check(q_latent, q_pe, latent, k_pe, lengths, starts)
    (b, h, r), (t, dr) = q_latent.shape, k_pe.shape[1:]
    block_h = max(16, triton.next_power_of_2(h)) if h <= 64 else 64
    head_groups = triton.cdiv(h, block_h)
    splits = num_splits or _mla_splits(b, head_groups, t, latent.device, block_t)
    split_len = triton.cdiv(triton.cdiv(t, splits), block_t) * block_t
    acc = torch.empty(b, h, splits, r, device=latent.device, dtype=torch.float32)
    m, l = (torch.empty(b, h, splits, device=latent.device, dtype=torch.float32) for _ in range(2))
    precision = "ieee" if latent.dtype == torch.float32 else None  # no TF32 for float32
    q, qp = q_latent.to(latent.dtype), q_pe.to(latent.dtype)  # tl.dot takes one dtype
    _mla_split_kernel[(b, head_groups, splits)](
        q, qp, latent, k_pe, lengths if starts is None else starts, lengths, acc, m, l,
        h, r, dr, split_len, scale * LOG2E, *q.stride(), *qp.stride(), *latent.stride(), *k_pe.stride(),
        BLOCK_H=block_h, BLOCK_T=block_t, BLOCK_R=max(16, triton.next_power_of_2(r)),
        BLOCK_DR=max(16, triton.next_power_of_2(dr)), HAS_STARTS=starts is not None, PRECISION=precision,
    )
    out = torch.empty(b, h, r, device=latent.device, dtype=q_latent.dtype)
    _mla_combine_kernel[(b, h)](acc, m, l, out, h, r, splits, *out.stride(),
                                BLOCK_S=triton.next_power_of_2(splits), BLOCK_R=triton.next_power_of_2(r))
    return out


def mla_decode_attention_ref(q_latent, q_pe, latent, k_pe, lengths, scale: float, starts=None) -> torch.Tensor:
    """Plain-PyTorch `mla_decode_attention` (same arguments and result), computed in at least float32
    (float64 for float64 inputs)."""
    _mla_check(q_latent, q_pe, latent, k_pe, lengths, starts)
    dtype = torch.promote_types(latent.dtype, torch.float32)
    lat = latent.to(dtype)
    scores = torch.einsum("bhr,btr->bht", q_latent.to(dtype), lat)
    scores = scale * (scores + torch.einsum("bhd,btd->bht", q_pe.to(dtype), k_pe.to(dtype)))
    pos = torch.arange(latent.shape[1], device=latent.device)
    valid = pos < lengths[:, None]
    if starts is not None:
        valid = valid & (pos >= starts[:, None])
    probs = torch.softmax(scores.masked_fill(~valid[:, None], float("-inf")), dim=-1).nan_to_num(0.0)
    return torch.einsum("bht,btr->bhr", probs, lat).to(q_latent.dtype)


def mla_decode(q_latent, q_pe, latent, k_pe, lengths, scale: float, starts=None, backend: str = "auto"):
    """The one dispatch point of MLA decode attention: `mla_decode_attention` (Triton) for backend "triton"
    or "auto" on CUDA, else `mla_decode_attention_ref`; the choice is logged once. Arguments and result
    as `mla_decode_attention`."""
    kernel = mla_decode_attention if _use_triton("mla_decode", backend, latent) else mla_decode_attention_ref
    return kernel(q_latent, q_pe, latent, k_pe, lengths, scale, starts=starts)


# -- Mamba2 one-token step ------------------------------------------------------------------------
@triton.jit
def _conv_step(xbc_ptr, win_ptr, w_ptr, b_ptr, ch, mask, sxc, swc, swk, sw_c, sw_k,
               K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_K: tl.constexpr):
    """SiLU(conv) (float32, shaped like ch) of channels ch after shifting xbc into their windows, which are
    written back in place: all of the program's threads read before any writes (the barrier)."""
    offs_k = tl.arange(0, BLOCK_K)
    mask_k = mask[:, None] & (offs_k[None, :] < K)
    shifted = tl.load(win_ptr + ch[:, None] * swc + (offs_k[None, :] + 1) * swk,
                      mask=mask[:, None] & (offs_k[None, :] < K - 1), other=0.0)
    new = tl.load(xbc_ptr + ch * sxc, mask=mask, other=0.0).to(win_ptr.dtype.element_ty)
    window = tl.where(offs_k[None, :] == K - 1, new[:, None], shifted)
    w = tl.load(w_ptr + ch[:, None] * sw_c + offs_k[None, :] * sw_k, mask=mask_k, other=0.0).to(tl.float32)
    acc = tl.sum(window.to(tl.float32) * w, axis=1)
    if HAS_BIAS:
        acc += tl.load(b_ptr + ch, mask=mask, other=0.0).to(tl.float32)
    tl.debug_barrier()
    tl.store(win_ptr + ch[:, None] * swc + offs_k[None, :] * swk, window, mask=mask_k)
    return acc * tl.sigmoid(acc)


@triton.jit
def _softplus(v):
    """log(1 + e^v) with log1p's accuracy for small e^v (log(w) u / (w - 1), w = 1 + u), v above 20 as is."""
    u = tl.exp(tl.minimum(v, 20.0))
    w = 1.0 + u
    return tl.where(v > 20.0, v, tl.where(w == 1.0, u, tl.log(w) * u / (w - 1.0)))


@triton.jit
def _mamba2_step_kernel(xbc_ptr, dt_ptr, win_ptr, state_ptr, w_ptr, b_ptr, A_ptr, D_ptr, dtb_ptr, y_ptr,
                        HEADS, GROUPS, P, N, sxb, sxc, sdb, sdh, swb, swc, swk, sw_c, sw_k,
                        ssb, ssh, ssp, ssn, syb, syh, syp,
                        K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_D: tl.constexpr, HAS_DT_BIAS: tl.constexpr,
                        DT_SOFTPLUS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr):
    """One (batch row, group): the conv of the group's x and B channels, then for each of its heads the
    conv of that head's C channels and the SSM update. A program owns every window channel it writes."""
    pid_b, g = tl.program_id(0).to(tl.int64), tl.program_id(1)
    offs_p, offs_n = tl.arange(0, BLOCK_P), tl.arange(0, BLOCK_N)
    mask_p, mask_n = offs_p < P, offs_n < N
    xbc_ptr += pid_b * sxb
    win_ptr += pid_b * swb
    x = _conv_step(xbc_ptr, win_ptr, w_ptr, b_ptr, g * P + offs_p, mask_p, sxc, swc, swk, sw_c, sw_k,
                   K, HAS_BIAS, BLOCK_K)
    B = _conv_step(xbc_ptr, win_ptr, w_ptr, b_ptr, GROUPS * P + g * N + offs_n, mask_n, sxc, swc, swk, sw_c, sw_k,
                   K, HAS_BIAS, BLOCK_K)
    rep = HEADS // GROUPS
    for head in range(g * rep, (g + 1) * rep):
        C = _conv_step(xbc_ptr, win_ptr, w_ptr, b_ptr, GROUPS * (P + N) + head * N + offs_n, mask_n,
                       sxc, swc, swk, sw_c, sw_k, K, HAS_BIAS, BLOCK_K)
        dt = tl.load(dt_ptr + pid_b * sdb + head * sdh).to(tl.float32)
        if HAS_DT_BIAS:
            dt += tl.load(dtb_ptr + head).to(tl.float32)
        if DT_SOFTPLUS:
            dt = _softplus(dt)
        ptrs = state_ptr + pid_b * ssb + head * ssh + offs_p[:, None] * ssp + offs_n[None, :] * ssn
        mask = mask_p[:, None] & mask_n[None, :]
        state = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        state = state * tl.exp(dt * tl.load(A_ptr + head).to(tl.float32)) + (dt * x)[:, None] * B[None, :]
        tl.store(ptrs, state.to(state_ptr.dtype.element_ty), mask=mask)
        y = tl.sum(state * C[None, :], axis=1)
        if HAS_D:
            y += tl.load(D_ptr + head).to(tl.float32) * x
        tl.store(y_ptr + pid_b * syb + head * syh + offs_p * syp, y.to(y_ptr.dtype.element_ty), mask=mask_p)


def _mamba2_groups(xbc, dt, conv_window, ssm_state, conv_weight) -> int:
    """Number of B groups implied by the shapes; a ValueError names the argument that disagrees."""
    b, heads, p, n = ssm_state.shape
    conv_dim, k = conv_weight.shape
    groups, rest = divmod(conv_dim - heads * n, p + n)
    if rest or groups < 1 or heads % groups:
        raise ValueError(f"mamba2_decode: conv_weight has {conv_dim} channels; expected groups * (P + N) + heads * N "
                         f"with heads {heads} divisible by groups (P {p}, N {n} from ssm_state)")
    for name, tensor, shape in (("xbc", xbc, (b, conv_dim)), ("dt", dt, (b, heads)),
                                ("conv_window", conv_window, (b, conv_dim, k))):
        if tuple(tensor.shape) != shape:
            raise ValueError(f"mamba2_decode: {name} has shape {tuple(tensor.shape)}, expected {shape}")
    return groups


def mamba2_decode_step(xbc, dt, conv_window, ssm_state, conv_weight, conv_bias, A, D=None, dt_bias=None,
                       dt_softplus: bool = False) -> torch.Tensor:
    """One Mamba2 token by one Triton launch; updates conv_window and ssm_state in place.

    xbc [b, conv_dim]: the conv input x | B | C with conv_dim = groups * (P + N) + heads * N,
    dt [b, heads] (dt_bias [heads] added and softplus applied here when given/asked),
    conv_window [b, conv_dim, k]: the last k conv inputs, ssm_state [b, heads, P, N] (float32 advised),
    conv_weight [conv_dim, k], conv_bias [conv_dim] or None, A [heads] (< 0), D [heads] or None
    -> y [b, heads, P] in xbc's dtype: C . state + D x, with x, B, C the SiLU'ed conv outputs and
    head i reading group i // (heads // groups).
    """
    groups = _mamba2_groups(xbc, dt, conv_window, ssm_state, conv_weight)
    b, heads, p, n = ssm_state.shape
    y = torch.empty(b, heads, p, device=xbc.device, dtype=xbc.dtype)
    _mamba2_step_kernel[(b, groups)](
        xbc, dt, conv_window, ssm_state, conv_weight, conv_weight if conv_bias is None else conv_bias, A,
        A if D is None else D, A if dt_bias is None else dt_bias, y, heads, groups, p, n, *xbc.stride(),
        *dt.stride(), *conv_window.stride(), *conv_weight.stride(), *ssm_state.stride(), *y.stride(),
        K=conv_weight.shape[1], HAS_BIAS=conv_bias is not None, HAS_D=D is not None,
        HAS_DT_BIAS=dt_bias is not None, DT_SOFTPLUS=dt_softplus,
        BLOCK_P=triton.next_power_of_2(p), BLOCK_N=triton.next_power_of_2(n),
        BLOCK_K=triton.next_power_of_2(conv_weight.shape[1]),
    )
    return y


def mamba2_decode_step_ref(xbc, dt, conv_window, ssm_state, conv_weight, conv_bias, A, D=None, dt_bias=None,
                           dt_softplus: bool = False) -> torch.Tensor:
    """`mamba2_decode_step` composed of kernels.ssd's `causal_conv1d_step` and `ssd_step` (same arguments,
    result and in-place updates)."""
    groups = _mamba2_groups(xbc, dt, conv_window, ssm_state, conv_weight)
    heads, p, n = ssm_state.shape[1:]
    if dt_bias is not None:
        dt = dt + dt_bias
    if dt_softplus:
        dt = F.softplus(dt.to(torch.promote_types(dt.dtype, torch.float32)))
    conv_out, window = causal_conv1d_step(conv_window, xbc, conv_weight, conv_bias)
    x, B, C = F.silu(conv_out).split([groups * p, groups * n, heads * n], dim=-1)
    x = x.unflatten(-1, (groups, p)).repeat_interleave(heads // groups, dim=1)
    B = B.unflatten(-1, (groups, n)).repeat_interleave(heads // groups, dim=1)
    y, state = ssd_step(ssm_state, x, dt, A, B, C.unflatten(-1, (heads, n)), D)
    conv_window.copy_(window)
    ssm_state.copy_(state)
    return y.to(xbc.dtype)


def mamba2_decode(xbc, dt, conv_window, ssm_state, conv_weight, conv_bias, A, D=None, dt_bias=None,
                  dt_softplus: bool = False, backend: str = "auto") -> torch.Tensor:
    """The one dispatch point of the Mamba2 decode step: `mamba2_decode_step` (Triton) for backend "triton"
    or "auto" on CUDA, else `mamba2_decode_step_ref`; logged once. Arguments and result as `mamba2_decode_step`."""
    kernel = mamba2_decode_step if _use_triton("mamba2_decode", backend, xbc) else mamba2_decode_step_ref
    return kernel(xbc, dt, conv_window, ssm_state, conv_weight, conv_bias, A, D, dt_bias, dt_softplus)
