"""Stage dpo: preference tuning with TRL's DPOTrainer -- not wired into the pipeline yet.

jobs.run calls `check(spec)` before any stage runs, so a spec that enables dpo fails at once,
not after hours of ILD and KD.
"""
from __future__ import annotations

from jobs.spec import JobSpec, SpecError
from jobs.stages.common import Context

UNSUPPORTED = ("dpo stage: preference tuning is not implemented in this pipeline yet; "
               "set dpo.enabled: false (the default)")


def check(spec: JobSpec) -> None:
    if spec.dpo.enabled:
        raise SpecError(f"job spec {spec.source}: dpo.enabled: {UNSUPPORTED}")


def run(spec: JobSpec, ctx: Context) -> dict:
    raise RuntimeError(UNSUPPORTED)
