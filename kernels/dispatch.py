"""What the dispatch points of kernels/ share: each choice of kernel or reference is logged once."""
from __future__ import annotations

import functools
import logging
import os

import torch


@functools.cache
def _log_cached(logger_name: str, message: str) -> None:
    logging.getLogger(logger_name).info(message)


def log_once(logger: logging.Logger, message: str) -> None:
    """Log `message` at INFO on `logger` once per process. Skipped while torch.compile traces: a logging call
    (or a traced cache wrapper) breaks the graph, and the eager call before or after logs it anyway."""
    if not torch.compiler.is_compiling():
        _log_cached(logger.name, message)


def device_reason(t: torch.Tensor, backend: str) -> str | None:
    """Why a Triton kernel cannot run on t's device (None when it can): it runs on CUDA tensors, and for backend
    "triton" also on CPU tensors under TRITON_INTERPRET=1 (the tests; "auto" never picks the interpreter)."""
    if t.is_cuda or (backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1"):
        return None
    return f"tensors are on {t.device.type}"


# Per kind of kernel: how the log names it, the backend that insists on it, and the end of its error.
KINDS = {
    "triton": ("Triton kernel", "backend='triton'", "use 'auto' or 'torch'"),
    "cuda": ("CUDA kernel", "mamba_backend='cuda'", "use 'auto' or 'torch', or install the kernel"),
}


def use_kernel(logger: logging.Logger, op: str, kernel: str, reason: str | None, backend: str,
               kind: str = "triton") -> bool:
    """The end of every dispatch point: True for the kernel (kind "triton" or "cuda") when nothing stops it
    (reason None); otherwise RuntimeError when backend insists on that kind, else False for the PyTorch
    reference. The choice is logged once, with the kernel's name (kernel, may be "") or the reason."""
    label, insists, hint = KINDS[kind]
    if reason is None:
        log_once(logger, f"{op}: {label}{' ' + kernel if kernel else ''}")
        return True
    if backend == kind:
        raise RuntimeError(f"{op}: {insists} but {reason}; {hint}")
    log_once(logger, f"{op}: PyTorch reference ({reason})")
    return False
