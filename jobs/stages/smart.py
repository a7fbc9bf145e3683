"""Stage smart: score each layer's need for MLA and choose the MLA layers (SMART).

Score of layer i = KL(teacher || all-Mamba2 hybrid) - KL(teacher || hybrid with only layer i MLA),
both hybrids composed from the ILD students (zebra.hybrid), KL per token on held-out sequences. The
layers are scored in spec.smart.parallel Ray tasks, each taking a contiguous chunk of layers. With
explicit student.mla_layers the scores are only reported; with smart disabled, `given` stands in for
the stage. SmartOutput: scores, kl_all_mamba, mla_layers.
"""
from __future__ import annotations

import functools
import logging

import numpy as np
import ray
import torch
from transformers import AutoConfig

from jobs.context import Context, held_out_device, sequences
from jobs.outputs import SmartOutput
from jobs.spec import JobSpec
from zebra.hybrid import kl_of_choices, teacher_logits
from zebra.smart import select_mla_layers, sensitivity_from_kl
from zebra.teacher import load_teacher_model

log = logging.getLogger(__name__)


def _task(mla_dir: str, mamba_dir: str, choices: list[list[int]], teacher, ids: torch.Tensor):
    """One Ray task's chunk of choices, on one core (the tasks run side by side), on its GPU if it has
    one (smart.gpus_per_task: on one CPU thread a 135M model takes minutes per choice). teacher: the
    teacher's logits [n, seq, vocab], or (on a GPU) a teacher_factory whose model the task runs itself."""
    torch.set_num_threads(1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # Ray hides GPUs from a task without any
    if callable(teacher):
        teacher = teacher().to(device)
    return kl_of_choices(mla_dir, mamba_dir, choices, teacher, ids, device)


def score_layers(spec: JobSpec, ctx: Context, num_layers: int) -> tuple[float, list[float]]:
    """(KL of the all-Mamba2 hybrid, [num_layers] sensitivity scores).

    With GPUs (smart.gpus_per_task > 0) each task loads the teacher and recomputes its logits batch by batch:
    seconds of GPU time, where shipping the driver's float32 logits (32 x 1024 tokens x 49k: 6.4 GB) through
    the object store to every task took minutes. On CPUs the driver computes them once for all tasks."""
    _, held = sequences(spec, ctx, spec.smart.seq_len)
    ids = torch.from_numpy(held[: spec.smart.sequences])
    teacher_factory = functools.partial(load_teacher_model, ctx.teacher_dir, spec.teacher.dtype)
    choices = [[]] + [[i] for i in range(num_layers)]
    chunks = [list(c) for c in np.array_split(np.arange(len(choices)), spec.smart.parallel) if len(c)]
    # On a GPU, one task per worker process (max_calls=1): a reused process would keep its CUDA
    # cache, GBs that later stages and tune trials on the same GPU need (seen on an H100).
    gpus = spec.smart.gpus_per_task
    task = ray.remote(max_calls=1 if gpus > 0 else 0)(_task).options(num_cpus=1, num_gpus=gpus)
    dirs = ctx.model_dir("ild/mla"), ctx.model_dir("ild/mamba")
    teacher = teacher_factory if gpus > 0 else ray.put(teacher_logits(teacher_factory().to(held_out_device()), ids))
    ids_ref = ray.put(ids)
    refs = [task.remote(*dirs, [choices[j] for j in chunk], teacher, ids_ref) for chunk in chunks]
    kls = [kl for part in ray.get(refs) for kl in part]
    return kls[0], sensitivity_from_kl(kls[0], kls[1:])


def run(spec: JobSpec, ctx: Context) -> SmartOutput:
    num_layers = AutoConfig.from_pretrained(ctx.teacher_dir).num_hidden_layers
    kl_all_mamba, scores = score_layers(spec, ctx, num_layers)
    st = spec.student
    if st.mla_layers is not None:
        chosen = st.mla_layers
    else:
        chosen = select_mla_layers(scores, ctx.num_mla, st.keep_terminal, st.min_spacing, st.placement)
    log.info("smart: scores %s; MLA layers %s", [round(s, 4) for s in scores], chosen)
    return SmartOutput(tokens=spec.smart.sequences * spec.smart.seq_len * (num_layers + 1), scores=scores,
                       kl_all_mamba=kl_all_mamba, mla_layers=chosen)


def given(spec: JobSpec) -> SmartOutput | None:
    """What stands in for a disabled smart stage: the spec's own student.mla_layers (None: none given)."""
    if spec.student.mla_layers is None:
        return None
    return SmartOutput(tokens=0, mla_layers=list(spec.student.mla_layers))
