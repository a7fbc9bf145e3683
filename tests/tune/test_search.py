"""`zebra tune` on a tiny random Llama teacher over the SmolLM2 tokenizer: a search under a KV budget
with early stopping whose best spec passes jobs.run's checks and builds its student; a search
interrupted for real (SIGINT to `python -m tune.search`) that resumes without launching finished
trials again; budgets that nothing meets fail before any work."""
import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
import yaml
from transformers import LlamaConfig

from jobs.run import run
from jobs.spec import load_spec
from tests.jobs.conftest import data_file, teacher_dir  # noqa: F401 (module fixtures)
from tests.jobs.conftest import spec_dict as pipeline_spec_dict
from tune.pareto import pareto_front
from tune.search import main

REPO = Path(__file__).parents[2]
GRID = {"num_mla_layers": [1, 2, 3], "kv_rank": [2, 4, 8], "q_rank": [None, 8], "qk_rope_dim": [4]}
TEACHER_KV_BYTES = 4 * 2 * 2 * 8 * 2  # layers x (K, V) x kv heads x head_dim x bf16
BUDGET = 0.2  # of the teacher's: 51.2 bytes/token


@pytest.fixture(scope="module")
def ray_cluster(ray_session):
    yield


def spec_dict(teacher: Path, data: Path, storage: Path, **tune) -> dict:
    """The pipeline tests' fast spec (tests.jobs.conftest.spec_dict) with the tune section over GRID:
    no student section (the search sets it), ILD and KD 4 steps of one worker, teacher in-process,
    SMART's 5 scorings in one Ray task (two tasks import torch twice on 2 cores)."""
    d = pipeline_spec_dict(teacher, data, storage)
    del d["student"]
    d.update(name="tiny-tune", cluster={"num_cpus": 4})
    d["smart"]["parallel"] = 1
    for stage in ("ild", "kd"):
        d[stage].update(workers=1, teacher_mode="inprocess", tokens=4 * 64)
    d["tune"] = {**GRID, "num_samples": 6, "kv_budget": BUDGET, "memory_budget_gb": 1, "search_alg": "optuna",
                 "steps": 8, "micro_batch": 2, "seq_len": 32, "lr": 3e-3, "eval_every": 2, "grace_period": 1,
                 "max_concurrent_trials": 2, **tune}
    return d


@pytest.fixture(scope="module")
def teacher_config_dir(tmp_path_factory) -> Path:
    """Only the config.json of the tiny teacher: all that the checks before any work read."""
    out = tmp_path_factory.mktemp("teacher-config")
    LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256).save_pretrained(out)
    return out


def write_spec(path: Path, data: dict) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


def nothing_written(storage: Path) -> bool:
    """No file in the run's storage (the preflight may create the empty folder to check it is writable)."""
    return not storage.exists() or not any(p.is_file() for p in storage.rglob("*"))


def kv_bytes(n: int, kv_rank: int, rope: int) -> int:
    return n * (kv_rank + rope) * 2


