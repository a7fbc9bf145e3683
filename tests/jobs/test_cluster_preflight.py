"""A job on a Ray cluster that cannot hold it fails before any work, with a message that names the stage,
what it needs, what the cluster has and the spec field to change; a storage path that would not
outlive a Ray job is refused; a stage whose actors wait for resources says so and gives up.

The slow tests do what a user does: `ray start --head --num-cpus 1`, then `ray job submit ... -- python
-m jobs.run SPEC` (the cluster helpers of test_submit.py: 127.0.0.1, a temp dir, ports and a token of
its own, stopped at teardown).
"""
import collections
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pyarrow.fs
import pytest
import ray
import yaml
from ray.job_submission import JobStatus, JobSubmissionClient

from cluster.placement import teacher_cpus_that_fit
from cluster.preflight import (INTERRUPT_SIGNAL, ClusterView, PendingTimeout, PreflightError, check_cluster,
                               check_shared_storage, job_needs, space_problem, storage_problem, unplaceable,
                               watch_pending)
from jobs.spec import load_spec
from tests.jobs.conftest import spec_dict
from tests.jobs.test_submit import REPO, auth_header, head_node, submit

ONE_CPU = ClusterView(total={"CPU": 1.0, "memory": 8 * 2**30}, largest_node={"CPU": 1.0, "memory": 8 * 2**30}, nodes=1)


def tiny_spec(storage="/runs/tiny", **sections) -> dict:
    """The fast spec of the pipeline tests (2 workers per training stage) without its files."""
    spec = {"name": "tiny", "storage": {"uri": storage}, "student": {"num_mla_layers": 2},
            "ild": {"workers": 2, "tokens": 10**6}, "kd": {"workers": 2, "tokens": 10**6}}
    for name, fields in sections.items():
        spec.setdefault(name, {}).update(fields)
    return spec


def test_workers_beyond_the_cluster_name_stage_need_have_and_field():
    problems = unplaceable(job_needs(load_spec(tiny_spec())), ONE_CPU)
    assert len(problems) == 2, problems  # ild and kd; smart's and eval's one CPU fit
    assert problems[0].startswith("stage ild: needs {CPU: 2} for 2 training workers")
    assert "the cluster has {CPU: 1}" in problems[0] and "ild.workers (2)" in problems[0]
    assert problems[1].startswith("stage kd:")
    assert unplaceable(job_needs(load_spec(tiny_spec(ild={"workers": 1}, kd={"workers": 1}))), ONE_CPU) == []


def test_gpus_count_against_the_autoscalers_maximum_and_the_largest_node():
    spec = load_spec(tiny_spec(ild={"gpus_per_worker": 1}, kd={"enabled": False}, smart={"gpus_per_task": 0.5}))
    problems = unplaceable(job_needs(spec), ONE_CPU)
    assert [p.split(":")[0] for p in problems] == ["stage ild", "stage smart"], problems
    assert problems[0].startswith("stage ild: needs {CPU: 2, GPU: 2} for 2 training workers x {CPU: 1, GPU: 1}")
    assert "the cluster has {CPU: 1, GPU: 0}" in problems[0] and "ild.gpus_per_worker (1)" in problems[0]
    assert "smart.gpus_per_task (0.5)" in problems[1]
    # an autoscaler that can add two 1-GPU nodes holds them; one of 2 GPUs split over 1-GPU nodes too
    grows = ClusterView({"CPU": 4.0}, {"CPU": 4.0}, 1, autoscaler_max={"CPU": 12.0, "GPU": 2.0},
                        autoscaler_largest_node={"CPU": 4.0, "GPU": 1.0})
    assert unplaceable(job_needs(spec), grows) == []
    big_task = load_spec(tiny_spec(kd={"enabled": False}, ild={"enabled": False}, smart={"gpus_per_task": 2}))
    problems = unplaceable(job_needs(big_task), grows)
    assert len(problems) == 1 and "on one node; the largest node has {GPU: 1}" in problems[0], problems


