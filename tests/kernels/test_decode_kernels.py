"""Decode kernels against float64 references on fresh random inputs: MLA absorbed decode attention
(the reference itself against SDPA over explicit [latent | rope] keys) and the Mamba2 one-token step
(steps against the causal conv + SSD scan of the same tokens). On a CPU the kernels run under
TRITON_INTERPRET=1 (tiny shapes); the `gpu` tests use SmolLM2 shapes (batch 64, 16k context)."""
import logging
import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # read when the kernels are decorated, so before the import below
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernels import dispatch
from kernels.decode import (  # noqa: E402
    mamba2_decode,
    mamba2_decode_step,
    mamba2_decode_step_ref,
    mla_decode,
    mla_decode_attention,
    mla_decode_attention_ref,
)
from kernels.ssd import causal_conv1d_ref, ssd_sequential_ref  # noqa: E402

F64 = torch.float64
# Tiny shapes run on CUDA where there is one, else on the CPU under the interpreter.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}  # relative (norm) error


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


# -- MLA decode attention -------------------------------------------------------------------------
def mla_inputs(b, h, r, dr, t, dtype, device, full=False):
    """q_latent, q_pe, latent, k_pe, lengths, starts: valid spans [start, length) of random sizes."""
    q, qpe = torch.randn(b, h, r, device=device), torch.randn(b, h, dr, device=device)
    lat, kpe = torch.randn(b, t, r, device=device), torch.randn(b, t, dr, device=device)
    lengths = torch.full((b,), t, device=device) if full else torch.randint(1, t + 1, (b,), device=device)
    starts = (torch.rand(b, device=device) * 0.3 * lengths).long()
    return (*(x.to(dtype) for x in (q, qpe, lat, kpe)), lengths, starts)


def check_mla(b, h, r, dr, t, dtype, device, **kwargs):
    q, qpe, lat, kpe, lengths, starts = mla_inputs(b, h, r, dr, t, dtype, device)
    scale = (r + dr) ** -0.5
    out = mla_decode_attention(q, qpe, lat, kpe, lengths, scale, starts=starts, **kwargs)
    ref = mla_decode_attention_ref(q.double(), qpe.double(), lat.double(), kpe.double(), lengths, scale, starts)
    err = rel_err(out, ref)
    print(f"mla_decode b={b} h={h} r={r} dr={dr} T={t} {dtype} {kwargs}: relative error {err:.1e}")
    assert out.shape == (b, h, r) and out.dtype == dtype
    return err


@pytest.mark.parametrize("b, h, r, dr, t, splits", [(3, 5, 24, 8, 150, 1), (2, 9, 32, 16, 150, 3),
                                                    (1, 17, 16, 8, 40, None), (2, 2, 16, 16, 7, 4)])
def test_mla_kernel_matches_reference_small(b, h, r, dr, t, splits):
    assert check_mla(b, h, r, dr, t, torch.float32, DEVICE, num_splits=splits, block_t=16) < TOL[torch.float32]


def test_mla_kernel_low_precision_small():
    # float16: the Triton 3.9 interpreter's tl.dot returns garbage for bfloat16 (the GPU test covers it).
    assert check_mla(2, 9, 32, 16, 70, torch.float16, DEVICE, num_splits=2, block_t=16) < TOL[torch.float16]


def test_mla_kernel_gives_zeros_for_rows_without_tokens_small():
    q, qpe, lat, kpe, _, _ = mla_inputs(2, 3, 16, 16, 20, torch.float32, DEVICE)
    lengths, starts = torch.tensor([0, 20], device=DEVICE), torch.tensor([0, 20], device=DEVICE)
    out = mla_decode_attention(q, qpe, lat, kpe, lengths, 0.1, starts=starts, num_splits=2, block_t=16)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(mla_decode_attention_ref(q, qpe, lat, kpe, lengths, 0.1, starts), torch.zeros_like(out))


