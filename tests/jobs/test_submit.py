"""`ray job submit --working-dir <repo> -- python -m jobs.run SPEC` against a real local cluster
(`ray start --head` on 127.0.0.1, started by head_node below): the job succeeds, its driver joined the
cluster, the uploaded working dir leaves out what .gitignore lists, and the run's artifacts are in
storage (every stage's marker, an exported model AutoModelForCausalLM loads, report.md).

The job is run 2 of the S3 run that test_s3_pipeline.py checks (tests/jobs/conftest.py's
s3_run_resumed_by_a_job): its storage is a moto S3 bucket where run 1 (init, ild, smart, in this
process) left its stages, and the job runs kd and export, so one training stage runs on the cluster.

The cluster keeps its own --temp-dir, so its address file is not /tmp/ray/ray_current_cluster and a
plain ray.init() elsewhere in the session (or on the machine) still starts its own Ray; this process
never sets RAY_ADDRESS. The cluster, the CLI and the job's driver share a token of their own
(RAY_AUTH_MODE=token): Ray (2.60) turns token auth on for `ray start` when ~/.ray/auth_token exists,
which another Ray on this machine may have written, and the CLI would then be refused.
"""
import contextlib
import json
import logging
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import NamedTuple

import boto3
import pytest
from ray.job_submission import JobStatus
from transformers import AutoModelForCausalLM

import zebra  # noqa: F401  (registers the zebra model type with AutoModelForCausalLM)
from tests.jobs.conftest import BUCKET, PREFIX, use_aws_env

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
RAY_CLI = str(Path(sys.executable).parent / "ray")  # this venv's
STARTUP_TIMEOUT_S = 180  # ray start + dashboard + job API on a busy 2-core machine
JOB_TIMEOUT_S = 400
# `ray start`'s environment, inherited by the cluster's workers: per-step reports of a tiny run would
# stall behind Ray Train's default 2 s controller poll; and no 30 s drain of the node at SIGTERM.
CLUSTER_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
MARKER_ENV = "ZEBRA_TEST_RAY_CLUSTER"  # set in every process of the test cluster: its temp dir
NOT_UPLOADED = (".git", ".venv", "runs", ".pytest_cache", "__pycache__", ".stage", ".whl")  # .gitignore and .git


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment for a child, without a Ray address."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(extra)
    return env


def python_only_bin(folder: Path) -> Path:
    """A folder whose one command, `python`, runs this venv's python (what the job's entrypoint calls).

    Not the venv's bin on PATH: that would also put the venv's ninja (1.13) before /usr/bin/ninja
    (1.11), and DeepSpeed's JIT-built shm_comm op in ~/.cache/torch_extensions rebuilds (minutes, under
    a lock every DeepSpeed process on the machine waits on) whenever the ninja that builds it changes.
    """
    folder.mkdir()
    python = folder / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    return folder


def auth_env(token: str) -> dict[str, str]:
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}