def test_tune_trials_are_checked_only_when_asked():
    spec = load_spec(tiny_spec(ild={"workers": 1}, kd={"workers": 1},
                               tune={"cpus_per_trial": 2, "memory_budget_gb": 1.0}))
    assert unplaceable(job_needs(spec), ONE_CPU) == []
    problems = unplaceable(job_needs(spec, include_tune=True), ONE_CPU)
    assert len(problems) == 1 and problems[0].startswith("stage tune: needs {CPU: 2} for one of its Tune trials: "
                                                         "{CPU: 2, memory: 1.0 GiB}"), problems


@pytest.mark.parametrize("uri, shared, view, refused", [
    ("runs/demo", False, ClusterView({}, {}, 1), None),  # the embedded default
    ("runs/demo", False, ClusterView({}, {}, 1, in_job=True), "is relative"),
    ("file://runs/demo", True, ClusterView({}, {}, 1, in_job=True), "needs an absolute path"),
    ("/srv/runs/demo", False, ClusterView({}, {}, 1, in_job=True), "inside a Ray job"),
    ("/srv/runs/demo", False, ClusterView({}, {}, 3), "several nodes"),
    ("/srv/runs/demo", False, ClusterView({}, {}, 1, autoscaler_max={"CPU": 8.0}), "several nodes"),
    ("/srv/runs/demo", True, ClusterView({}, {}, 3, in_job=True), None),
    ("s3://bucket/runs/demo", False, ClusterView({}, {}, 3, in_job=True), None),
])
def test_storage_that_would_not_outlive_a_job_is_refused(uri, shared, view, refused):
    problem = storage_problem(uri, shared, view)
    if refused is None:
        assert problem is None
    else:
        assert refused in problem and "s3://" in problem and "storage.shared: true" in problem, problem


Usage = collections.namedtuple("Usage", "total used free")  # what shutil.disk_usage returns


def test_space_problem_names_folder_free_space_estimate_and_fix(tmp_path, monkeypatch):
    free = 3 * 2**30
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(8 * 2**30, 5 * 2**30, free))
    need = {"ild checkpoints": 2**30, "kd checkpoints": 2**31 + 2**29, "dpo checkpoints": 0}
    problem = space_problem(tmp_path / "not-yet-made", need, "point storage.uri at a larger disk")
    assert problem == (f"{tmp_path / 'not-yet-made'} has 3.00 GiB free, less than the 3.50 GiB estimated "
                       "(ild checkpoints 1.00 GiB, kd checkpoints 2.50 GiB); the run may fail with 'No space left "
                       "on device' when it writes there. To avoid it, point storage.uri at a larger disk")
    assert space_problem(tmp_path, {"kd checkpoints": free}, "x") is None


def test_teacher_cpus_shrink_to_what_the_workers_leave():
    assert teacher_cpus_that_fit(2, {"CPU": 1.0}, 0.5, {"CPU": 4.0}) == 0.5
    assert teacher_cpus_that_fit(2, {"CPU": 1.0}, 0.5, {"CPU": 2.5}) == 0.25
    assert teacher_cpus_that_fit(3, {"CPU": 1.0}, 0.5, {"CPU": 4.0}) == 0.33
    assert teacher_cpus_that_fit(2, {"CPU": 1.0}, 0.5, {"CPU": 2.0}) == 0.0  # the 2-CPU cluster
    assert teacher_cpus_that_fit(2, {"CPU": 1.0}, 0.5, {"CPU": 1.0}) == 0.0


def test_check_cluster_reads_the_ray_it_is_connected_to(ray_session):
    view = ClusterView.current()
    assert (view.total["CPU"], view.largest_node["CPU"], view.nodes) == (4.0, 4.0, 1)  # the session's Ray
    assert view.autoscaler_max is None and not view.in_job
    with pytest.raises(PreflightError, match=r"stage ild: needs \{CPU: 5\} .*; the cluster has \{CPU: 4\}"):
        check_cluster(load_spec(tiny_spec(storage="runs/tiny", ild={"workers": 5})))
    assert check_cluster(load_spec(tiny_spec(storage="runs/tiny"))) == view  # embedded: runs/<name> is fine


