"""The teacher beside each training worker: in its own Ray actor, or in the worker's process.

Both give the same two calls, so a training loop does not care which it holds:
    hidden_states(input_ids) -> list of [batch, seq, d_model]
    hidden_states(input_ids, mixers=True) -> (that list, each layer's attention output [batch, seq, d_model])
    logits(input_ids, top_k=None, temperature=1.0) -> [batch, seq, vocab] or TopKLogprobs

On GPU the actor shares the worker's GPU (see cluster.placement) and its outputs reach the worker
as CUDA IPC handles (torch.multiprocessing's reduce_tensor): the worker maps the teacher's memory
and never copies through the host. Ray's own CUDA_IPC tensor transport (Ray Direct Transport)
needs both sides to hold Ray-assigned shares of the GPU, which Ray Train's one-bundle-per-worker
placement cannot give; the handles it ships are the same ones used here.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Literal

import ray
import torch
from torch import Tensor, nn
from torch.multiprocessing.reductions import reduce_tensor

from cluster.placement import beside_this_worker
from zebra.losses import TopKLogprobs, top_k_logprobs

TeacherFactory = Callable[[], nn.Module]
TeacherMode = Literal["actor", "inprocess"]
TEACHER_MODES = ("actor", "inprocess")
LayerStates = tuple[list[Tensor], list[Tensor]]  # (hidden states, attention outputs) of hidden_states(mixers=True)


class LocalTeacher:
    """The teacher model in this process, frozen, on `device`.

    factory: picklable callable returning the teacher (an HF causal LM: `.model.norm`, `.model(...)`).
    """

    def __init__(self, factory: TeacherFactory, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.model = factory().to(self.device).eval().requires_grad_(False)

    @torch.no_grad()
    def hidden_states(self, input_ids: Tensor, mixers: bool = False) -> list[Tensor] | LayerStates:
        """n_layers + 1 tensors [batch, seq, d_model]: the input of each decoder layer, then the
        last layer's output before the final norm (HF's last entry is after the norm; ILD needs before).
        mixers: also return each decoder layer's attention output (`self_attn`, after its output
        projection, before the residual add), n_layers tensors [batch, seq, d_model]."""
        captured, attn = [], []
        hooks = [self.model.model.norm.register_forward_pre_hook(lambda _module, args: captured.append(args[0]))]
        if mixers:
            hooks += [_attention(layer, i).register_forward_hook(
                lambda _module, _args, out: attn.append(out[0] if isinstance(out, tuple) else out))
                for i, layer in enumerate(self.model.model.layers)]
        try:
            out = self.model.model(input_ids.to(self.device), output_hidden_states=True, use_cache=False)
        finally:
            for hook in hooks:
                hook.remove()
        hidden = [*out.hidden_states[:-1], captured[0]]
        return (hidden, attn) if mixers else hidden

    @torch.no_grad()
    def logits(self, input_ids: Tensor, top_k: int | None = None, temperature: float = 1.0) -> Tensor | TopKLogprobs:
        """[batch, seq, vocab] logits, or with top_k the k largest log-probabilities at `temperature`."""
        logits = self.model(input_ids.to(self.device), use_cache=False).logits  # no KV cache: ~0.75 GB of copies a call
        return logits if top_k is None else top_k_logprobs(logits, top_k, temperature)

    def gpu_uuid(self) -> str | None:
        """The UUID of the GPU the teacher runs on; None on CPU."""
        return str(torch.cuda.get_device_properties(self.device).uuid) if self.device.type == "cuda" else None


@ray.remote
class TeacherActor:
    """LocalTeacher in its own process. CUDA outputs leave as IPC handles, CPU ones as tensors."""

    def __init__(self, factory: TeacherFactory, device: str):
        self._teacher = LocalTeacher(factory, device)

    def hidden_states(self, input_ids: Tensor, mixers: bool = False):
        return self._ship(self._teacher.hidden_states(input_ids, mixers))

    def logits(self, input_ids: Tensor, top_k: int | None = None, temperature: float = 1.0):
        return self._ship(self._teacher.logits(input_ids, top_k, temperature))

    def _ship(self, out):
        if self._teacher.device.type == "cuda":
            torch.cuda.ipc_collect()  # free earlier outputs the worker has released (once a call: ILD ships 61)
        return map_tensors(_share, out)

    def gpu_uuid(self) -> str | None:
        return self._teacher.gpu_uuid()


class RemoteTeacher:
    """Blocking client of a TeacherActor with LocalTeacher's calls; outputs land on `device`."""

    def __init__(self, actor: ray.actor.ActorHandle, device: torch.device):
        self.actor, self.device = actor, torch.device(device)
        if self.device.type == "cuda":
            mine = str(torch.cuda.get_device_properties(self.device).uuid)
            theirs = ray.get(actor.gpu_uuid.remote())
            if theirs != mine:
                raise RuntimeError(f"teacher actor runs on GPU {theirs}, not on its worker's GPU {mine}")

    def hidden_states(self, input_ids: Tensor, mixers: bool = False) -> list[Tensor] | LayerStates:
        return self._open(ray.get(self.actor.hidden_states.remote(input_ids.cpu(), mixers)))

    def logits(self, input_ids: Tensor, top_k: int | None = None, temperature: float = 1.0) -> Tensor | TopKLogprobs:
        return self._open(ray.get(self.actor.logits.remote(input_ids.cpu(), top_k, temperature)))

    def _open(self, shipped):
        return map_tensors(lambda x: _open(x, self.device), shipped)


def start_teacher(factory: TeacherFactory, mode: TeacherMode, device: torch.device, num_cpus: float):
    """The teacher for this training worker: an actor placed beside it, or a LocalTeacher in it."""
    if mode == "inprocess":
        return LocalTeacher(factory, device)
    if mode != "actor":
        raise ValueError(f"teacher_mode={mode!r}: expected one of {TEACHER_MODES}")
    actor_device = "cuda:0" if device.type == "cuda" else "cpu"  # the worker's GPU is the actor's only one
    actor = TeacherActor.options(**beside_this_worker(num_cpus)).remote(factory, actor_device)
    return RemoteTeacher(actor, device)


@dataclasses.dataclass(frozen=True)
class _CudaHandle:
    """torch's reduce_tensor of a CUDA tensor: (rebuild function, its arguments)."""

    reduced: tuple


def _share(t: Tensor):
    return _CudaHandle(reduce_tensor(t)) if t.is_cuda else t


def _open(x, device: torch.device) -> Tensor:
    if not isinstance(x, _CudaHandle):
        return x.to(device)
    rebuild, args = x.reduced
    args = list(args)
    args[6] = device.index if device.index is not None else torch.cuda.current_device()  # the storage's device
    return rebuild(*args)


def _attention(layer: nn.Module, index: int) -> nn.Module:
    """A teacher decoder layer's attention module (HF's `self_attn`)."""
    attn = getattr(layer, "self_attn", None)
    if attn is None:
        raise ValueError(f"teacher decoder layer {index} ({type(layer).__name__}) has no self_attn: "
                         "its mixer output cannot be captured for ILD")
    return attn


def map_tensors(fn, out):
    """Apply fn to each tensor of a teacher output: a tensor, a list or tuple of them (nested), or TopKLogprobs."""
    if isinstance(out, (list, tuple)):
        return type(out)(map_tensors(fn, t) for t in out)
    if isinstance(out, TopKLogprobs):
        return dataclasses.replace(out, logprobs=fn(out.logprobs), indices=fn(out.indices))
    return fn(out)

