"""A run with s3:// storage against a real S3 server on loopback (moto in server mode): the stage
markers and models land in the bucket, and a later run without the local scratch (another machine)
resumes from the bucket alone: the finished stages are skipped, KD fetches the ILD students from S3
and writes its model, the export and the report back; a third run does no work.

Runs 1 and 2 are tests/jobs/conftest.py's s3_run_resumed_by_a_job, which test_submit.py shares: run 1
(init, ild, smart) in this process, run 2 (kd and export on) as a `ray job submit` job on a cluster of
its own whose processes have another $ZEBRA_CACHE, so no scratch and no download of run 1's."""
import json
import time

import boto3
import pytest
from transformers import AutoModelForCausalLM

import zebra  # noqa: F401  (registers the zebra model type with AutoModelForCausalLM)
from jobs.run import run
from jobs.spec import load_spec
from tests.jobs.conftest import BUCKET, FIRST, PREFIX, bucket_objects, use_aws_env


@pytest.fixture
def client(s3_run_resumed_by_a_job, monkeypatch, tmp_path):
    """A boto3 client of the run's S3 server; this process has the server's credentials and a fresh $ZEBRA_CACHE."""
    use_aws_env(monkeypatch, tmp_path)
    monkeypatch.setenv("ZEBRA_CACHE", str(tmp_path / "cache"))
    return boto3.client("s3", endpoint_url=s3_run_resumed_by_a_job.endpoint)


def marker(client, stage: str) -> dict:
    body = client.get_object(Bucket=BUCKET, Key=f"{PREFIX}/{stage}/COMPLETE.json")["Body"].read()
    return json.loads(body)


def under(objects: dict, stages) -> dict:
    return {k: v for k, v in objects.items() if k.split("/")[0] in stages}


def download(client, key_prefix: str, dest):
    """Copy the run's folder key_prefix out of the bucket with plain boto3 (not the code under test)."""
    for key in bucket_objects(client):
        if key.startswith(key_prefix + "/"):
            path = dest / key[len(key_prefix) + 1:]
            path.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(BUCKET, f"{PREFIX}/{key}", str(path))
    return dest


def fetched_models(cache) -> list[str]:
    """The run-relative keys of the models S3Storage.fetch_dir downloaded under $ZEBRA_CACHE `cache`."""
    root = cache / "storage" / BUCKET / PREFIX
    return sorted(str(p.parent.relative_to(root)) for p in root.rglob("config.json"))


@pytest.mark.slow
def test_s3_run_writes_the_bucket_and_resumes_from_it(s3_run_resumed_by_a_job, client, tmp_path):
    job = s3_run_resumed_by_a_job
    assert job.submitted.returncode == 0, job.logs[-6000:]  # test_submit.py says more about the job

    # run 1: init, ild, smart; their models and markers went to the bucket
    first = job.first
    for stage in FIRST:
        assert f"{stage}/COMPLETE.json" in first
    for model in ("init/mla", "init/mamba", "ild/mla", "ild/mamba"):
        assert {f"{model}/config.json", f"{model}/model.safetensors", f"{model}/tokenizer.json"} <= set(first), model
    assert not any(k.startswith(("kd/", "export/")) for k in first)
    assert {"report/report.md", "report/smart_scores.png", "report/losses.png"} <= set(first)
    assert job.first_scratch.is_dir()
    infos = {stage: marker(client, stage) for stage in FIRST}
    assert infos["ild"]["loss_after"]["mla"] < infos["ild"]["loss_before"]["mla"]
    assert len(infos["smart"]["mla_layers"]) == 2 and len(infos["smart"]["scores"]) == 4

    # run 2, the job on another "machine": no scratch, no download cache of run 1's; kd and export on
    second = job.second
    assert under(second, FIRST) == under(first, FIRST)  # init, ild, smart skipped: not one object rewritten
    job_scratch = job.job_cache / "runs" / job.spec["name"]
    assert list(job_scratch.glob("_ray/kd-*")) and not list(job_scratch.glob("_ray/ild-*"))  # no ILD training
    assert fetched_models(job.job_cache) == ["ild/mamba", "ild/mla"]  # KD's students came from the bucket
    for stage in ("kd", "export"):
        assert f"{stage}/COMPLETE.json" in second
    assert {"kd/model/config.json", "kd/model/model.safetensors", "export/config.json",
            "export/model.safetensors"} <= set(second)
    kd = marker(client, "kd")
    assert kd["mla_layers"] == infos["smart"]["mla_layers"] and kd["kl_after"] < kd["kl_before"]
    report = job_scratch / "report" / "report.md"
    assert "| kd |" in report.read_text()
    stored_report = client.get_object(Bucket=BUCKET, Key=f"{PREFIX}/report/report.md")["Body"].read().decode()
    assert stored_report == report.read_text()
    model = AutoModelForCausalLM.from_pretrained(download(client, "export", tmp_path / "export"))
    mla = [i for i, kind in enumerate(model.config.mixer_types) if kind == "mla"]
    assert mla == infos["smart"]["mla_layers"]

    # run 3, here: every stage complete in the bucket; nothing but the report is written again
    start = time.perf_counter()
    run(load_spec(job.spec))
    assert time.perf_counter() - start < 30
    third = bucket_objects(client)
    assert {k: v for k, v in third.items() if not k.startswith("report/")} == \
        {k: v for k, v in second.items() if not k.startswith("report/")}
    assert {stage: marker(client, stage) for stage in FIRST} == infos
