"""Stage eval: lm-eval through the Serve endpoint (serve.eval.run_eval) on the exported hybrid, and on
the teacher with eval.compare_teacher. Output: eval/eval.json and eval/eval.md; EvalOutput: the table rows."""
from __future__ import annotations

import socket

import ray

from jobs.context import Context
from jobs.outputs import EvalOutput
from jobs.spec import JobSpec


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def eval_gpus(setting: float | None, cluster: dict) -> float:
    """The Serve replica's GPUs: eval.gpus, or one GPU where the cluster has any (a replica with none
    runs on the CPU: Ray hides the GPUs from it)."""
    if setting is not None:
        return setting
    return 1.0 if cluster.get("GPU", 0) >= 1 else 0.0


def run(spec: JobSpec, ctx: Context) -> EvalOutput:
    from serve.eval import run_eval  # here: lm-eval and Serve are heavy imports the other stages do not need

    ev = spec.eval
    out = ctx.scratch / "eval"
    report = run_eval(ctx.model_dir("export"), ev.tasks, out, teacher_dir=ctx.teacher_dir if ev.compare_teacher else None,
                      limit=ev.limit, port=_free_port(), num_gpus=eval_gpus(ev.gpus, ray.cluster_resources()),
                      reuse=ev.reuse, batch_size=ev.batch_size, num_concurrent=ev.num_concurrent)
    if not ctx.local_storage:
        ctx.storage.upload_dir(out, "eval")
    return EvalOutput(tokens=0, rows=report["rows"])
