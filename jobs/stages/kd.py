"""Stage kd: compose the hybrid from the ILD students by SMART's choice and distill the teacher's logits.

Output: kd/model; KdOutput: held-out KL(teacher || hybrid) before and after, loss curve. The training
setup is jobs.context.kd_recipe, which a Tune trial (tune.trial) runs too, with its own steps and data.
"""
from __future__ import annotations

import functools
import logging

import torch

from jobs.context import Context, curve, data_factory, held_out_device, kd_recipe, release_cuda_cache, sequences
from jobs.outputs import KdOutput, SmartOutput
from jobs.spec import JobSpec
from jobs.train import distill
from zebra.hybrid import compose_hybrid, teacher_student_kl

log = logging.getLogger(__name__)


def run(spec: JobSpec, ctx: Context) -> KdOutput:
    mla_layers = ctx.output(SmartOutput).mla_layers
    factory = functools.partial(compose_hybrid, ctx.model_dir("ild/mla"), ctx.model_dir("ild/mamba"), mla_layers)
    cfg, teacher_factory, objective = kd_recipe(spec, ctx.teacher_dir)
    _, held = sequences(spec, ctx, spec.kd.seq_len)
    device = held_out_device()
    held = torch.from_numpy(held).to(device)
    teacher = teacher_factory().to(device).eval()
    before = teacher_student_kl(teacher, factory().to(device).eval(), held)
    release_cuda_cache()
    result = distill(cfg, factory, teacher_factory, objective, data_factory(spec, ctx, "kd", spec.kd),
                     ctx.ray_storage(), f"kd-{spec.section_hash('kd')}")
    hybrid = factory()
    hybrid.load_state_dict(result.student_state_dict())
    after = teacher_student_kl(teacher, hybrid.to(device).eval(), held)
    ctx.save_model(hybrid, "kd/model")
    del teacher
    release_cuda_cache()
    log.info("kd: held-out KL %.4f -> %.4f", before, after)
    return KdOutput(tokens=spec.kd.total_steps * spec.kd.tokens_per_step, kl_before=before, kl_after=after,
                    mla_layers=mla_layers, history=curve(result.history))