def _probe_ranks(views: list, world: int) -> list:
    """check_shared_storage in `world` threads (rank r sees the storage through views[r]); their errors."""
    barrier, errors = threading.Barrier(world, timeout=10), [None] * world

    def rank(r):
        try:
            check_shared_storage(views[r], "run", r, world, barrier.wait)
        except Exception as e:  # noqa: BLE001 (collected for the assertions)
            errors[r] = e

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_workers_find_storage_that_is_not_shared_between_them(tmp_path):
    local = pyarrow.fs.LocalFileSystem()
    shared = pyarrow.fs.SubTreeFileSystem(str(tmp_path / "shared"), local)
    assert _probe_ranks([shared, shared], 2) == [None, None]
    assert list((tmp_path / "shared" / "run").iterdir()) == []  # the probes are gone
    per_node = [pyarrow.fs.SubTreeFileSystem(str(tmp_path / f"node{r}"), local) for r in range(2)]
    errors = _probe_ranks(per_node, 2)
    assert all(isinstance(e, RuntimeError) and "not shared between the nodes" in str(e) for e in errors), errors
    assert "workers [1]" in str(errors[0]) and "workers [0]" in str(errors[1])


def test_workers_that_cannot_write_the_storage_say_where(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    fs = pyarrow.fs.SubTreeFileSystem(str(tmp_path / "file"), pyarrow.fs.LocalFileSystem())
    with pytest.raises(PermissionError, match="training worker 0 .* cannot write the run's storage run"):
        check_shared_storage(fs, "run", 0, 1, lambda: None)


@ray.remote(resources={"zebra_test_never": 1})
class NeverPlaced:
    def ping(self):
        return 1


def test_a_stage_waiting_on_an_actor_logs_it_and_gives_up(ray_session, caplog):
    caplog.set_level("WARNING", logger="cluster.preflight")
    before = signal.getsignal(INTERRUPT_SIGNAL)
    actor = NeverPlaced.remote()
    start = time.monotonic()
    try:
        with pytest.raises(PendingTimeout, match=r"stage ild: waited \d+ s .*actor NeverPlaced asking "
                                                 r"\{CPU: 1, zebra_test_never: 1\}.*cluster.pending_timeout_s"):
            with watch_pending("ild", timeout_s=4, every_s=2, poll_s=0.5):
                ray.get(actor.ping.remote())
    finally:
        ray.kill(actor)
    assert time.monotonic() - start < 20
    assert any("stage ild: waiting" in r.message and "NeverPlaced" in r.message for r in caplog.records)
    assert signal.getsignal(INTERRUPT_SIGNAL) is before
    with watch_pending("ild", timeout_s=1, poll_s=0.2):  # nothing of this job waits: no error
        time.sleep(1.5)


@ray.remote(resources={"zebra_test_never": 1})
def never_runs():
    return 1


def test_queued_tasks_are_logged_but_do_not_end_the_stage(ray_session, caplog):
    caplog.set_level("WARNING", logger="cluster.preflight")
    ref = never_runs.remote()
    try:
        with watch_pending("smart", timeout_s=2, every_s=1, poll_s=0.3):
            assert ray.wait([ref], timeout=4)[0] == []
    finally:
        ray.cancel(ref, force=True)
    assert any("stage smart: waiting" in r.message and "queued in the cluster" in r.message
               and "{CPU: 1, zebra_test_never: 1}" in r.message for r in caplog.records), caplog.text


TRAINER_THAT_WAITS = """
import sys
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from cluster.connect import connect
from cluster.preflight import PendingTimeout, watch_pending

connect(None, 2)
trainer = TorchTrainer(lambda: None, scaling_config=ScalingConfig(num_workers=1, use_gpu=True),
                       run_config=RunConfig(name="never", storage_path=sys.argv[1]))
try:  # the timeout counts from the first poll that sees the placement group wait, not from the start
    with watch_pending("kd", timeout_s=4, poll_s=0.5):
        trainer.fit()
except PendingTimeout as e:
    print(f"PendingTimeout: {e}")
    sys.exit(3)
"""


def pending_groups() -> list[str]:
    """Placement groups waiting for resources in this test's Ray (a live controller would keep one there)."""
    return [g["placement_group_id"] for g in ray.util.placement_group_table().values() if g["state"] == "PENDING"]


@pytest.mark.slow
def test_a_ray_train_worker_group_that_cannot_be_placed_gives_up(ray_session, tmp_path):
    """The distill path: a worker group asking for a GPU the cluster lacks ends in PendingTimeout, not in
    Ray Train's endless restarts. In a driver process of its own that joins this test's Ray (as under
    `ray job submit`, and no second Ray to start): the process's end takes the waiting controller and
    its placement group with it, as the end of a job's driver does."""
    assert pending_groups() == []
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", TRAINER_THAT_WAITS, str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 3, done.stderr[-4000:]
    assert re.search(r"PendingTimeout: stage kd: waited \d+ s .*placement group \S+ of 1 bundles \{GPU: 1\}",
                     done.stdout), done.stdout + done.stderr[-4000:]
    assert time.monotonic() - start < 240  # the driver's imports take most of it on 2 loaded cores
    deadline = time.monotonic() + 30
    while left := pending_groups():
        assert time.monotonic() < deadline, f"placement groups {left} still wait after the driver ended"
        time.sleep(0.5)


# ---- as the user did it: ray start --head --num-cpus 1, ray job submit --------------------------------

FAIL_WITHIN_S = 60  # on an idle machine; most of it is Ray's job start and the driver's imports (torch,
# DeepSpeed), which take minutes when other work loads the 2 cores: the limit grows with the load average


def fail_within_s() -> float:
    return min(240.0, FAIL_WITHIN_S * max(1.0, os.getloadavg()[0] / os.cpu_count()))


@pytest.fixture(scope="module")
def one_cpu_cluster():
    temp_dir = Path(tempfile.mkdtemp(prefix="zray-"))
    try:
        with head_node(1, temp_dir) as cluster:
            yield cluster
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)


