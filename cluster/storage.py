"""Run storage: one key space over a local folder or an S3 prefix, with atomic checkpoints and stage markers.

Keys are '/'-separated paths relative to the run's root; a *prefix* names a folder of keys (so
`delete_prefix("kd/ckpt/00000010")` never touches `kd/ckpt/00000010.done`). Layout of a run:

    <stage>/ckpt/<step:08d>/...      a checkpoint folder
    <stage>/ckpt/<step:08d>.done     its manifest {"stage", "step", "files": {relpath: bytes}}, written last
    <stage>/COMPLETE.json            the stage's completion marker (its info dict), written last

A reader trusts a checkpoint only when its manifest exists and every listed file is present with
the listed size, so a writer that dies mid-upload leaves a checkpoint `latest_checkpoint` skips.
One writer per stage (rank 0); any number of readers.

A full disk: a local write that fails with ENOSPC leaves no partial object or folder behind and
raises StorageFull (explain_disk_full), whose message names the path, the bytes free there now
and the fix (free space, or storage.uri on a larger disk).
"""
from __future__ import annotations

import abc
import contextlib
import errno
import json
import logging
import os
import shutil
import uuid
from pathlib import Path

import boto3
import botocore.exceptions

from zebra.paths import cache_root

log = logging.getLogger(__name__)

CKPT = "ckpt"
MANIFEST_SUFFIX = ".done"
COMPLETE = "COMPLETE.json"
TMP_PREFIX = ".tmp-"  # local partial writes; never listed
DEFAULT_KEEP = 3
SPACE_FIX = ("free space on that disk, or point storage.uri in the job spec at a folder on a larger one (with "
             "s3:// storage the run's local scratch is under $ZEBRA_CACHE: point that at a larger disk)")


class StorageFull(OSError):
    """A write failed for want of disk space (errno ENOSPC); the message names the path, the bytes free
    there now and what to change. The OSError it replaces is its __cause__."""


def free_bytes(path: str | Path) -> int:
    """Bytes this user may still write on the filesystem holding path (or its nearest existing parent)."""
    folder = Path(path).expanduser().absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def fmt_bytes(n: int) -> str:
    """Bytes for messages: 2.46 GiB, 12.0 MiB, 512 bytes."""
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n} bytes"


NEARLY_FULL = 64 * 2**20  # free bytes below which a write error without an errno is put down to the disk


@contextlib.contextmanager
def explain_disk_full(path: str | Path, fix: str = SPACE_FIX):
    """Run the body; an OSError ENOSPC from it becomes StorageFull naming path (what the body writes),
    the bytes free on its filesystem now, and `fix`. So does a RuntimeError while less than NEARLY_FULL
    bytes are free there: torch.save (DeepSpeed's checkpoint shards) reports a full disk without an errno
    ("[enforce fail at inline_container.cc] ... unexpected pos", "PytorchStreamWriter failed writing file").
    Other errors pass unchanged."""
    try:
        yield
    except StorageFull:
        raise
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        raise _storage_full(path, "", fix) from e
    except RuntimeError as e:  # torch.save's full disk: no errno, so the free space decides
        if _free_or_inf(path) >= NEARLY_FULL:
            raise
        raise _storage_full(path, f" ({type(e).__name__}: {str(e).splitlines()[0][:160]})", fix) from e


def _storage_full(path: str | Path, what: str, fix: str) -> StorageFull:
    return StorageFull(errno.ENOSPC, f"No space left on device writing {path}{what}: {fmt_bytes(free_bytes(path))} "
                                     f"free there now; {fix}")


def _free_or_inf(path: str | Path) -> float:
    """free_bytes(path), or infinity where the filesystem cannot say (the error then stands as it is)."""
    try:
        return free_bytes(path)
    except OSError:
        return float("inf")


def open_storage(uri: str, s3_endpoint_url: str | None = None, cache_dir: str | Path | None = None) -> Storage:
    """Storage for a local folder (plain path or file://) or `s3://bucket/prefix`.

    s3_endpoint_url: an S3-compatible server (MinIO, moto, ...); default $AWS_ENDPOINT_URL, else AWS.
    cache_dir: where S3 downloads land; default $ZEBRA_CACHE/storage/<bucket>/<prefix>.
    """
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return LocalStorage(Path(uri))
    if scheme == "file":
        return LocalStorage(Path(rest))
    if scheme == "s3":
        return S3Storage(uri, s3_endpoint_url, cache_dir)
    raise ValueError(f"storage URI {uri!r}: unknown scheme {scheme!r}; use a local path, file:// or s3://")


