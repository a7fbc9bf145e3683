"""`python -m tune.search SPEC` (`zebra tune SPEC`): Ray Tune search over MLA layer count, kv_rank,
q_rank and qk_rope_dim under a KV-cache and a per-trial memory budget (the spec's tune section).

1. Checks first, before any work: every arm over tune.kv_budget is rejected (counted, logged,
   reported, never launched); no arm left, a trial's memory over tune.memory_budget_gb, or a
   candidate that does not fit the teacher is a SpecError naming the field.
2. Shared work, once: the pipeline's own init, ild and smart stages (jobs.run.run_stage, so cached
   by their COMPLETE markers) in a sub-run <storage>/tune/shared-rope<d> per qk_rope_dim candidate,
   at the largest kv_rank and q_rank of the arms that use it. The Mamba2 student does not depend on
   the MLA shape, so with several rope candidates it is trained once per sub-run (duplicated work,
   kept for the simplicity of reusing the stages as they are).
3. The search (tune.trial): each trial composes its hybrid, cuts its ranks, runs the kd stage's
   recipe for tune.steps steps (jobs.train.distill_in_tune) and reports held-out KL; ASHA stops weak trials; Optuna or HyperOpt choose arms (or a seeded random
   sample; a space no larger than tune.num_samples is searched whole). An interrupted search
   resumes with Tuner.restore: finished trials stay finished, unfinished ones continue from their
   last checkpoint. The experiment is <storage>/tune/search-<hash of the spec>: a changed spec
   starts a new search.
4. Outputs in <storage>/tune: trials.json, pareto.md, pareto.png and best.yaml (tune.pareto).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import random
import sys
import time

from ray import tune
from ray.tune.schedulers import ASHAScheduler
from transformers import AutoConfig

from cluster.connect import connect
from jobs.context import sequences
from jobs.outputs import SmartOutput
from jobs.run import STAGE, make_context, preflight, run_stage
from jobs.spec import JobSpec, SpecError, load_spec

from .distinct import DistinctArms
from .pareto import best_row, best_spec_yaml, pareto_front, pareto_plot, pareto_table
from .space import check_memory, search_space, shared_students
from .trial import SharedStudents, TrialLog, TrialPlan, run_trial

log = logging.getLogger("tune.search")

SHARED_STAGES = ("init", "ild", "smart")
OUTPUTS = ("trials.json", "pareto.md", "pareto.png", "best.yaml")


@dataclasses.dataclass
class Outcome:
    """What a search left: its trials (rows as tune.pareto reads them), where the outputs are, and
    whether it was interrupted (then nothing is written: rerun the command to resume)."""

    rows: list[dict]
    outputs: dict[str, str]
    table: str
    interrupted: bool = False


def run_search(spec: JobSpec) -> Outcome:
    """Check, run the shared stages, search, write the outputs."""
    _check_sections(spec)
    t = spec.tune  # the pipeline's checks on the smallest arm; search_space checks every candidate
    teacher_dir, _ = preflight(spec.updated({"student.num_mla_layers": min(t.num_mla_layers), "student.mla_layers": None,
                                             "student.kv_budget": None, "student.kv_rank": min(t.kv_rank),
                                             "student.q_rank": None, "student.qk_rope_dim": min(t.qk_rope_dim)}))
    teacher_config = AutoConfig.from_pretrained(teacher_dir)
    space = search_space(spec, teacher_config)
    if space.rejected:
        log.info("tune: %d of %d configurations exceed tune.kv_budget (%.6g bytes/token) and are never launched: %s",
                 len(space.rejected), len(space.rejected) + len(space.arms), space.budget_bytes,
                 ", ".join(a.key for a in space.rejected))
    memory = check_memory(spec, teacher_config, space.arms)
    log.info("Ray: %s", connect(spec.cluster.address, spec.cluster.num_cpus))
    started = time.perf_counter()
    shared = {shape.qk_rope_dim: _run_shared(_shared_spec(spec, shape), teacher_dir, shape.num_mla)
              for shape in shared_students(space.arms)}
    ctx = make_context(spec, teacher_dir, 0)
    train, held = sequences(spec, ctx, spec.tune.seq_len, "kd")  # trials train as KD does
    plan = _plan(spec, teacher_dir, shared, space, train, held, memory)
    searching = time.perf_counter()
    results, filesystem = _fit(spec, ctx, space, plan)
    timing = {"shared_s": searching - started, "search_s": time.perf_counter() - searching}
    rows = [_row(r, space, spec.tune.steps) for r in results]
    finished = _finished_trials(results.experiment_path, filesystem)
    expected = min(spec.tune.num_samples, len(space.arms))
    if finished < expected:
        log.warning("tune: interrupted with %d of %d trials finished; run the same command again to resume",
                    finished, expected)
        return Outcome(rows, {}, "", interrupted=True)
    return _write_outputs(spec, ctx, space, rows, timing)


def _finished_trials(experiment_path: str, filesystem) -> int:
    """Trials the saved experiment state holds as finished (terminated or errored). The state on
    disk, not the ResultGrid: on SIGINT Tune saves the state, then stops the running trials, which
    the ResultGrid then shows as terminated although a restore resumes them."""
    trials = tune.ExperimentAnalysis(experiment_path, storage_filesystem=filesystem).trials
    return sum(t.status in ("TERMINATED", "ERROR") for t in trials)


def _check_sections(spec: JobSpec) -> None:
    where = f"job spec {spec.source}: " if spec.source else "job spec: "
    if spec.tune is None:
        raise SpecError(f"{where}tune: the spec has no tune section (see jobs/examples/tune.yaml)")
    off = [s for s in SHARED_STAGES if not spec.section(s).enabled]
    if off:
        raise SpecError(f"{where}{off[0]}.enabled: tune composes every trial from the ILD students by the SMART "
                        "scores, so init, ild and smart must be enabled")


def _shared_spec(spec: JobSpec, shape) -> JobSpec:
    """The sub-run that trains the pure students once for all arms of one qk_rope_dim."""
    return spec.updated({
        "name": f"{spec.name}-shared-rope{shape.qk_rope_dim}",
        "storage.uri": f"{spec.storage.uri.rstrip('/')}/tune/shared-rope{shape.qk_rope_dim}",
        "student.kv_rank": shape.kv_rank, "student.q_rank": shape.q_rank, "student.qk_rope_dim": shape.qk_rope_dim,
        "student.num_mla_layers": shape.num_mla, "student.mla_layers": None, "student.kv_budget": None,
        "tune": None,
    })


def _run_shared(sub: JobSpec, teacher_dir: str, n_mla: int):
    ctx = make_context(sub, teacher_dir, n_mla)
    for name in SHARED_STAGES:
        run_stage(sub, ctx, STAGE[name])
    return SharedStudents(ctx.storage, ctx.output(SmartOutput).scores)


def _plan(spec: JobSpec, teacher_dir: str, shared: dict, space, train, held, memory: int) -> TrialPlan:
    log.info("tune: %d configurations within the budget; a trial needs about %.2f GiB", len(space.arms),
             memory / 2**30)
    return TrialPlan(spec=spec, teacher_dir=teacher_dir, shared=shared, arms={a.key: a for a in space.arms},
                     train_ids=train, held_ids=held)


# ---- Ray Tune ------------------------------------------------------------------------------------

def _fit(spec: JobSpec, ctx, space, plan):
    """Start the search, or resume it where an earlier run of the same spec stopped; returns the
    ResultGrid and the pyarrow filesystem of its storage (None: local or default S3)."""
    t = spec.tune
    resources = {"cpu": t.cpus_per_trial, "gpu": t.gpus_per_trial}
    if t.memory_budget_gb is not None:
        resources["memory"] = int(t.memory_budget_gb * 2**30)
    trainable = tune.with_resources(tune.with_parameters(run_trial, plan=plan), resources)
    storage_path, filesystem = ctx.storage.pyarrow_location("tune")  # S3 through cluster.storage
    name = f"search-{_search_hash(spec)}"
    path = f"{storage_path}/{name}"
    if tune.Tuner.can_restore(path, storage_filesystem=filesystem):
        log.info("tune: resuming the search at %s", path)
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True,
                                   storage_filesystem=filesystem)
    else:
        param_space, searcher, num_samples = _search_alg(spec, [a.key for a in space.arms])
        tuner = tune.Tuner(
            trainable, param_space=param_space,
            tune_config=tune.TuneConfig(metric="kl", mode="min", search_alg=searcher, scheduler=_asha(t),
                                        num_samples=num_samples, max_concurrent_trials=t.max_concurrent_trials,
                                        reuse_actors=True),
            run_config=tune.RunConfig(name=name, storage_path=storage_path, storage_filesystem=filesystem,
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                                      callbacks=[TrialLog(t.steps)], verbose=1),
        )
    return tuner.fit(), filesystem


def _search_alg(spec: JobSpec, keys: list[str]):
    """(param_space, searcher or None, num_samples). A space no larger than num_samples is searched
    whole; "random" tries a seeded sample of distinct arms; Optuna and HyperOpt choose among the arms,
    each arm at most once (tune.distinct)."""
    t = spec.tune
    if len(keys) <= t.num_samples or t.search_alg == "random":
        chosen = keys if len(keys) <= t.num_samples else random.Random(spec.seed).sample(keys, t.num_samples)
        log.info("tune: trying %d of %d configurations (%s)", len(chosen), len(keys),
                 "all of them" if len(chosen) == len(keys) else "a seeded random sample")
        return {"arm": tune.grid_search(chosen)}, None, 1
    if t.search_alg == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        searcher = OptunaSearch(seed=spec.seed)
    else:
        from ray.tune.search.hyperopt import HyperOptSearch

        searcher = HyperOptSearch(random_state_seed=spec.seed)
    return {"arm": tune.choice(keys)}, DistinctArms(searcher, keys, seed=spec.seed), t.num_samples


def _asha(t):
    return ASHAScheduler(time_attr="step", max_t=t.steps, grace_period=t.grace_period * t.eval_every,
                         reduction_factor=t.reduction_factor)


def _search_hash(spec: JobSpec) -> str:
    """12 hex digits over what the search's trials depend on (not the name, storage or cluster)."""
    parts = spec.model_dump(mode="json", exclude={"name", "storage", "cluster", "export", "eval", "dpo"})
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


