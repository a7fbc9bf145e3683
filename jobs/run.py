"""`python -m jobs.run SPEC`: validate the job spec, connect to Ray, open storage, run the stages.

The pipeline is PIPELINE, a table of typed stage functions: each `run(spec, ctx)` returns its
output dataclass (jobs.outputs), which the stages after it read with ctx.output(Type).

Everything that can be checked before work is checked first (the spec, the teacher's shape
against the student section, unsupported stages, and every enabled stage's inputs), so a bad spec
fails in seconds and marks nothing complete. Each stage is skipped when storage holds its COMPLETE
marker with the hash of its current spec section (spec.section_hash); otherwise it runs, and its
marker (its output as JSON) is written last. A rerun of a finished spec does no work. A disabled
stage contributes what stands in for it (smart: the spec's student.mla_layers) or its stored
output; a later stage that needs an output nothing provides is refused at preflight.

Local storage: the run's folder is the storage root and Ray Train checkpoints go to <root>/_ray.
S3 storage: stages work in a local scratch folder ($ZEBRA_CACHE/runs/<name>) and upload their
outputs; an interrupted ILD or KD resumes from checkpoints in that scratch, so on the same machine.
Before the stages start, a warning is logged when that folder's disk has less free space than the
checkpoints of the stages left to run are estimated to take (checkpoint_bytes, a low estimate).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

import torch

from cluster.connect import ClusterUnreachable, connect
from cluster.preflight import PendingTimeout, PreflightError, check_cluster, space_problem, watch_pending
from cluster.storage import LocalStorage, Storage, StorageFull, open_storage
from jobs.context import Context
from jobs.outputs import (DpoOutput, EvalOutput, ExportOutput, IldOutput, InitOutput, KdOutput, SmartOutput,
                          StageOutput)
from jobs.spec import STAGES, JobSpec, SpecError, check_against_teacher, check_environment, load_spec
from jobs.stages import dpo, export, ild, init, kd, smart
from jobs.stages import eval as evaluation
from zebra.modeling import ZebraForCausalLM
from zebra.paths import cache_root

log = logging.getLogger("jobs.run")



@dataclasses.dataclass(frozen=True)
class Stage:
    """One row of the pipeline: its name (its spec section and its folder in storage), the function
    that runs it, the output it returns, the outputs of earlier stages it reads, and what stands in
    for it when it is disabled (None: only a stored output can)."""

    name: str
    run: Callable[[JobSpec, Context], StageOutput]
    output: type[StageOutput]
    needs: tuple[type[StageOutput], ...] = ()
    stand_in: Callable[[JobSpec], StageOutput | None] | None = None


PIPELINE: tuple[Stage, ...] = (
    Stage("init", init.run, InitOutput),
    Stage("ild", ild.run, IldOutput, needs=(InitOutput,)),
    Stage("smart", smart.run, SmartOutput, needs=(IldOutput,), stand_in=smart.given),
    Stage("kd", kd.run, KdOutput, needs=(IldOutput, SmartOutput)),
    Stage("dpo", dpo.run, DpoOutput, needs=(KdOutput,)),
    Stage("export", export.run, ExportOutput, needs=(KdOutput,)),
    Stage("eval", evaluation.run, EvalOutput, needs=(ExportOutput,)),
)
STAGE = {stage.name: stage for stage in PIPELINE}
assert tuple(STAGE) == STAGES, "jobs.spec.STAGES and PIPELINE list the stages in one order"


def preflight(spec: JobSpec) -> tuple[str, int]:
    """(teacher's local folder, number of MLA layers): the checks that need the teacher's config."""
    from transformers import AutoConfig

    from zebra.kv import kv_bytes_per_token, kv_values_per_token, mla_layer_bytes_per_token
    from zebra.teacher import teacher_folder

    check_environment(spec)
    dpo.check(spec)
    teacher_dir = teacher_folder(spec.teacher.source)
    teacher_config = AutoConfig.from_pretrained(teacher_dir)
    mla_config = init.student_config(spec, teacher_config, "mla")
    n_mla = check_against_teacher(spec, teacher_config.num_hidden_layers, kv_bytes_per_token(teacher_config),
                                  mla_layer_bytes_per_token(mla_config),
                                  kv_values_per_token(teacher_config) // teacher_config.num_hidden_layers)
    return teacher_dir, n_mla


def make_context(spec: JobSpec, teacher_dir: str, num_mla: int) -> Context:
    storage = open_storage(spec.storage.uri, spec.storage.s3_endpoint_url)
    local = isinstance(storage, LocalStorage)
    scratch = Path(storage.local_path("")) if local else cache_root() / "runs" / spec.name
    scratch.mkdir(parents=True, exist_ok=True)
    return Context(storage=storage, scratch=scratch, teacher_dir=teacher_dir, local_storage=local,
                   num_mla=num_mla)


def _enabled(spec: JobSpec, stage: Stage) -> bool:
    return getattr(spec.section(stage.name), "enabled", True)


def _done(spec: JobSpec, storage: Storage, stage: Stage) -> bool:
    """Whether storage holds the stage's COMPLETE marker for its current spec section."""
    digest = spec.section_hash(stage.name)
    return storage.is_complete(stage.name) and storage.stage_info(stage.name).get("hash") == digest


WEIGHT_BYTES = 2  # per parameter of a checkpoint's weights: bf16, the least they take (float32 runs: 4)
OPTIMIZER_BYTES = 12  # per trained parameter: DeepSpeed's float32 master copy and Adam's two moments


def checkpoint_bytes(spec: JobSpec, teacher_config, stages: Iterable[str]) -> dict[str, int]:
    """{stage: bytes} of the Ray Train checkpoints each training stage among `stages` keeps, a low estimate:
    min(storage.keep_checkpoints, the checkpoints it writes) checkpoints, each WEIGHT_BYTES per parameter
    of its student(s) and OPTIMIZER_BYTES per trained one. ild: both pure students, their mixers trained
    (with ild.train_mlp_norms, their layers); kd and dpo: the hybrid, all trained, counted as the smaller
    pure student. Left out, so the real figure is larger: float32 weights (CPU runs), the final checkpoint's
    float32 state_dict, the copy each worker stages in $TMPDIR, and the models the stages save."""
    with torch.device("meta"):  # shapes only: no memory, milliseconds
        pair = ild.StudentPair(*(ZebraForCausalLM(init.student_config(spec, teacher_config, kind))
                                 for kind in ("mla", "mamba")), spec.ild.train_mlp_norms)
    pure = min(_numel(pair.mla.parameters()), _numel(pair.mamba.parameters()))
    ild_trained = _numel(p for p in pair.parameters() if p.requires_grad)
    sizes = {"ild": (_numel(pair.parameters()), ild_trained), "kd": (pure, pure), "dpo": (pure, pure)}
    need = {}
    for name in stages:
        section = spec.section(name)
        if name in sizes and section.enabled:
            params, trained = sizes[name]
            kept = min(spec.storage.keep_checkpoints, -(-section.total_steps // section.checkpoint_every))
            need[name] = kept * (WEIGHT_BYTES * params + OPTIMIZER_BYTES * trained)
    return need


def _numel(params: Iterable[torch.nn.Parameter]) -> int:
    return sum(p.numel() for p in params)


def warn_if_short_of_space(spec: JobSpec, ctx: Context) -> None:
    """Log a warning when the folder that takes the run's checkpoints (the storage folder; for S3 storage
    the local scratch) has less free space than checkpoint_bytes estimates for the stages left to run."""
    from transformers import AutoConfig

    todo = [stage.name for stage in PIPELINE if _enabled(spec, stage) and not _done(spec, ctx.storage, stage)]
    need = checkpoint_bytes(spec, AutoConfig.from_pretrained(ctx.teacher_dir), todo)
    if ctx.local_storage:
        field, fix = f"storage.uri {spec.storage.uri!r}", "free space there or point storage.uri at a larger disk"
    else:
        field, fix = "the local scratch of S3 storage", "free space there or point $ZEBRA_CACHE at a larger disk"
    problem = space_problem(ctx.scratch, {f"{name} checkpoints": n for name, n in need.items()}, fix)
    if problem:
        log.warning("preflight: %s: %s", field, problem)


def check_inputs(spec: JobSpec, storage: Storage) -> None:
    """Refuse, before any work, an enabled stage that reads the output of a disabled stage for which
    nothing stands in and storage holds no stored output. Raises SpecError naming both sections."""
    where = f"job spec {spec.source}: " if spec.source else "job spec: "
    made_by = {stage.output: stage for stage in PIPELINE}
    available: set[type] = set()
    for stage in PIPELINE:
        if _enabled(spec, stage):
            for need in stage.needs:
                if need not in available:
                    producer = made_by[need]
                    raise SpecError(
                        f"{where}{stage.name}.enabled: true needs the output of stage {producer.name}, but "
                        f"{producer.name}.enabled is false and {storage.uri} holds no output of it; enable "
                        f"{producer.name} or disable {stage.name}")
            available.add(stage.output)
        elif (stage.stand_in and stage.stand_in(spec)) or storage.is_complete(stage.name):
            available.add(stage.output)


def run_stage(spec: JobSpec, ctx: Context, stage: Stage) -> None:
    """Run the stage, or skip it when storage holds its output for this spec; either way its output
    lands in ctx.outputs. A disabled stage contributes its stand-in or its stored output, if any."""
    if not _enabled(spec, stage):
        out = stage.stand_in(spec) if stage.stand_in else None
        if out is None and ctx.storage.is_complete(stage.name):
            out = stage.output.from_json(ctx.storage.stage_info(stage.name))
        if out is not None:
            ctx.outputs[stage.output] = out
        log.info("stage %s: disabled%s", stage.name, "" if out is None else f"; its output: {out}")
        return
    digest = spec.section_hash(stage.name)
    if _done(spec, ctx.storage, stage):
        log.info("stage %s: skipping, complete with the same spec (hash %s)", stage.name, digest)
        ctx.outputs[stage.output] = stage.output.from_json(ctx.storage.stage_info(stage.name))
        return
    log.info("stage %s: start", stage.name)
    start = time.perf_counter()
    with watch_pending(stage.name, spec.cluster.pending_timeout_s):
        out = stage.run(spec, ctx)
    out.wall_s = time.perf_counter() - start
    ctx.storage.mark_complete(stage.name, {**out.to_json(), "stage": stage.name, "hash": digest})
    ctx.outputs[stage.output] = out
    log.info("stage %s: done in %.1f s", stage.name, out.wall_s)


def run(spec: JobSpec) -> Path:
    """Run (or finish) the job; returns the local path of report.md."""
    from jobs.report import write_report

    teacher_dir, n_mla = preflight(spec)
    ctx = make_context(spec, teacher_dir, n_mla)
    check_inputs(spec, ctx.storage)
    warn_if_short_of_space(spec, ctx)
    how = connect(spec.cluster.address, spec.cluster.num_cpus)
    log.info("Ray: %s", how)
    check_cluster(spec)
    for stage in PIPELINE:
        run_stage(spec, ctx, stage)
    outputs = {stage.name: ctx.outputs[stage.output] for stage in PIPELINE if stage.output in ctx.outputs}
    report = write_report(spec.name, outputs, ctx.scratch / "report")
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
    except (SpecError, PreflightError, PendingTimeout, ClusterUnreachable, StorageFull) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
