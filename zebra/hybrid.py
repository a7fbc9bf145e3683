"""Hybrids from the two pure students, and the held-out figures that judge them. No Ray.

    student = load_student(folder)                           # a saved ZebraForCausalLM, float32, eval
    hybrid = compose_hybrid(mla_dir, mamba_dir, [0, 3])      # layers 0 and 3 MLA, the rest Mamba2
    with mla_layers_swapped_in(mamba, mla, [2]) as h: ...    # the same hybrid, in place, undone on exit
    logits = teacher_logits(teacher, ids)                    # [n, seq, vocab] float32 in host memory
    held_out_kl(hybrid, logits, ids), held_out_ce(hybrid, ids)

These are module-level functions, so `functools.partial`s of them pickle into Ray Train workers and
Ray tasks (the factories of jobs.train.distill, the tasks of the smart stage).
"""
from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .losses import kd_loss
from .modeling import ZebraForCausalLM

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_student(folder: str) -> ZebraForCausalLM:
    """A saved Zebra model (an HF folder), float32, in eval mode."""
    return ZebraForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def compose_hybrid(mla_dir: str, mamba_dir: str, mla_layers: list[int]) -> ZebraForCausalLM:
    """The hybrid whose layers in mla_layers come from the MLA student and the rest from the Mamba2
    student (embeddings, norms and MLPs are the teacher's in both)."""
    mla, mamba = load_student(mla_dir), load_student(mamba_dir)
    config = copy.deepcopy(mamba.config)
    config.mixer_types = ["mla" if i in mla_layers else "mamba" for i in range(config.num_hidden_layers)]
    state = mamba.state_dict()
    for i in mla_layers:
        prefix = f"model.layers.{i}."
        state = {k: v for k, v in state.items() if not k.startswith(prefix)}
        state.update({k: v for k, v in mla.state_dict().items() if k.startswith(prefix)})
    hybrid = ZebraForCausalLM(config)
    hybrid.load_state_dict(state)
    return hybrid.eval()


@contextlib.contextmanager
def mla_layers_swapped_in(mamba: ZebraForCausalLM, mla: ZebraForCausalLM, layers: list[int]):
    """The Mamba2 student with the MLA student's decoder layers at `layers`, in place and undone on
    exit: the same hybrid as compose_hybrid, without loading or copying a model per choice."""
    saved = {i: mamba.model.layers[i] for i in layers}
    types = list(mamba.config.mixer_types)
    try:
        for i in layers:
            mamba.model.layers[i] = mla.model.layers[i]
            mamba.config.mixer_types[i] = "mla"
        yield mamba
    finally:
        for i, layer in saved.items():
            mamba.model.layers[i] = layer
        mamba.config.mixer_types = types


def kl_of_choices(mla_dir: str, mamba_dir: str, choices: list[list[int]], teacher: Tensor | nn.Module, ids: Tensor,
                  device: torch.device) -> list[float]:
    """Held-out KL of the hybrid for each choice of MLA layers (each student is loaded once), on `device`;
    ids [n, seq]. teacher: its logits [n, seq, vocab] (may stay in host memory), or the teacher model itself,
    whose logits are then recomputed a batch at a time for each choice (teacher_student_kl): on a GPU a
    teacher forward costs less than holding or shipping n x seq x vocab float32 (32 x 1024 tokens: 6.4 GB)."""
    mla, mamba = load_student(mla_dir).to(device), load_student(mamba_dir).to(device)
    ids = ids.to(device)
    kls = []
    for choice in choices:
        with mla_layers_swapped_in(mamba, mla, choice) as hybrid:
            kls.append(teacher_student_kl(teacher, hybrid, ids) if isinstance(teacher, nn.Module)
                       else held_out_kl(hybrid, teacher, ids))
    return kls


@torch.no_grad()
def held_out_kl(student: nn.Module, teacher_logits: Tensor, ids: Tensor, batch: int = 4) -> float:
    """Mean KL(teacher || student) per token on ids [n, seq] (teacher_logits [n, seq, vocab], on any
    device: a batch at a time moves to the student's, so the logits of many sequences may stay in host memory)."""
    total = 0.0
    for s in range(0, len(ids), batch):
        logits = student(ids[s:s + batch]).logits
        total += kd_loss(logits, teacher_logits[s:s + batch].to(logits.device)).item() * len(ids[s:s + batch])
    return total / len(ids)


@torch.no_grad()
def teacher_student_kl(teacher: nn.Module, student: nn.Module, ids: Tensor, batch: int = 4) -> float:
    """Mean KL(teacher || student) per token on ids [n, seq], the teacher's logits computed a batch at a
    time on its device (nothing of n x seq x vocab is kept: 64 x 2048 tokens of a 49k vocabulary would
    be 26 GB). Equals held_out_kl(student, teacher_logits(teacher, ids), ids)."""
    return teacher_student_figures(teacher, student, ids, batch, cross_entropy=False)["kl"]


@torch.no_grad()
def teacher_student_figures(teacher: nn.Module, student: nn.Module, ids: Tensor, batch: int = 4,
                            cross_entropy: bool = True) -> dict[str, float]:
    """From one pass of both models over ids [n, seq], a batch at a time: "kl", the mean KL(teacher || student)
    per token (as teacher_student_kl), and with cross_entropy "ce_teacher", "ce_student", each model's mean
    next-token cross-entropy in nats (as held_out_ce; exp of it is the perplexity). SMART's many scorings
    (kl_of_choices) take the KL alone."""
    t_device, s_device = next(teacher.parameters()).device, next(student.parameters()).device
    sums = dict.fromkeys(("kl", "ce_teacher", "ce_student") if cross_entropy else ("kl",), 0.0)
    for s in range(0, len(ids), batch):
        chunk = ids[s:s + batch]
        want = teacher(chunk.to(t_device)).logits.float().to(s_device)
        got = student(chunk.to(s_device)).logits
        sums["kl"] += kd_loss(got, want).item() * len(chunk)
        if cross_entropy:
            sums["ce_teacher"] += _next_token_nll(want, chunk)
            sums["ce_student"] += _next_token_nll(got, chunk)
    predictions = len(ids) * (ids.shape[1] - 1)
    return {key: total / (len(ids) if key == "kl" else predictions) for key, total in sums.items()}


def _next_token_nll(logits: Tensor, ids: Tensor) -> float:
    """Summed next-token cross-entropy (nats) of logits [b, seq, vocab] for ids [b, seq]: seq - 1 predictions a row."""
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten().to(logits.device),
                           reduction="sum").item()


@torch.no_grad()
def held_out_ce(model: nn.Module, ids: Tensor, batch: int = 4) -> float:
    """Mean cross-entropy (nats) of the next token over ids [n, seq] (seq - 1 predictions per row)."""
    total = sum(_next_token_nll(model(ids[s:s + batch]).logits, ids[s:s + batch]) for s in range(0, len(ids), batch))
    return total / (len(ids) * (ids.shape[1] - 1))


@torch.no_grad()
def teacher_logits(teacher: nn.Module, ids: Tensor, batch: int = 4) -> Tensor:
    """[n, seq, vocab] float32 logits of the teacher, in host memory (n x seq x vocab x 4 bytes: 1.6 GB
    for 16 x 512 tokens of a 49k vocabulary, which a GPU shared by several trials or tasks should not hold)."""
    device = next(teacher.parameters()).device
    return torch.cat([teacher(ids[s:s + batch].to(device)).logits.float().cpu() for s in range(0, len(ids), batch)])