def test_mla_reference_matches_sdpa_over_explicit_keys():
    """[q_latent | q_pe] against keys [latent | k_pe] and values latent: plain attention, as the absorbed path is."""
    q, qpe, lat, kpe, lengths, starts = mla_inputs(3, 4, 12, 6, 30, F64, "cpu")
    scale = 0.2
    valid = (torch.arange(30) < lengths[:, None]) & (torch.arange(30) >= starts[:, None])
    sdpa = F.scaled_dot_product_attention(torch.cat([q, qpe], -1)[:, :, None], torch.cat([lat, kpe], -1)[:, None],
                                          lat[:, None], attn_mask=valid[:, None, None], scale=scale)[:, :, 0]
    diff = (mla_decode_attention_ref(q, qpe, lat, kpe, lengths, scale, starts) - sdpa).abs().max().item()
    print(f"mla_decode_attention_ref vs SDPA: max diff {diff:.1e}")
    assert diff < 1e-12


def test_mla_checks_shapes_and_dispatch(caplog):
    q, qpe, lat, kpe, lengths, _ = mla_inputs(2, 3, 8, 4, 10, torch.float32, "cpu")
    with pytest.raises(ValueError, match="k_pe has shape"):
        mla_decode(q, qpe, lat, kpe[:, :5], lengths, 0.1)
    with pytest.raises(ValueError, match="lengths must be an integer tensor"):
        mla_decode(q, qpe, lat, kpe, lengths.float(), 0.1)
    dispatch._log_cached.cache_clear()
    with caplog.at_level(logging.INFO, logger="kernels.decode"):
        out = mla_decode(q, qpe, lat, kpe, lengths, 0.1)
        mla_decode(q, qpe, lat, kpe, lengths, 0.1)
    assert [r.getMessage() for r in caplog.records] == ["mla_decode: PyTorch reference (tensors are on cpu)"]
    assert torch.equal(out, mla_decode_attention_ref(q, qpe, lat, kpe, lengths, 0.1))
    with pytest.raises(RuntimeError, match="backend='triton' but tensors are on cpu"):
        mla_decode(q, qpe, lat, kpe, lengths, 0.1, backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_mla_kernel_matches_reference_gpu(dtype):
    """SmolLM2 MLA shapes: 9 heads, kv_rank 128, rope 32; batch 64 over a 16k context."""
    assert check_mla(64, 9, 128, 32, 16384, dtype, "cuda") < TOL[dtype]


@pytest.mark.gpu
def test_mla_dispatch_uses_triton_on_cuda(caplog):
    q, qpe, lat, kpe, lengths, starts = mla_inputs(2, 9, 128, 32, 1000, torch.bfloat16, "cuda")
    dispatch._log_cached.cache_clear()
    with caplog.at_level(logging.INFO, logger="kernels.decode"):
        out = mla_decode(q, qpe, lat, kpe, lengths, 0.1, starts)
    assert [r.getMessage() for r in caplog.records] == ["mla_decode: Triton kernel"]
    assert torch.equal(out, mla_decode_attention(q, qpe, lat, kpe, lengths, 0.1, starts=starts))


# -- Mamba2 decode step ---------------------------------------------------------------------------
def mamba_inputs(b, heads, groups, p, n, k, dtype, device):
    """xbc [b, steps=5, conv_dim] (x | B | C), raw dt [b, 5, heads], window, float32 state and the parameters."""
    conv_dim = groups * (p + n) + heads * n
    return dict(
        xbc=torch.randn(b, 5, 8 + conv_dim, device=device).to(dtype)[..., 8:],  # a slice of in_proj's output
        dt=torch.randn(b, 5, heads, device=device) - 2.0,
        conv_window=torch.randn(b, conv_dim, k, device=device).to(dtype),
        ssm_state=torch.randn(b, heads, p, n, device=device),
        conv_weight=torch.randn(conv_dim, k, device=device) / k**0.5,
        conv_bias=torch.randn(conv_dim, device=device),
        A=-torch.exp(torch.rand(heads, device=device)),
        D=torch.randn(heads, device=device),
        dt_bias=torch.randn(heads, device=device) * 0.5,
    )


def run_steps(step, inputs, steps):
    """`steps` decode steps on copies of the state; returns ys [b, steps, heads, p], window, state."""
    inputs = {name: t.clone() if name in ("conv_window", "ssm_state") else t for name, t in inputs.items()}
    xbc, dt = inputs.pop("xbc"), inputs.pop("dt")
    ys = [step(xbc[:, i], dt[:, i], **inputs, dt_softplus=True) for i in range(steps)]
    return torch.stack(ys, dim=1), inputs["conv_window"], inputs["ssm_state"]


def scan_reference(inputs, groups):
    """The same tokens through the sequence path in float64: causal conv + SiLU, then the SSD recurrence."""
    i = {name: t.double() for name, t in inputs.items()}
    b, heads, p, n = i["ssm_state"].shape
    conv = F.silu(causal_conv1d_ref(i["xbc"].transpose(1, 2), i["conv_weight"], i["conv_bias"],
                                    i["conv_window"][..., 1:])).transpose(1, 2)
    x, B, C = conv.split([groups * p, groups * n, heads * n], dim=-1)
    x = x.unflatten(-1, (groups, p)).repeat_interleave(heads // groups, dim=2)
    B = B.unflatten(-1, (groups, n)).repeat_interleave(heads // groups, dim=2)
    dt = F.softplus(i["dt"] + i["dt_bias"])
    y, state = ssd_sequential_ref(x, dt, i["A"], B, C.unflatten(-1, (heads, n)), D=i["D"],
                                  initial_state=i["ssm_state"])
    window = torch.cat([i["conv_window"], i["xbc"].transpose(1, 2)], dim=-1)[..., -i["conv_window"].shape[-1]:]
    return y, window, state


def check_mamba(b, heads, groups, p, n, k, dtype, device):
    """Five kernel steps against the scan of the same five tokens; returns the worst relative error."""
    inputs = mamba_inputs(b, heads, groups, p, n, k, dtype, device)
    y, window, state = run_steps(mamba2_decode_step, inputs, 5)
    y_ref, window_ref, state_ref = scan_reference(inputs, groups)
    errors = {"y": rel_err(y, y_ref), "window": rel_err(window, window_ref), "state": rel_err(state, state_ref)}
    print(f"mamba2_decode b={b} heads={heads} groups={groups} P={p} N={n} k={k} {dtype}: "
          + ", ".join(f"{name} {e:.1e}" for name, e in errors.items()))
    assert y.dtype == dtype and state.dtype == torch.float32 and window.dtype == dtype
    return max(errors.values())


@pytest.mark.parametrize("b, heads, groups, p, n, k", [(2, 4, 2, 8, 6, 4), (1, 3, 3, 4, 16, 3), (2, 6, 1, 5, 4, 2)])
def test_mamba2_steps_match_scan_small(b, heads, groups, p, n, k):
    assert check_mamba(b, heads, groups, p, n, k, torch.float32, DEVICE) < TOL[torch.float32]


def test_mamba2_step_low_precision_small():
    assert check_mamba(2, 4, 2, 8, 6, 4, torch.bfloat16, DEVICE) < TOL[torch.bfloat16]


def test_mamba2_reference_steps_match_scan():
    inputs = {name: t.double() for name, t in mamba_inputs(2, 4, 2, 3, 5, 4, F64, "cpu").items()}
    ref = run_steps(mamba2_decode_step_ref, inputs, 5)
    diff = max((a - b).abs().max().item() for a, b in zip(ref, scan_reference(inputs, 2)))
    print(f"mamba2_decode_step_ref x5 vs scan: max diff {diff:.1e}")
    assert diff < 1e-12


def test_mamba2_checks_shapes_and_dispatch(caplog):
    inputs = mamba_inputs(2, 4, 2, 3, 5, 4, torch.float32, "cpu")
    xbc, dt = inputs.pop("xbc")[:, 0], inputs.pop("dt")[:, 0]
    with pytest.raises(ValueError, match="dt has shape"):
        mamba2_decode(xbc, dt[:, :3], **inputs)
    dispatch._log_cached.cache_clear()
    with caplog.at_level(logging.INFO, logger="kernels.decode"):
        mamba2_decode(xbc, dt, **inputs)
    assert [r.getMessage() for r in caplog.records] == ["mamba2_decode: PyTorch reference (tensors are on cpu)"]
    with pytest.raises(ValueError, match="backend must be one of"):
        mamba2_decode(xbc, dt, **inputs, backend="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_mamba2_step_matches_scan_gpu(dtype):
    """SmolLM2 Mamba2 shapes: 9 heads, 3 groups, head_dim 64, state 64, d_conv 4; batch 64."""
    assert check_mamba(64, 9, 3, 64, 64, 4, dtype, "cuda") < TOL[dtype]
