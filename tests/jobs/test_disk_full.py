"""A disk that fills: the checkpoint writes of the training recipe (jobs.train) raise StorageFull naming the
folder, its free bytes and the fix, and the driver surfaces it from Ray Train's worker errors; jobs.run warns
before the stages start when the checkpoints it estimates (checkpoint_bytes) would not fit. No Ray: fakes
stand in for the DeepSpeed engine and Ray Train's report, shutil.disk_usage is monkeypatched."""
import collections
import errno
import logging
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from ray.train import WorkerGroupError
from ray.train.v2._internal.exceptions import UserExceptionWithTraceback

import jobs.run
from cluster.storage import StorageFull, open_storage
from jobs.context import Context
from jobs.run import OPTIMIZER_BYTES, WEIGHT_BYTES, checkpoint_bytes, warn_if_short_of_space
from jobs.spec import load_spec
from jobs.train import Session, _report_checkpoint, disk_full_cause
from tests.conftest import tiny_llama_config
from zebra.convert import hybrid_config
from zebra.modeling import ZebraForCausalLM

Usage = collections.namedtuple("Usage", "total used free")  # what shutil.disk_usage returns
ENOSPC = OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device")  # pyarrow's


def full_disk(monkeypatch, free: int) -> None:
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(100 * 2**30, 100 * 2**30 - free, free))


class Engine:
    """DeepSpeed's engine as _report_checkpoint uses it: save_checkpoint writes a shard, then may hit a full disk."""

    def __init__(self, full: bool):
        self.full, self.folders = full, []

    def save_checkpoint(self, folder, tag, client_state):
        self.folders.append(folder)
        (Path(folder) / tag).mkdir()
        (Path(folder) / tag / "mp_rank_00_model_states.pt").write_bytes(b"x" * 1000)
        if self.full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def session(tmp_path, report) -> Session:
    return Session(rank=0, world=1, device=torch.device("cpu"), get_checkpoint=lambda: None, report=report,
                   storage_dir=str(tmp_path / "run" / "_ray" / "kd-abc"))


def test_a_full_staging_disk_names_the_folder_and_tmpdir(tmp_path, monkeypatch):
    full_disk(monkeypatch, free=0)
    engine, reports = Engine(full=True), []
    with pytest.raises(StorageFull) as caught:
        _report_checkpoint(engine, {"step": 4}, session(tmp_path, lambda m, d: reports.append(d)), final=False)
    message = str(caught.value)
    assert f"writing {engine.folders[0]}: 0 bytes free there now" in message and "TMPDIR" in message, message
    assert isinstance(caught.value.__cause__, OSError) and reports == []  # nothing reported: nothing to resume
    assert not Path(engine.folders[0]).exists()  # the partial staging folder is removed


def test_a_full_storage_disk_names_the_run_folder_and_storage_uri(tmp_path, monkeypatch):
    full_disk(monkeypatch, free=5 * 2**20)

    def report(metrics, folder):
        raise ENOSPC

    with pytest.raises(StorageFull) as caught:
        _report_checkpoint(Engine(full=False), {"step": 4}, session(tmp_path, report), final=False)
    message = str(caught.value)
    assert f"writing {tmp_path / 'run' / '_ray' / 'kd-abc'}: 5.0 MiB free there now" in message, message
    assert "point storage.uri in the job spec at a folder on a larger one" in message
    assert caught.value.__cause__ is ENOSPC


def test_the_driver_finds_the_disk_full_error_among_the_workers():
    full = StorageFull(errno.ENOSPC, "No space left on device writing /runs/demo/_ray: 0 bytes free there now; ...")
    failures = {0: UserExceptionWithTraceback(RuntimeError("gloo: connection closed"), "tb 0"),
                1: UserExceptionWithTraceback(full, "tb 1")}
    error = pickle.loads(pickle.dumps(WorkerGroupError("two workers failed", failures)))  # as Ray hands it over
    found = disk_full_cause(error)
    assert isinstance(found, StorageFull) and str(found) == str(full)
    assert disk_full_cause(WorkerGroupError("one", {0: failures[0]})) is None
    assert disk_full_cause(ValueError("not a training error")) is None


def test_main_prints_the_disk_full_error_without_a_traceback(monkeypatch, capsys):
    message = "No space left on device writing /runs/demo/_ray/kd-1: 0 bytes free there now; free space"
    monkeypatch.setattr(jobs.run, "load_spec", lambda path: None)

    def run(spec):
        raise StorageFull(errno.ENOSPC, message)

    monkeypatch.setattr(jobs.run, "run", run)
    assert jobs.run.main(["spec.yaml"]) == 2
    assert capsys.readouterr().err == f"error: [Errno 28] {message}\n"


