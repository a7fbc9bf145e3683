"""The eager path of the Triton kernels (kernels._eager.op_or_impl): in eager mode the gated RMSNorm, the RMSNorm,
the causal conv1d, the SSD scan and the ILD loss's per-token L2 distance call their launchers directly, not through their torch.library custom ops (which
cost host time per call), and give bit-identical outputs and input gradients to the op path, forced here by making
torch.compiler.is_compiling() return True as it does under torch.compile. Fresh random inputs, CPU under
TRITON_INTERPRET=1. That torch.compile(fullgraph=True) keeps the ops whole: tests/zebra/test_compile.py and
tests/zebra/test_zebra_rms_norm.py."""
import os

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

if not torch.cuda.is_available():  # read when the kernels are decorated, so before the imports below
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernels.conv1d import causal_conv1d_triton  # noqa: E402
from kernels.norm import gated_rms_norm_triton, rms_norm_triton  # noqa: E402
from kernels.ssd_scan import ssd_scan_triton  # noqa: E402
from kernels.token_l2 import token_l2_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class ZebraOps(TorchDispatchMode):
    """Records the names of the zebra:: custom ops dispatched while active."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "zebra":
            self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def run(fn, leaves, compiling, monkeypatch):
    """fn(*leaves)'s outputs, the gradient of every leaf (fixed random cotangents) and the zebra ops called, with
    torch.compiler.is_compiling() returning `compiling`."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
    with ZebraOps() as ops:
        outs = fn(*leaves)
        gen = torch.Generator(DEVICE).manual_seed(1)
        cotangents = [torch.randn(o.shape, generator=gen, device=DEVICE).to(o.dtype) for o in outs]
        grads = torch.autograd.grad(outs, leaves, cotangents)
    monkeypatch.undo()
    return [*outs, *grads], ops.names


def assert_paths_identical(fn, leaves, ops, monkeypatch):
    """Eager calls no custom op, the op path calls `ops`; outputs and gradients bit-identical (values, dtypes,
    strides)."""
    eager, eager_ops = run(fn, leaves, False, monkeypatch)
    op_path, op_path_ops = run(fn, leaves, True, monkeypatch)
    print(f"eager path ops {eager_ops}, op path ops {op_path_ops}")
    assert eager_ops == [] and op_path_ops == ops
    for i, (a, b) in enumerate(zip(eager, op_path)):
        assert a.dtype == b.dtype and a.stride() == b.stride() and torch.equal(a, b), f"output/gradient {i}"


def leaves(*tensors):
    return [t.to(DEVICE).requires_grad_() for t in tensors]


def test_gated_rms_norm_eager_path_equals_op_path(monkeypatch):
    y, z, weight = leaves(torch.randn(2, 5, 48), torch.randn(2, 5, 48) * 2, 1 + 0.3 * torch.randn(48))
    assert_paths_identical(lambda y, z, w: (gated_rms_norm_triton(y, z, w, 16, 1e-5),), [y, z, weight],
                           ["gated_rms_norm_fwd", "gated_rms_norm_bwd"], monkeypatch)


def test_rms_norm_eager_path_equals_op_path(monkeypatch):
    x, weight = leaves(torch.randn(3, 7, 40).bfloat16(), 1 + 0.3 * torch.randn(40))
    assert_paths_identical(lambda x, w: (rms_norm_triton(x, w, 1e-5),), [x, weight],
                           ["rms_norm_fwd", "rms_norm_bwd"], monkeypatch)


def test_token_l2_eager_path_equals_op_path(monkeypatch):
    student, teacher = leaves(torch.randn(3, 9, 40).bfloat16(), torch.randn(3, 9, 40).bfloat16())
    assert_paths_identical(lambda s, t: (token_l2_triton(s, t),), [student, teacher],
                           ["token_l2_fwd", "token_l2_bwd"], monkeypatch)


def test_causal_conv1d_eager_path_equals_op_path(monkeypatch):
    b, c, l, k = 2, 24, 19, 4
    x, weight, bias, window = leaves(torch.randn(b, l, c).transpose(1, 2), torch.randn(c, k) / 2, torch.randn(c),
                                     torch.randn(b, c, k - 1))
    assert_paths_identical(lambda *args: (causal_conv1d_triton(*args, activation="silu"),), [x, weight, bias, window],
                           ["causal_conv1d_fwd", "causal_conv1d_bwd"], monkeypatch)


def test_ssd_scan_eager_path_equals_op_path(monkeypatch):
    b, l, h, p, n, g = 1, 20, 2, 16, 16, 1
    x, dt, A, B, C, D, s0 = leaves(torch.randn(b, l, h, p), F.softplus(torch.randn(b, l, h) - 1), -torch.rand(h) - 0.5,
                                   torch.randn(b, l, g, n), torch.randn(b, l, g, n), torch.randn(h),
                                   torch.randn(b, h, p, n))
    assert_paths_identical(lambda x, dt, A, B, C, D, s0: ssd_scan_triton(x, dt, A, B, C, 16, D=D, initial_state=s0),
                           [x, dt, A, B, C, D, s0], ["ssd_scan_fwd", "ssd_scan_bwd"], monkeypatch)
