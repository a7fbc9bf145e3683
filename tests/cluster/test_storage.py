"""Storage on a local folder and on a real S3 server (moto, on loopback): objects, folders, checkpoints, markers;
a local disk that fills mid-write."""
import collections
import errno
import logging
import os
import pickle
import shutil
import uuid
from pathlib import Path

import boto3
import pytest
from moto.server import ThreadedMotoServer

from cluster.storage import TMP_PREFIX, StorageFull, explain_disk_full, open_storage

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="module")
def s3_endpoint():
    """URL of a moto S3 server on 127.0.0.1 with fake credentials in the environment."""
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    with pytest.MonkeyPatch.context() as mp:
        for name, value in CREDENTIALS.items():
            mp.setenv(name, value)
        mp.delenv("AWS_ENDPOINT_URL", raising=False)
        yield f"http://{host}:{port}"
    server.stop()


def _new_bucket(endpoint: str) -> str:
    name = f"run-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    if request.param == "local":
        return open_storage(str(tmp_path / "run"))
    endpoint = request.getfixturevalue("s3_endpoint")
    return open_storage(f"s3://{_new_bucket(endpoint)}/runs/r1", s3_endpoint_url=endpoint, cache_dir=tmp_path / "cache")


def _write_tree(root, files: dict[str, bytes]):
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def _read_tree(root) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _checkpoint(tmp_path, step: int) -> tuple:
    files = {"model.safetensors": os.urandom(1000 + step), "opt/state.pt": os.urandom(17), "step.txt": str(step).encode()}
    return _write_tree(tmp_path / f"src{step}", files), files


def test_objects_round_trip(storage):
    data = os.urandom(4096)
    storage.write_bytes("a/b.bin", data)
    storage.write_bytes("a/c/d.json", b"{}")
    storage.write_bytes("ab/e", b"x")
    assert storage.read_bytes("a/b.bin") == data
    assert storage.exists("a/b.bin") and not storage.exists("a/zz")
    assert storage.list("a") == ["a/b.bin", "a/c/d.json"]  # a folder prefix: "ab/e" is not under "a"
    assert storage.list() == ["a/b.bin", "a/c/d.json", "ab/e"]
    storage.write_bytes("a/b.bin", b"new")
    assert storage.read_bytes("a/b.bin") == b"new"
    storage.delete_prefix("a")
    assert storage.list() == ["ab/e"]


def test_missing_and_bad_keys_are_named(storage):
    with pytest.raises(FileNotFoundError, match="nothing/here"):
        storage.read_bytes("nothing/here")
    for bad in ("../escape", "a//b", "/abs", ""):
        with pytest.raises(ValueError, match="storage key"):
            storage.write_bytes(bad, b"x")
    with pytest.raises(ValueError, match="whole run root"):
        storage.delete_prefix("")


def test_upload_download_dir_round_trip(storage, tmp_path):
    files = {"config.json": b'{"a": 1}', "weights/part-0.bin": os.urandom(3000), "weights/deep/x": b""}
    storage.upload_dir(_write_tree(tmp_path / "model", files), "init/mla")
    assert _read_tree(storage.download_dir("init/mla", tmp_path / "copy")) == files
    assert _read_tree(storage.fetch_dir("init/mla")) == files
    storage.upload_dir(_write_tree(tmp_path / "model2", {"only.txt": b"1"}), "init/mla")  # replaces the folder
    assert storage.list("init") == ["init/mla/only.txt"]
    with pytest.raises(FileNotFoundError, match="no folder 'init/none'"):
        storage.download_dir("init/none", tmp_path / "x")


def test_latest_checkpoint_is_the_newest_complete_one(storage, tmp_path):
    assert storage.latest_checkpoint("kd") is None
    saved = {}
    for step in (10, 20):
        src, saved[step] = _checkpoint(tmp_path, step)
        storage.save_checkpoint("kd", step, src)
    step, path = storage.latest_checkpoint("kd")
    assert step == 20 and _read_tree(path) == saved[20]


