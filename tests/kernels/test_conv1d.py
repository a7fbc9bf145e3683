"""Triton causal conv1d (+ SiLU) against the float64 reference: outputs, the final window and every
input's gradient, on fresh random inputs. On a CPU the kernels run under TRITON_INTERPRET=1 (tiny
shapes); the `gpu` tests run SmolLM2's Mamba2 conv (960 channels, 2048 tokens) on CUDA."""
import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # read when the kernels are decorated, so before the import below
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernels import dispatch
from kernels.conv1d import causal_conv1d_triton  # noqa: E402
from kernels.ssd import causal_conv1d, causal_conv1d_ref  # noqa: E402

F64 = torch.float64
# Tiny shapes run on CUDA where there is one, else on the CPU under the interpreter.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Relative (norm) error against float64; float32 differs only by summation order.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def reference(x, weight, bias, window, activation):
    out = causal_conv1d_ref(x, weight, bias, window)
    return F.silu(out) if activation == "silu" else out


def conv_inputs(b, c, l, k, dtype, device, with_bias, with_window, channel_last):
    x = torch.randn(b, l, c, device=device).transpose(1, 2) if channel_last else torch.randn(b, c, l, device=device)
    return (
        x.to(dtype).requires_grad_(),
        (torch.randn(c, k, device=device) / k**0.5).requires_grad_(),
        torch.randn(c, device=device).requires_grad_() if with_bias else None,
        torch.randn(b, c, k - 1, device=device).to(dtype).requires_grad_() if with_window else None,
    )


def check_parity(shape, dtype, device, activation, with_bias=True, with_window=True, channel_last=True):
    """Output, final window and gradients of the kernel against the float64 reference; returns the worst error."""
    b, c, l, k = shape
    inputs = conv_inputs(b, c, l, k, dtype, device, with_bias, with_window, channel_last)
    out, final = causal_conv1d_triton(*inputs, activation=activation, return_final_window=True)
    ref_inputs = [None if t is None else t.detach().double().requires_grad_() for t in inputs]
    ref = reference(*ref_inputs, activation)
    dout = torch.randn_like(ref)
    out.backward(dout.to(out.dtype))
    ref.backward(dout)
    full = torch.cat([torch.zeros(b, c, k - 1, dtype=F64, device=device) if inputs[3] is None else ref_inputs[3],
                      ref_inputs[0]], dim=-1)
    errors = {"out": rel_err(out, ref), "final_window": rel_err(final, full[..., full.shape[-1] - (k - 1):])}
    for name, t, r in zip(("dx", "dweight", "dbias", "dwindow"), inputs, ref_inputs):
        if t is not None:
            errors[name] = rel_err(t.grad, r.grad)
    print(f"{shape} {dtype} {activation} bias={with_bias} window={with_window}: "
          + ", ".join(f"{n} {e:.1e}" for n, e in errors.items()))
    assert out.dtype == dtype and out.stride() == inputs[0].stride() and inputs[0].grad.dtype == dtype
    return max(errors.values())


CPU_SHAPES = [(2, 5, 9, 4), (1, 70, 3, 4), (2, 8, 70, 3), (1, 3, 1, 2), (2, 4, 7, 1)]  # b, c, l, k: block edges


@pytest.mark.parametrize("shape", CPU_SHAPES)
@pytest.mark.parametrize("activation", [None, "silu"])
def test_conv_kernel_matches_reference_small(shape, activation):
    assert check_parity(shape, torch.float32, DEVICE, activation) < TOL[torch.float32]


@pytest.mark.parametrize("with_bias, with_window, channel_last", [(False, False, False), (True, False, True),
                                                                  (False, True, False)])
def test_conv_kernel_optional_inputs_and_layouts_small(with_bias, with_window, channel_last):
    err = check_parity((2, 6, 11, 4), torch.float32, DEVICE, "silu", with_bias, with_window, channel_last)
    assert err < TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_conv_kernel_low_precision_small(dtype):
    assert check_parity((2, 6, 11, 4), dtype, DEVICE, "silu") < TOL[dtype]


