"""SSD scan and causal conv: chunked == sequential == a quadratic (attention-form) reference, steps == scans,
and mamba_ssm / causal_conv1d kernels against the references on GPU. Float64, fresh random inputs."""
import importlib.util
import logging

import pytest
import torch
import torch.nn.functional as F

from kernels import dispatch
from kernels.ssd import (
    causal_conv1d,
    causal_conv1d_ref,
    causal_conv1d_step,
    ssd_chunked_ref,
    ssd_scan,
    ssd_sequential_ref,
    ssd_step,
)

F64 = torch.float64


def ssd_inputs(b, l, h, p, n, groups=None, device="cpu", dtype=F64):
    """x, dt, A, B, C, D, initial_state; B and C have `groups` groups (default: one per head)."""
    g = groups or h
    kw = dict(device=device, dtype=dtype)
    return (
        torch.randn(b, l, h, p, **kw),
        F.softplus(torch.randn(b, l, h, **kw) - 1.0),  # positive, mostly in (0.05, 1.5)
        -torch.exp(torch.rand(h, **kw)),  # in [-e, -1]
        torch.randn(b, l, g, n, **kw),
        torch.randn(b, l, g, n, **kw),
        torch.randn(h, **kw),
        torch.randn(b, h, p, n, **kw),
    )


def ssd_quadratic(x, dt, A, B, C, D, s0):
    """y_t = sum_{s<=t} (C_t.B_s) exp(A sum_{s<r<=t} dt_r) dt_s x_s + exp(A sum_{r<=t} dt_r) S0 C_t + D x_t."""
    cum = torch.cumsum(dt * A, dim=1)  # [b, l, h]
    decay = torch.exp(cum[:, :, None] - cum[:, None, :])  # [b, t, s, h]
    causal = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril()[None, :, :, None]
    w = torch.einsum("bthn,bshn->btsh", C, B) * torch.where(causal, decay, 0.0) * dt[:, None]
    y = torch.einsum("btsh,bshp->bthp", w, x)
    y = y + torch.exp(cum)[..., None] * torch.einsum("bhpn,bthn->bthp", s0, C)
    return y + D[:, None] * x


SHAPES = [  # b, l, h, p, n, chunk
    (1, 8, 2, 4, 3, 4),
    (2, 13, 3, 4, 5, 4),  # l % chunk != 0
    (2, 5, 2, 3, 4, 8),  # l < chunk
    (1, 17, 4, 2, 6, 1),
    (3, 20, 1, 5, 2, 7),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_matches_sequential(shape, with_state):
    *dims, chunk = shape
    x, dt, A, B, C, D, s0 = ssd_inputs(*dims)
    s0 = s0 if with_state else None
    y, final = ssd_chunked_ref(x, dt, A, B, C, chunk, D=D, initial_state=s0)
    y_seq, final_seq = ssd_sequential_ref(x, dt, A, B, C, chunk, D=D, initial_state=s0)
    dy, ds = (y - y_seq).abs().max().item(), (final - final_seq).abs().max().item()
    print(f"{shape} state={with_state}: max |dy| {dy:.2e}, max |dstate| {ds:.2e}")
    assert y.shape == x.shape and final.shape == (dims[0], dims[2], dims[3], dims[4])
    assert dy < 1e-10 and ds < 1e-10


def test_sequential_matches_quadratic_form():
    x, dt, A, B, C, D, s0 = ssd_inputs(2, 9, 3, 4, 5)
    y, _ = ssd_sequential_ref(x, dt, A, B, C, D=D, initial_state=s0)
    diff = (y - ssd_quadratic(x, dt, A, B, C, D, s0)).abs().max().item()
    print(f"sequential vs quadratic form: max |dy| {diff:.2e}")
    assert diff < 1e-10


def test_chunked_prefill_then_steps_matches_sequential():
    x, dt, A, B, C, D, _ = ssd_inputs(2, 12, 3, 4, 5)
    y_full, final_full = ssd_sequential_ref(x, dt, A, B, C, D=D)
    y_pre, state = ssd_chunked_ref(x[:, :5], dt[:, :5], A, B[:, :5], C[:, :5], 4, D=D)
    ys = [y_pre]
    for t in range(5, 12):
        y, state = ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D)
        ys.append(y[:, None])
    dy = (torch.cat(ys, dim=1) - y_full).abs().max().item()
    ds = (state - final_full).abs().max().item()
    print(f"prefill + steps vs sequential: max |dy| {dy:.2e}, max |dstate| {ds:.2e}")
    assert dy < 1e-10 and ds < 1e-10


def test_ssd_scan_reference_expands_groups():
    x, dt, A, B, C, D, s0 = ssd_inputs(2, 10, 4, 3, 5, groups=2)
    y, final = ssd_scan(x, dt, A, B, C, 4, D=D, initial_state=s0, backend="torch")
    Bh, Ch = (t.repeat_interleave(2, dim=2) for t in (B, C))  # head i reads group i // 2
    y_seq, final_seq = ssd_sequential_ref(x, dt, A, Bh, Ch, D=D, initial_state=s0)
    diff = max((y - y_seq).abs().max().item(), (final - final_seq).abs().max().item())
    print(f"ssd_scan(groups=2) vs sequential: max diff {diff:.2e}")
    assert diff < 1e-10


