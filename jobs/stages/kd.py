"""Stage kd: compose the hybrid from the ILD students by SMART's choice and distill the teacher's logits.

Output: kd/model; KdOutput: held-out KL(teacher || hybrid) and the hybrid's perplexity before and after (and
the teacher's), loss curve. The training
setup is jobs.context.kd_recipe, which a Tune trial (tune.trial) runs too, with its own steps and data.
"""
from __future__ import annotations

import functools
import logging
import math

import torch

from jobs.context import Context, curve, data_factory, held_out_device, kd_recipe, release_cuda_cache, sequences
from jobs.outputs import KdOutput, SmartOutput
from jobs.spec import JobSpec
from jobs.train import distill
from zebra.hybrid import compose_hybrid, teacher_student_figures

log = logging.getLogger(__name__)


def run(spec: JobSpec, ctx: Context) -> KdOutput:
    mla_layers = ctx.output(SmartOutput).mla_layers
    factory = functools.partial(compose_hybrid, ctx.model_dir("ild/mla"), ctx.model_dir("ild/mamba"), mla_layers)
    cfg, teacher_factory, objective = kd_recipe(spec, ctx.teacher_dir)
    _, held = sequences(spec, ctx, spec.kd.seq_len)
    device = held_out_device()
    held = torch.from_numpy(held).to(device)
    teacher = teacher_factory().to(device).eval()
    before = teacher_student_figures(teacher, factory().to(device).eval(), held)
    release_cuda_cache()
    result = distill(cfg, factory, teacher_factory, objective, data_factory(spec, ctx, "kd", spec.kd),
                     ctx.ray_storage(), f"kd-{spec.section_hash('kd')}")
    hybrid = factory()
    hybrid.load_state_dict(result.student_state_dict())
    after = teacher_student_figures(teacher, hybrid.to(device).eval(), held)
    ctx.save_model(hybrid, "kd/model")
    del teacher
    release_cuda_cache()
    ppl = {"teacher": math.exp(before["ce_teacher"]), "before": math.exp(before["ce_student"]),
           "after": math.exp(after["ce_student"])}
    log.info("kd: held-out KL %.4f -> %.4f; held-out perplexity %.2f -> %.2f (teacher %.2f)", before["kl"],
             after["kl"], ppl["before"], ppl["after"], ppl["teacher"])
    return KdOutput(tokens=spec.kd.total_steps * spec.kd.tokens_per_step, kl_before=before["kl"], kl_after=after["kl"],
                    mla_layers=mla_layers, history=curve(result.history), ppl_teacher=ppl["teacher"],
                    ppl_before=ppl["before"], ppl_after=ppl["after"])
