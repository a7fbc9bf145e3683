"""Gated RMSNorm (kernels.norm): the Triton kernels against the float64 reference, output and the gradients of
y, z and weight on fresh random inputs; on a CPU under TRITON_INTERPRET=1 (tiny shapes, float32), on the GPU
(`gpu`) at SmolLM2's Mamba2 shape in bfloat16 and float32. Also: the custom-op registration (opcheck), the
dispatch, and that the reference is the formula of the module docstring.

Plain RMSNorm (kernels.norm.rms_norm, the decoder layers' norms) likewise: kernel output and the gradients of x
and weight against the float64 formula (float32 and bfloat16 inputs, dims a power of two or not, rows not a
multiple of the tile), `rms_norm_ref` == transformers' LlamaRMSNorm exactly, opcheck, dispatch and its errors;
on the GPU (`gpu`) at SmolLM2's shape, 32768 x 576."""
import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # read when the kernels are decorated, so before the import below
    os.environ.setdefault("TRITON_INTERPRET", "1")

from transformers.models.llama.modeling_llama import LlamaRMSNorm  # noqa: E402

from kernels.norm import gated_rms_norm, gated_rms_norm_ref, gated_rms_norm_triton  # noqa: E402
from kernels.norm import rms_norm, rms_norm_ref, rms_norm_triton  # noqa: E402

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


# -- plain RMSNorm --------------------------------------------------------------------------------------
def rms_norm_64(x, weight):
    """x * rsqrt(mean(x^2) + eps) * weight, all in float64 (no intermediate cast)."""
    x = x.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * weight.double()


def rms_inputs(shape, dim, dtype, weight_dtype, device="cpu", strided=False):
    """x [*shape, dim] in dtype (a strided slice of a wider leaf when strided), weight [dim] in weight_dtype; the
    leaves (x's, weight) require grad."""
    wide = (torch.randn(*shape, dim + 5 * strided, device=device) * 3 + 0.5).to(dtype).requires_grad_()
    x = wide[..., 2 : 2 + dim] if strided else wide
    weight = (1 + 0.3 * torch.randn(dim, device=device)).to(weight_dtype).requires_grad_()
    return x, weight


