"""Stage kd: compose the hybrid from the ILD students by SMART's choice and distill the teacher's logits.

Output: kd/model. Info: held-out KL(teacher || hybrid) before and after, loss curve.
"""
from __future__ import annotations

import functools
import logging

import torch

from jobs.spec import JobSpec
from jobs.stages.common import (Context, compose_hybrid, curve, data_factory, held_out_kl, load_teacher_model,
                                sequences, teacher_logits, train_config)
from jobs.train import distill, kd_objective
from zebra.teacher import teacher_folder

log = logging.getLogger(__name__)


def run(spec: JobSpec, ctx: Context) -> dict:
    mla_layers = ctx.infos["smart"]["mla_layers"]
    factory = functools.partial(compose_hybrid, ctx.model_dir("ild/mla"), ctx.model_dir("ild/mamba"), mla_layers)
    teacher_dir = teacher_folder(spec.kd.teacher) if spec.kd.teacher else ctx.teacher_dir
    teacher_factory = functools.partial(load_teacher_model, teacher_dir, spec.teacher.dtype)
    _, held = sequences(spec, ctx, spec.kd.seq_len)
    held = torch.from_numpy(held)
    logits = teacher_logits(teacher_factory(), held)
    before = held_out_kl(factory(), logits, held)
    kd = spec.kd
    objective = kd_objective(kd.temperature, kd.top_k, kd.ce_weight)
    result = distill(train_config(spec, kd), factory, teacher_factory, objective, data_factory(spec, ctx, "kd", kd),
                     ctx.ray_storage(), f"kd-{spec.section_hash('kd')}")
    hybrid = factory()
    hybrid.load_state_dict(result.student_state_dict())
    after = held_out_kl(hybrid.eval(), logits, held)
    ctx.save_model(hybrid, "kd/model")
    log.info("kd: held-out KL %.4f -> %.4f", before, after)
    return {"tokens": kd.total_steps * kd.tokens_per_step, "kl_before": before, "kl_after": after,
            "mla_layers": mla_layers, "history": curve(result.history)}
