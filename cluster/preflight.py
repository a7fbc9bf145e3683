"""Before a job works on the Ray cluster it joined, and while it works: nothing waits in silence.

    check_cluster(spec)                         # after connect: raises PreflightError if the job can never
                                                # be placed, or if its storage would not outlive it
    space_problem(folder, {"kd": 2**30}, fix)   # why the estimated writes may not fit on folder's disk, or None
    with watch_pending("ild", timeout_s=300):   # logs what this job's actors and placement groups (and the
        ...                                     # cluster's queued tasks) wait for every 30 s; raises
                                                # PendingTimeout when this job's have waited timeout_s
    check_shared_storage(fs, folder, rank, world, barrier)   # in each training worker, once

What a job asks of Ray (job_needs): per training stage (ild, kd, dpo) its Ray Train workers,
all at once (one placement group); SMART's scoring tasks and Tune's trials one at a time at
least; eval's Serve replica. The teacher actors never block a job: their CPU share shrinks to
what the workers leave (cluster.placement.teacher_cpus_that_fit, called by jobs.train.distill).
The cluster's capacity is its resources now, or the autoscaler's declared maximum where there
is an autoscaler and that is more.

The spec is read by attribute only (cluster/ does not import jobs/): the sections ild, kd, dpo,
smart, eval, tune, storage and cluster of jobs.spec.JobSpec.
"""
from __future__ import annotations

import _thread
import contextlib
import dataclasses
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Callable

import ray

from cluster.placement import worker_resources
from cluster.storage import fmt_bytes, free_bytes

log = logging.getLogger(__name__)

JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor in the driver of a submitted job
PROBE = ".zebra-storage-probe-{rank}"
POLL_S = 2.0  # how often the watcher asks the GCS


class PreflightError(ValueError):
    """The job cannot run on this cluster as specified; the message names the stage, the need, what
    the cluster has, and the spec field to change."""


class PendingTimeout(RuntimeError):
    """A stage's actors or placement groups waited longer than cluster.pending_timeout_s."""


@dataclasses.dataclass(frozen=True)
class Need:
    """What one stage asks of Ray: `count` units of `each` resources, all at once or one at a time."""

    stage: str
    what: str  # "training workers", "SMART scoring tasks", ...
    count: int
    each: dict[str, float]  # Ray resources of one unit, e.g. {"CPU": 1.0, "GPU": 1.0}; zeros are dropped
    all_at_once: bool  # a Ray Train worker group is placed whole; tasks and trials can queue
    fix: str  # the spec fields that change it

    def __post_init__(self):
        object.__setattr__(self, "each", {r: v for r, v in self.each.items() if v > 0})

    def total(self) -> dict[str, float]:
        """The resources that must be free together for the stage to start."""
        n = self.count if self.all_at_once else 1
        return {r: n * v for r, v in self.each.items()}


@dataclasses.dataclass(frozen=True)
class ClusterView:
    """The cluster as a job sees it: resources now, the largest node, the autoscaler's maximum (None:
    no autoscaler), how many nodes, and whether this driver runs inside a submitted Ray job."""

    total: dict[str, float]
    largest_node: dict[str, float]
    nodes: int
    autoscaler_max: dict[str, float] | None = None
    autoscaler_largest_node: dict[str, float] | None = None
    in_job: bool = False

    @classmethod
    def current(cls) -> ClusterView:
        """The cluster this process is connected to (call after ray.init)."""
        alive = [n["Resources"] for n in ray.nodes() if n["Alive"]]
        config = ray._private.state.state.get_cluster_config()  # the autoscaler's, None without one
        groups = [g for g in config.node_group_configs if g.max_count != 0] if config is not None else []
        return cls(
            total=dict(ray.cluster_resources()),
            largest_node=_largest(alive),
            nodes=len(alive),
            autoscaler_max=ray._private.state.state.get_max_resources_from_cluster_config() if groups else None,
            autoscaler_largest_node=_largest([dict(g.resources) for g in groups]) if groups else None,
            in_job=JOB_ENV in os.environ,
        )

    def capacity(self, resource: str) -> float:
        """The most of `resource` the cluster has or can grow to."""
        return max(self.total.get(resource, 0.0), (self.autoscaler_max or {}).get(resource, 0.0))

    def node_capacity(self, resource: str) -> float:
        """The most of `resource` one node has or can have."""
        return max(self.largest_node.get(resource, 0.0), (self.autoscaler_largest_node or {}).get(resource, 0.0))

    def may_have_several_nodes(self) -> bool:
        return self.nodes > 1 or self.autoscaler_max is not None

    def describe(self) -> str:
        have = _fmt({r: self.total.get(r, 0.0) for r in ("CPU", "GPU")})
        grow = f", an autoscaler up to {_fmt(self.autoscaler_max)}" if self.autoscaler_max else ", no autoscaler"
        return f"{have} on {self.nodes} node{'s' * (self.nodes != 1)}{grow}"