def submit_and_fail(cluster, spec: dict, tmp_path: Path) -> str:
    """Submit the spec as the README says; assert the job FAILED in time and before any work; its logs.

    The spec waits an hour before a stage gives up on resources (cluster.pending_timeout_s), so only
    the preflight can fail it in time.
    """
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({**spec, "cluster": {"pending_timeout_s": 3600}}))
    submission_id = f"zebra-preflight-{uuid.uuid4().hex[:8]}"
    client = JobSubmissionClient(cluster.url, headers=auth_header(cluster.token))
    start, limit = time.monotonic(), fail_within_s()
    done = submit(cluster.url, cluster.token, path, submission_id)
    elapsed = time.monotonic() - start
    logs, info = client.get_job_logs(submission_id), client.get_job_info(submission_id)
    if info.status != JobStatus.FAILED:
        client.stop_job(submission_id)
    assert done.returncode != 0 and info.status == JobStatus.FAILED, logs[-4000:]
    assert elapsed < limit, f"the job took {elapsed:.0f} s to fail (limit {limit:.0f} s):\n{logs[-4000:]}"
    assert "stage init: start" not in logs, logs[-4000:]  # refused before any work
    return logs


@pytest.mark.slow
def test_a_job_the_cluster_cannot_hold_fails_within_a_minute(one_cpu_cluster, teacher_dir, data_file, tmp_path):
    spec = spec_dict(teacher_dir, data_file, tmp_path / "run")  # ild and kd: 2 workers of 1 CPU each
    spec["storage"]["shared"] = True
    logs = submit_and_fail(one_cpu_cluster, spec, tmp_path)
    assert "this job cannot run on its Ray cluster ({CPU: 1, GPU: 0} on 1 node" in logs, logs[-4000:]
    assert "stage ild: needs {CPU: 2} for 2 training workers x {CPU: 1} at once; the cluster has {CPU: 1}. " \
           "To fit, lower ild.workers (2)" in logs, logs[-4000:]


@pytest.mark.slow
def test_a_relative_storage_path_is_refused_in_a_ray_job(one_cpu_cluster, teacher_dir, data_file, tmp_path):
    spec = spec_dict(teacher_dir, data_file, "runs/tiny")
    for stage in ("ild", "kd"):
        spec[stage]["workers"] = 1
    logs = submit_and_fail(one_cpu_cluster, spec, tmp_path)
    assert "storage.uri 'runs/tiny' is relative: inside a Ray job" in logs and "s3://bucket/prefix" in logs, \
        logs[-4000:]
    assert "stage ild: needs" not in logs  # the job fits: only the storage is refused