def _key(key: str, prefix: bool = False) -> str:
    """Validated key ('' allowed for a prefix: the run root). Rejects keys that could escape the root."""
    norm = key.strip("/") if prefix else key
    if norm == "":
        if prefix:
            return ""
        raise ValueError("storage key is empty")
    parts = norm.split("/")
    if any(p in ("", ".", "..") or "\\" in p for p in parts):
        raise ValueError(f"storage key {key!r}: use '/'-separated names without '', '.', '..' or '\\'")
    return norm


def _join(prefix: str, rel: str) -> str:
    return f"{prefix}/{rel}" if prefix else rel


def _dir_sizes(local_dir: str | Path) -> dict[str, int]:
    """{posix relative path: bytes} of every file under local_dir, sorted; the folder must hold files."""
    root = Path(local_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"local folder {root} does not exist")
    sizes = {p.relative_to(root).as_posix(): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}
    if not sizes:
        raise ValueError(f"local folder {root} holds no files")
    return sizes


def _ckpt_prefix(stage: str, step: int) -> str:
    if step < 0:
        raise ValueError(f"checkpoint step must be >= 0, got {step}")
    return f"{_key(stage, prefix=True)}/{CKPT}/{step:08d}"


def fetch_uri(uri: str, endpoint_url: str | None = None) -> Path:
    """A fresh local copy of s3://bucket/key under $ZEBRA_CACHE/data/s3/bucket/key: the object itself,
    or every object under the folder `key`. The one S3 reader for inputs (a corpus): zebra reads
    only local paths. Raises FileNotFoundError naming the URI when nothing is there."""
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    key = key.strip("/")
    store = S3Storage(f"s3://{bucket}", endpoint_url, cache_dir=cache_root() / "data" / "s3" / bucket)
    if key and store.exists(key):
        dest = store.local_path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(store.read_bytes(key))
        return dest
    try:
        return store.fetch_dir(key)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{uri}: no such object, and no objects under it") from e