def _largest(nodes: list[dict]) -> dict[str, float]:
    keys = {k for n in nodes for k in n}
    return {k: max(float(n.get(k, 0.0)) for n in nodes) for k in keys}


def _fmt(resources: dict[str, float]) -> str:
    def num(v: float) -> str:
        return f"{v:g}" if abs(v) < 2**20 else f"{v / 2**30:.1f} GiB"

    return "{" + ", ".join(f"{k}: {num(v)}" for k, v in sorted(resources.items())) + "}"


# ---- what a job spec asks of Ray ---------------------------------------------------------------

TRAIN_STAGES = ("ild", "kd", "dpo")


def job_needs(spec, include_tune: bool = False) -> list[Need]:
    """The needs of every enabled stage of a jobs.spec.JobSpec (and of its tune section if asked)."""
    needs = []
    for stage in TRAIN_STAGES:
        s = getattr(spec, stage)
        if s.enabled:
            gpu = f", {stage}.gpus_per_worker ({s.gpus_per_worker})" if s.gpus_per_worker else ""
            needs.append(Need(stage, "training workers", s.workers, worker_resources(s.gpus_per_worker > 0),
                              True, f"lower {stage}.workers ({s.workers}){gpu}"))
    if spec.smart.enabled:
        g = spec.smart.gpus_per_task
        needs.append(Need("smart", "SMART scoring tasks", spec.smart.parallel, {"CPU": 1.0, "GPU": g}, False,
                          f"lower smart.gpus_per_task ({g:g})" if g else "give the cluster a CPU"))
    if spec.eval.enabled:  # one Serve replica of 1 CPU; eval.gpus None takes a GPU only where there is one
        g = spec.eval.gpus or 0.0
        needs.append(Need("eval", "Serve replica", 1, {"CPU": 1.0, "GPU": g}, False,
                          f"lower eval.gpus ({g:g})" if g else "set eval.enabled: false"))
    if include_tune and spec.tune is not None:
        t = spec.tune
        each = {"CPU": t.cpus_per_trial, "GPU": t.gpus_per_trial, "memory": (t.memory_budget_gb or 0) * 2**30}
        needs.append(Need("tune", "Tune trials", t.num_samples, each, False,
                          "lower tune.cpus_per_trial, tune.gpus_per_trial or tune.memory_budget_gb"))
    return needs


def unplaceable(needs: list[Need], view: ClusterView) -> list[str]:
    """One line per need the cluster can never place (empty: all fit)."""
    problems = []
    for need in needs:
        short = {r: v for r, v in need.total().items() if v > view.capacity(r) + 1e-9}
        big = {r: v for r, v in need.each.items() if v > view.node_capacity(r) + 1e-9}
        if short:
            have = _fmt({r: view.capacity(r) for r in short})
            at_once = f"{need.count} {need.what} x {_fmt(need.each)} at once" if need.all_at_once else \
                f"one of its {need.what}: {_fmt(need.each)}"
            problems.append(f"stage {need.stage}: needs {_fmt(short)} for {at_once}; the cluster has {have}. "
                            f"To fit, {need.fix}, or add {'/'.join(short)} to the cluster")
        elif big:
            have = _fmt({r: view.node_capacity(r) for r in big})
            problems.append(f"stage {need.stage}: one of its {need.what} needs {_fmt(big)} on one node; the "
                            f"largest node has {have}. To fit, {need.fix}, or add a larger node")
    return problems


def storage_problem(uri: str, shared: bool, view: ClusterView) -> str | None:
    """Why storage.uri would not outlive the job or reach every worker here (None: it will).

    s3:// always does. A local path: in a submitted Ray job the driver's working directory is the
    package Ray unpacked for the job (deleted with it), and on a cluster of several nodes a path on
    one node is not on the others; there a local path must be absolute and declared shared.
    """
    if uri.startswith("s3://"):
        return None
    path = uri.removeprefix("file://")
    absolute = Path(path).expanduser().is_absolute()
    hint = ("use s3://bucket/prefix, or an absolute path on a filesystem every node mounts (NFS, or the "
            "machine of a one-node cluster) together with storage.shared: true")
    if shared and not absolute:
        return f"storage.uri {uri!r}: storage.shared: true needs an absolute path; {hint}"
    if view.in_job and not absolute:
        return (f"storage.uri {uri!r} is relative: inside a Ray job it resolves in the job's unpacked working "
                f"dir ({os.getcwd()}), which Ray deletes, so the run's outputs would be lost; {hint}")
    if (view.in_job or view.may_have_several_nodes()) and not shared:
        where = "inside a Ray job" if view.in_job else "on a cluster of several nodes"
        return (f"storage.uri {uri!r} is a local path of the node the driver runs on; {where} the workers may "
                f"not see it; {hint}")
    return None