# ---- outputs -------------------------------------------------------------------------------------

def _row(result, space, steps: int) -> dict:
    arm = {a.key: a for a in space.arms}[result.config["arm"]]
    m = result.metrics or {}
    return {
        "trial_id": m.get("trial_id", os.path.basename(result.path)), **arm.fields(),
        "mla_layers": m.get("mla_layers", ""), "kl": m.get("kl"), "ppl": m.get("ppl"), "step": m.get("step", 0),
        "peak_gpu_gib": m.get("peak_gpu_gib"),
        "stopped_early": result.error is None and m.get("step", 0) < steps,
        "status": "ok" if result.error is None else f"error: {type(result.error).__name__}",
    }


def _write_outputs(spec: JobSpec, ctx, space, rows: list[dict], timing: dict) -> Outcome:
    """trials.json, pareto.md, pareto.png and best.yaml in <storage>/tune. timing: this invocation's
    seconds in the shared stages (shared_s, ~0 when cached) and in Ray Tune (search_s; after a
    restore only the resumed part)."""
    t = spec.tune
    rows.sort(key=lambda r: (r["kv_bytes_per_token"], r["key"], r["trial_id"]))
    budget = "none" if space.budget_bytes is None else (
        f"tune.kv_budget {t.kv_budget} = {space.budget_bytes:.6g} bytes/token "
        f"({space.budget_bytes / space.teacher_kv_bytes:.2%} of the teacher's {space.teacher_kv_bytes})")
    summary = {"name": spec.name, "budget": budget, "configurations": len(space.arms) + len(space.rejected),
               "rejected": len(space.rejected), "steps": t.steps, **timing,
               "trials_per_hour": len(rows) * 3600 / timing["search_s"] if timing["search_s"] > 0 else None}
    best = best_row(rows)
    report = {
        **summary, "budget_bytes_per_token": space.budget_bytes, "teacher_kv_bytes_per_token": space.teacher_kv_bytes,
        "rejected_configurations": [a.fields() for a in space.rejected], "trials": rows,
        "pareto": [r["trial_id"] for r in pareto_front(rows)], "best": best and best["trial_id"],
    }
    table = pareto_table(rows, summary)
    fraction = None if space.budget_bytes is None else space.budget_bytes / space.teacher_kv_bytes
    files = {"trials.json": json.dumps(report, indent=2).encode(), "pareto.md": table.encode(),
             "pareto.png": pareto_plot(rows, fraction)}
    if best is not None:
        files["best.yaml"] = best_spec_yaml(spec, best).encode()
    for name, data in files.items():
        ctx.storage.write_bytes(f"tune/{name}", data)
    outputs = {name: f"{ctx.storage.uri}/tune/{name}" for name in files}
    return Outcome(rows, outputs, table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tune.search", description=__doc__.splitlines()[0])
    parser.add_argument("spec", help="job spec YAML with a tune section (see jobs/examples/tune.yaml)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        outcome = run_search(load_spec(args.spec))
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if outcome.interrupted:
        print("interrupted: run the same command again to resume the search", file=sys.stderr)
        return 130
    print(outcome.table)
    for name, where in outcome.outputs.items():
        print(f"{name}: {where}")
    failed = sum(r["status"] != "ok" for r in outcome.rows)
    return 1 if failed or "best.yaml" not in outcome.outputs else 0


if __name__ == "__main__":
    sys.exit(main())
