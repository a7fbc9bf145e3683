"""Stage smart: score each layer's need for MLA and choose the MLA layers (SMART).

Score of layer i = KL(teacher || all-Mamba2 hybrid) - KL(teacher || hybrid with only layer i MLA),
both hybrids composed from the ILD students, KL per token on held-out sequences. The layers are
scored in spec.smart.parallel Ray tasks, each taking a contiguous chunk of layers. With explicit
student.mla_layers the scores are only reported. Info: scores, kl_all_mamba, mla_layers.
"""
from __future__ import annotations

import contextlib
import logging

import numpy as np
import ray
import torch

from jobs.spec import JobSpec
from jobs.stages.common import Context, held_out_kl, load_student, load_teacher_model, sequences, teacher_logits
from zebra import ZebraForCausalLM
from zebra.smart import select_mla_layers, sensitivity_from_kl

log = logging.getLogger(__name__)


def _kl_of_choices(mla_dir: str, mamba_dir: str, choices: list[list[int]], logits: torch.Tensor,
                   ids: torch.Tensor) -> list[float]:
    """Held-out KL of the hybrid for each choice of MLA layers (each student is loaded once per task)."""
    torch.set_num_threads(1)  # one core per task: the tasks run side by side
    # A task given GPUs (smart.gpus_per_task) scores on its GPU: on one CPU thread a 135M model
    # takes minutes per choice (seen on an H100 host, where this ran on the CPU before).
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # Ray hides GPUs from a task without any
    mla, mamba = load_student(mla_dir).to(device), load_student(mamba_dir).to(device)
    ids = ids.to(device)  # logits stay in host memory: held_out_kl moves a batch at a time
    kls = []
    for choice in choices:
        with mla_layers_swapped_in(mamba, mla, choice) as hybrid:
            kls.append(held_out_kl(hybrid, logits, ids))
    return kls


@contextlib.contextmanager
def mla_layers_swapped_in(mamba: ZebraForCausalLM, mla: ZebraForCausalLM, layers: list[int]):
    """The Mamba2 student with the MLA student's decoder layers at `layers`, in place and undone on
    exit: the same hybrid as compose_hybrid (norms and MLPs are the teacher's in both students),
    without loading or copying a model per choice."""
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


def score_layers(spec: JobSpec, ctx: Context, num_layers: int) -> tuple[float, list[float]]:
    """(KL of the all-Mamba2 hybrid, [num_layers] sensitivity scores)."""
    _, held = sequences(spec, ctx, spec.smart.seq_len)
    ids = torch.from_numpy(held[: spec.smart.sequences])
    logits = teacher_logits(load_teacher_model(ctx.teacher_dir, spec.teacher.dtype), ids)
    choices = [[]] + [[i] for i in range(num_layers)]
    chunks = [list(c) for c in np.array_split(np.arange(len(choices)), spec.smart.parallel) if len(c)]
    # On a GPU, one task per worker process (max_calls=1): a reused process would keep its CUDA
    # cache, GBs that later stages and tune trials on the same GPU need (seen on an H100).
    gpus = spec.smart.gpus_per_task
    task = ray.remote(max_calls=1 if gpus > 0 else 0)(_kl_of_choices).options(num_cpus=1, num_gpus=gpus)
    dirs = ctx.model_dir("ild/mla"), ctx.model_dir("ild/mamba")
    logits_ref, ids_ref = ray.put(logits), ray.put(ids)
    refs = [task.remote(*dirs, [choices[j] for j in chunk], logits_ref, ids_ref) for chunk in chunks]
    kls = [kl for part in ray.get(refs) for kl in part]
    return kls[0], sensitivity_from_kl(kls[0], kls[1:])


def run(spec: JobSpec, ctx: Context) -> dict:
    num_layers = len(ctx.infos["init"]["init_errors"]["mla"])
    kl_all_mamba, scores = score_layers(spec, ctx, num_layers)
    st = spec.student
    if st.mla_layers is not None:
        chosen = st.mla_layers
    else:
        chosen = select_mla_layers(scores, ctx.num_mla, st.keep_terminal, st.min_spacing)
    log.info("smart: scores %s; MLA layers %s", [round(s, 4) for s in scores], chosen)
    return {"tokens": spec.smart.sequences * spec.smart.seq_len * (num_layers + 1), "scores": scores,
            "kl_all_mamba": kl_all_mamba, "mla_layers": chosen}
