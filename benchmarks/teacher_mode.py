"""KD step time with the teacher as a colocated Ray actor against the teacher in the worker's process.

    python -m benchmarks.teacher_mode SPEC [--steps 24] [--out teacher_mode.json]

SPEC is a job spec whose run has finished ILD and SMART (its storage holds ild/mla, ild/mamba and
the SMART choice). For each teacher mode the benchmark runs the spec's KD section (same workers,
GPUs, micro-batch, ZeRO stage, top_k) for --steps optimizer steps from the SMART-composed hybrid,
in a scratch Ray Train run of its own (the run's KD checkpoints are not touched), then prints a
table of ratios against in-process and writes JSON. Step time is the mean of the reports after the
first (worker start-up, CUDA and DeepSpeed warm-up fall in the first window).
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import statistics
import tempfile
import time

MODES = ("inprocess", "actor")


def measure(spec, ctx, mode: str, steps: int, storage_path: str) -> dict:
    from jobs.context import data_factory, train_config
    from jobs.train import distill, kd_objective
    from zebra.hybrid import compose_hybrid
    from zebra.teacher import load_teacher_model

    mla_layers = ctx.storage.stage_info("smart")["mla_layers"]
    factory = functools.partial(compose_hybrid, ctx.model_dir("ild/mla"), ctx.model_dir("ild/mamba"), mla_layers)
    teacher_factory = functools.partial(load_teacher_model, ctx.teacher_dir, spec.teacher.dtype)
    kd = spec.kd
    log_every = max(1, steps // 6)
    section = kd.model_copy(update={"teacher_mode": mode, "tokens": steps * kd.tokens_per_step,
                                    "checkpoint_every": steps, "log_every": log_every})
    cfg = train_config(spec, section)
    objective = kd_objective(kd.temperature, kd.top_k, kd.ce_weight)
    start = time.perf_counter()
    result = distill(cfg, factory, teacher_factory, objective, data_factory(spec, ctx, "kd", section),
                     storage_path, f"bench-teacher-{mode}")
    wall = time.perf_counter() - start
    windows = result.history[1:] or result.history
    step_s = statistics.fmean(h["step_s"] for h in windows)
    return {
        "mode": mode, "steps": steps, "workers": cfg.workers, "tokens_per_step": cfg.tokens_per_step,
        "step_s": step_s, "tokens_per_s": cfg.tokens_per_step / step_s,
        "tokens_per_s_per_worker": cfg.tokens_per_step / step_s / cfg.workers,
        "peak_gpu_gib": max((h.get("peak_gpu_gib", 0.0) for h in result.history), default=0.0),
        "wall_s": wall, "final_loss": result.history[-1]["loss"],
    }


def table(rows: list[dict]) -> str:
    base = next(r for r in rows if r["mode"] == "inprocess")["step_s"]
    lines = ["| teacher | step s | tokens/s | tokens/s per worker | peak GPU GiB | step time vs in-process |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s_per_worker']:,.0f}"
                     f" | {r['peak_gpu_gib']:.2f} | {r['step_s'] / base:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.teacher_mode", description=__doc__.splitlines()[0])
    parser.add_argument("spec", help="job spec of a run that has finished ILD and SMART")
    parser.add_argument("--steps", type=int, default=24, help="optimizer steps per mode (default 24)")
    parser.add_argument("--out", default="teacher_mode.json", help="JSON results (default teacher_mode.json)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    import ray

    from cluster.connect import connect
    from jobs.run import make_context, preflight
    from jobs.spec import load_spec

    spec = load_spec(args.spec)
    teacher_dir, n_mla = preflight(spec)
    connect(spec.cluster.address, spec.cluster.num_cpus)
    ctx = make_context(spec, teacher_dir, n_mla)
    for stage in ("ild", "smart"):
        if not ctx.storage.is_complete(stage):
            parser.error(f"{args.spec}: stage {stage} of run {spec.storage.uri} is not complete; run the spec first")
    try:
        with tempfile.TemporaryDirectory(prefix="zebra-bench-") as tmp:
            rows = [measure(spec, ctx, mode, args.steps, tmp) for mode in MODES]
    finally:
        ray.shutdown()  # on the H100 the process lingered past its table at exit without this
    print(table(rows))
    with open(args.out, "w") as f:
        json.dump({"spec": args.spec, "rows": rows}, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
