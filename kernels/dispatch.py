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
