"""Connecting the driver to Ray: join a running cluster, or start an embedded one.

    connect(spec.cluster.address, spec.cluster.num_cpus)

An address (the spec's, else $RAY_ADDRESS, which `ray job submit` sets) joins that cluster;
with neither, a Ray of this process's own starts with `num_cpus` logical CPUs (None: all cores),
whatever else runs on the machine: Ray's own lookup would join the cluster that the last
`ray start` on this machine recorded (even one since killed) and then refuse num_cpus.
An already connected driver (a test, a notebook) keeps its connection.
"""
from __future__ import annotations

import logging
import os

import ray

log = logging.getLogger(__name__)

# Ray Train takes one metrics report per controller poll (2 s by default) and blocks the next, so
# per-step reports of a small run would stall; an embedded cluster polls faster.
TRAIN_POLL_ENV, TRAIN_POLL_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2"


def connect(address: str | None = None, num_cpus: int | None = None) -> str:
    """Connect to Ray; returns how ("existing", "joined <address>" or "embedded")."""
    if ray.is_initialized():
        return "existing"
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        log.info("joined the Ray cluster at %s", address)
        return f"joined {address}"
    os.environ.setdefault(TRAIN_POLL_ENV, TRAIN_POLL_S)  # inherited by the embedded cluster's processes
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False)
    log.info("started an embedded Ray with %s CPUs", num_cpus or "all")
    return "embedded"
