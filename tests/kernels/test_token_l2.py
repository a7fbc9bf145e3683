"""Per-token L2 distance (kernels.token_l2, the ILD loss's term): the Triton kernels against the float64 formula,
the norms and the gradients of both inputs on fresh random inputs (a row with zero distance included, rows that
are strided slices, dims a power of two or not); on a CPU under TRITON_INTERPRET=1 (float32), on the GPU (`gpu`)
at SmolLM2's ILD shape in bfloat16 and float32. Also: opcheck of the custom ops, the eager twin equal to the ops,
and zebra.losses.ild_loss's dispatch (kernel == formula; "auto" is the formula)."""
import os

import pytest
import torch

if not torch.cuda.is_available():  # read when the kernels are decorated, so before the import below
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernels.token_l2 import token_l2_ref, token_l2_triton, unsupported  # noqa: E402
from zebra.losses import ild_loss  # noqa: E402

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def inputs(rows, dim, dtype, device="cpu", strided=False):
    """student, teacher [*rows, dim] in dtype, leaves requiring grad (the student a strided slice of a wider leaf
    when strided); the first row's student equals its teacher (distance 0: the gradient there must be 0)."""
    wide = torch.randn(*rows, dim + 3 * strided, device=device).to(dtype)
    teacher = (wide[..., :dim] + 0.5 * torch.randn(*rows, dim, device=device).to(dtype)).detach()
    wide.view(-1, wide.shape[-1])[0, :dim] = teacher.reshape(-1, dim)[0]
    wide.requires_grad_()
    teacher.requires_grad_()
    student = wide[..., 1 : 1 + dim] if strided else wide
    if strided:
        with torch.no_grad():  # the zero-distance row, for the slice
            wide.view(-1, wide.shape[-1])[0, 1 : 1 + dim] = teacher.reshape(-1, dim)[0]
    return student, teacher, wide


def check(rows, dim, dtype, device="cpu", strided=False):
    student, teacher, leaf = inputs(rows, dim, dtype, device, strided)
    norm = token_l2_triton(student, teacher)
    assert norm.dtype == torch.float32 and norm.shape == student.shape[:-1]
    dnorm = torch.randn_like(norm)
    ds, dt = torch.autograd.grad(norm, [student, teacher], dnorm)
    s64, t64 = (x.detach().double().requires_grad_() for x in (student, teacher))
    d = s64 - t64
    norm64 = d.pow(2).sum(-1).sqrt()  # the formula, without vector_norm
    ds64 = torch.where(norm64[..., None] > 0, d / norm64[..., None].clamp(min=1e-300), 0.0) * dnorm.double()[..., None]
    errors = {"norm": rel_err(norm, norm64), "dstudent": rel_err(ds, ds64), "dteacher": rel_err(dt, -ds64)}
    print(f"{dtype} {rows} dim {dim} strided {strided}: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    assert max(errors.values()) < TOL[dtype], errors
    assert norm.reshape(-1)[0] == 0 and not ds.reshape(-1, dim)[0].any()  # zero distance: zero gradient
    assert ds.dtype == dtype and dt.dtype == dtype


@pytest.mark.parametrize("rows, dim, strided", [
    ((2, 9), 48, False),     # rows fewer than one tile
    ((3, 70), 40, True),     # several programs; the student a strided slice
    ((150,), 576, False),    # SmolLM2's d_model, not a power of two
    ((5,), 1024, True),      # one row a tile
])
def test_kernel_matches_float64_formula(rows, dim, strided):
    check(rows, dim, torch.float32, strided=strided)


def test_reference_is_the_formula_of_the_loss_before_the_kernel():
    """token_l2_ref on bfloat16 inputs is exactly what zebra.losses computed before (float32 norm of the difference)."""
    s, t = torch.randn(4, 7, 24).bfloat16(), torch.randn(4, 7, 24).bfloat16()
    assert torch.equal(token_l2_ref(s, t), torch.linalg.vector_norm(s.float() - t.float(), dim=-1))
    assert token_l2_ref(s.double(), t.double()).dtype == torch.float64


def test_custom_ops_pass_opcheck():
    student, teacher, _ = inputs((40,), 24, torch.float32)
    args = (student.detach().requires_grad_(), teacher.detach().requires_grad_())
    torch.library.opcheck(torch.ops.zebra.token_l2_fwd.default, args)
    norm, inv = torch.ops.zebra.token_l2_fwd(*(a.detach() for a in args))
    torch.library.opcheck(torch.ops.zebra.token_l2_bwd.default, (torch.randn_like(norm), *(a.detach() for a in args), inv),
                          test_utils=("test_schema", "test_faketensor"))


def test_ild_loss_dispatch():
    """The kernel ("triton") and the formula ("torch") give the same loss and student gradient; "auto" is the
    formula (on CUDA too: it measured faster); errors name the bad backend and a kernel that cannot run."""
    student, teacher, _ = inputs((2, 33), 40, torch.float32)
    mixer_s, mixer_t, _ = inputs((2, 33), 40, torch.float32)
    results = {}
    for backend in ("triton", "torch", "auto"):
        loss = ild_loss(student, teacher.detach(), mixer_s, mixer_t.detach(), backend=backend)
        results[backend] = (loss, *torch.autograd.grad(loss, [student, mixer_s]))
    for got, want in zip(results["triton"], results["torch"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(results["auto"], results["torch"]))
    with pytest.raises(ValueError, match="backend"):
        ild_loss(student, teacher, backend="fast")
    with pytest.raises(RuntimeError, match="float64"):
        ild_loss(student.double(), teacher.double(), backend="triton")
    assert unsupported(student, teacher, "auto") == "tensors are on cpu"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernel_matches_formula_on_gpu(dtype):
    """The ILD step's shape: 16 x 2048 tokens of SmolLM2's d_model 576."""
    check((16, 2048), 576, dtype, device="cuda")