def check_rms(shape, dim, dtype, weight_dtype=torch.float32, device="cpu", strided=False):
    """Kernel output and gradients == the float64 formula on the same inputs within TOL[dtype]; dtypes as the
    reference's (output promote_types(x, weight), gradients those of x and weight)."""
    x, weight = rms_inputs(shape, dim, dtype, weight_dtype, device, strided)
    out = rms_norm_triton(x, weight, EPS)
    ref = rms_norm_ref(x.detach(), weight.detach(), EPS)
    assert out.dtype == ref.dtype == torch.promote_types(dtype, weight_dtype) and out.shape == x.shape
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, weight], dout)
    leaves64 = [t.detach().double().requires_grad_() for t in (x, weight)]
    out64 = rms_norm_64(*leaves64)
    grads64 = torch.autograd.grad(out64, leaves64, dout.double())
    errors = {"out": rel_err(out, out64), "out vs rms_norm_ref": rel_err(out, ref)}
    errors |= {f"d{n}": rel_err(g, g64) for n, g, g64 in zip("xw", grads, grads64)}
    print(f"rms_norm {dtype} weight {weight_dtype} {shape} dim {dim}: "
          + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    assert max(errors.values()) < TOL[dtype], errors
    assert grads[0].dtype == dtype and grads[1].dtype == weight_dtype


@pytest.mark.parametrize("shape, dim, dtype, weight_dtype, strided", [
    ((2, 9), 72, torch.float32, torch.float32, False),     # rows fewer than one tile, dim not a power of two
    ((530,), 96, torch.float32, torch.float32, True),      # two backward programs, 530 not a multiple of 32 rows
    ((3, 7), 64, torch.bfloat16, torch.float32, False),    # dim a power of two; output float32 as LlamaRMSNorm's
    ((2, 45), 72, torch.bfloat16, torch.bfloat16, True),   # a bfloat16 model: output bfloat16
])
def test_rms_kernel_matches_float64_reference(shape, dim, dtype, weight_dtype, strided):
    check_rms(shape, dim, dtype, weight_dtype, strided=strided)


def test_rms_kernel_casts_normed_x_to_input_dtype_before_weight():
    """LlamaRMSNorm's order: weight * (normed x).to(bfloat16) with a float32 weight gives float32 values that are
    bfloat16 numbers times the weight. With power-of-two weights the product is exact, so out / weight must be
    bfloat16 numbers (almost never true without the cast), each within one bfloat16 step of the reference's. (The
    Triton interpreter rounds float32 -> bfloat16 toward zero, the GPU to nearest even, so not bit for bit here.)"""
    x = (torch.randn(37, 72) * 3).bfloat16()
    weight = 2.0 ** torch.randint(-2, 3, (72,)).float()
    out = rms_norm_triton(x, weight, EPS)
    ref = rms_norm_ref(x, weight, EPS)
    normed = out / weight
    assert out.dtype == torch.float32 and torch.equal(normed.bfloat16().float(), normed)
    assert ((out - ref).abs() <= ref.abs() * 2.0**-7).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_reference_is_llama_rms_norm(dtype):
    """Bit for bit LlamaRMSNorm's forward (float32 weight, as trained), output dtype included."""
    llama = LlamaRMSNorm(40, eps=EPS)
    with torch.no_grad():
        llama.weight.copy_(1 + 0.3 * torch.randn(40))
    x = (torch.randn(3, 5, 40) * 4).to(dtype)
    expected = llama(x)
    ours = rms_norm_ref(x, llama.weight, EPS)
    assert ours.dtype == expected.dtype and torch.equal(ours, expected)
    assert torch.equal(rms_norm(x, llama.weight, EPS, "auto"), expected)  # the CPU path


def test_rms_custom_ops_pass_opcheck():
    x, weight = rms_inputs((70,), 24, torch.float32, torch.float32, strided=True)
    torch.library.opcheck(torch.ops.zebra.rms_norm_fwd.default, (x, weight, EPS))
    out, rstd = torch.ops.zebra.rms_norm_fwd(x, weight, EPS)
    args = (torch.randn_like(out), x.detach(), weight.detach(), rstd)
    torch.library.opcheck(torch.ops.zebra.rms_norm_bwd.default, args, test_utils=("test_schema", "test_faketensor"))


def test_rms_dispatch():
    x, weight = rms_inputs((2, 3), 8, torch.float32, torch.float32)
    ref = rms_norm_ref(x, weight, EPS)
    assert torch.equal(rms_norm(x, weight, EPS, "torch"), ref)
    assert torch.equal(rms_norm(x, weight, EPS, "cuda"), ref)  # no CUDA tensors: the reference
    torch.testing.assert_close(rms_norm(x, weight, EPS, "triton"), ref)
    with pytest.raises(ValueError, match="backend must be one of .* got 'fast'"):
        rms_norm(x, weight, EPS, "fast")
    with pytest.raises(ValueError, match=r"weight \(7,\)"):
        rms_norm_triton(x, weight[:7], EPS)
    with pytest.raises(RuntimeError, match="float64"):
        rms_norm(x.double(), weight, EPS, "triton")
    with pytest.raises(RuntimeError, match="weight dtype torch.float64"):
        rms_norm(x, weight.double(), EPS, "triton")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rms_kernel_matches_reference_on_gpu(dtype):
    """SmolLM2's decoder norm over 16 x 2048 tokens (32768 x 576), float32 weight: x bfloat16 (a bf16 model's
    activations) and float32 (the residual stream under autocast)."""
    torch.manual_seed(0)
    check_rms((16, 2048), 576, dtype, device="cuda")
    x, weight = rms_inputs((16, 2048), 576, dtype, torch.float32, device="cuda")
    with torch.no_grad():
        out, ref = rms_norm_triton(x, weight, EPS), rms_norm_ref(x, weight, EPS)
        llama = LlamaRMSNorm(576, eps=EPS).cuda()
        llama.weight.copy_(weight)
        assert torch.equal(ref, llama(x))
    if dtype == torch.float32:  # rstd differs from torch's by a few ulp at most
        assert rel_err(out, ref) < 1e-6
    else:  # same rounding of the normed x to bfloat16: equal but where a few-ulp rstd difference flips it
        same = (out == ref).float().mean().item()
        print(f"rms_norm {dtype}: {same:.5f} of the outputs equal rms_norm_ref's")
        assert same > 0.99


def ops_in_compiled_graph(fn, *args) -> set[str]:
    """The zebra custom ops in the FX graph torch.compile traces for fn(*args)."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    out = torch.compile(fn, backend=record, fullgraph=True)(*args)
    assert len(graphs) == 1
    return out, {str(n.target) for n in graphs[0].graph.nodes if "zebra" in str(n.target)}


@pytest.mark.parametrize("formula", [True, False])
def test_norms_under_compile_take_the_fusable_formula_unless_told(monkeypatch, formula):
    """Under torch.compile, backends "auto" and "cuda" trace the PyTorch formula (inductor fuses it) when
    FORMULA_UNDER_COMPILE, the kernel's op otherwise; "triton" always the op. The device check is made to pass,
    as on a GPU; the result equals the eager reference either way."""
    import kernels.norm as norm

    monkeypatch.setattr(norm, "FORMULA_UNDER_COMPILE", formula)
    monkeypatch.setattr(norm, "device_reason", lambda t, backend: None)
    x, w = torch.randn(3, 5, 32), torch.rand(32) + 0.5
    y, z = torch.randn(3, 5, 32), torch.randn(3, 5, 32)
    for backend in ("auto", "cuda", "triton"):
        out, ops = ops_in_compiled_graph(lambda a, b: rms_norm(a, b, EPS, backend), x, w)
        assert bool(ops) == (backend == "triton" or not formula), (backend, ops)
        torch.testing.assert_close(out, rms_norm_ref(x, w, EPS), rtol=1e-5, atol=1e-5)
        out, ops = ops_in_compiled_graph(lambda a, b, c: gated_rms_norm(a, b, c, 8, EPS, backend), y, z, w)
        assert bool(ops) == (backend == "triton" or not formula), (backend, ops)
        torch.testing.assert_close(out, gated_rms_norm_ref(y, z, w, 8, EPS), rtol=1e-5, atol=1e-5)
