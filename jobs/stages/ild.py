"""Stage ild: intermediate-layer distillation of both pure students in one run of the recipe (jobs.train).

Each student layer i gets the teacher's input to layer i and must reproduce the teacher's output
of layer i (cluster.teacher's hidden_states: entry i+1, the last one taken before the final norm),
MSE summed over layers and over the two students. Only the mixers train; norms and MLPs are the
teacher's. Outputs: ild/mla, ild/mamba; IldOutput: held-out MSE per student before and after, loss curve.
"""
from __future__ import annotations

import functools
import logging

import torch
from torch import Tensor, nn

from cluster.teacher import LocalTeacher
from jobs.context import Context, curve, data_factory, sequences, train_config
from jobs.outputs import IldOutput
from jobs.spec import JobSpec
from jobs.train import Objective, distill
from zebra.hybrid import load_student
from zebra.losses import ild_loss
from zebra.teacher import load_teacher_model

log = logging.getLogger(__name__)


class StudentPair(nn.Module):
    """The pure-MLA and pure-Mamba2 students side by side; only their mixers are trainable."""

    def __init__(self, mla_dir: str, mamba_dir: str):
        super().__init__()
        self.mla, self.mamba = load_student(mla_dir), load_student(mamba_dir)
        for name, p in self.named_parameters():
            p.requires_grad_(".mixer." in name)

    def layer_losses(self, hidden: list[Tensor]) -> dict[str, Tensor]:
        """hidden: the teacher's n_layers + 1 states [batch, seq, d_model]; per student, the summed
        MSE of its layers each fed the teacher's input."""
        batch, seq, _ = hidden[0].shape
        pos = torch.arange(seq, device=hidden[0].device).expand(batch, seq)
        losses = {}
        for kind, student in (("mla", self.mla), ("mamba", self.mamba)):
            layers = student.model.layers
            losses[kind] = sum(ild_loss(layer(hidden[i], pos), hidden[i + 1]) for i, layer in enumerate(layers))
        return losses

    def forward(self, hidden: list[Tensor]) -> Tensor:
        return sum(self.layer_losses(hidden).values())


def _targets(teacher, batch):
    return teacher.hidden_states(batch["input_ids"])


def _loss(student: nn.Module, targets, batch) -> Tensor:
    return student(targets)


ILD_OBJECTIVE = Objective(_targets, _loss)


@torch.no_grad()
def held_out_mse(pair: StudentPair, teacher: LocalTeacher, ids: Tensor) -> dict[str, float]:
    losses = pair.layer_losses(teacher.hidden_states(ids))
    return {kind: float(v) for kind, v in losses.items()}


def run(spec: JobSpec, ctx: Context) -> IldOutput:
    init_dirs = [ctx.model_dir(f"init/{kind}") for kind in ("mla", "mamba")]
    factory = functools.partial(StudentPair, *init_dirs)
    teacher_factory = functools.partial(load_teacher_model, ctx.teacher_dir, spec.teacher.dtype)
    _, held = sequences(spec, ctx, spec.ild.seq_len)
    held = torch.from_numpy(held)
    teacher = LocalTeacher(teacher_factory)
    before = held_out_mse(factory(), teacher, held)
    result = distill(train_config(spec, spec.ild), factory, teacher_factory, ILD_OBJECTIVE,
                     data_factory(spec, ctx, "ild", spec.ild), ctx.ray_storage(),
                     f"ild-{spec.section_hash('ild')}")
    pair = factory()
    pair.load_state_dict(result.student_state_dict())
    after = held_out_mse(pair.eval(), teacher, held)
    for kind in ("mla", "mamba"):
        ctx.save_model(getattr(pair, kind), f"ild/{kind}")
        log.info("ild: %s student held-out MSE %.5f -> %.5f", kind, before[kind], after[kind])
    return IldOutput(tokens=spec.ild.total_steps * spec.ild.tokens_per_step, mse_before=before, mse_after=after,
                     history=curve(result.history))