class Storage(abc.ABC):
    """Backend primitives (abstract) plus checkpoints and completion markers built on them."""

    uri: str

    @abc.abstractmethod
    def write_bytes(self, key: str, data: bytes) -> None:
        """Write (replace) one object; readers see the old or the new bytes, never a part."""

    @abc.abstractmethod
    def read_bytes(self, key: str) -> bytes:
        """The object's bytes; FileNotFoundError naming the URI and key when absent."""

    @abc.abstractmethod
    def exists(self, key: str) -> bool:
        """Whether the object exists."""

    @abc.abstractmethod
    def _sizes(self, prefix: str) -> dict[str, int]:
        """{root-relative key: bytes} of every object under the folder prefix."""

    @abc.abstractmethod
    def _delete(self, key: str) -> None:
        """Remove one object if present."""

    @abc.abstractmethod
    def delete_prefix(self, prefix: str) -> None:
        """Remove every object under the folder prefix (not the run root)."""

    @abc.abstractmethod
    def upload_dir(self, local_dir: str | Path, key_prefix: str) -> None:
        """Replace the folder key_prefix by the files of local_dir."""

    @abc.abstractmethod
    def download_dir(self, key_prefix: str, local_dir: str | Path) -> Path:
        """Copy the folder key_prefix into local_dir (created); returns local_dir."""

    @abc.abstractmethod
    def local_path(self, key: str) -> Path:
        """Where the key lives on this machine: the file itself (local) or its place in the cache (S3)."""

    @abc.abstractmethod
    def fetch_dir(self, key_prefix: str) -> Path:
        """A local folder holding the folder key_prefix: itself (local), or a fresh download (S3)."""

    def list(self, prefix: str = "") -> list[str]:
        """Sorted root-relative keys under the folder prefix ('' = the whole run)."""
        return sorted(self._sizes(prefix))

    def save_checkpoint(self, stage: str, step: int, local_dir: str | Path, keep: int = DEFAULT_KEEP) -> str:
        """Store local_dir as checkpoint `step` of `stage`, manifest last; keep the newest `keep`. Returns its prefix."""
        if keep < 1:
            raise ValueError(f"keep must be >= 1 checkpoints, got {keep}")
        files = _dir_sizes(local_dir)
        prefix = _ckpt_prefix(stage, step)
        self._delete(prefix + MANIFEST_SUFFIX)  # a re-save must never leave the old manifest over new files
        self.upload_dir(local_dir, prefix)
        manifest = {"stage": stage, "step": step, "files": files}
        self.write_bytes(prefix + MANIFEST_SUFFIX, json.dumps(manifest, indent=1).encode())
        log.info("saved checkpoint %s/%s (%d files)", self.uri, prefix, len(files))
        self._prune(stage, keep)
        return prefix

    def latest_checkpoint(self, stage: str) -> tuple[int, Path] | None:
        """(step, local folder) of the newest complete checkpoint of stage, or None; incomplete ones are skipped."""
        manifests, _, sizes = self._ckpt_index(stage)
        for step in sorted(manifests, reverse=True):
            prefix = _ckpt_prefix(stage, step)
            if self._verified(prefix, sizes):
                return step, self.fetch_dir(prefix)
            log.warning("checkpoint %s/%s does not match its manifest; skipping it", self.uri, prefix)
        return None

    def mark_complete(self, stage: str, info: dict) -> None:
        """Record that stage finished; call after all its outputs are written. info must be JSON-serialisable."""
        try:
            data = json.dumps(info, indent=1, sort_keys=True).encode()
        except TypeError as e:
            raise TypeError(f"stage {stage!r}: completion info is not JSON-serialisable ({e})") from e
        self.write_bytes(_join(_key(stage, prefix=True), COMPLETE), data)

    def is_complete(self, stage: str) -> bool:
        return self.exists(_join(_key(stage, prefix=True), COMPLETE))

    def stage_info(self, stage: str) -> dict:
        """The info given to mark_complete; FileNotFoundError naming the marker when stage is not complete."""
        return json.loads(self.read_bytes(_join(_key(stage, prefix=True), COMPLETE)))

    def _ckpt_index(self, stage: str) -> tuple[set[int], set[int], dict[str, int]]:
        """(steps with a manifest, steps with a folder, sizes of everything under <stage>/ckpt)."""
        root = f"{_key(stage, prefix=True)}/{CKPT}"
        sizes = self._sizes(root)
        manifests, folders = set(), set()
        for key in sizes:
            head, sep, _ = key[len(root) + 1 :].partition("/")
            name = head.removesuffix(MANIFEST_SUFFIX)
            if not (len(name) == 8 and name.isdigit()):
                continue
            if sep:
                folders.add(int(name))
            elif head.endswith(MANIFEST_SUFFIX):
                manifests.add(int(name))
        return manifests, folders, sizes

    def _verified(self, prefix: str, sizes: dict[str, int]) -> bool:
        files = json.loads(self.read_bytes(prefix + MANIFEST_SUFFIX))["files"]
        return bool(files) and all(sizes.get(f"{prefix}/{rel}") == n for rel, n in files.items())

    def _prune(self, stage: str, keep: int) -> None:
        """Drop all but the newest `keep` manifested checkpoints and any older folder without a manifest."""
        manifests, folders, _ = self._ckpt_index(stage)
        kept = sorted(manifests)[-keep:]
        for step in sorted(manifests | folders):
            if step in kept or step > kept[-1]:
                continue
            prefix = _ckpt_prefix(stage, step)
            self._delete(prefix + MANIFEST_SUFFIX)  # manifest first: a crash here leaves no trusted partial
            self.delete_prefix(prefix)
            log.info("pruned checkpoint %s/%s", self.uri, prefix)