def small_spec(storage, keep: int = 2, **sections) -> object:
    spec = {"name": "tiny", "storage": {"uri": str(storage), "keep_checkpoints": keep},
            "student": {"kv_rank": 8, "qk_rope_dim": 4, "num_mla_layers": 2},
            "ild": {"workers": 1, "micro_batch": 1, "seq_len": 32, "tokens": 10 * 32, "checkpoint_every": 4},
            "kd": {"workers": 1, "micro_batch": 1, "seq_len": 32, "tokens": 4 * 32, "checkpoint_every": 4}}
    for name, fields in sections.items():
        spec.setdefault(name, {}).update(fields)
    return load_spec(spec)


def student_sizes(teacher_config) -> tuple[int, int, int]:
    """(parameters of both pure students, of their mixers, of the smaller student), counted on real models."""
    n = teacher_config.num_hidden_layers
    models = [ZebraForCausalLM(hybrid_config(teacher_config, layers, 8, 4)) for layers in (list(range(n)), [])]
    total = [sum(p.numel() for p in m.parameters()) for m in models]
    mixers = sum(p.numel() for m in models for name, p in m.named_parameters() if ".mixer." in name)
    return sum(total), mixers, min(total)


def test_checkpoint_estimate_counts_weights_optimizer_states_and_kept_checkpoints(tmp_path):
    teacher = tiny_llama_config()
    both, mixers, smaller = student_sizes(teacher)
    spec = small_spec(tmp_path)  # ild: 10 steps, checkpoints at 4, 8, 10: 2 kept; kd: 4 steps, 1 checkpoint
    need = checkpoint_bytes(spec, teacher, ["init", "ild", "smart", "kd", "dpo", "export", "eval"])
    assert need == {"ild": 2 * (WEIGHT_BYTES * both + OPTIMIZER_BYTES * mixers),
                    "kd": 1 * (WEIGHT_BYTES + OPTIMIZER_BYTES) * smaller}
    assert checkpoint_bytes(small_spec(tmp_path, keep=1), teacher, ["kd"]) == {"kd": need["kd"]}  # ild done
    with_dpo = checkpoint_bytes(small_spec(tmp_path, dpo={"enabled": True, "tokens": 8 * 64, "checkpoint_every": 1,
                                                          "micro_batch": 1, "seq_len": 32, "workers": 1}),
                                teacher, ["dpo"])
    assert with_dpo == {"dpo": 2 * (WEIGHT_BYTES + OPTIMIZER_BYTES) * smaller}  # 8 steps written, 2 kept


def context(tmp_path, spec) -> Context:
    teacher_dir = tmp_path / "teacher"
    tiny_llama_config().save_pretrained(teacher_dir)
    storage = open_storage(spec.storage.uri)
    return Context(storage=storage, scratch=storage.local_path(""), teacher_dir=str(teacher_dir), local_storage=True,
                   num_mla=2)


def test_preflight_warns_when_the_estimate_exceeds_the_free_space(tmp_path, monkeypatch, caplog):
    spec = small_spec(tmp_path / "run")
    ctx = context(tmp_path, spec)
    need = checkpoint_bytes(spec, tiny_llama_config(), ["ild", "kd"])
    full_disk(monkeypatch, free=sum(need.values()) - 1)
    with caplog.at_level(logging.WARNING, logger="jobs.run"):
        warn_if_short_of_space(spec, ctx)
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    message = record.getMessage()
    assert f"storage.uri {str(tmp_path / 'run')!r}: {tmp_path / 'run'} has" in message, message
    assert "ild checkpoints" in message and "kd checkpoints" in message and "No space left on device" in message
    assert message.endswith("free space there or point storage.uri at a larger disk")
    caplog.clear()
    full_disk(monkeypatch, free=need["kd"])  # enough once ild is done: its checkpoints are on the disk already
    ctx.storage.mark_complete("ild", {"hash": spec.section_hash("ild")})
    warn_if_short_of_space(spec, ctx)
    assert caplog.records == []
    full_disk(monkeypatch, free=need["kd"] - 1)
    warn_if_short_of_space(spec, ctx)
    assert "ild checkpoints" not in caplog.text and "kd checkpoints" in caplog.text
