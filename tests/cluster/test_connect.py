"""cluster.connect without an address starts a Ray of its own, whatever Ray runs on the machine: a live
`ray start --head` cluster, or only the address file a killed one left in Ray's temp folder. (Ray's
own lookup would join that cluster and then refuse num_cpus: "When connecting to an existing
cluster, num_cpus and num_gpus must not be provided".)

Each test runs connect in a child process whose RAY_TMPDIR is a folder of the test's own, so the
cluster it meets (and the address file in <RAY_TMPDIR>/ray) is the test's, not the machine's.
"""
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.jobs.test_submit import REPO, free_ports, head_node

CONNECT = """
import ray
from cluster.connect import connect
how = connect(None, 2)
print("connect:", how, ray.cluster_resources().get("CPU"), ray.get_runtime_context().gcs_address)
import logging
from cluster.connect import QUIET_LOGGERS
level = ray.get(ray.remote(lambda: min(logging.getLogger(n).getEffectiveLevel() for n in QUIET_LOGGERS)).remote())
print("worker log level:", level)
"""


def connect_in_child(ray_tmpdir: Path) -> tuple[str, float, str]:
    """(how, CPUs of the cluster it got, its GCS address) of connect(None, num_cpus=2) in a child process."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = str(ray_tmpdir)
    done = subprocess.run([sys.executable, "-c", CONNECT], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("connect:"))
    _, how, cpus, address = line.split()
    level = next(line for line in done.stdout.splitlines() if line.startswith("worker log level:")).split()[-1]
    assert int(level) == logging.ERROR  # the embedded Ray's workers ran cluster.connect.embedded_worker_setup
    return how, float(cpus), address


@pytest.fixture
def ray_tmpdir():
    folder = Path(tempfile.mkdtemp(prefix="zrt-"))  # short: Ray's socket paths must fit in 107 bytes
    yield folder
    subprocess.run(["rm", "-rf", str(folder)], check=False)


@pytest.mark.slow
def test_embedded_connect_while_a_ray_start_cluster_runs(ray_tmpdir):
    with head_node(1, ray_tmpdir / "ray", dashboard=False) as cluster:
        assert (ray_tmpdir / "ray" / "ray_current_cluster").is_file()  # what a plain ray.init() would join
        how, cpus, address = connect_in_child(ray_tmpdir)
    assert how == "embedded" and cpus == 2.0  # its own Ray, with the CPUs asked for (the head has 1)
    assert not address.endswith(f":{cluster.gcs_port}")


@pytest.mark.slow
def test_embedded_connect_with_the_address_file_of_a_killed_cluster(ray_tmpdir):
    (ray_tmpdir / "ray").mkdir()
    (ray_tmpdir / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{free_ports(1)[0]}")
    how, cpus, _ = connect_in_child(ray_tmpdir)
    assert how == "embedded" and cpus == 2.0


def test_unreachable_address_fails_fast_naming_it(monkeypatch):
    """cluster.address 127.0.0.1:1 hung the job in ray.init's retries; it must fail at once, naming the address."""
    import time

    import ray

    from cluster.connect import ClusterUnreachable, check_reachable, connect

    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as in a fresh driver, whatever the suite started
    start = time.monotonic()
    with pytest.raises(ClusterUnreachable, match=r"'127\.0\.0\.1:1'.*nothing answers at 127\.0\.0\.1:1"):
        connect("127.0.0.1:1")
    with pytest.raises(ClusterUnreachable, match="nothing answers"):
        check_reachable("ray://127.0.0.1:1")
    with pytest.raises(ClusterUnreachable, match="port is not a number"):
        check_reachable("127.0.0.1:http")
    assert time.monotonic() - start < 30


def test_quiet_loggers_name_modules_of_the_installed_ray():
    """A logger name that no module of this Ray has (a renamed module) would quiet nothing."""
    import importlib.util

    from cluster.connect import QUIET_LOGGERS

    assert [name for name in QUIET_LOGGERS if importlib.util.find_spec(name) is None] == []