def space_problem(folder: str | Path, need: dict[str, int], fix: str) -> str | None:
    """Why the writes estimated in `need` ({what: bytes}) may not fit in the free space of folder's
    filesystem (None: they fit). The caller logs it: an estimate is no reason to refuse a run."""
    free, total = free_bytes(folder), sum(need.values())
    if free >= total:
        return None
    parts = ", ".join(f"{what} {fmt_bytes(n)}" for what, n in need.items() if n)
    return (f"{folder} has {fmt_bytes(free)} free, less than the {fmt_bytes(total)} estimated ({parts}); the run may fail "
            f"with 'No space left on device' when it writes there. To avoid it, {fix}")


def check_cluster(spec, include_tune: bool = False) -> ClusterView:
    """After connect: raise PreflightError naming every stage that can never be placed and any storage
    that would not outlive the job. (The teachers' CPU share shrinks in jobs.train.distill.)"""
    view = ClusterView.current()
    where = f"job spec {spec.source}" if spec.source else "job spec"
    log.info("preflight: the cluster has %s%s", view.describe(), " (a submitted Ray job)" if view.in_job else "")
    problems = unplaceable(job_needs(spec, include_tune), view)
    storage = storage_problem(spec.storage.uri, spec.storage.shared, view)
    if storage:
        problems.append(storage)
    if problems:
        raise PreflightError(f"{where}: this job cannot run on its Ray cluster ({view.describe()}):\n  "
                             + "\n  ".join(problems))
    return view


# ---- while a stage runs --------------------------------------------------------------------------

def pending_now() -> list[str]:
    """This job's placement groups and actors that wait for resources, one line each (an actor still in
    its __init__, such as a teacher loading its weights, has its process and does not count)."""
    accessor = ray._private.state.state._connect_and_get_accessor()  # the GCS tables; no dashboard needed
    from ray.core.generated import gcs_pb2

    job = ray.JobID.from_hex(ray.get_runtime_context().get_job_id())
    lines = []
    for blob in accessor.get_placement_group_table():
        pg = gcs_pb2.PlacementGroupTableData.FromString(blob)
        if pg.creator_job_id == job.binary() and pg.state in (pg.PENDING, pg.RESCHEDULING):
            bundles = [_fmt(dict(b.unit_resources)) for b in pg.bundles]
            lines.append(f"placement group {pg.name or pg.placement_group_id.hex()[:8]} of {len(bundles)} "
                         f"bundles {', '.join(sorted(set(bundles)))} (a Ray Train worker group)")
    for blob in accessor.get_actor_table(job, "PENDING_CREATION"):
        actor = gcs_pb2.ActorTableData.FromString(blob)
        if not actor.address.worker_id:  # no process yet: waits for resources (one in __init__ has a worker)
            lines.append(f"actor {actor.class_name} asking {_fmt(dict(actor.required_resources))}")
    return lines


@contextlib.contextmanager
def watch_pending(stage: str, timeout_s: float, every_s: float = 30.0, poll_s: float = POLL_S):
    """Run the body while a thread watches this job's pending actors and placement groups: every
    `every_s` of waiting it logs what waits and what the cluster has free; after `timeout_s` of
    waiting without a break it interrupts the main thread and the body ends in PendingTimeout.

    The interruption is INTERRUPT_SIGNAL, simulated in the main thread, whose handler (installed for
    the body only) raises a KeyboardInterrupt: the one exception Ray's blocking calls give way to.
    Not SIGINT: Ray Train's handler for it waits on its controller, which waits on the resources.
    Off the main thread (a Tune trial) the watcher only logs.
    """
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(INTERRUPT_SIGNAL, _raise_interrupt) if in_main else None
    watcher = _Watcher(stage, timeout_s, every_s, poll_s, interrupt=in_main)
    watcher.start()
    try:
        yield watcher
    except BaseException as e:
        if watcher.expired is None:
            raise
        raise PendingTimeout(watcher.expired) from e
    finally:
        watcher.stop.set()
        watcher.join()
        if in_main:
            signal.signal(INTERRUPT_SIGNAL, previous)
    if watcher.expired is not None:  # the body caught the interruption and returned
        raise PendingTimeout(watcher.expired)


INTERRUPT_SIGNAL = signal.SIGUSR2  # unused by Ray, torch and DeepSpeed (Tune takes SIGUSR1)


