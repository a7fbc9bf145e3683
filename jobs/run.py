"""`python -m jobs.run SPEC`: validate the job spec, connect to Ray, open storage, run the stages.

Everything that can be checked before work is checked first (the spec, the teacher's shape
against the student section, unsupported stages), so a bad spec fails in seconds and marks
nothing complete. Each stage is skipped when storage holds its COMPLETE marker with the hash of
its current spec section (spec.section_hash); otherwise it runs, and its marker is written last,
with its info, wall time and tokens. A rerun of a finished spec does no work.

Local storage: the run's folder is the storage root and Ray Train checkpoints go to <root>/_ray.
S3 storage: stages work in a local scratch folder (~/.cache/zebra/runs/<name>) and upload their
outputs; an interrupted ILD or KD resumes from checkpoints in that scratch, so on the same machine.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time
from pathlib import Path

from cluster.connect import connect
from cluster.storage import LocalStorage, open_storage
from jobs.spec import STAGES, JobSpec, SpecError, check_against_teacher, load_spec

log = logging.getLogger("jobs.run")

SCRATCH_ROOT = Path.home() / ".cache" / "zebra" / "runs"


def preflight(spec: JobSpec) -> tuple[str, int]:
    """(teacher's local folder, number of MLA layers): the checks that need the teacher's config."""
    from transformers import AutoConfig

    from jobs.stages import dpo
    from jobs.stages.init import student_config
    from zebra.kv import kv_bytes_per_token, mla_layer_bytes_per_token
    from zebra.teacher import teacher_folder

    dpo.check(spec)
    if spec.kd.kl_weight != 1.0:  # kd_loss mixes (1 - ce_weight) * KL + ce_weight * CE; no separate KL weight
        raise SpecError(f"job spec {spec.source}: kd.kl_weight: {spec.kd.kl_weight} is not supported; "
                        "only 1.0 (set the KL/CE mix with kd.ce_weight)")
    teacher_dir = teacher_folder(spec.teacher.source)
    teacher_config = AutoConfig.from_pretrained(teacher_dir)
    mla_config = student_config(spec, teacher_config, "mla")
    n_mla = check_against_teacher(spec, teacher_config.num_hidden_layers, kv_bytes_per_token(teacher_config),
                                  mla_layer_bytes_per_token(mla_config))
    return teacher_dir, n_mla


def make_context(spec: JobSpec, teacher_dir: str, num_mla: int):
    from jobs.stages.common import Context

    storage = open_storage(spec.storage.uri, spec.storage.s3_endpoint_url)
    local = isinstance(storage, LocalStorage)
    scratch = Path(storage.local_path("")) if local else SCRATCH_ROOT / spec.name
    scratch.mkdir(parents=True, exist_ok=True)
    return Context(storage=storage, scratch=scratch, teacher_dir=teacher_dir, local_storage=local,
                   num_mla=num_mla)


def run_stage(spec: JobSpec, ctx, stage: str) -> None:
    section = spec.section(stage)
    if not getattr(section, "enabled", True):
        log.info("stage %s: disabled", stage)
        return
    digest = spec.section_hash(stage)
    if ctx.storage.is_complete(stage) and ctx.storage.stage_info(stage).get("hash") == digest:
        log.info("stage %s: skipping, complete with the same spec (hash %s)", stage, digest)
        ctx.infos[stage] = ctx.storage.stage_info(stage)
        return
    log.info("stage %s: start", stage)
    start = time.perf_counter()
    info = importlib.import_module(f"jobs.stages.{stage}").run(spec, ctx)
    info.update(stage=stage, hash=digest, wall_s=time.perf_counter() - start)
    ctx.storage.mark_complete(stage, info)
    ctx.infos[stage] = info
    log.info("stage %s: done in %.1f s", stage, info["wall_s"])


def run(spec: JobSpec) -> Path:
    """Run (or finish) the job; returns the local path of report.md."""
    from jobs.report import write_report

    teacher_dir, n_mla = preflight(spec)
    how = connect(spec.cluster.address, spec.cluster.num_cpus)
    log.info("Ray: %s", how)
    ctx = make_context(spec, teacher_dir, n_mla)
    for stage in STAGES:
        run_stage(spec, ctx, stage)
    report = write_report(spec.name, ctx.infos, ctx.scratch / "report")
    if not ctx.local_storage:
        ctx.storage.upload_dir(report.parent, "report")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.run", description=__doc__.splitlines()[0])
    parser.add_argument("spec", help="job spec YAML (see jobs/examples)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        spec = load_spec(args.spec)
        report = run(spec)
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
