"""A run with s3:// storage against a real S3 server on loopback (moto in server mode): the stage
markers and models land in the bucket, and a later run without the local scratch (another machine)
resumes from the bucket alone: the finished stages are skipped, KD fetches the ILD students from S3
and writes its model, the export and the report back; a third run does no work."""
import json
import shutil
import time

import boto3
import pytest
from moto.server import ThreadedMotoServer
from transformers import AutoModelForCausalLM

import zebra  # noqa: F401  (registers the zebra model type with AutoModelForCausalLM)
from cluster.storage import S3Storage
from jobs.run import run
from jobs.spec import load_spec
from tests.jobs.conftest import spec_dict

BUCKET, PREFIX = "zebra-runs", "team/tiny"
FIRST = ("init", "ild", "smart")  # run 1's stages; runs 2 and 3 must leave their objects alone


@pytest.fixture(scope="module", autouse=True)
def ray_cluster(ray_session):
    yield


@pytest.fixture
def s3(monkeypatch, tmp_path):
    """(endpoint URL, boto3 client) of a moto S3 server on 127.0.0.1 holding an empty bucket."""
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
           "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials")}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)  # the spec's s3_endpoint_url must be what counts
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket=BUCKET)
    yield endpoint, client
    server.stop()


def bucket_objects(client) -> dict[str, tuple[str, object]]:
    """{run-relative key: (ETag, LastModified)} of every object under the run's prefix."""
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=PREFIX + "/")
    return {o["Key"][len(PREFIX) + 1:]: (o["ETag"], o["LastModified"]) for p in pages for o in p.get("Contents", [])}


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


@pytest.mark.slow
def test_s3_run_writes_the_bucket_and_resumes_from_it(teacher_dir, data_file, tmp_path, monkeypatch, s3):
    endpoint, client = s3
    monkeypatch.setenv("ZEBRA_CACHE", str(tmp_path / "cache"))  # S3 downloads and the run's scratch, never ~/.cache
    scratch = tmp_path / "cache" / "runs"
    data = spec_dict(teacher_dir, data_file, f"s3://{BUCKET}/{PREFIX}")
    data["storage"]["s3_endpoint_url"] = endpoint
    for stage in ("ild", "kd"):  # the test is the storage, not the training: 4 steps of one worker
        data[stage].update(workers=1, teacher_mode="inprocess", tokens=4 * 64)
    data["kd"]["enabled"] = data["export"]["enabled"] = False

    # run 1: init, ild, smart; their models and markers go to the bucket
    run(load_spec(data))
    first = bucket_objects(client)
    for stage in FIRST:
        assert f"{stage}/COMPLETE.json" in first
    for model in ("init/mla", "init/mamba", "ild/mla", "ild/mamba"):
        assert {f"{model}/config.json", f"{model}/model.safetensors", f"{model}/tokenizer.json"} <= set(first), model
    assert not any(k.startswith(("kd/", "export/")) for k in first)
    assert "report/report.md" in first
    infos = {stage: marker(client, stage) for stage in FIRST}
    assert infos["ild"]["loss_after"]["mla"] < infos["ild"]["loss_before"]["mla"]
    assert len(infos["smart"]["mla_layers"]) == 2

    # run 2, as on another machine: no scratch, no download cache; kd and export on
    assert (scratch / data["name"]).is_dir()
    shutil.rmtree(tmp_path / "cache")
    fetched = []
    fetch_dir = S3Storage.fetch_dir
    monkeypatch.setattr(S3Storage, "fetch_dir", lambda self, key: fetched.append(key) or fetch_dir(self, key))
    data["kd"]["enabled"] = data["export"]["enabled"] = True
    report = run(load_spec(data))
    second = bucket_objects(client)
    assert under(second, FIRST) == under(first, FIRST)  # init, ild, smart skipped: not one object rewritten
    assert {stage: marker(client, stage) for stage in FIRST} == infos
    assert not list((scratch / data["name"]).glob("_ray/ild-*"))  # no ILD training started
    assert sorted(fetched) == ["ild/mamba", "ild/mla"]  # KD's students came from the bucket
    for stage in ("kd", "export"):
        assert f"{stage}/COMPLETE.json" in second
    assert {"kd/model/config.json", "kd/model/model.safetensors", "export/config.json",
            "export/model.safetensors"} <= set(second)
    kd = marker(client, "kd")
    assert kd["mla_layers"] == infos["smart"]["mla_layers"] and kd["kl_after"] < kd["kl_before"]
    assert "| kd |" in report.read_text()
    stored_report = client.get_object(Bucket=BUCKET, Key=f"{PREFIX}/report/report.md")["Body"].read().decode()
    assert stored_report == report.read_text()
    model = AutoModelForCausalLM.from_pretrained(download(client, "export", tmp_path / "export"))
    mla = [i for i, kind in enumerate(model.config.mixer_types) if kind == "mla"]
    assert mla == infos["smart"]["mla_layers"]

    # run 3: every stage complete in the bucket; nothing but the report is written again
    start = time.perf_counter()
    run(load_spec(data))
    assert time.perf_counter() - start < 30
    third = bucket_objects(client)
    assert {k: v for k, v in third.items() if not k.startswith("report/")} == \
        {k: v for k, v in second.items() if not k.startswith("report/")}
