"""Where training workers and their teachers run. Declared here, once.

One training worker = one process = one GPU (what DeepSpeed expects). Each worker starts its own
teacher actor beside it: on the same node always, and on GPU on the same GPU.

Why the teacher shares the worker's whole-GPU reservation (num_gpus=0 plus the worker's
CUDA_VISIBLE_DEVICES) instead of a fractional split such as worker 0.5 + teacher 0.5:
- Ray Train makes one placement-group bundle per worker and the worker actor takes all of it, so
  there is no room left in the bundle for a second actor.
- Ray hands out fractional GPUs best-fit (src/ray/common/scheduling/resource_instance_set.cc), so
  0.5-GPU worker bundles pack two workers onto one GPU, and a 0.5-GPU teacher outside the bundle
  lands on whichever half-free GPU fits best, not necessarily its own worker's.
Pinning by node id and by the worker's own GPU id puts each pair on one GPU deterministically.
The cost: Ray does not count the teacher's GPU memory; the worker's reservation covers both.
"""
from __future__ import annotations

import logging
import math

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy


log = logging.getLogger(__name__)


def worker_resources(use_gpu: bool, cpus_per_worker: float = 1.0) -> dict[str, float]:
    """Ray Train `resources_per_worker`: a whole GPU each on GPU (its teacher shares it)."""
    resources = {"CPU": cpus_per_worker}
    if use_gpu:
        resources["GPU"] = 1.0
    return resources


def beside_this_worker(num_cpus: float) -> dict:
    """Actor options that place an actor on the calling worker's node and, on GPU, on its GPU.

    Call inside a Ray Train worker. The actor asks Ray for no GPU: it uses the worker's, made
    visible through CUDA_VISIBLE_DEVICES, and appears there as cuda:0.
    """
    options = {
        "num_cpus": num_cpus,
        "num_gpus": 0,
        "scheduling_strategy": NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False),
    }
    gpu_ids = ray.get_gpu_ids()
    if gpu_ids:
        options["runtime_env"] = {"env_vars": {"CUDA_VISIBLE_DEVICES": str(gpu_ids[0])}}
    return options


def teacher_cpus_that_fit(workers: int, per_worker: dict[str, float], wanted: float,
                          cluster: dict[str, float] | None = None) -> float:
    """CPUs to reserve for each teacher actor: `wanted`, or less, down to 0, so that `workers` Ray Train
    workers of `per_worker` and their teachers fit in the cluster's CPUs (`cluster`: its resources,
    default ray.cluster_resources()). A teacher of 0 CPUs still runs; Ray only reserves no CPU for it.
    Without this, a cluster whose CPUs the workers fill leaves each worker waiting on its teacher forever.
    """
    total = (ray.cluster_resources() if cluster is None else cluster).get("CPU", 0.0)
    spare = total - workers * per_worker.get("CPU", 0.0)
    fit = max(0.0, math.floor(spare / workers * 100) / 100)  # whole hundredths: Ray's resources are fixed-point
    if fit < wanted:
        log.info("teacher actors get %g CPUs each, not %g: the cluster's %g CPUs go to %d workers of %g", fit,
                 wanted, total, workers, per_worker.get("CPU", 0.0))
    return min(wanted, fit)
