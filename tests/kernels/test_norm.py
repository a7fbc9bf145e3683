"""Gated RMSNorm (kernels.norm): the Triton kernels against the float64 reference, output and the gradients of
y, z and weight on fresh random inputs; on a CPU under TRITON_INTERPRET=1 (tiny shapes, float32), on the GPU
(`gpu`) at SmolLM2's Mamba2 shape in bfloat16 and float32. Also: the custom-op registration (opcheck), the
dispatch, and that the reference is the formula of the module docstring."""
import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # read when the kernels are decorated, so before the import below
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernels import norm  # noqa: E402
from kernels.norm import gated_rms_norm, gated_rms_norm_ref, gated_rms_norm_triton  # noqa: E402

F64 = torch.float64
EPS = 1e-5
# Relative (norm) error against float64: float32 differs by rounding only; bfloat16 rounds inputs and output.
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def inputs(shape, dim, dtype, device="cpu", z_slice=False):
    """y, z [*shape, dim] in dtype (z a strided slice of a wider tensor when z_slice), weight [dim] float32,
    all leaves requiring grad."""
    y = torch.randn(*shape, dim, device=device).to(dtype).requires_grad_()
    if z_slice:
        wide = (torch.randn(*shape, dim + 7, device=device) * 2).to(dtype).requires_grad_()
        z = wide[..., 3 : 3 + dim]
    else:
        wide = z = (torch.randn(*shape, dim, device=device) * 2).to(dtype).requires_grad_()
    weight = (1 + 0.3 * torch.randn(dim, device=device)).requires_grad_()
    return y, z, weight, wide


def check(shape, dim, group_size, dtype, device="cpu", z_slice=False):
    """Output and gradients of the kernel == the float64 reference on the same inputs, within TOL[dtype]."""
    y, z, weight, z_leaf = inputs(shape, dim, dtype, device, z_slice)
    out = gated_rms_norm_triton(y, z, weight, group_size, EPS)
    assert out.dtype == dtype and out.shape == y.shape
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, [y, z, weight], dout)
    leaves64 = [t.detach().double().requires_grad_() for t in (y, z, weight)]
    out64 = gated_rms_norm_ref(*leaves64, group_size, EPS)
    grads64 = torch.autograd.grad(out64, leaves64, dout.double())
    errors = {"out": rel_err(out, out64)} | {f"d{n}": rel_err(g, g64) for n, g, g64 in zip("yzw", grads, grads64)}
    print(f"{dtype} {shape} dim {dim} group {group_size}: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    assert max(errors.values()) < TOL[dtype], errors
    assert grads[0].dtype == dtype and grads[1].dtype == dtype and grads[2].dtype == weight.dtype


@pytest.mark.parametrize("shape, dim, group_size, z_slice", [
    ((2, 9), 48, 16, False),        # rows fewer than one tile
    ((3, 200), 40, 8, True),        # several programs along the rows; z a strided slice of in_proj's output
    ((1, 5), 24, 24, False),        # one group over the whole row, not a power of two
    ((530,), 36, 12, True),         # 2-d input, groups not a power of two
])
def test_kernel_matches_float64_reference(shape, dim, group_size, z_slice):
    check(shape, dim, group_size, torch.float32, z_slice=z_slice)


def test_reference_is_the_documented_formula():
    """rstd per group, RMSNorm(y * silu(z)) * weight, written out group by group in float64."""
    y, z, weight = torch.randn(2, 3, 12, dtype=F64), torch.randn(2, 3, 12, dtype=F64), torch.randn(12, dtype=F64)
    expected = []
    for j in range(3):
        g = y[..., 4 * j : 4 * j + 4] * F.silu(z[..., 4 * j : 4 * j + 4])
        expected.append(g / torch.sqrt(g.pow(2).mean(-1, keepdim=True) + EPS) * weight[4 * j : 4 * j + 4])
    torch.testing.assert_close(gated_rms_norm_ref(y, z, weight, 4, EPS), torch.cat(expected, dim=-1))


def test_custom_ops_pass_opcheck():
    """The registered fake (shapes, strides, dtypes), autograd and schema agree with the kernel's real results."""
    y, z, weight, _ = inputs((80,), 32, torch.float32, z_slice=True)
    torch.library.opcheck(torch.ops.zebra.gated_rms_norm_fwd.default, (y, z, weight, 16, EPS))
    out, rstd = torch.ops.zebra.gated_rms_norm_fwd(y, z, weight, 16, EPS)
    args = (torch.randn_like(out), y.detach(), z.detach(), weight.detach(), rstd, 16)
    torch.library.opcheck(torch.ops.zebra.gated_rms_norm_bwd.default, args,
                          test_utils=("test_schema", "test_faketensor"))


def test_dispatch():
    y, z, weight, _ = inputs((2, 3), 8, torch.float32)
    assert torch.equal(gated_rms_norm(y, z, weight, 4, EPS, "torch"), gated_rms_norm_ref(y, z, weight, 4, EPS))
    assert torch.equal(gated_rms_norm(y, z, weight, 4, EPS, "auto"), gated_rms_norm_ref(y, z, weight, 4, EPS))
    torch.testing.assert_close(gated_rms_norm(y, z, weight, 4, EPS, "triton"), gated_rms_norm_ref(y, z, weight, 4, EPS))
    with pytest.raises(ValueError, match="backend"):
        gated_rms_norm(y, z, weight, 4, EPS, "fast")
    with pytest.raises(ValueError, match="group_size"):
        gated_rms_norm_triton(y, z, weight, 3, EPS)
    with pytest.raises(RuntimeError, match="float64"):
        gated_rms_norm(y.double(), z.double(), weight, 4, EPS, "triton")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernel_matches_reference_on_gpu(dtype):
    """SmolLM2's Mamba2 norm: 9 heads of 64 channels, z a slice of in_proj's output, 4 x 2048 tokens."""
    torch.manual_seed(0)
    check((4, 2048), 576, 64, dtype, device="cuda", z_slice=True)
