"""Stage ild: intermediate-layer distillation of both pure students in one run of the recipe (jobs.train).

Each student layer i gets the teacher's input to layer i and must reproduce the teacher's output
of layer i (cluster.teacher's hidden_states: entry i+1, the last one taken before the final norm)
and the output of its attention (the student's mixer output against the teacher's self_attn output):
the official Zebra-Llama loss, zebra.losses.ild_loss (token mean of the unsquared L2 norm of each
difference), summed over layers and over the two students. Each student's gradient is clipped on
its own (jobs.train's GroupClippedAdamW: one parameter group per student). Only the mixers train unless
ild.train_mlp_norms (then the layers' MLPs and norms too). Outputs: ild/mla, ild/mamba; IldOutput:
held-out ILD loss per student before and after, loss curve.
"""
from __future__ import annotations

import functools
import logging

import torch
from torch import Tensor, nn

from cluster.teacher import LocalTeacher
from jobs.context import Context, curve, data_factory, held_out_device, release_cuda_cache, sequences, train_config
from jobs.outputs import IldOutput
from jobs.spec import JobSpec
from jobs.train import Objective, distill
from zebra.hybrid import load_student
from zebra.losses import ild_loss
from zebra.teacher import load_teacher_model

log = logging.getLogger(__name__)


class StudentPair(nn.Module):
    """The pure-MLA and pure-Mamba2 students side by side; their mixers are trainable (with
    train_mlp_norms, the decoder layers' MLPs and norms too)."""

    def __init__(self, mla: str | nn.Module, mamba: str | nn.Module, train_mlp_norms: bool = False,
                 loss_backend: str = "auto"):
        """mla, mamba: each a student's folder (zebra.hybrid.load_student) or the model itself; loss_backend:
        zebra.losses.ild_loss's (IldSpec.loss_backend)."""
        super().__init__()
        self.loss_backend = loss_backend
        self.layer_loss = _layer_loss  # compile_layers replaces it by its compiled form
        self.mla, self.mamba = (m if isinstance(m, nn.Module) else load_student(m) for m in (mla, mamba))
        for name, p in self.named_parameters():
            p.requires_grad_(".layers." in name and (".mixer." in name or train_mlp_norms))

    def param_groups(self) -> list[dict]:
        """One optimizer parameter group per student (jobs.train clips each group's gradient on its own)."""
        return [{"params": [p for p in getattr(self, kind).parameters() if p.requires_grad]}
                for kind in ("mla", "mamba")]

    def compile_layers(self, backend: str = "inductor") -> int:
        """torch.compile each layer's step of the loss, the layer and its ild_loss in one graph per kind of layer
        (the loss's float32 differences and norms fuse into the layer's kernels; the layer is an input of the
        graph, so every layer of a kind shares it). What zebra.modeling.compile_decoder_layers calls for this
        model (jobs.train's `compile`); the layers it covers."""
        self.layer_loss = torch.compile(_layer_loss, backend=backend)
        return sum(len(student.model.layers) for student in (self.mla, self.mamba))

    def layer_losses(self, hidden: list[Tensor], mixers: list[Tensor]) -> dict[str, Tensor]:
        """hidden: the teacher's n_layers + 1 states, mixers: its n_layers attention outputs, all
        [batch, seq, d_model]; per student, the summed ild_loss of its layers each fed the teacher's input."""
        batch, seq, _ = hidden[0].shape
        pos = torch.arange(seq, device=hidden[0].device).expand(batch, seq)
        losses = {}
        for kind, student in (("mla", self.mla), ("mamba", self.mamba)):
            total = 0
            for i, layer in enumerate(student.model.layers):
                total = total + self.layer_loss(layer, hidden[i], pos, hidden[i + 1], mixers[i], self.loss_backend)
            losses[kind] = total
        return losses

    def forward(self, targets: tuple[list[Tensor], list[Tensor]]) -> Tensor:
        return sum(self.layer_losses(*targets).values())


def _layer_and_mixer(layer: nn.Module, x: Tensor, pos: Tensor) -> tuple[Tensor, Tensor]:
    """A decoder layer's output and its mixer's output, both [batch, seq, d_model]."""
    return layer(x, pos, return_mixer=True)


def _layer_loss(layer: nn.Module, x: Tensor, pos: Tensor, out: Tensor, mixer: Tensor, backend: str) -> Tensor:
    """One layer's ild_loss: the layer fed x (the teacher's input to it), against the teacher's output `out` and
    attention output `mixer`, all [batch, seq, d_model]."""
    got, mixed = _layer_and_mixer(layer, x, pos)
    return ild_loss(got, out, mixed, mixer, backend=backend)


def _targets(teacher, batch):
    return teacher.hidden_states(batch["input_ids"], mixers=True)


def _loss(student: nn.Module, targets, batch) -> Tensor:
    return student(targets)


ILD_OBJECTIVE = Objective(_targets, _loss)


@torch.no_grad()
def held_out_ild(pair: StudentPair, teacher: LocalTeacher, ids: Tensor, batch: int = 4) -> dict[str, float]:
    """Per student, the ILD loss (summed over layers; each a token mean) on held-out sequences
    ids [n, seq_len], `batch` sequences at a time on the teacher's device."""
    totals: dict[str, float] = {}
    for s in range(0, len(ids), batch):
        chunk = ids[s:s + batch]
        for kind, loss in pair.layer_losses(*teacher.hidden_states(chunk, mixers=True)).items():
            totals[kind] = totals.get(kind, 0.0) + float(loss) * len(chunk)
    return {kind: total / len(ids) for kind, total in totals.items()}


def run(spec: JobSpec, ctx: Context) -> IldOutput:
    init_dirs = [ctx.model_dir(f"init/{kind}") for kind in ("mla", "mamba")]
    factory = functools.partial(StudentPair, *init_dirs, spec.ild.train_mlp_norms, spec.ild.loss_backend)
    teacher_factory = functools.partial(load_teacher_model, ctx.teacher_dir, spec.teacher.dtype)
    _, held = sequences(spec, ctx, spec.ild.seq_len)
    held = torch.from_numpy(held)
    teacher = LocalTeacher(teacher_factory, held_out_device())
    before = held_out_ild(factory().to(teacher.device).eval(), teacher, held)
    release_cuda_cache()
    result = distill(train_config(spec, spec.ild), factory, teacher_factory, ILD_OBJECTIVE,
                     data_factory(spec, ctx, "ild", spec.ild), ctx.ray_storage(),
                     f"ild-{spec.section_hash('ild')}")
    pair = factory()
    pair.load_state_dict(result.student_state_dict())
    after = held_out_ild(pair.to(teacher.device).eval(), teacher, held)
    for kind in ("mla", "mamba"):
        ctx.save_model(getattr(pair, kind), f"ild/{kind}")
        log.info("ild: %s student held-out ILD loss %.5f -> %.5f", kind, before[kind], after[kind])
    return IldOutput(tokens=spec.ild.total_steps * spec.ild.tokens_per_step, loss_before=before, loss_after=after,
                     history=curve(result.history))
