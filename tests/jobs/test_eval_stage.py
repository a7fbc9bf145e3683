"""The eval stage's Serve replica: on a GPU where the cluster has one (a replica without GPUs runs on the
CPU, Ray hides the GPUs from it), eval.gpus overrides, and preflight refuses what no node can hold."""
import pytest

from cluster.preflight import ClusterView, job_needs, unplaceable
from jobs.spec import SpecError, load_spec
from jobs.stages.eval import eval_gpus


@pytest.mark.parametrize("setting, cluster, want", [
    (None, {"CPU": 16.0, "GPU": 2.0}, 1.0),
    (None, {"CPU": 16.0, "GPU": 0.5}, 0.0),  # less than a whole GPU free of fractions: stay on the CPU
    (None, {"CPU": 2.0}, 0.0),
    (0.0, {"CPU": 16.0, "GPU": 2.0}, 0.0),
    (0.5, {"CPU": 16.0, "GPU": 2.0}, 0.5),
])
def test_the_replica_takes_a_gpu_where_there_is_one(setting, cluster, want):
    assert eval_gpus(setting, cluster) == want


def test_preflight_refuses_eval_gpus_the_cluster_lacks():
    spec = load_spec({"eval": {"gpus": 2}, "ild": {"enabled": False}, "kd": {"enabled": False},
                      "smart": {"enabled": False}, "student": {"mla_layers": [0]}})
    cpu_only = ClusterView({"CPU": 8.0}, {"CPU": 8.0}, 1)
    problems = unplaceable(job_needs(spec), cpu_only)
    assert len(problems) == 1 and "stage eval" in problems[0] and "eval.gpus (2)" in problems[0]
    default = load_spec({"ild": {"enabled": False}, "kd": {"enabled": False}, "smart": {"enabled": False},
                         "student": {"mla_layers": [0]}})
    assert unplaceable(job_needs(default), cpu_only) == []


def test_negative_eval_gpus_names_the_field():
    with pytest.raises(SpecError, match="eval.gpus"):
        load_spec({"eval": {"gpus": -1}})