def test_dispatch_logs_choice_once_and_rejects_bad_backends(caplog):
    x, dt, A, B, C, D, _ = ssd_inputs(1, 4, 2, 2, 2)
    dispatch._log_cached.cache_clear()
    with caplog.at_level(logging.INFO, logger="kernels.ssd"):
        ssd_scan(x, dt, A, B, C, 4)
        ssd_scan(x, dt, A, B, C, 4)
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["ssd_scan: PyTorch reference (tensors are on cpu)"]
    with pytest.raises(RuntimeError, match="mamba_backend='cuda'"):
        ssd_scan(x, dt, A, B, C, 4, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        ssd_scan(x, dt, A, B, C, 4, backend="bogus")


# -- causal conv ----------------------------------------------------------------------------------
def conv_loop(x, weight, bias, window):
    """out[:, :, t] = bias + sum_j weight[:, j] * in[:, :, t - (k-1) + j], one position at a time."""
    c, k = weight.shape
    full = torch.cat([window if window is not None else x.new_zeros(x.shape[0], c, k - 1), x], dim=-1)
    cols = [(full[:, :, t : t + k] * weight).sum(-1) + bias for t in range(x.shape[-1])]
    return torch.stack(cols, dim=-1)


@pytest.mark.parametrize("b, c, l, k", [(2, 5, 9, 4), (1, 3, 2, 4), (3, 8, 7, 2), (1, 4, 6, 3)])
@pytest.mark.parametrize("with_window", [False, True])
def test_conv_ref_matches_loop(b, c, l, k, with_window):
    x, weight, bias = torch.randn(b, c, l, dtype=F64), torch.randn(c, k, dtype=F64), torch.randn(c, dtype=F64)
    window = torch.randn(b, c, k - 1, dtype=F64) if with_window else None
    diff = (causal_conv1d_ref(x, weight, bias, window) - conv_loop(x, weight, bias, window)).abs().max().item()
    dispatched = causal_conv1d(x, weight, bias, window)
    print(f"conv b={b} c={c} l={l} k={k} window={with_window}: max diff {diff:.2e}")
    assert diff < 1e-12
    assert torch.equal(dispatched, causal_conv1d_ref(x, weight, bias, window))


def test_conv_steps_match_ref():
    b, c, l, k = 2, 6, 9, 4
    x, weight, bias = torch.randn(b, c, l, dtype=F64), torch.randn(c, k, dtype=F64), torch.randn(c, dtype=F64)
    window = torch.randn(b, c, k, dtype=F64)  # the last k inputs before x
    ref = causal_conv1d_ref(x, weight, bias, window[..., 1:])
    ys = []
    for t in range(l):
        y, window = causal_conv1d_step(window, x[:, :, t], weight, bias)
        ys.append(y)
    diff = (torch.stack(ys, dim=-1) - ref).abs().max().item()
    print(f"conv steps vs ref: max diff {diff:.2e}")
    assert diff < 1e-12
    assert torch.equal(window, x[..., -k:])


# -- kernels (GPU) --------------------------------------------------------------------------------
# Relative (norm) error against the float64 reference. float32 is loose because Triton's tl.dot runs
# float32 products in TF32 (~1e-3 seen on H100); bf16 inputs saw ~2.5e-3.
TOL = {torch.float32: 5e-3, torch.bfloat16: 2e-2}


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b, l, h, p, n, g, chunk", [(2, 100, 4, 16, 16, 2, 32), (1, 256, 8, 64, 64, 8, 64)])
def test_mamba_ssm_kernel_matches_reference(dtype, b, l, h, p, n, g, chunk):
    if importlib.util.find_spec("mamba_ssm") is None:
        pytest.skip("mamba_ssm is not installed")
    x, dt, A, B, C, D, s0 = ssd_inputs(b, l, h, p, n, groups=g, device="cuda", dtype=torch.float32)
    args = (x.to(dtype), dt, A, B.to(dtype), C.to(dtype), chunk)
    y, final = ssd_scan(*args, D=D, initial_state=s0, backend="cuda")
    y_ref, final_ref = ssd_scan(*(a.double() if torch.is_tensor(a) else a for a in args), D=D.double(),
                                initial_state=s0.double(), backend="torch")
    ey, es = rel_err(y, y_ref), rel_err(final, final_ref)
    print(f"{dtype} {(b, l, h, p, n, g, chunk)}: relative error y {ey:.2e}, final state {es:.2e}")
    assert ey < TOL[dtype] and es < TOL[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_window", [False, True])
def test_causal_conv1d_kernel_matches_reference(dtype, with_window):
    if importlib.util.find_spec("causal_conv1d") is None:
        pytest.skip("causal_conv1d is not installed")
    b, c, l, k = 2, 64, 37, 4
    x = torch.randn(b, l, c, device="cuda").to(dtype).transpose(1, 2)  # channel-last, as the mixer passes it
    weight, bias = torch.randn(c, k, device="cuda"), torch.randn(c, device="cuda")
    window = torch.randn(b, c, k - 1, device="cuda").to(dtype) if with_window else None
    out = causal_conv1d(x, weight, bias, window, backend="cuda")
    ref = causal_conv1d_ref(x.double(), weight.double(), bias.double(), None if window is None else window.double())
    err = rel_err(out, ref)
    print(f"causal_conv1d {dtype} window={with_window}: relative error {err:.2e}")
    assert err < TOL[dtype]
