"""Mamba2's SSD scan and its causal depthwise conv: plain-PyTorch references and one dispatch point each.

Per head h the SSD layer (Mamba2, state-space duality) keeps a state S [p, n] and runs
    S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T        y_t = S_t C_t + D x_t
with x_t [p], B_t, C_t [n], dt_t > 0 (already softplus'ed), A < 0 (one scalar per head).

`ssd_scan` and `causal_conv1d` are the dispatch points: on CUDA "auto" calls our Triton kernels
(kernels.ssd_scan, kernels.conv1d), "cuda" mamba_ssm's scan and the causal_conv1d package (both optional),
elsewhere the references. The choice follows `backend` ("auto", "torch", "cuda", "triton") and is logged
once per reason.
The one-token steps (`ssd_step`, `causal_conv1d_step`) stay plain PyTorch: a decode step is a few
small elementwise ops that torch.compile fuses, so no kernel is needed there.
"""
from __future__ import annotations

import functools
import importlib
import logging
import sys

import torch
import torch.nn.functional as F

from kernels.dispatch import device_reason, use_kernel

# Our Triton kernels, imported up front so that `_load` finds them in sys.modules: torch.compile traces that
# lookup, where an import inside a compiled forward would break its graph. Without triton, `_load` says why.
try:
    import kernels.conv1d  # noqa: F401
    import kernels.ssd_scan  # noqa: F401
