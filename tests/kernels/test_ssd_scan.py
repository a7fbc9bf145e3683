"""Triton SSD scan (kernels.ssd_scan) against the float64 reference: y, the final state and the gradient of
every input, on fresh random inputs. On a CPU the kernels run under TRITON_INTERPRET=1 (tiny shapes; float32
and float16, since the interpreter's tl.dot mishandles bfloat16); the `gpu` tests run SmolLM2's Mamba2 shapes
(9 heads, head_dim 64, d_state 64, chunk 256, 2048 tokens) in bfloat16 and float32, and compare with
mamba_ssm's mamba_chunk_scan_combined where it imports."""
import logging
import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # read when the kernels are decorated, so before the import below
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernels import dispatch
from kernels import ssd_scan as triton_scan  # noqa: E402
from kernels.ssd import ssd_chunked_ref, ssd_scan  # noqa: E402
from kernels.ssd_scan import ssd_scan_triton  # noqa: E402

F64 = torch.float64
NAMES = ("x", "dt", "A", "B", "C", "D", "initial_state")
# Relative (norm) error against float64. float32 differs from float64 by rounding only (the kernels ask
# tl.dot for full float32 products, not TF32, which gave ~1.5e-3 on an H200); bfloat16/float16 products
# round the decayed operands (bfloat16 gave ~3e-3 on an H200 at SmolLM2's shapes).
TOL_CPU = {torch.float32: 1e-5, torch.float16: 5e-3}
TOL_GPU = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def scan_inputs(b, l, h, p, n, g, dtype, device="cpu", with_D=True, with_state=True, dt_scale=1.0):
    """x, dt, A, B, C, D, initial_state as leaves requiring grad; x, B, C in `dtype`, the rest float32.

    dt_scale sets how far a state reaches: with dt * |A| ~ 1 / chunk the state entering a chunk still
    weighs in at its end, so the state passing is tested, not drowned by decay."""
    kw = dict(device=device)
    tensors = (
        torch.randn(b, l, h, p, **kw).to(dtype),
        F.softplus(torch.randn(b, l, h, **kw) - 1.0) * dt_scale,  # > 0, mostly in (0.05, 1.5) * dt_scale
        -torch.exp(torch.rand(h, **kw)),  # in [-e, -1]
        torch.randn(b, l, g, n, **kw).to(dtype),
        torch.randn(b, l, g, n, **kw).to(dtype),
        torch.randn(h, **kw) if with_D else None,
        torch.randn(b, h, p, n, **kw) if with_state else None,
    )
    return [None if t is None else t.requires_grad_() for t in tensors]