def test_checkpoint_without_manifest_is_ignored(storage, tmp_path):
    """A writer that died after uploading files but before the manifest leaves an untrusted checkpoint."""
    storage.save_checkpoint("ild", 100, _checkpoint(tmp_path, 100)[0])
    src, _ = _checkpoint(tmp_path, 200)
    storage.upload_dir(src, "ild/ckpt/00000200")  # the crash: files written, manifest never
    step, path = storage.latest_checkpoint("ild")
    assert step == 100 and _read_tree(path) == _read_tree(tmp_path / "src100")


def test_checkpoint_not_matching_its_manifest_is_ignored(storage, tmp_path):
    storage.save_checkpoint("ild", 1, _checkpoint(tmp_path, 1)[0])
    storage.save_checkpoint("ild", 2, _checkpoint(tmp_path, 2)[0])
    storage.write_bytes("ild/ckpt/00000002/model.safetensors", b"truncated")
    assert storage.latest_checkpoint("ild")[0] == 1
    storage._delete("ild/ckpt/00000001/step.txt")
    assert storage.latest_checkpoint("ild") is None


def test_keep_last_k_and_orphans_pruned(storage, tmp_path):
    storage.upload_dir(_checkpoint(tmp_path, 0)[0], "kd/ckpt/00000000")  # an orphan from a crash
    for step in (1, 2, 3, 4, 5):
        storage.save_checkpoint("kd", step, _checkpoint(tmp_path, step)[0], keep=2)
    heads = sorted({k.split("/")[2] for k in storage.list("kd/ckpt")})
    assert heads == ["00000004", "00000004.done", "00000005", "00000005.done"]
    assert storage.latest_checkpoint("kd")[0] == 5


def test_resave_same_step_replaces_files(storage, tmp_path):
    storage.save_checkpoint("kd", 7, _write_tree(tmp_path / "a", {"old.bin": b"1", "w": b"22"}))
    storage.save_checkpoint("kd", 7, _write_tree(tmp_path / "b", {"w": b"333"}))
    step, path = storage.latest_checkpoint("kd")
    assert step == 7 and _read_tree(path) == {"w": b"333"}


def test_completion_markers(storage):
    assert not storage.is_complete("smart")
    with pytest.raises(FileNotFoundError, match="smart/COMPLETE.json"):
        storage.stage_info("smart")
    info = {"mla_layers": [0, 5, 9], "kv_bytes_per_token": 1536, "score": 0.25}
    storage.mark_complete("smart", info)
    assert storage.is_complete("smart") and storage.stage_info("smart") == info
    with pytest.raises(TypeError, match="stage 'kd'"):
        storage.mark_complete("kd", {"x": object()})
    assert not storage.is_complete("kd")


def test_missing_bucket_is_named(s3_endpoint):
    with pytest.raises(FileNotFoundError, match="bucket 'no-such-bucket'.*does not exist"):
        open_storage("s3://no-such-bucket/run", s3_endpoint_url=s3_endpoint)


def test_endpoint_from_environment_and_pickling(s3_endpoint, monkeypatch, tmp_path):
    bucket = _new_bucket(s3_endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    store = open_storage(f"s3://{bucket}/p", cache_dir=tmp_path)
    store.write_bytes("k", b"v")
    assert pickle.loads(pickle.dumps(store)).read_bytes("k") == b"v"  # what a Ray task receives
    assert boto3.client("s3", endpoint_url=s3_endpoint).get_object(Bucket=bucket, Key="p/k")["Body"].read() == b"v"


def test_unknown_scheme_and_file_uri(tmp_path):
    with pytest.raises(ValueError, match="'gs'"):
        open_storage("gs://bucket/run")
    store = open_storage(f"file://{tmp_path}/run")
    store.write_bytes("x/y", b"1")
    assert (tmp_path / "run" / "x" / "y").read_bytes() == b"1" and store.local_path("x/y") == tmp_path / "run/x/y"


Usage = collections.namedtuple("Usage", "total used free")  # what shutil.disk_usage returns


def _fill_disk_after(monkeypatch, name: str, nbytes: int, free: int) -> None:
    """shutil.<name> (copyfile or the like: (src, dst, ...)) writes nbytes of src, then fails as a full disk
    does; shutil.disk_usage then reports `free` bytes."""
    def full(src, dst, *args, **kwargs):
        Path(dst).write_bytes(Path(src).read_bytes()[:nbytes])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))

    monkeypatch.setattr(shutil, name, full)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10 * 2**30, 10 * 2**30 - free, free))