except ImportError:
    pass

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "cuda", "triton")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """At least float32: the references accumulate states and decays at this precision."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


# -- SSD references -------------------------------------------------------------------------------
def segsum(x: torch.Tensor) -> torch.Tensor:
    """x [..., T] -> [..., T, T] with out[i, j] = x[j+1] + ... + x[i] for j <= i and -inf above the diagonal.

    Built by masked cumsum rather than a difference of cumsums, which loses precision (ssd_minimal).
    """
    t = x.shape[-1]
    x = x[..., None].expand(*x.shape, t)  # [..., i, j] = x[i]
    ones = torch.ones(t, t, dtype=torch.bool, device=x.device)
    sums = x.masked_fill(~ones.tril(-1), 0).cumsum(dim=-2)
    return sums.masked_fill(~ones.tril(), float("-inf"))


def ssd_chunked_ref(x, dt, A, B, C, chunk_size: int, D=None, initial_state=None):
    """Chunked SSD scan (mamba_ssm's ssd_minimal, plus an initial state and any length).

    x [b, l, h, p], dt [b, l, h] (> 0), A [h] (< 0), B, C [b, l, h, n], D [h] or None,
    initial_state [b, h, p, n] or None (zeros) -> y [b, l, h, p] (x's dtype),
    final_state [b, h, p, n] (float32, or float64 for float64 inputs).
    The sequence is right-padded to a multiple of chunk_size with dt = 0, which leaves the state unchanged.
    """
    (b, l, h, p), n = x.shape, B.shape[-1]
    dtype = _compute_dtype(x, dt, A, B, C)
    pad = -l % chunk_size
    chunks = (l + pad) // chunk_size

    def chunked(t):  # [b, l, *rest] -> [b, chunks, chunk_size, *rest], zero-padded
        t = F.pad(t.to(dtype), (0, 0) * (t.dim() - 2) + (0, pad))
        return t.reshape(b, chunks, chunk_size, *t.shape[2:])

    xs, Bs, Cs, dts = chunked(x), chunked(B), chunked(C), chunked(dt)
    xdt = xs * dts[..., None]
    a = (dts * A.to(dtype)).permute(0, 3, 1, 2)  # [b, h, chunks, chunk_size]: log-decay per step
    a_cum = a.cumsum(dim=-1)
    # 1. within each chunk: attention-like form with decay mask L[i, j] = exp(a[j+1] + ... + a[i])
    scores = torch.einsum("bclhn,bcshn->bhcls", Cs, Bs) * torch.exp(segsum(a))
    y = torch.einsum("bhcls,bcshp->bclhp", scores, xdt)
    # 2. the state each chunk adds by its end
    decay_to_end = torch.exp(a_cum[..., -1:] - a_cum)
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", Bs, decay_to_end, xdt)
    # 3. pass states across chunks, starting from the initial state
    if initial_state is None:
        initial_state = torch.zeros(b, h, p, n, dtype=dtype, device=x.device)
    states = torch.cat([initial_state.to(dtype)[:, None], states], dim=1)
    chunk_decay = torch.exp(segsum(F.pad(a_cum[..., -1], (1, 0))))  # [b, h, chunks + 1, chunks + 1]
    states = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, states)
    # 4. each chunk's incoming state, read out by C with the decay since the chunk start
    y = y + torch.einsum("bclhn,bchpn,bhcl->bclhp", Cs, states[:, :-1], torch.exp(a_cum))
    y = y.reshape(b, chunks * chunk_size, h, p)[:, :l]
    if D is not None:
        y = y + x.to(dtype) * D.to(dtype)[:, None]
    return y.to(x.dtype), states[:, -1]


def ssd_step(state, x, dt, A, B, C, D=None):
    """One token of the SSD recurrence.

    state [b, h, p, n], x [b, h, p], dt [b, h] (> 0), A [h], B, C [b, h, n], D [h] or None
    -> y [b, h, p] (x's dtype), new_state [b, h, p, n] (float32, or float64 for float64 inputs).
    """
    dtype, out_dtype = _compute_dtype(state, x, dt, B, C), x.dtype
    x, dt, B, C = x.to(dtype), dt.to(dtype), B.to(dtype), C.to(dtype)
    decay = torch.exp(dt * A.to(dtype))[..., None, None]
    new_state = state.to(dtype) * decay + (dt[..., None] * x)[..., None] * B[:, :, None, :]
    y = torch.einsum("bhpn,bhn->bhp", new_state, C)
    if D is not None:
        y = y + D.to(dtype)[:, None] * x
    return y.to(out_dtype), new_state


def ssd_sequential_ref(x, dt, A, B, C, chunk_size: int | None = None, D=None, initial_state=None):
    """The plain recurrence, one `ssd_step` per token: the simple reference the tests trust.

    Same arguments and results as `ssd_chunked_ref`; chunk_size is accepted so the two are
    interchangeable, and ignored.
    """
    b, l, h, p = x.shape
    state = initial_state
    if state is None:
        state = torch.zeros(b, h, p, B.shape[-1], dtype=_compute_dtype(x, dt, B, C), device=x.device)
    ys = []
    for t in range(l):
        y, state = ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D)
        ys.append(y)
    return torch.stack(ys, dim=1), state


# -- causal depthwise conv references -------------------------------------------------------------
def causal_conv1d_ref(x, weight, bias=None, initial_window=None):
    """Causal depthwise conv, no activation.

    x [b, c, l], weight [c, k], bias [c] or None, initial_window [b, c, k-1]: the k-1 inputs before
    x (zeros when None) -> [b, c, l], out[:, :, t] = bias + sum_j weight[:, j] * in[:, :, t - (k-1) + j].
    """
    k = weight.shape[1]
    if initial_window is None:
        x = F.pad(x, (k - 1, 0))
    else:
        x = torch.cat([initial_window.to(x.dtype), x], dim=-1)
    bias = None if bias is None else bias.to(x.dtype)
    return F.conv1d(x, weight.to(x.dtype)[:, None], bias, groups=weight.shape[0])


def causal_conv1d_step(conv_window, x_t, weight, bias=None):
    """One token of the causal conv. conv_window [b, c, k]: the last k inputs; x_t [b, c]
    -> y_t [b, c] (no activation), new_window [b, c, k] (shifted left, x_t last)."""
    window = torch.cat([conv_window[..., 1:], x_t[..., None].to(conv_window.dtype)], dim=-1)
    y = (window * weight.to(window.dtype)).sum(dim=-1)
    if bias is not None:
        y = y + bias.to(window.dtype)
    return y, window


# -- dispatch -------------------------------------------------------------------------------------
def _load(module: str, attr: str):
    """(function, None) when module.attr imports, else (None, why not). A module imported before is read from
    sys.modules, which torch.compile traces (importlib.import_module would break its graph)."""
    if module in sys.modules:
        return getattr(sys.modules[module], attr), None
    return _import(module, attr)


@functools.cache
def _import(module: str, attr: str):
    try:
        return getattr(importlib.import_module(module), attr), None
    except (ImportError, OSError) as err:
        return None, f"{module} is not importable ({type(err).__name__}: {err})"




def _choose(op: str, backend: str, x: torch.Tensor, module: str, attr: str, unsupported: str | None = None):
    """The CUDA kernel module.attr for this call, or None for the PyTorch reference.

    backend "torch": always the reference; "auto": the kernel when x is on CUDA, the module imports
    and the call is supported, else the reference; "cuda": the kernel, or an error saying why not.
    """
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    fn, reason = None, "backend='torch'"
    if backend != "torch":
        if not x.is_cuda:
            reason = f"tensors are on {x.device.type}"
        else:
            fn, reason = _load(module, attr)
            if fn is not None and unsupported:
                fn, reason = None, unsupported
    return fn if use_kernel(log, op, f"{module}.{attr}", None if fn is not None else reason, backend, "cuda") else None


def _ssd_triton(x, chunk_size: int, backend: str):
    """kernels.ssd_scan.ssd_scan_triton for this call, or None where backend "auto" falls back (logged once).

    It runs on CUDA tensors, and for backend "triton" also on CPU tensors under TRITON_INTERPRET=1.
    """
    fn, reason = None, device_reason(x, backend)
    if reason is None:
        fn, reason = _load("kernels.ssd_scan", "ssd_scan_triton")
    if fn is not None and x.dtype not in KERNEL_DTYPES:
        fn, reason = None, f"dtype {x.dtype} has no kernel"
    if fn is not None and (chunk_size < 16 or chunk_size & (chunk_size - 1)):
        fn, reason = None, f"chunk_size {chunk_size} is not a power of two >= 16"
    return fn if use_kernel(log, "ssd_scan", "kernels.ssd_scan.ssd_scan_triton", None if fn else reason,
                            backend) else None


def ssd_scan(x, dt, A, B, C, chunk_size: int, D=None, initial_state=None, backend: str = "auto"):
    """SSD scan over a sequence; the one dispatch point between our Triton kernel (kernels.ssd_scan),
    mamba_ssm's kernel and `ssd_chunked_ref`.

    backend "auto": the Triton kernel on CUDA, else the reference; "triton": the Triton kernel or an error;
    "cuda": mamba_ssm's kernel or an error; "torch": the reference. All paths are differentiable.
    x [b, l, h, p], dt [b, l, h] (> 0), A [h] (< 0), B, C [b, l, g, n] with g dividing h (head i reads
    group i // (h // g)), D [h] or None, initial_state [b, h, p, n] or None
    -> y [b, l, h, p], final_state [b, h, p, n] (float32, or float64 from the float64 reference).
    """
    if backend in ("auto", "triton"):
        kernel = _ssd_triton(x, chunk_size, backend)
        if kernel is not None:
            return kernel(x, dt, A, B, C, chunk_size, D=D, initial_state=initial_state)
    else:
        unsupported = None if x.dtype in KERNEL_DTYPES else f"dtype {x.dtype} has no kernel"
        kernel = _choose("ssd_scan", backend, x, "mamba_ssm.ops.triton.ssd_combined", "mamba_chunk_scan_combined",
                         unsupported)
        if kernel is not None:
            return kernel(x, dt, A, B, C, chunk_size, D=D, initial_states=initial_state, return_final_states=True)
    heads = x.shape[2]
    B = B.repeat_interleave(heads // B.shape[2], dim=2)
    C = C.repeat_interleave(heads // C.shape[2], dim=2)
    return ssd_chunked_ref(x, dt, A, B, C, chunk_size, D=D, initial_state=initial_state)


def _conv_unsupported(x, weight, initial_window, package: bool = True) -> str | None:
    """Why the causal_conv1d package (package=True) or our Triton kernel cannot take this call, or None."""
    if x.dtype not in KERNEL_DTYPES:
        return f"dtype {x.dtype} has no kernel"
    lowest = 2 if package else 1
    if not lowest <= weight.shape[1] <= 4:
        return f"kernel width {weight.shape[1]} is outside the kernel's {lowest}..4"
    if package and initial_window is not None and x.shape[1] % 8:
        return f"an initial window needs channels divisible by 8, got {x.shape[1]}"
    return None


def _conv_triton(x, weight, bias, initial_window, backend: str, activation: str | None):
    """kernels.conv1d's result, or None where backend "auto" falls back to the reference (logged once).

    It runs on CUDA tensors, and for backend "triton" also on CPU tensors under TRITON_INTERPRET=1.
    """
    fn, reason = None, device_reason(x, backend)
    if reason is None:
        fn, reason = _load("kernels.conv1d", "causal_conv1d_triton")
    if fn is not None:
        reason = _conv_unsupported(x, weight, initial_window, package=False)
    if use_kernel(log, "causal_conv1d", "kernels.conv1d.causal_conv1d_triton", reason, backend):
        return fn(x, weight, bias, initial_window, activation)
    return None


def causal_conv1d(x, weight, bias=None, initial_window=None, backend: str = "auto", activation: str | None = None):
    """Causal depthwise conv, then `activation` (None or "silu"); the one dispatch point between our Triton
    kernel (kernels.conv1d), the causal_conv1d package and `causal_conv1d_ref`.

    backend "auto": the Triton kernel on CUDA, else the reference; "triton": the Triton kernel or an
    error; "cuda": the causal_conv1d package or an error; "torch": the reference.
    Same arguments and result as `causal_conv1d_ref` (then the activation), differentiable on every path.
    """
    if activation not in (None, "silu"):
        raise ValueError(f"causal_conv1d: activation must be None or 'silu', got {activation!r}")
    kernel = None
    if backend in ("auto", "triton"):
        out = _conv_triton(x, weight, bias, initial_window, backend, activation)
        if out is not None:
            return out
    else:
        kernel = _choose("causal_conv1d", backend, x, "causal_conv1d", "causal_conv1d_fn",
                         _conv_unsupported(x, weight, initial_window))
    if kernel is None:
        out = causal_conv1d_ref(x, weight, bias, initial_window)
        return out if activation is None else F.silu(out)
    if initial_window is None:
        return kernel(x.contiguous(), weight, bias, activation=activation)
    # The kernel takes an initial window only in channel-last layout (stride 1 over channels).
    x = x.transpose(1, 2).contiguous().transpose(1, 2)
    initial_window = initial_window.to(x.dtype).transpose(1, 2).contiguous().transpose(1, 2)
    return kernel(x, weight, bias, initial_states=initial_window, activation=activation)