class LocalStorage(Storage):
    """A folder; writes go to a temporary sibling first and are moved in place with os.replace."""

    def __init__(self, root: Path):
        self.root = root.expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.uri = str(self.root)

    def local_path(self, key: str) -> Path:
        return self.root / _key(key, prefix=True)

    def _tmp_sibling(self, path: Path) -> Path:
        return path.parent / f"{TMP_PREFIX}{path.name}-{uuid.uuid4().hex[:8]}"

    @contextlib.contextmanager
    def _writing(self, path: Path):
        """A temporary sibling of path to write, moved onto path when the body ends; removed on failure."""
        tmp = self._tmp_sibling(path)
        try:
            with explain_disk_full(path):
                path.parent.mkdir(parents=True, exist_ok=True)
                yield tmp
        except BaseException:
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, path)

    def write_bytes(self, key: str, data: bytes) -> None:
        with self._writing(self.root / _key(key)) as tmp:
            tmp.write_bytes(data)

    def read_bytes(self, key: str) -> bytes:
        path = self.root / _key(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError) as e:
            raise FileNotFoundError(f"{self.uri}: no object {key!r} ({path})") from e

    def exists(self, key: str) -> bool:
        return (self.root / _key(key)).is_file()

    def _sizes(self, prefix: str) -> dict[str, int]:
        base = self.local_path(prefix)
        sizes = {}
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(TMP_PREFIX))
            for name in filenames:
                if not name.startswith(TMP_PREFIX):
                    path = Path(dirpath) / name
                    sizes[path.relative_to(self.root).as_posix()] = path.stat().st_size
        return sizes

    def _delete(self, key: str) -> None:
        (self.root / _key(key)).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> None:
        if _key(prefix, prefix=True) == "":
            raise ValueError(f"{self.uri}: refusing to delete the whole run root; name a folder")
        shutil.rmtree(self.local_path(prefix), ignore_errors=True)

    def upload_dir(self, local_dir: str | Path, key_prefix: str) -> None:
        files = _dir_sizes(local_dir)  # names a missing or empty folder
        dest = self.root / _key(key_prefix)
        with self._writing(dest) as tmp:
            for rel in files:  # file by file, not copytree: that turns an ENOSPC into a shutil.Error without errno
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(Path(local_dir) / rel, tmp / rel)
            if dest.exists():
                shutil.rmtree(dest)

    def download_dir(self, key_prefix: str, local_dir: str | Path) -> Path:
        src = self.fetch_dir(key_prefix)
        shutil.copytree(src, local_dir, dirs_exist_ok=True, ignore=shutil.ignore_patterns(TMP_PREFIX + "*"))
        return Path(local_dir)

    def pyarrow_location(self, key_prefix: str):
        """(path, None) of a folder for Ray Train/Tune's storage_path (None: the default filesystem)."""
        return str(self.local_path(key_prefix).resolve()), None

    def fetch_dir(self, key_prefix: str) -> Path:
        path = self.local_path(key_prefix)
        if not path.is_dir():
            raise FileNotFoundError(f"{self.uri}: no folder {key_prefix!r} ({path})")
        return path


