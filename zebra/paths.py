"""Where Zebra keeps its caches, and how a source string is read: a local path or a hub id.

    cache_root()          $ZEBRA_CACHE, else ~/.cache/zebra: converted teachers, token caches, S3
                          downloads (cluster.storage) and the scratch folders of S3-stored runs (jobs.run)
    file_sha256(path)     the hex sha256 of a file's bytes, once per process and file version: what the caches
                          key content by (the converted teacher, serve.eval's results)
    looks_local(source)   True for a path, False for a hub id ("org/name"): the one rule the teacher,
                          the data and the job spec use to tell them apart
"""
from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

# A source with one of these suffixes is a file, never a hub id.
LOCAL_SUFFIXES = (".txt", ".json", ".jsonl", ".parquet", ".gguf", ".xz", ".gz", ".bz2", ".zst")


def cache_root() -> Path:
    """$ZEBRA_CACHE, else ~/.cache/zebra (read at each call, so a changed environment takes effect)."""
    return Path(os.environ.get("ZEBRA_CACHE", Path.home() / ".cache" / "zebra"))


def file_sha256(path: str | Path) -> str:
    """The hex sha256 of the file's bytes (~0.2 s per 100 MB), computed once per process for each version
    (path, size, mtime) of the file."""
    st = os.stat(path)
    return _sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@functools.cache
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def looks_local(source: str) -> bool:
    """A path rather than a hub id: it exists, or it is spelled like a path (starts with / . ~, has a
    file suffix, or has more than one "/": hub ids are "name" or "org/name")."""
    path = Path(source).expanduser()
    return (path.exists() or source.startswith(("/", ".", "~")) or path.suffix in LOCAL_SUFFIXES
            or source.count("/") > 1)