def test_conv_kernel_chunks_chain_through_the_window_small():
    """Two chunks joined by the returned window equal one pass over the whole sequence."""
    x, weight, bias = (torch.randn(*shape, device=DEVICE) for shape in ((2, 6, 13), (6, 4), (6,)))
    first, window = causal_conv1d_triton(x[..., :5], weight, bias, activation="silu", return_final_window=True)
    second = causal_conv1d_triton(x[..., 5:], weight, bias, window, activation="silu")
    whole = F.silu(causal_conv1d_ref(x.double(), weight.double(), bias.double()))
    err = rel_err(torch.cat([first, second], dim=-1), whole)
    print(f"two chunks vs one pass: relative error {err:.1e}")
    assert err < TOL[torch.float32]


@pytest.mark.parametrize("with_bias, with_window", [(True, True), (False, False)])
def test_custom_ops_pass_opcheck(with_bias, with_window):
    """The registered fakes (shapes, strides, dtypes) and schemas of the conv's ops agree with the kernels'
    real results, on a channel-last x (the mixer's layout) with and without the optional inputs."""
    x, weight, bias, window = (None if t is None else t.detach()
                               for t in conv_inputs(2, 6, 11, 4, torch.float32, DEVICE, with_bias, with_window, True))
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.zebra.causal_conv1d_fwd.default, (x, weight, bias, window, True), test_utils=utils)
    out = torch.ops.zebra.causal_conv1d_fwd(x, weight, bias, window, True)
    assert out.stride() == x.stride()
    bwd_args = (torch.randn_like(out), x, weight, bias, window, True)
    torch.library.opcheck(torch.ops.zebra.causal_conv1d_bwd.default, bwd_args, test_utils=utils)


def test_conv_kernel_rejects_bad_arguments():
    x, weight = torch.randn(1, 4, 5), torch.randn(4, 3)
    with pytest.raises(ValueError, match="activation must be one of"):
        causal_conv1d_triton(x, weight, activation="relu")
    with pytest.raises(ValueError, match="initial_window must be"):
        causal_conv1d_triton(x, weight, initial_window=torch.randn(1, 4, 3))
    with pytest.raises(ValueError, match="kernel width"):
        causal_conv1d_triton(x, torch.randn(4, 5))


def test_dispatch_rejects_triton_backend_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, weight = torch.randn(1, 4, 5), torch.randn(4, 3)
    with pytest.raises(RuntimeError, match="backend='triton' but tensors are on cpu"):
        causal_conv1d(x, weight, backend="triton")
    ref = causal_conv1d(x, weight, activation="silu")  # "auto" on the CPU: the reference
    assert torch.equal(ref, F.silu(causal_conv1d_ref(x, weight)))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs the Triton interpreter")
def test_dispatch_triton_backend_runs_the_kernel_interpreted():
    x, weight, bias, window = torch.randn(2, 4, 6), torch.randn(4, 4), torch.randn(4), torch.randn(2, 4, 3)
    out = causal_conv1d(x, weight, bias, window, backend="triton", activation="silu")
    assert torch.equal(out, causal_conv1d_triton(x, weight, bias, window, activation="silu"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_conv_kernel_matches_reference_gpu(dtype, activation):
    assert check_parity((4, 960, 2048, 4), dtype, "cuda", activation) < TOL[dtype]


@pytest.mark.gpu
def test_dispatch_auto_uses_triton_on_cuda(caplog):
    x, weight, bias = torch.randn(2, 960, 100, device="cuda"), torch.randn(960, 4, device="cuda"), None
    dispatch._log_cached.cache_clear()
    with caplog.at_level("INFO", logger="kernels.ssd"):
        out = causal_conv1d(x, weight, bias, activation="silu")
    assert any("Triton" in r.getMessage() for r in caplog.records)
    err = rel_err(out, F.silu(causal_conv1d_ref(x.double(), weight.double())))
    print(f"dispatch auto on CUDA: relative error {err:.1e}")
    assert err < TOL[torch.float32]