@pytest.fixture(scope="module")
def searched(ray_cluster, teacher_dir, data_file, tmp_path_factory) -> tuple[dict, Path]:  # noqa: F811
    """A finished search (Optuna, 6 trials): its spec and storage."""
    storage = tmp_path_factory.mktemp("search") / "run"
    data = spec_dict(teacher_dir, data_file, storage)
    start = time.perf_counter()
    assert main([write_spec(storage.parent / "spec.yaml", data)]) == 0
    print(f"search with shared stages: {time.perf_counter() - start:.0f} s")
    return data, storage


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_search_within_budget_stops_early_and_writes_its_outputs(searched):
    storage = searched[1]
    report = json.loads((storage / "tune/trials.json").read_text())
    trials = report["trials"]
    assert len(trials) == 6 and len({t["trial_id"] for t in trials}) == 6
    assert len({t["key"] for t in trials}) == 6  # Optuna's proposals, each arm at most once (tune.distinct)
    assert all(t["status"] == "ok" and t["kl"] > 0 and t["ppl"] > 1 for t in trials), trials
    budget = BUDGET * TEACHER_KV_BYTES
    for t in trials:
        assert t["kv_bytes_per_token"] == kv_bytes(t["num_mla"], t["kv_rank"], t["qk_rope_dim"]) <= budget
        assert len(t["mla_layers"].split(",")) == t["num_mla"]
    over = [c for c in itertools.product(*GRID.values()) if kv_bytes(c[0], c[1], c[3]) > budget]
    assert report["rejected"] == len(over) == len(report["rejected_configurations"]) == 2
    assert any(t["stopped_early"] and t["step"] < 8 for t in trials)
    assert any(not t["stopped_early"] and t["step"] == 8 for t in trials)

    table = (storage / "tune/pareto.md").read_text()
    print(table)
    assert "over the KV budget (never launched): 2" in table
    front = [t for t in trials if t["trial_id"] in report["pareto"]]
    assert front and all(f"{t['kl']:.4f}" in table for t in front)
    assert (storage / "tune/pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"



def finished_reports(search_root: Path, steps: int) -> list[Path]:
    """result.json of the trials that reported their last step."""
    done = []
    for path in search_root.glob("search-*/*/result.json"):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if any(r.get("step") == steps for r in rows):
            done.append(path)
    return done


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_interrupted_search_resumes_without_rerunning_finished_trials(
        searched, teacher_dir, data_file, tmp_path):  # noqa: F811
    from ray.tune import ExperimentAnalysis

    storage = tmp_path / "run"
    for shared in (searched[1] / "tune").glob("shared-rope*"):  # the shared stages are cached by their markers
        shutil.copytree(shared, storage / "tune" / shared.name)
    # 4 trials of 12 steps, two at a time, a report and checkpoint every 4 steps; ASHA's only rung is
    # the last step, so no trial stops early: when the first one finishes, the second is still running
    # or just done and the other two have not finished, so the interruption leaves unfinished trials for
    # the restore to run. (With a rung at step 4, trials 3 and 4 could be stopped there before the first
    # finished: on a slow machine the whole search was over by the time of the SIGINT.)
    steps, samples, every = 12, 4, 4
    spec = write_spec(tmp_path / "spec.yaml", spec_dict(teacher_dir, data_file, storage, search_alg="random",
                                                        steps=steps, eval_every=every, grace_period=steps // every,
                                                        num_samples=samples))
    log = (tmp_path / "first.log").open("w")
    # the search joins this test's Ray (as under `ray job submit`): no second cluster to start on a busy machine
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    proc = subprocess.Popen([sys.executable, "-m", "tune.search", spec], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while not finished_reports(storage / "tune", steps):
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no trial finished in time"
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130, (tmp_path / "first.log").read_text()[-3000:]
    finally:  # a failed wait must not leave the search running (and loading the cores) after the test
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    (experiment,) = (storage / "tune").glob("search-*")
    trials = ExperimentAnalysis(str(experiment)).trials
    finished = {t.trial_id: Path(t.path) for t in trials if t.status == "TERMINATED"}
    print({t.trial_id: t.status for t in trials})
    assert 1 <= len(finished) < samples
    before = {tid: (path / "result.json").read_bytes() for tid, path in finished.items()}

    assert main([spec]) == 0
    report = json.loads((storage / "tune/trials.json").read_text())
    ids = [t["trial_id"] for t in report["trials"]]
    assert len(ids) == len(set(ids)) == samples and set(finished) <= set(ids)
    for tid, path in finished.items():  # a relaunch would have appended reports (with a new pid)
        assert (path / "result.json").read_bytes() == before[tid], f"trial {tid} ran again"
    assert all(t["status"] == "ok" for t in report["trials"])


def test_a_budget_nothing_meets_fails_before_any_work(teacher_config_dir, data_file, tmp_path, capsys):  # noqa: F811
    storage = tmp_path / "run"
    data = spec_dict(teacher_config_dir, data_file, storage, kv_budget=0.01)
    assert main([write_spec(tmp_path / "spec.yaml", data)]) == 2
    err = capsys.readouterr().err
    smallest = kv_bytes(1, 2, 4)  # 1 MLA layer, kv_rank 2, rope 4: 12 bytes/token
    assert "tune.kv_budget" in err and f"{smallest} bytes/token ({smallest / TEACHER_KV_BYTES:.2%}" in err, err
    assert nothing_written(storage)


@pytest.mark.parametrize("change, message", [
    (lambda d: d["tune"].update(memory_budget_gb=0.001), "tune.memory_budget_gb"),
    (lambda d: d["tune"].update(qk_rope_dim=[2, 18]), "tune.qk_rope_dim: [18]"),
    (lambda d: d["tune"].update(num_mla_layers=[2, 5]), "tune.num_mla_layers: [5]"),
    (lambda d: d.pop("tune"), "tune: the spec has no tune section"),
    (lambda d: d["ild"].update(enabled=False), "ild.enabled"),
])
def test_bad_tune_spec_fails_before_any_work(
        teacher_config_dir, data_file, tmp_path, capsys, change, message):  # noqa: F811
    data = spec_dict(teacher_config_dir, data_file, tmp_path / "run")
    change(data)
    assert main([write_spec(tmp_path / "spec.yaml", data)]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert nothing_written(tmp_path / "run")


def test_pareto_front_matches_brute_force():
    rng = random.Random(0)
    rows = [{"kv_fraction": rng.choice([0.1, 0.2, 0.3, 0.4]), "kl": rng.choice([None, 1.0, 2.0, rng.random()])}
            for _ in range(200)]
    scored = [r for r in rows if r["kl"] is not None]

    def dominated(r):
        return any(o["kv_fraction"] <= r["kv_fraction"] and o["kl"] <= r["kl"]
                   and (o["kv_fraction"], o["kl"]) != (r["kv_fraction"], r["kl"]) for o in scored)

    expected = {(r["kv_fraction"], r["kl"]) for r in scored if not dominated(r)}
    front = pareto_front(rows)
    assert [(r["kv_fraction"], r["kl"]) for r in front] == sorted(expected)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_best_spec_passes_the_pipelines_checks_and_builds_its_student(searched):
    """best.yaml is the best trial's shape in a valid pipeline spec: jobs.run takes it (its preflight and
    input checks) and its init stage builds the MLA student at that shape. The later stages are off:
    they would train the students again (tests/jobs/test_pipeline.py runs a whole spec)."""
    storage = searched[1]
    report = json.loads((storage / "tune/trials.json").read_text())
    best = min(report["trials"], key=lambda t: (t["kl"], t["kv_bytes_per_token"]))
    assert report["best"] == best["trial_id"]
    spec = load_spec(storage / "tune/best.yaml")
    st = spec.student
    assert spec.tune is None and spec.name == "tiny-tune-best" and spec.storage.uri == f"{storage}/best"
    assert (st.kv_rank, st.q_rank, st.qk_rope_dim, st.num_mla_layers) == (
        best["kv_rank"], best["q_rank"], best["qk_rope_dim"], best["num_mla"])
    assert all(spec.section(name).enabled for name in ("init", "ild", "smart", "kd", "export"))
    start = time.perf_counter()
    later_off = {f"{name}.enabled": False for name in ("ild", "smart", "kd", "export")}
    layers = [int(i) for i in best["mla_layers"].split(",")]  # with smart off, the spec names them
    assert run(spec.updated({**later_off, "student.mla_layers": layers, "student.num_mla_layers": None})).is_file()
    print(f"best spec through jobs.run's init: {time.perf_counter() - start:.0f} s")
    built = json.loads((storage / "best/init/mla/config.json").read_text())
    assert (built["kv_rank"], built["q_rank"], built["qk_rope_dim"]) == (
        best["kv_rank"], best["q_rank"], best["qk_rope_dim"])
    assert json.loads((storage / "best/init/COMPLETE.json").read_text())["kv_bytes_per_token"]["mla"] == kv_bytes(
        len(built["mixer_types"]), best["kv_rank"], best["qk_rope_dim"])
