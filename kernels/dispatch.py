"""What the dispatch points of kernels/ share: each choice of kernel or reference is logged once."""
from __future__ import annotations

import functools
import logging

import torch


@functools.cache
def _log_cached(logger_name: str, message: str) -> None:
    logging.getLogger(logger_name).info(message)


def log_once(logger: logging.Logger, message: str) -> None:
    """Log `message` at INFO on `logger` once per process. Skipped while torch.compile traces: a logging call
    (or a traced cache wrapper) breaks the graph, and the eager call before or after logs it anyway."""
    if not torch.compiler.is_compiling():
        _log_cached(logger.name, message)


def use_kernel(logger: logging.Logger, op: str, kernel: str, reason: str | None, backend: str) -> bool:
    """The end of every dispatch point: True for the Triton kernel when nothing stops it (reason None);
    otherwise RuntimeError under backend "triton", else False for the PyTorch reference. The choice is
    logged once, with the kernel's name (kernel, may be "") or the reason."""
    if reason is None:
        log_once(logger, f"{op}: Triton kernel{' ' + kernel if kernel else ''}")
        return True
    if backend == "triton":
        raise RuntimeError(f"{op}: backend='triton' but {reason}; use 'auto' or 'torch'")
    log_once(logger, f"{op}: PyTorch reference ({reason})")
    return False