class _Interrupted(KeyboardInterrupt):
    """Raised in the main thread when the watcher gives up; watch_pending turns it into PendingTimeout."""


def _raise_interrupt(signum, frame):
    raise _Interrupted()


class _Watcher(threading.Thread):
    def __init__(self, stage: str, timeout_s: float, every_s: float, poll_s: float, interrupt: bool):
        super().__init__(daemon=True, name=f"watch-pending-{stage}")
        self.stage, self.timeout_s, self.every_s, self.poll_s, self.interrupt = stage, timeout_s, every_s, poll_s, interrupt
        self.stop = threading.Event()
        self.expired: str | None = None

    def run(self) -> None:
        since = queued_since = last_log = None
        while not self.stop.wait(self.poll_s):
            try:
                waiting = pending_now()
                queued = queued_demand()
            except Exception as e:  # the GCS briefly unreachable must not end the stage
                log.debug("stage %s: could not read what waits: %s", self.stage, e)
                continue
            now = time.monotonic()
            since = (since or now) if waiting else None
            queued_since = (queued_since or now) if queued else None
            if since is None and queued_since is None:
                last_log = None
                continue
            last_log = last_log or now
            if now - last_log >= self.every_s:
                last_log = now
                what = waiting + ([f"queued in the cluster (tasks and actors of any job): {', '.join(queued)}"]
                                  if queued else [])
                log.warning("stage %s: waiting %.0f s for resources (this job's actors and worker groups give up "
                            "after %.0f s, cluster.pending_timeout_s): %s; free now: %s", self.stage,
                            now - min(t for t in (since, queued_since) if t is not None), self.timeout_s,
                            "; ".join(what), _fmt(_free()))
            if since is not None and now - since >= self.timeout_s and self.expired is None:
                self.expired = (f"stage {self.stage}: waited {now - since:.0f} s for resources the cluster did "
                                f"not give (cluster.pending_timeout_s: {self.timeout_s:g}): {'; '.join(waiting)}; "
                                f"the cluster has {_fmt(_totals())}, free now {_fmt(_free())}. Lower the stage's "
                                "workers or GPUs, free the cluster, or raise cluster.pending_timeout_s")
                log.error("%s", self.expired)
                if self.interrupt:
                    _thread.interrupt_main(INTERRUPT_SIGNAL)


def queued_demand() -> list[str]:
    """The cluster's queued task and actor requests, "count x {resources}" each. Ray does not say
    whose they are, so they are logged but never end a stage (SMART's tasks queue by design)."""
    from ray.autoscaler.v2.sdk import get_cluster_status

    try:
        status = get_cluster_status(ray.get_runtime_context().gcs_address)
    except Exception as e:  # an older GCS without the autoscaler state: this job's own waits still count
        log.debug("no queued demand from the GCS: %s", e)
        return []
    return [f"{r.count} x {_fmt(r.bundle)}" for d in status.resource_demands.ray_task_actor_demand
            for r in d.bundles_by_count]


def _totals() -> dict[str, float]:
    return {r: v for r, v in ray.cluster_resources().items() if r in ("CPU", "GPU")}


def _free() -> dict[str, float]:
    free = ray.available_resources()
    return {r: free.get(r, 0.0) for r in _totals()}


# ---- in each training worker ---------------------------------------------------------------------

def check_shared_storage(fs, folder: str, rank: int, world: int, barrier: Callable[[], None]) -> None:
    """Every worker writes a probe file into `folder` (a pyarrow filesystem path: Ray Train's run
    storage) and checks that it sees every other worker's: a path local to each node fails here,
    before any training, instead of losing checkpoints. `barrier` syncs the workers (dist.barrier)."""
    import pyarrow.fs

    node = ray.get_runtime_context().get_node_id()[:8] if ray.is_initialized() else "?"
    mine = f"{folder}/{PROBE.format(rank=rank)}"
    try:
        fs.create_dir(folder, recursive=True)
        with fs.open_output_stream(mine) as f:
            f.write(node.encode())
    except OSError as e:
        raise PermissionError(f"training worker {rank} (node {node}) cannot write the run's storage {folder}: "
                              f"{e}; check storage.uri and that every node may write there") from e
    barrier()
    seen = fs.get_file_info([f"{folder}/{PROBE.format(rank=r)}" for r in range(world)])
    missing = [r for r, info in enumerate(seen) if info.type == pyarrow.fs.FileType.NotFound]
    barrier()  # every worker has looked before any probe goes
    fs.delete_file(mine)
    if missing:
        raise RuntimeError(f"training worker {rank} (node {node}) does not see what workers {missing} wrote to the "
                           f"run's storage {folder}: it is not shared between the nodes. Use s3://bucket/prefix, "
                           "or a filesystem every node mounts with storage.shared: true")