def _partials(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(TMP_PREFIX)]


def test_a_full_disk_names_the_checkpoint_and_keeps_the_last_complete_one(tmp_path, monkeypatch):
    storage = open_storage(str(tmp_path / "run"))
    storage.save_checkpoint("kd", 1, _checkpoint(tmp_path, 1)[0])
    _fill_disk_after(monkeypatch, "copyfile", nbytes=100, free=3 * 2**20)
    with pytest.raises(StorageFull) as caught:
        storage.save_checkpoint("kd", 2, _checkpoint(tmp_path, 2)[0])
    message = str(caught.value)
    assert str(tmp_path / "run" / "kd" / "ckpt" / "00000002") in message, message
    assert "3.0 MiB free" in message and "storage.uri" in message, message
    assert caught.value.errno == errno.ENOSPC and caught.value.__cause__.errno == errno.ENOSPC
    monkeypatch.undo()
    assert _partials(tmp_path / "run") == []  # the half-copied folder is gone
    step, path = storage.latest_checkpoint("kd")
    assert step == 1 and _read_tree(path) == _read_tree(tmp_path / "src1")


def test_a_full_disk_leaves_the_old_object_whole(tmp_path, monkeypatch):
    storage = open_storage(str(tmp_path / "run"))
    storage.write_bytes("kd/COMPLETE.json", b'{"old": 1}')
    real = Path.write_bytes

    def full(self, data):
        real(self, data[:3])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_bytes", full)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(2**30, 2**30, 0))
    with pytest.raises(StorageFull, match=r"writing .*kd/COMPLETE.json: 0 bytes free there now; free space"):
        storage.mark_complete("kd", {"new": 2})
    monkeypatch.undo()
    assert storage.stage_info("kd") == {"old": 1} and _partials(tmp_path / "run") == []


def test_only_enospc_is_explained(tmp_path):
    with pytest.raises(PermissionError) as caught:
        with explain_disk_full(tmp_path):
            raise PermissionError(errno.EACCES, "denied")
    assert type(caught.value) is PermissionError
    with pytest.raises(StorageFull, match="Errno 28.*set TMPDIR") as caught:  # errno kept; a caller's fix
        with explain_disk_full(tmp_path / "not" / "yet", "set TMPDIR"):
            raise OSError(errno.ENOSPC, "Error writing bytes to file")
    assert str(tmp_path / "not" / "yet") in str(caught.value)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("free, explained", [(0, True), (20 * 2**30, False)])
def test_torch_save_on_a_full_disk_is_explained_though_it_has_no_errno(tmp_path, monkeypatch, free, explained):
    """torch.save (DeepSpeed's checkpoint shards) into /dev/full, which fails every write with ENOSPC, raises a
    RuntimeError without an errno: StorageFull when the disk has almost no free bytes, the error itself when it
    has plenty (then the cause is something else)."""
    import torch

    monkeypatch.setattr(shutil, "disk_usage", lambda path: collections.namedtuple("U", "total used free")(
        30 * 2**30, 30 * 2**30 - free, free))
    with pytest.raises(RuntimeError if not explained else StorageFull) as caught:
        with explain_disk_full(tmp_path / "ckpt", "set TMPDIR"):
            torch.save({"w": torch.zeros(1 << 16)}, "/dev/full")
    if explained:
        message = str(caught.value)
        assert f"writing {tmp_path / 'ckpt'} (RuntimeError: " in message and "0 bytes free there now; set TMPDIR" in message
        assert isinstance(caught.value.__cause__, RuntimeError) and caught.value.errno == errno.ENOSPC
    else:
        assert type(caught.value) is RuntimeError
