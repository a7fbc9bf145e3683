"""Stage export: the final hybrid in spec.export.dtype with the tokenizer, as an HF folder at <run>/export."""
from __future__ import annotations

import logging

from jobs.spec import JobSpec
from jobs.stages.common import DTYPES, Context, load_student
from zebra.kv import kv_bytes_per_token

log = logging.getLogger(__name__)


def run(spec: JobSpec, ctx: Context) -> dict:
    model = load_student(ctx.model_dir("kd/model")).to(DTYPES[spec.export.dtype])
    out = ctx.save_model(model, "export")
    log.info("export: %s", out)
    return {"tokens": 0, "path": str(out), "dtype": spec.export.dtype,
            "kv_bytes_per_token": kv_bytes_per_token(model.config)}