@pytest.mark.parametrize("index", [0, 1])
def test_quiet_loggers_survive_ray_trains_logging_setup(index):
    """Ray Train configures `ray.train` with logging.config.dictConfig in every controller process (and Ray
    reuses worker processes), which sets child loggers back to NOTSET: the cleaner's State-API warnings and
    the autoscaling client's timeouts must stay out anyway, and their errors must still come through."""
    import logging.config

    from cluster.connect import QUIET_LOGGERS, embedded_worker_setup

    logger = logging.getLogger(QUIET_LOGGERS[index])
    saved = logger.level, list(logger.filters), list(logger.handlers), logger.propagate
    seen: list[int] = []
    try:
        embedded_worker_setup()
        embedded_worker_setup()  # a second run (a reused process) adds nothing
        logging.config.dictConfig({"version": 1, "disable_existing_loggers": False,
                                   "loggers": {"ray.train": {"level": "INFO"}}})
        assert logger.level == logging.NOTSET  # what the dictConfig did to the level
        handler = logging.Handler()
        handler.emit = lambda record: seen.append(record.levelno)
        logger.addHandler(handler)
        logger.warning("Failed to query Ray Train Controller actor state.")
        logger.error("a real error")
    finally:
        logger.setLevel(saved[0])
        logger.filters[:], logger.handlers[:], logger.propagate = saved[1], saved[2], saved[3]
        logging.getLogger("ray.train").setLevel(logging.NOTSET)
    assert seen == [logging.ERROR]


SOURCE_TREE_TASKS = """
import ray
from cluster.connect import connect
connect(None, 1)
def where():
    import cluster
    return cluster.__file__
where = ray.remote(max_retries=0)(where)
print("plain task:", ray.get(where.remote(), timeout=120))
# an actor or task with env_vars of its own (cluster.placement's CUDA_VISIBLE_DEVICES) keeps the PYTHONPATH
print("task with env_vars:", ray.get(where.options(runtime_env={"env_vars": {"ZEBRA_PROBE": "1"}}).remote(),
                                     timeout=120))
"""


@pytest.mark.slow
def test_embedded_workers_import_a_source_tree_that_is_not_installed(ray_tmpdir, tmp_path):
    """`python -m jobs.run spec.yaml` from a source tree without `pip install` (a GPU host): the driver imports
    the project from its cwd, and the embedded Ray's workers, started from Ray's own script, must import it too
    (the setup hook cluster.connect.embedded_worker_setup first). The child runs in a venv of its own that sees
    this venv's site-packages through a plain path (.pth) entry, so this project's editable finder is not loaded."""
    import shutil
    import sysconfig

    tree = tmp_path / "tree"
    shutil.copytree(REPO / "cluster", tree / "cluster", ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    site_packages = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    (site_packages / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    python = str(venv / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}
    env["RAY_TMPDIR"] = str(ray_tmpdir)
    premise = subprocess.run([python, "-c", "import importlib.util, ray; print(importlib.util.find_spec('cluster'))"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert premise.stdout.strip() == "None", premise.stdout + premise.stderr[-2000:]  # only the tree has it

    done = subprocess.run([python, "-c", SOURCE_TREE_TASKS], cwd=tree, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    seen = dict(line.split(": ", 1) for line in done.stdout.splitlines() if line.startswith(("plain", "task with")))
    expected = str(tree / "cluster" / "__init__.py")
    assert seen == {"plain task": expected, "task with env_vars": expected}


def test_worker_pythonpath_puts_the_project_first_unless_workers_import_it_already(monkeypatch):
    """The folder of the project's packages goes in front of the driver's PYTHONPATH, kept as it is (an empty
    entry means the cwd); nothing changes where the folder is on PYTHONPATH or is a site-packages folder."""
    import site

    from cluster.connect import worker_pythonpath

    root = str(REPO.resolve())
    monkeypatch.delenv("PYTHONPATH", raising=False)
    assert worker_pythonpath() == root
    monkeypatch.setenv("PYTHONPATH", "/opt/deps::relative")
    assert worker_pythonpath() == f"{root}:/opt/deps::relative"
    monkeypatch.setenv("PYTHONPATH", f"/opt/deps:{root}/")
    assert worker_pythonpath() is None
    monkeypatch.setenv("PYTHONPATH", "/opt/deps")
    monkeypatch.setattr(site, "getsitepackages", lambda: ["/usr/lib/python3/dist-packages", root])
    assert worker_pythonpath() is None
