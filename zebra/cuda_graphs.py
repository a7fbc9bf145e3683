"""A module's training forward and backward replayed from CUDA graphs instead of launched op by op.

Why: a distillation step of SmolLM2's depth at 8 x 2048 tokens is bound by the host, not the GPU (notes/GPU.md,
session 12: GPU busy 93 of 217 ms in a compiled KD step). Each decoder layer queues dozens of kernels forward and
backward, and the host's Python (dispatcher, autograd, Triton's launcher) cannot queue them as fast as an H200
runs them. A CUDA graph queues a whole forward, or a whole backward, with one launch.

`graph_forward(module)` replaces module.forward (an instance attribute: parameter names and state dicts are
unchanged) with one that, at its first call in training mode with gradients enabled and tensor arguments on
CUDA, captures the forward and its backward with torch.cuda.make_graphed_callables (the call's own arguments
are the sample: warm-up iterations, then the captures) and from then on replays them for every call with the
same argument shapes, dtypes and nesting; any other call (eval mode, no_grad, other shapes, keyword arguments,
CPU tensors) runs the original forward. What a graph cannot hold fails the capture, which is logged and
leaves the original forward in place.

The contract a graphed module must meet (make_graphed_callables'): no host synchronisation and no data-dependent
shapes inside forward or backward, parameters that stay where they are (an optimizer that updates them in place,
as DeepSpeed's does), and outputs read before the next call (the next replay writes over them). The gradients the
backward hands autograd are views of the graph's memory, and autograd stores a parameter's first gradient
without a copy: the next backward's replay writes over it. DeepSpeed ZeRO-1/2 (jobs.train) copy every gradient
into their buckets in their hooks, during the backward that made it, so accumulation over micro-batches is
right there; a plain loop must step (or copy the gradients) after each backward.
"""
from __future__ import annotations

import gc
import logging
from typing import Any, Callable

import torch
from torch import nn
from torch.utils import _pytree

log = logging.getLogger(__name__)

WARMUP_CALLS = 3  # forward + backward runs before the capture (lazy inits, Triton's and torch.compile's compiles)


def _signature(args: tuple) -> tuple | None:
    """The nesting and, per tensor, shape, dtype, device and requires_grad of a call's arguments; None when an
    argument is not a tensor (a graph replays tensors only)."""
    leaves, spec = _pytree.tree_flatten(args)
    if not leaves or not all(isinstance(t, torch.Tensor) for t in leaves):
        return None
    return spec, tuple((t.shape, t.dtype, t.device, t.requires_grad) for t in leaves)


def _capturable(module: nn.Module, signature: tuple | None, kwargs: dict) -> bool:
    """Whether a call may be captured or replayed: training mode, gradients on, positional tensor arguments,
    all on CUDA."""
    return (signature is not None and not kwargs and module.training and torch.is_grad_enabled()
            and all(device.type == "cuda" for _, _, device, _ in signature[1]))


class _GraphedForward:
    """module.forward's replacement (see the module docstring): captures at the first capturable call, replays
    calls of the captured signature, runs `original` for the rest."""

    def __init__(self, module: nn.Module, original: Callable, warmup: int, before_capture: Callable[[], None] | None):
        self.module, self.original, self.warmup, self.before_capture = module, original, warmup, before_capture
        self.graphed: Callable | None = None
        self.signature: tuple | None = None
        self.failure: str | None = None  # why the capture failed: the first error of its chain

    def __call__(self, *args, **kwargs) -> Any:
        if self.failure is not None:
            return self.original(*args, **kwargs)
        signature = _signature(args)
        if not _capturable(self.module, signature, kwargs):
            return self.original(*args, **kwargs)
        if self.graphed is None:
            self._capture(args, signature)
            if self.graphed is None:
                return self.original(*args)
        if signature != self.signature:
            return self.original(*args)
        return self.graphed(*args)

    def _capture(self, args: tuple, signature: tuple) -> None:
        # make_graphed_callables refuses a module with hooks (DeepSpeed hooks the module it wraps): capture a
        # hook-free module over the same parameters that runs the original forward; the module's own hooks still
        # run around every call, outside the graphs
        plain = _Plain(self.module, self.original)
        if self.before_capture is not None:
            self.before_capture()
        try:
            torch.cuda.make_graphed_callables(plain, args, num_warmup_iters=self.warmup, allow_unused_input=True)
        except Exception as error:  # noqa: BLE001 - any capture failure leaves the eager forward, said once
            self.failure = first_error(error)
            log.warning("CUDA graphs off for %s: the capture failed (%s); it runs op by op",
                        type(self.module).__name__, self.failure)
            del error, plain  # the failed graphs' memory pool goes back (a worker kept ~2x its memory and ran out)
            gc.collect()
            torch.cuda.empty_cache()
            return
        self.graphed, self.signature = plain.forward, signature
        torch.cuda.empty_cache()  # the warm-up's blocks: the graphs' pool holds what the replays use
        log.info("%s: forward and backward captured in CUDA graphs (%d tensor arguments)",
                 type(self.module).__name__, len(signature[1]))


def first_error(error: BaseException) -> str:
    """The earliest error of error's chain, in one line: a failed capture reports "operation failed due to a
    previous error during capture", and the previous error (the cause to fix) is its context."""
    while error.__context__ is not None:
        error = error.__context__
    return f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300]}"


class _Plain(nn.Module):
    """`module`'s parameters (as a child) and its original forward, without its hooks: what is captured."""

    def __init__(self, module: nn.Module, forward: Callable):
        super().__init__()
        self.module, self.run = module, forward

    def forward(self, *args) -> Any:
        return self.run(*args)


def graph_forward(module: nn.Module, warmup: int = WARMUP_CALLS,
                  before_capture: Callable[[], None] | None = None) -> nn.Module:
    """Replace module.forward, in place, by one replayed from CUDA graphs (see the module docstring); the module.
    before_capture: called just before the capture, to quiet every other thread's CUDA work: while a stream
    captures, another thread's allocation, synchronisation or IPC handle opening (a teacher actor's reply)
    invalidates the capture."""
    if _wrapper(module) is None:
        module.forward = _GraphedForward(module, module.forward, warmup, before_capture)
    return module


def _wrapper(module: nn.Module) -> _GraphedForward | None:
    forward = module.__dict__.get("forward")
    return forward if isinstance(forward, _GraphedForward) else None


def is_graphed(module: nn.Module) -> bool:
    """Whether module's forward replays CUDA graphs (captured, not failed)."""
    wrapper = _wrapper(module)
    return wrapper is not None and wrapper.graphed is not None


def capture_failure(module: nn.Module) -> str | None:
    """Why module's capture failed (the first error of its chain), or None."""
    wrapper = _wrapper(module)
    return None if wrapper is None else wrapper.failure
