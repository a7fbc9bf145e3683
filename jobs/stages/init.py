"""Stage init: the teacher -> a pure-MLA and a pure-Mamba2 student (no training), stored as HF folders.

Outputs: init/mla, init/mamba; InitOutput: per-layer relative init error of each student on the
calibration sequences (zebra.convert.layer_init_errors) and the students' KV bytes per token.
"""
from __future__ import annotations

import logging

import torch

from jobs.context import Context, held_out_device, sequences
from jobs.outputs import InitOutput
from jobs.spec import JobSpec
from zebra.convert import convert, hybrid_config, layer_init_errors
from zebra.kv import kv_bytes_per_token
from zebra.teacher import load_teacher_model

log = logging.getLogger(__name__)

KINDS = ("mla", "mamba")


def student_config(spec: JobSpec, teacher_config, kind: str):
    """The pure student of `kind` ("mla": every layer MLA, "mamba": every layer Mamba2)."""
    n = teacher_config.num_hidden_layers
    st = spec.student
    return hybrid_config(teacher_config, list(range(n)) if kind == "mla" else [], st.kv_rank, st.qk_rope_dim,
                         st.q_rank)


def run(spec: JobSpec, ctx: Context) -> InitOutput:
    # On the driver's GPU where it has one: the calibration forward and the float64 SVDs of SmolLM2 take
    # seconds there, ten minutes on the CPU in bfloat16.
    device = held_out_device()
    teacher = load_teacher_model(ctx.teacher_dir, spec.teacher.dtype).to(device)
    train, _ = sequences(spec, ctx, spec.init.seq_len)
    calib = torch.from_numpy(train[: spec.init.calibration_sequences]).to(device)
    out = InitOutput(tokens=int(calib.numel()), init_errors={}, kv_bytes_per_token={})
    for kind in KINDS:
        student = convert(teacher, student_config(spec, teacher.config, kind), calib)
        out.init_errors[kind] = layer_init_errors(teacher, student, calib)
        out.kv_bytes_per_token[kind] = kv_bytes_per_token(student.config)
        ctx.save_model(student, f"init/{kind}")
        log.info("init: %s student, mean layer init error %.4f", kind,
                 sum(out.init_errors[kind]) / len(out.init_errors[kind]))
    out.kv_bytes_per_token["teacher"] = kv_bytes_per_token(teacher.config)
    return out