def reference(x, dt, A, B, C, D, s0, chunk):
    """ssd_chunked_ref in float64, B and C repeated from groups to heads."""
    heads = x.shape[2]
    B, C = (t.repeat_interleave(heads // t.shape[2], dim=2) for t in (B, C))
    return ssd_chunked_ref(x, dt, A, B, C, chunk, D=D, initial_state=s0)


def check_against_reference(inputs, chunk, tol, use_final=True, scan=ssd_scan_triton):
    """Run `scan` and the float64 reference on the same inputs and upstream gradients; assert every
    relative error (y, final state, each input's gradient) is below tol, printing them first."""
    x, dt, A, B, C, D, s0 = inputs
    y, final = scan(x, dt, A, B, C, chunk, D=D, initial_state=s0)
    assert y.dtype == x.dtype and final.dtype == torch.float32
    assert y.shape == x.shape and final.shape == (x.shape[0], x.shape[2], x.shape[3], B.shape[3])
    dy, dfinal = torch.randn_like(y, dtype=F64), torch.randn_like(final, dtype=F64)
    leaves = [(name, t) for name, t in zip(NAMES, inputs) if t is not None]
    loss = (y.double() * dy).sum() + ((final.double() * dfinal).sum() if use_final else 0)
    grads = torch.autograd.grad(loss, [t for _, t in leaves])
    ref_leaves = [t.detach().double().requires_grad_() if t is not None else None for t in inputs]
    y_ref, final_ref = reference(*ref_leaves, chunk)
    loss_ref = (y_ref * dy).sum() + ((final_ref * dfinal).sum() if use_final else 0)
    ref_grads = torch.autograd.grad(loss_ref, [t for t in ref_leaves if t is not None])
    errors = {"y": rel_err(y, y_ref), "final_state": rel_err(final, final_ref)}
    errors.update({f"d{name}": rel_err(g, r) for (name, _), g, r in zip(leaves, grads, ref_grads)})
    print(" ".join(f"{k} {v:.1e}" for k, v in errors.items()),
          f"| max |dy| {(y.double() - y_ref).abs().max().item():.2e}")
    bad = {k: v for k, v in errors.items() if not v < tol}
    assert not bad, f"relative errors above {tol}: {bad}"


# -- CPU (Triton interpreter) ---------------------------------------------------------------------
CPU_CASES = [  # b, l, h, p, n, g, chunk, block_t
    (2, 37, 3, 8, 16, 3, 16, 16),  # l % chunk != 0, one block per chunk
    (2, 64, 3, 8, 16, 1, 32, 16),  # two blocks per chunk, all heads read one group of B and C
    (1, 5, 2, 8, 16, 2, 16, 16),  # l < chunk
]


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter test; the gpu tests cover CUDA")
@pytest.mark.parametrize("case", CPU_CASES)
@pytest.mark.parametrize("with_state", [True, False])
@pytest.mark.parametrize("with_D", [True, False])
def test_float32_matches_reference(case, with_state, with_D, monkeypatch):
    *dims, chunk, block_t = case
    monkeypatch.setattr(triton_scan, "BLOCK_T", block_t)
    inputs = scan_inputs(*dims, torch.float32, with_D=with_D, with_state=with_state, dt_scale=0.1)
    check_against_reference(inputs, chunk, TOL_CPU[torch.float32])


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter test; the gpu tests cover CUDA")
def test_float16_matches_reference_final_state_unused():
    inputs = scan_inputs(2, 37, 4, 8, 16, 4, torch.float16)  # g == h: dB, dC stored in float16 directly
    check_against_reference(inputs, 16, TOL_CPU[torch.float16], use_final=False)


def test_rejects_bad_chunk_size_and_shapes():
    x, dt, A, B, C, D, s0 = scan_inputs(1, 8, 2, 4, 4, 2, torch.float32)
    with pytest.raises(ValueError, match="chunk_size must be a power of two >= 16, got 24"):
        ssd_scan_triton(x, dt, A, B, C, 24)
    with pytest.raises(ValueError, match="g dividing h = 2"):
        ssd_scan_triton(x, dt, A, B[:, :, :1].expand(1, 8, 3, 4), C, 16)
    with pytest.raises(ValueError, match="initial_state must be"):
        ssd_scan_triton(x, dt, A, B, C, 16, initial_state=s0[:, :1])


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter test; the gpu tests cover CUDA")
def test_dispatch_triton_backend_runs_kernel_and_auto_stays_on_reference(caplog):
    inputs = scan_inputs(1, 20, 2, 8, 16, 1, torch.float32, dt_scale=0.1)
    dispatch._log_cached.cache_clear()
    with caplog.at_level(logging.INFO, logger="kernels.ssd"):
        check_against_reference(inputs, 16, TOL_CPU[torch.float32],
                                scan=lambda *a, **kw: ssd_scan(*a, **kw, backend="triton"))
        ssd_scan(*inputs[:5], 16, backend="auto")
    assert [r.getMessage() for r in caplog.records] == [
        "ssd_scan: Triton kernel kernels.ssd_scan.ssd_scan_triton",
        "ssd_scan: PyTorch reference (tensors are on cpu)",
    ]
    with pytest.raises(RuntimeError, match="backend='triton' but chunk_size 8 is not a power of two >= 16"):
        ssd_scan(*inputs[:5], 8, backend="triton")


# -- GPU ------------------------------------------------------------------------------------------
SMOLLM2 = (2, 2048, 9, 64, 64, 3, 256)  # b, l, h, p, n, g, chunk (3 groups: Llama's KV heads)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("l", [2048, 1000])
def test_gpu_smollm2_shapes_match_reference(dtype, l):
    b, _, h, p, n, g, chunk = SMOLLM2
    inputs = scan_inputs(b, l, h, p, n, g, dtype, device="cuda", dt_scale=0.01)
    check_against_reference(inputs, chunk, TOL_GPU[dtype])


@pytest.mark.gpu
def test_gpu_auto_dispatch_picks_triton(caplog):
    inputs = scan_inputs(1, 300, 4, 64, 64, 4, torch.bfloat16, device="cuda", dt_scale=0.05)
    dispatch._log_cached.cache_clear()
    with caplog.at_level(logging.INFO, logger="kernels.ssd"):
        check_against_reference(inputs, 64, TOL_GPU[torch.bfloat16],
                                scan=lambda *a, **kw: ssd_scan(*a, **kw, backend="auto"))
    assert "ssd_scan: Triton kernel kernels.ssd_scan.ssd_scan_triton" in [r.getMessage() for r in caplog.records]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_matches_mamba_ssm(dtype):
    from benchmarks.mamba_ssm_ssd import chunk_scan_combined

    mamba_chunk_scan_combined = chunk_scan_combined()
    if mamba_chunk_scan_combined is None:
        pytest.skip("mamba_ssm is not installed and $MAMBA_SSM_SRC is unset")

    b, l, h, p, n, g, chunk = SMOLLM2
    inputs = scan_inputs(b, l, h, p, n, g, dtype, device="cuda", dt_scale=0.01)
    x, dt, A, B, C, D, s0 = inputs
    ours = ssd_scan_triton(x, dt, A, B, C, chunk, D=D, initial_state=s0)
    theirs = mamba_chunk_scan_combined(x, dt, A, B, C, chunk, D=D, initial_states=s0, return_final_states=True)
    errors = [rel_err(a, b) for a, b in zip(ours, theirs)]
    print(f"{dtype}: ours vs mamba_ssm relative difference y {errors[0]:.1e}, final state {errors[1]:.1e}")
    assert max(errors) < {torch.float32: 5e-3, torch.bfloat16: 3e-2}[dtype]  # mamba_ssm runs float32 as TF32