class S3Storage(Storage):
    """An S3 prefix through boto3. Objects are written whole by PUT, so a reader never sees part of one."""

    def __init__(self, uri: str, endpoint_url: str | None = None, cache_dir: str | Path | None = None):
        bucket, _, prefix = uri.removeprefix("s3://").partition("/")
        if not bucket:
            raise ValueError(f"storage URI {uri!r} names no bucket; use s3://bucket/prefix")
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.uri = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self.endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
        self.cache_dir = Path(cache_dir) if cache_dir else cache_root() / "storage" / bucket / self.prefix
        self.client = boto3.client("s3", endpoint_url=self.endpoint_url)
        self._check_bucket()

    def __reduce__(self):  # boto3 clients do not pickle; Ray tasks get a fresh client
        return S3Storage, (self.uri, self.endpoint_url, self.cache_dir)

    def _where(self) -> str:
        return f"bucket {self.bucket!r} at {self.endpoint_url or 'AWS'}"

    @contextlib.contextmanager
    def _errors(self, key: str):
        """Re-raise S3 failures as OSErrors that name the URI and key."""
        try:
            yield
        except botocore.exceptions.ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            msg = f"{self.uri}: {key!r}: {code} {e.response.get('Error', {}).get('Message', '')}".rstrip()
            if code in ("NoSuchKey", "404", "NotFound"):
                raise FileNotFoundError(msg) from e
            if code == "NoSuchBucket":
                raise FileNotFoundError(f"{self.uri}: {self._where()} does not exist; create it") from e
            if code in ("AccessDenied", "403", "Forbidden"):
                raise PermissionError(msg) from e
            raise OSError(msg) from e
        except botocore.exceptions.NoCredentialsError as e:
            raise PermissionError(f"{self.uri}: no AWS credentials (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)") from e
        except botocore.exceptions.EndpointConnectionError as e:
            raise ConnectionError(f"{self.uri}: cannot reach the S3 endpoint of {self._where()} ({e})") from e

    def _check_bucket(self) -> None:
        try:
            with self._errors(""):
                self.client.head_bucket(Bucket=self.bucket)
        except FileNotFoundError as e:  # head_bucket says only "404" for a missing bucket
            raise FileNotFoundError(f"{self.uri}: {self._where()} does not exist; create it") from e

    def _full(self, key: str) -> str:
        return _join(self.prefix, _key(key))

    def _folder(self, prefix: str) -> str:
        """The S3 prefix of the folder, ending in '/' (or the root prefix itself)."""
        rel = _key(prefix, prefix=True)
        full = _join(self.prefix, rel) if rel else self.prefix
        return full + "/" if full else ""

    def local_path(self, key: str) -> Path:
        return self.cache_dir / _key(key, prefix=True)

    def write_bytes(self, key: str, data: bytes) -> None:
        with self._errors(key):
            self.client.put_object(Bucket=self.bucket, Key=self._full(key), Body=data)

    def read_bytes(self, key: str) -> bytes:
        with self._errors(key):
            return self.client.get_object(Bucket=self.bucket, Key=self._full(key))["Body"].read()

    def exists(self, key: str) -> bool:
        try:
            with self._errors(key):
                self.client.head_object(Bucket=self.bucket, Key=self._full(key))
        except FileNotFoundError:
            return False
        return True

    def _sizes(self, prefix: str) -> dict[str, int]:
        folder, root = self._folder(prefix), self._folder("")
        sizes = {}
        with self._errors(prefix):
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=folder):
                sizes.update({o["Key"][len(root) :]: o["Size"] for o in page.get("Contents", [])})
        return sizes

    def _delete(self, key: str) -> None:
        with self._errors(key):
            self.client.delete_object(Bucket=self.bucket, Key=self._full(key))

    def delete_prefix(self, prefix: str) -> None:
        if _key(prefix, prefix=True) == "":
            raise ValueError(f"{self.uri}: refusing to delete the whole run root; name a folder")
        keys = [self._full(k) for k in self._sizes(prefix)]
        with self._errors(prefix):
            for i in range(0, len(keys), 1000):  # the DeleteObjects limit
                batch = [{"Key": k} for k in keys[i : i + 1000]]
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})

    def upload_dir(self, local_dir: str | Path, key_prefix: str) -> None:
        files = _dir_sizes(local_dir)
        self.delete_prefix(key_prefix)
        for rel in files:
            key = _join(_key(key_prefix), rel)
            with self._errors(key):
                self.client.upload_file(str(Path(local_dir) / rel), self.bucket, self._full(key))

    def download_dir(self, key_prefix: str, local_dir: str | Path) -> Path:
        sizes = self._sizes(key_prefix)
        if not sizes:
            raise FileNotFoundError(f"{self.uri}: no folder {key_prefix!r}")
        folder = _key(key_prefix, prefix=True)
        start = len(folder) + 1 if folder else 0
        for key in sorted(sizes):
            dest = Path(local_dir) / key[start:]
            dest.parent.mkdir(parents=True, exist_ok=True)
            with self._errors(key):
                self.client.download_file(self.bucket, self._full(key), str(dest))
        return Path(local_dir)

    def pyarrow_location(self, key_prefix: str):
        """(path, pyarrow filesystem or None) of a folder for Ray Train/Tune's storage_path: s3://... with
        AWS's endpoint, else bucket/prefix on a pyarrow S3FileSystem at this storage's endpoint."""
        if self.endpoint_url is None:
            return f"{self.uri}/{_key(key_prefix, prefix=True)}".rstrip("/"), None
        from pyarrow import fs

        path = f"{self.bucket}/{self._folder(key_prefix)}".rstrip("/")
        return path, fs.S3FileSystem(endpoint_override=self.endpoint_url)

    def fetch_dir(self, key_prefix: str) -> Path:
        dest = self.local_path(key_prefix)
        shutil.rmtree(dest, ignore_errors=True)  # a stale copy may hold files the new one lacks
        return self.download_dir(key_prefix, dest)
