"""Connecting the driver to Ray: join a running cluster, or start an embedded one.

    connect(spec.cluster.address, spec.cluster.num_cpus)

An address (the spec's, else $RAY_ADDRESS, which `ray job submit` sets) joins that cluster;
with neither, a Ray of this process's own starts with `num_cpus` logical CPUs (None: all cores),
whatever else runs on the machine: Ray's own lookup would join the cluster that the last
`ray start` on this machine recorded (even one since killed) and then refuse num_cpus.
An already connected driver (a test, a notebook) keeps its connection.

An embedded Ray's worker processes start from Ray's own script, so they do not get the driver's
cwd (sys.path[0]): a source tree run as `python -m jobs.run spec.yaml` without `pip install` is
put in front of their PYTHONPATH. (A joined cluster gets the code through `ray job submit`'s
working_dir.)
"""
from __future__ import annotations

import logging
import os
import site
import socket
import sysconfig
from pathlib import Path
from urllib.parse import urlsplit

import ray

log = logging.getLogger(__name__)

# Ray Train takes one metrics report per controller poll (2 s by default) and blocks the next, so
# per-step reports of a small run would stall; an embedded cluster polls faster.
TRAIN_POLL_ENV, TRAIN_POLL_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2"
PROBE_TIMEOUT_S = 10.0
# Ray Train's placement-group cleaner asks the State API (served by the dashboard) whether the controller
# lives, once a second; an embedded Ray runs no dashboard, so it warned a hundred times a run. Its
# controller also registers each worker group with the autoscaling coordinator (an actor it starts on first
# use) and gives that call 5 s: on a busy node the actor starts later, and every training stage began with
# a GetTimeoutError traceback, though nothing waits on the call and an embedded Ray has no autoscaler.
QUIET_LOGGERS = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",
                 "ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client")


class ClusterUnreachable(ConnectionError):
    """Nothing answers at the cluster address (ray.init would retry for minutes before saying so)."""


def check_reachable(address: str, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Raise ClusterUnreachable unless a TCP connection to the address's host:port opens within timeout_s.
    Addresses Ray resolves itself ("auto", "local") and ones without a port are left to ray.init."""
    parts = urlsplit(address if "://" in address else f"ray://{address}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        raise ClusterUnreachable(f"cluster address {address!r}: the port is not a number") from None
    if not host or port is None or address in ("auto", "local"):
        return
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as err:
        raise ClusterUnreachable(
            f"cluster address {address!r} (cluster.address or $RAY_ADDRESS): nothing answers at {host}:{port} "
            f"within {timeout_s:.0f} s ({type(err).__name__}: {err}). Start a cluster there (`ray start --head`), "
            "or fix the address; without one, jobs.run starts a Ray of its own") from None


def connect(address: str | None = None, num_cpus: int | None = None) -> str:
    """Connect to Ray; returns how ("existing", "joined <address>" or "embedded")."""
    if ray.is_initialized():
        return "existing"
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        check_reachable(address)
        ray.init(address=address)
        log.info("joined the Ray cluster at %s", address)
        return f"joined {address}"
    os.environ.setdefault(TRAIN_POLL_ENV, TRAIN_POLL_S)  # inherited by the embedded cluster's processes
    runtime_env = {"worker_process_setup_hook": "cluster.connect.embedded_worker_setup"}
    pythonpath = worker_pythonpath()
    if pythonpath is not None:
        runtime_env["env_vars"] = {"PYTHONPATH": pythonpath}
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, runtime_env=runtime_env)
    log.info("started an embedded Ray with %s CPUs", num_cpus or "all")
    return "embedded"


def worker_pythonpath() -> str | None:
    """PYTHONPATH for an embedded Ray's workers: the folder holding this project's packages, then the
    driver's PYTHONPATH as it is (which the workers inherit anyway); None where the workers import the
    project already: the folder is on PYTHONPATH (absolute: a relative entry means the worker's own
    cwd), or is a site-packages folder (a regular install).

    An editable install maps the packages to this same folder, so adding it changes nothing there.
    Ray's runtime_env env_vars replace the worker's variable (expanding any $NAME in it), and Ray
    itself needs no PYTHONPATH: its workers find it through site-packages."""
    root = Path(__file__).resolve().parents[1]
    inherited = os.environ.get("PYTHONPATH", "")
    site_dirs = [*site.getsitepackages(), site.getusersitepackages(),
                 sysconfig.get_path("purelib"), sysconfig.get_path("platlib")]
    folders = [*inherited.split(os.pathsep), *site_dirs]
    if root in {Path(folder).resolve() for folder in folders if os.path.isabs(folder)}:
        return None
    return os.pathsep.join([str(root), inherited]) if inherited else str(root)


def _errors_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR


def embedded_worker_setup() -> None:
    """Every process of an embedded Ray runs this first (Ray's worker_process_setup_hook): loggers that
    only report the missing dashboard's State API are kept to errors. (The cleaner they belong to frees a
    dead controller's placement groups; an embedded cluster ends with its driver anyway.)

    A filter, not a level: Ray Train's logging setup (logging.config.dictConfig for `ray.train`, run
    again in a worker process that Ray reuses for a controller) sets every child logger back to NOTSET,
    and the cleaner's warnings then reached the driver's stderr. dictConfig leaves filters alone."""
    for name in QUIET_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(logging.ERROR)
        if _errors_only not in logger.filters:
            logger.addFilter(_errors_only)