def auth_header(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def jobs_api_up(url: str, token: str) -> bool:
    request = urllib.request.Request(f"{url}/api/jobs/", headers=auth_header(token))
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def wait_for_jobs_api(url: str, token: str, head: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not jobs_api_up(url, token):
        if head.poll() is not None:
            pytest.fail(f"`ray start --head` exited with {head.returncode} before its job API at {url} "
                        f"came up; its output:\n{log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"the job API of `ray start --head` at {url} was not up within {STARTUP_TIMEOUT_S} s "
                        f"(needs ray[default]: aiohttp, ...); ray start's output:\n{log.read_text()[-4000:]}")
        time.sleep(1)


def stop_head(head: subprocess.Popen, marker: str) -> None:
    """SIGTERM to `ray start --block` (it stops the Ray processes it started), then SIGKILL to its
    process group and to any process still carrying this cluster's marker in its environment (Ray's
    workers lead process groups of their own)."""
    head.terminate()
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.pid, signal.SIGKILL)
    head.wait()
    stragglers = marked_processes(marker)  # e.g. the job supervisor's watcher of its driver (a sleep loop)
    if stragglers:
        log.info("killing processes of the test cluster that outlived `ray start`: %s", stragglers)
    for pid in stragglers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def marked_processes(marker: str) -> list[int]:
    """Ids of the live processes whose environment holds MARKER_ENV=marker (this cluster's processes)."""
    pids = []
    needle = f"{MARKER_ENV}={marker}".encode()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if needle in (proc / "environ").read_bytes().split(b"\0"):
                pids.append(int(proc.name))
        except OSError:  # gone, or not ours
            continue
    return pids


class Cluster(NamedTuple):
    url: str  # the dashboard's, where jobs are submitted
    token: str  # RAY_AUTH_TOKEN of the cluster
    temp_dir: Path
    gcs_port: int


@contextlib.contextmanager
def head_node(num_cpus: int, temp_dir: Path, dashboard: bool = True, **env: str):
    """A running `ray start --head --block` of `num_cpus` CPUs on 127.0.0.1 with its own --temp-dir and
    free ports, its own auth token, and `env` in its environment; stopped (every process of it) on exit.
    Yields a Cluster once its job API is up (with dashboard) or its GCS answers (without)."""
    token = secrets.token_hex(32)
    gcs, dash, agent, client = free_ports(4)
    cmd = [RAY_CLI, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--dashboard-agent-listen-port",
           str(agent), "--ray-client-server-port", str(client), "--num-cpus", str(num_cpus), "--temp-dir",
           str(temp_dir), "--disable-usage-stats", "--include-dashboard", str(dashboard).lower()]
    temp_dir.mkdir(parents=True, exist_ok=True)
    start_log = temp_dir / "ray-start.log"
    with open(start_log, "w") as out:
        path = f"{python_only_bin(temp_dir / 'bin')}{os.pathsep}{os.environ['PATH']}"
        env = child_env(**CLUSTER_ENV, **auth_env(token), PATH=path, **{MARKER_ENV: str(temp_dir)}, **env)
        head = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        if dashboard:
            wait_for_jobs_api(url, token, head, start_log)
        else:
            wait_for_address_file(temp_dir, head, start_log)
        yield Cluster(url, token, temp_dir, gcs)
    finally:
        if head.poll() is not None:  # `ray start --block` ends when any process of the head dies
            log.warning("`ray start --head` ended early (exit code %s); its output:\n%s", head.returncode,
                        start_log.read_text()[-4000:])
        stop_head(head, str(temp_dir))


def wait_for_address_file(temp_dir: Path, head: subprocess.Popen, log: Path) -> None:
    """`ray start` writes <temp-dir>/ray_current_cluster once its head node is up."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not (temp_dir / "ray_current_cluster").is_file():
        if head.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"`ray start --head` did not come up (exit code {head.poll()}); its output:\n"
                        f"{log.read_text()[-4000:]}")
        time.sleep(1)


def submit(url: str, token: str, spec: Path, submission_id: str) -> subprocess.CompletedProcess:
    """The documented command: `ray job submit --working-dir . -- python -m jobs.run SPEC`, run from the repo."""
    cmd = [RAY_CLI, "job", "submit", "--address", url, "--submission-id", submission_id,
           "--working-dir", ".", "--", "python", "-m", "jobs.run", str(spec)]
    return subprocess.run(cmd, cwd=REPO, env=child_env(**auth_env(token)), capture_output=True, text=True,
                          timeout=JOB_TIMEOUT_S)


def uploaded_working_dir(temp_dir: Path) -> Path:
    """The working dir as the cluster unpacked it (runtime_resources/working_dir_files/_ray_pkg_<hash>)."""
    found = [p for p in temp_dir.glob("session_latest/runtime_resources/working_dir_files/_ray_pkg_*") if p.is_dir()]
    assert len(found) == 1, found
    return found[0]


@pytest.mark.slow
def test_ray_job_submit_runs_the_pipeline_on_a_local_cluster(s3_run_resumed_by_a_job, monkeypatch, tmp_path):
    """The job is run 2 of tests/jobs/conftest.py's S3 run: kd and export after init, ild and smart."""
    job = s3_run_resumed_by_a_job
    done, logs = job.submitted, job.logs
    assert done.returncode == 0, f"ray job submit exited {done.returncode}:\n{done.stderr[-3000:]}\n{logs[-6000:]}"
    assert job.status == JobStatus.SUCCEEDED
    assert re.search(rf"Ray: joined \S+:{job.gcs_port}\n", logs), logs[-6000:]  # this cluster, not embedded
    assert "stage kd: done" in logs and "stage export: done" in logs
    log.info("the job's stages:\n%s", "\n".join(line for line in logs.splitlines() if "jobs.run" in line))

    assert job.has_code
    assert not job.uploaded & set(NOT_UPLOADED), job.uploaded & set(NOT_UPLOADED)
    # a plain ray.init() in this session would not join the job's cluster (ray.init's own address lookup)
    assert "RAY_ADDRESS" not in os.environ
    assert not job.plain_init_address.endswith(f":{job.gcs_port}")

    use_aws_env(monkeypatch, tmp_path)
    client = boto3.client("s3", endpoint_url=job.endpoint)
    for stage in ("init", "ild", "smart", "kd", "export"):
        info = json.loads(client.get_object(Bucket=BUCKET, Key=f"{PREFIX}/{stage}/COMPLETE.json")["Body"].read())
        assert info["stage"] == stage
    export = tmp_path / "export"
    for key in job.second:
        if key.startswith("export/"):
            (export / key).parent.mkdir(parents=True, exist_ok=True)
            client.download_file(BUCKET, f"{PREFIX}/{key}", str(export / key))
    model = AutoModelForCausalLM.from_pretrained(export / "export")
    assert model.config.mixer_types.count("mla") == 2
    report = client.get_object(Bucket=BUCKET, Key=f"{PREFIX}/report/report.md")["Body"].read().decode()
    assert "| kd |" in report
