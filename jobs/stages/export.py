"""Stage export: the final hybrid (dpo/model when the dpo stage is enabled, else kd/model) in
spec.export.dtype with the tokenizer, as an HF folder at <run>/export."""
from __future__ import annotations

import logging

from jobs.context import Context
from jobs.outputs import ExportOutput
from jobs.spec import JobSpec
from zebra.hybrid import DTYPES, load_student
from zebra.kv import kv_bytes_per_token

log = logging.getLogger(__name__)


def run(spec: JobSpec, ctx: Context) -> ExportOutput:
    source = "dpo/model" if spec.dpo.enabled else "kd/model"
    model = load_student(ctx.model_dir(source)).to(DTYPES[spec.export.dtype])
    out = ctx.save_model(model, "export")
    log.info("export: %s from %s", out, source)
    return ExportOutput(tokens=0, path=str(out), source=source, dtype=spec.export.dtype,
                        kv_bytes_per_token=kv_bytes_per_token(model.config))
